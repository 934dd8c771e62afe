"""Write a bundle directory atomically: build in a temporary sibling, rename at the end.

An interrupted or failed build never leaves a half bundle at the output path:
everything is written to ``.<name>.tmp-<pid>-*`` next to it (same filesystem,
so the final ``rename`` is atomic) and removed on any failure. A build killed
outright (SIGKILL) cannot clean up: the next build of the same output removes
what it left (``sweep_stale``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from edge_runtime._files import check_can_make_dir, dirs_for_work, remove_moved_aside, replace_dir
from edge_runtime.bundle import MANIFEST_NAME, STAMP_NAME, sha256_file, write_stamp
from edge_runtime.cache import publish_dir
from edge_runtime.errors import BuildError

__all__ = ["check_replaceable", "staging_dir", "sweep_stale", "save_model_external", "hash_files", "write_manifest",
           "check_free_space"]

_ALIGN = 4096  # page-aligned tensors let onnxruntime map the weights file instead of copying it
_INLINE_MAX_BYTES = 1024
# what a bundle directory holds (see edge_runtime.bundle)
_BUNDLE_FILES = frozenset({MANIFEST_NAME, STAMP_NAME, "model.onnx", "model.onnx.data", "tokenizer.json"})


# a stamp's temporary file, left by a verification killed while it rewrote the stamp (see edge_runtime.bundle)
_STAMP_LEFTOVER = re.compile(rf"\.{re.escape(STAMP_NAME)}\.[0-9a-z]+\.tmp")


def check_replaceable(out: Path, *, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``, and even then unless it holds nothing but bundle files.

    ``--force`` replaces a bundle: a directory of something else (or a file)
    given as ``--out`` by mistake must not be deleted with it.
    """
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise BuildError(f"{out} already exists (use --force to replace it)")
    if out.is_symlink() or not out.is_dir():
        raise BuildError(f"{out} is not a directory: --force only replaces a bundle directory")
    # a bundle, a damaged one (a file missing) or an empty directory; anything else is someone's data
    # (a web project has a manifest.json too, so the names of all the entries are checked, that they are
    # files, and that a manifest.json is a bundle's)
    foreign = sorted(p.name for p in out.iterdir()
                     if (p.name not in _BUNDLE_FILES and not _STAMP_LEFTOVER.fullmatch(p.name))
                     or p.is_symlink() or not p.is_file())
    if not foreign and (out / MANIFEST_NAME).exists():
        try:
            manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = None  # unreadable: a damaged bundle's, which --force may replace
        ours = manifest is None or (isinstance(manifest, dict) and "schema_version" in manifest and "files" in manifest)
        if not ours:
            foreign = [f"a {MANIFEST_NAME} that is not a bundle's"]
    if foreign:
        raise BuildError(f"{out} is not a bundle (it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                         "--force only replaces a bundle; choose another --out")


def _pid_alive(pid: int) -> bool:
    import psutil  # not os.kill(pid, 0): on Windows signal 0 is CTRL_C_EVENT, sent to that process, not a probe

    return psutil.pid_exists(pid)


def sweep_stale(out: Path) -> list[Path]:
    """Remove the staging directories of builds of ``out`` that were killed (SIGKILL leaves no time to clean up).

    A staging directory is named ``.<name>.tmp-<pid>-*`` after the process that writes it; one whose
    process is gone is stale. Returns what was removed.
    """
    removed = []
    for entry in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # "m[1]" is a name, not a pattern
        pid = entry.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    # an old bundle a --force rebuild moved aside and was killed before removing (it is put back when the build is
    # stopped any other way): it was left beside the new one for good
    return removed + remove_moved_aside(out)


@contextlib.contextmanager
def staging_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds."""
    out = out.absolute()
    check_replaceable(out, force=force)
    with contextlib.ExitStack() as stack:
        try:  # the --out parents it makes are removed again when the build fails (its quality gate, a signal)
            stack.enter_context(dirs_for_work(out.parent))
        except OSError as err:  # a file where a directory should be, no permission
            raise BuildError(f"cannot create {out.parent} for --out: {err.strerror or err}") from err
        sweep_stale(out)
        prefix = f".{out.name}.tmp-{os.getpid()}-"
        tmp: Path | None = None
        try:
            try:
                tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
            except OSError as err:  # a read-only directory: named as given, not as the hidden staging path
                raise BuildError(f"cannot write {out}: {err.strerror or err}") from err
            yield tmp
            publish_dir(tmp)  # mkdtemp makes it owner-only; a bundle is read by other users too
            # what appeared at out during the build (another build's bundle, someone's directory) is checked as it
            # was before it, once the new bundle is flushed (seconds on an SD card): without --force nothing is
            # replaced. The old bundle or the whole new one is at out, whatever stops this (see replace_dir)
            replace_dir(tmp, out, may_replace=lambda target: check_replaceable(target, force=force))
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise BuildError(f"no space left on the device while writing {out}") from err
            raise BuildError(f"cannot write {out}: {err.strerror or err}") from err
        finally:
            # a signal (SIGTERM unwinds as SystemExit) between mkdtemp's mkdir and the assignment leaves tmp unset
            # with the directory made (the SIGTERM test hit that window on a loaded machine): what this process's
            # mkdtemp made under the prefix is this build's
            made = [tmp] if tmp is not None else list(out.parent.glob(glob.escape(prefix) + "*"))
            for path in made:
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)


def check_writable(out: Path) -> None:
    """Fail before the long load when ``out`` cannot be written (a read-only directory, a file in the way), naming
    ``out``; makes nothing (a build refused for its source left the --out parents it had made)."""
    try:
        check_can_make_dir(out.parent)
    except OSError as err:
        raise BuildError(f"cannot write {out} (--out): {err.strerror or err}") from err


def check_free_space(directory: Path, needed_bytes: int) -> None:
    existing = next(p for p in (directory, *directory.parents) if p.is_dir())  # the one the build will fill
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise BuildError(f"not enough disk space in {directory}: the build needs about {needed_bytes >> 20} MB, {free >> 20} MB free")


def save_model_external(model: onnx.ModelProto, directory: Path, name: str = "model.onnx") -> list[str]:
    """Save the graph with its large tensors in ``<name>.data`` at page-aligned offsets; return the file names."""
    data_name = f"{name}.data"
    offset = 0
    with (directory / data_name).open("wb") as fh:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) <= _INLINE_MAX_BYTES:
                continue
            pad = (-offset) % _ALIGN
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            raw = tensor.raw_data
            fh.write(raw)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    with (directory / name).open("wb") as fh:
        fh.write(model.SerializeToString())
    return [name, data_name]


def hash_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """SHA-256 and size of each file, as the manifest lists them."""
    return {name: {"sha256": sha256_file(directory / name), "size": (directory / name).stat().st_size} for name in sorted(names)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` and the fast-verification stamp for the files it lists."""
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    write_stamp(directory, manifest["files"])


def save_tokenizer(tokenizer: Any, path: Path, *, add_bos_token: bool) -> None:
    """Write the fast tokenizer's tokenizer.json, its post-processor agreeing with ``add_bos_token``, with no
    truncation or padding.

    The engine adds the BOS itself, by the manifest; a program that loads the bundle with the tokenizers library
    alone gets what the post-processor adds. transformers' GGUF loader gives SmolLM2's one that adds its BOS,
    ``<|im_start|>``, which its GGUF says not to add: the BOS is dropped from the post-processor's templates then.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # a source saved with truncation or padding on would cut or pad every prompt of a program reading the bundle
    spec["truncation"] = spec["padding"] = None
    post = spec.get("post_processor")
    bos = getattr(tokenizer, "bos_token", None)
    if not add_bos_token and bos and isinstance(post, dict) and post.get("type") == "TemplateProcessing":
        for key in ("single", "pair"):
            if isinstance(post.get(key), list):
                post[key] = [piece for piece in post[key] if (piece.get("SpecialToken") or {}).get("id") != bos]
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")

