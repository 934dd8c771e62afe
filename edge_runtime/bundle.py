"""Model bundles: a directory an edge device can load with onnxruntime and tokenizers alone.

Layout::

    BUNDLE/
      manifest.json      schema version, architecture, sizes, tokens, chat template,
                         quantization, source hash, SHA-256 + size of every file,
                         quality report, tool versions
      model.onnx         graph (weights in external data)
      model.onnx.data    weights, 4 KiB-aligned so onnxruntime can map them
      tokenizer.json     Hugging Face tokenizers format
      stamp.json         size + mtime of the big files at build time (fast verification)

Verification modes: ``full`` hashes every file; ``fast`` (the engine's default)
hashes every file except those whose size and mtime still match the build
stamp; ``none`` checks that every listed file is a regular file of its listed
size. In every mode the graph may read weights only from files the manifest lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ._files import write_text_whole
from .errors import BundleError, BundleNotFoundError, BundleVerificationError, InvalidRequestError

__all__ = [
    "MANIFEST_NAME",
    "STAMP_NAME",
    "SCHEMA_VERSION",
    "Manifest",
    "load_manifest",
    "verify_bundle",
    "sha256_file",
    "read_small_file",
    "write_stamp",
    "VerifyMode",
]

MANIFEST_NAME = "manifest.json"
STAMP_NAME = "stamp.json"
SCHEMA_VERSION = 1
VerifyMode = Literal["full", "fast", "none"]

# files at least this large may skip hashing in fast mode when the build stamp matches
_FAST_SKIP_MIN_BYTES = 16 << 20
# manifest fields that describe the build, not what the bundle answers (``files`` enters the hash by its hashes): a
# bundle built again from a renamed copy of its source, or under another name, answers as before
_NOT_HASHED = frozenset({"files", "created_at", "tools", "quality", "source", "name"})
# quantization settings newer than the bundle hash: unset (false, None) they describe every earlier build, so a
# rebuild of the same weights keeps its hash (its cached runs, its estimators, the bridge's revision)
_ADDED_LATER = frozenset({"int4_symmetric"})
# a manifest is a few kB (the chat template is its largest part); anything near this is not one
_MAX_MANIFEST_BYTES = 16 << 20


@dataclass(frozen=True)
class Manifest:
    """Typed view of ``manifest.json``; ``raw`` keeps every field."""

    path: Path
    raw: dict[str, Any]

    @property
    def bundle_dir(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return str(self.raw.get("name", self.bundle_dir.name))

    @property
    def architecture(self) -> str:
        return str(self.raw["architecture"])

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.raw["model"])

    @property
    def context_length(self) -> int:
        return int(self.raw["model"]["context_length"])

    @property
    def precision(self) -> str:
        return str(self.raw["quantization"]["precision"])

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(t) for t in self.raw["tokens"]["eos_token_ids"]]

    @property
    def bos_token_id(self) -> int | None:
        bos = self.raw["tokens"].get("bos_token_id")
        return int(bos) if bos is not None else None

    @property
    def add_bos_token(self) -> bool:
        return bool(self.raw["tokens"].get("add_bos_token", False))

    @property
    def chat_template(self) -> str | None:
        return self.raw.get("chat_template")

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.raw["files"])

    @property
    def model_file(self) -> Path:
        return self.bundle_dir / self.raw.get("model_file", "model.onnx")

    @property
    def tokenizer_file(self) -> Path:
        return self.bundle_dir / self.raw.get("tokenizer_file", "tokenizer.json")

    @property
    def io_schema(self) -> str:
        return str(self.raw.get("io_schema", ""))

    @property
    def bundle_hash(self) -> str:
        """A hash identifying what the bundle answers: every file's hash and the manifest's own settings.

        The manifest holds the chat template and the BOS/EOS tokens, which change the answers as much as the
        weights do: a bundle whose template was edited (or rebuilt after its source's template changed) must not be
        answered from the old one's cached runs, nor get its estimator. Left out: its name, its source's file, when
        it was built, with which tool versions, the quantization method's description and its quality report, which
        describe the build and change no answer (the weights are in the files' hashes)."""
        h = hashlib.sha256(self.legacy_bundle_hash.encode())
        settings = {k: v for k, v in self.raw.items() if k not in _NOT_HASHED}
        if isinstance(settings.get("quantization"), dict):  # its "method" is prose a later version may reword
            settings["quantization"] = {k: v for k, v in settings["quantization"].items()
                                        if k != "method" and not (k in _ADDED_LATER and not v)}
        h.update(json.dumps(settings, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode())
        return h.hexdigest()

    @property
    def legacy_bundle_hash(self) -> str:
        """The per-file hashes alone: the bundle hash of earlier versions of edge-runtime, which estimator files
        calibrated with them record (see ``confidence.check_bundle_hash``)."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode())
            h.update(str(self.files[name]["sha256"]).encode())
        return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_small_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes; OSError for anything else or more than ``limit`` bytes.

    Opened without blocking (opening a FIFO for reading waits for a writer) and checked before it is
    read (/dev/zero never ends).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path.name} is larger than {limit:,} bytes")
    return data


def _short(err: BaseException) -> str:
    return "nested too deeply" if isinstance(err, RecursionError) else str(err)


def load_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read and sanity-check ``manifest.json`` (no hashing; see :func:`verify_bundle`)."""
    root = Path(bundle_dir)
    if not root.is_dir():
        # a file given for a bundle exists: "not found" sent the user looking for a typo
        raise BundleNotFoundError(f"{root} is not a directory (a bundle is a directory with manifest.json)"
                                  if root.exists() else f"bundle directory not found: {root}")
    path = root / MANIFEST_NAME
    _check_inside(root.resolve(), path, MANIFEST_NAME)  # the manifest is what the bundle answers by (its template, tokens, hashes)
    try:
        raw = json.loads(read_small_file(path, _MAX_MANIFEST_BYTES).decode("utf-8"))
    except FileNotFoundError as err:
        raise BundleNotFoundError(f"{root} is not a bundle: no {MANIFEST_NAME}") from err
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested past Python's stack
        raise BundleVerificationError(f"{path} is not valid JSON: {_short(err)}", file=MANIFEST_NAME) from err
    except OSError as err:  # a directory or a device where the file should be, no permission, too large
        raise BundleVerificationError(f"cannot read {path}: {err.strerror or err}", file=MANIFEST_NAME) from err
    if not isinstance(raw, dict):
        raise BundleVerificationError(f"{path}: expected a JSON object", file=MANIFEST_NAME)
    version = raw.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # true == 1.0 == 1 in Python, not in a schema
        raise BundleError(f"{path}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
    for key in ("architecture", "model", "tokens", "quantization", "files"):
        if key not in raw:
            raise BundleVerificationError(f"{path}: missing field {key!r}", file=MANIFEST_NAME)
    _check_manifest_fields(raw, path)
    return Manifest(path=path, raw=raw)


# what the runtime reads from a manifest's sections, so a hand-edited or damaged
# manifest fails verification naming the field rather than as a KeyError at load
# files a graph may read its weights from (this project writes <model_file>.data)
_WEIGHT_SUFFIXES = frozenset({".data", ".onnx_data"})
_REQUIRED_INTS = {"model": ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "context_length")}


def _check_manifest_fields(raw: dict[str, Any], path: Path) -> None:
    def bad(field: str, what: str) -> BundleVerificationError:
        return BundleVerificationError(f"{path}: field {field!r} {what}", file=MANIFEST_NAME)

    for section in ("model", "tokens", "quantization", "files"):
        if not isinstance(raw[section], dict):
            raise bad(section, "must be an object")
    for section, keys in _REQUIRED_INTS.items():
        for key in keys:
            value = raw[section].get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(f"{section}.{key}", f"must be a positive integer, got {value!r}")
    vocab = raw["model"]["vocab_size"]

    def token_id(t: Any) -> bool:  # onnxruntime's Gather would not fail on an id past the vocabulary: it reads zeros
        return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab

    eos = raw["tokens"].get("eos_token_ids")
    if not isinstance(eos, list) or not all(token_id(t) for t in eos):
        raise bad("tokens.eos_token_ids", f"must be a list of token ids below model.vocab_size {vocab}, got {eos!r}")
    if not eos:  # nothing would end an answer: every chat answer would run to its length, inventing new turns
        raise bad("tokens.eos_token_ids", "must name at least one token that ends an answer, got []")
    bos = raw["tokens"].get("bos_token_id")
    if bos is not None and not token_id(bos):
        raise bad("tokens.bos_token_id", f"must be a token id below model.vocab_size {vocab} or null, got {bos!r}")
    if not isinstance(raw["tokens"].get("add_bos_token", False), bool):
        raise bad("tokens.add_bos_token", "must be true or false")
    if raw.get("chat_template") is not None and not isinstance(raw["chat_template"], str):
        raise bad("chat_template", "must be a Jinja2 template string or null")
    for name in raw["files"]:
        if not _plain_name(name):
            raise bad("files", f"lists {name!r}, which is not a file name inside the bundle")
    for key, default in (("model_file", "model.onnx"), ("tokenizer_file", "tokenizer.json")):
        name = raw.get(key, default)
        if not isinstance(name, str) or not _plain_name(name):
            raise bad(key, "must be a file name")
        if isinstance(raw["files"], dict) and name not in raw["files"]:
            # the listed files are all that verification checks: an unlisted model would load unchecked
            raise bad("files", f"must list {name}")
    if not isinstance(raw["quantization"].get("precision"), str):
        raise bad("quantization.precision", "must be a string")
    for name, info in raw["files"].items():
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(info.get("sha256"), str):
            raise bad(f"files.{name}", "must be an object with size and sha256")
        if not re.fullmatch(r"[0-9a-f]{64}", info["sha256"]):  # else a damaged manifest reads as a damaged file
            raise bad(f"files.{name}.sha256", f"must be 64 lowercase hex digits, got {info['sha256'][:80]!r}")
    # the weights beside the graph too (onnxruntime opens whatever external data file the graph names);
    # dotfiles are not weights (macOS leaves ._model.onnx.data copies on FAT and SMB volumes)
    try:
        unlisted = sorted(p.name for p in path.parent.iterdir() if p.suffix in _WEIGHT_SUFFIXES
                          and not p.name.startswith(".") and p.name not in raw["files"] and p.is_file())
    except OSError:  # a directory that cannot be listed: the listed files are still checked
        unlisted = []
    if unlisted:
        raise bad("files", f"must list {unlisted[0]}: a weights file it does not list would load unchecked")


def _check_inside(real_root: Path, path: Path, name: str) -> None:
    """Refuse a symbolic link out of the bundle (``real_root``, resolved): onnxruntime refuses one for weights (after verification said OK),
    and a tokenizer or manifest was read from wherever it pointed, which whoever may write there could change."""
    try:
        inside = path.resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13): reading the file says so
        return
    if not inside:
        raise BundleVerificationError(f"{name}: a symbolic link to a file outside the bundle", file=name)


def _plain_name(name: str) -> bool:
    """A relative path to a file below the bundle: not empty, "." or "..", absolute, or holding a NUL."""
    parts = Path(name).parts
    return (bool(name) and "\x00" not in name and not Path(name).is_absolute() and ".." not in parts
            and bool(parts) and parts[-1] not in (".", ""))


# The ONNX messages (by their field numbers in onnx.proto) that lead from the model to a TensorProto, whose
# ``external_data`` (13) entries name the file its data is read from (key "location"): every place a tensor can be,
# in the graph, its nodes' attributes (subgraphs of If and Loop too), sparse tensors, functions and training graphs
_ONNX_PATHS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}


class _NotOnnx(ValueError):
    pass


def _varint(data: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise _NotOnnx("a varint runs past its message")


def _fields(data: Any, start: int, end: int) -> Any:
    """(field number, start, end) of each length-delimited field of the protobuf message in ``data[start:end]``."""
    pos = start
    while pos < end:
        key = data[pos]
        key, pos = (key, pos + 1) if key < 0x80 else _varint(data, pos, end)  # one byte: the usual case, inlined
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length = data[pos] if pos < end else 0x80
            length, pos = (length, pos + 1) if length < 0x80 else _varint(data, pos, end)
            if pos + length > end:
                raise _NotOnnx("a field runs past its message")
            yield key >> 3, pos, pos + length
            pos += length
        else:  # groups: not in ONNX
            raise _NotOnnx(f"wire type {wire}")
    if pos != end:
        raise _NotOnnx("a field runs past its message")


def _graph_data_files(model_path: Path) -> set[str]:
    """The external data files the graph names (onnxruntime opens them, whatever the manifest lists).

    Read by walking the protobuf encoding along :data:`_ONNX_PATHS`, without an ONNX parser in the base install;
    fields may come in any order and varints need not be minimal (a byte search for ``location`` missed an entry
    written value first, which onnxruntime reads all the same). The graph file is mapped, not read.
    Raises ValueError for a file that is not protobuf.
    """
    names: set[str] = set()
    with model_path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return names
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            stack = [("model", 0, len(data))]
            while stack:
                kind, start, end = stack.pop()
                if kind == "entry":
                    key = value = None
                    for number, a, b in _fields(data, start, end):
                        if number == 1:
                            key = bytes(data[a:b])
                        elif number == 2:
                            value = bytes(data[a:b])
                    if key == b"location" and value is not None:
                        names.add(os.path.normpath(value.decode("utf-8", "replace")))
                    continue
                paths = _ONNX_PATHS[kind]
                stack.extend((paths[number], a, b) for number, a, b in _fields(data, start, end) if number in paths)
    return names


def write_stamp(bundle_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """Record size and mtime of the large files so fast verification can skip re-hashing them."""
    stamp = {}
    for name in files:
        st = (bundle_dir / name).stat()
        stamp[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": files[name]["sha256"]}
    _save_stamp(bundle_dir, stamp)


def _save_stamp(bundle_dir: Path, stamp: dict[str, Any]) -> None:
    """Write ``stamp.json`` whole or not at all (a half-written stamp would only mean hashing again), through a
    temporary file of a random name created anew: the pid's name, written through, let whoever could write in the
    bundle (a group-shared cache) plant a symlink there and have verification overwrite the file it pointed at."""
    write_text_whole(bundle_dir / STAMP_NAME, json.dumps(stamp, indent=1) + "\n")


def _read_stamp(bundle_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_small_file(bundle_dir / STAMP_NAME, 1 << 20))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):  # a damaged stamp only means hashing again
        return {}


def verify_bundle(bundle_dir: str | os.PathLike[str], mode: VerifyMode = "full") -> Manifest:
    """Check every file listed in the manifest; raise BundleVerificationError naming the first bad one."""
    if mode not in get_args(VerifyMode):
        raise InvalidRequestError(f"must be one of {', '.join(get_args(VerifyMode))}, got {mode!r}", field="verify")
    manifest = load_manifest(bundle_dir)
    root = manifest.bundle_dir
    stamp = _read_stamp(root) if mode == "fast" else {}
    hashed: dict[str, dict[str, Any]] = {}  # large files fast mode hashed again: the stamp is brought up to date
    real_root = root.resolve()
    for name, info in sorted(manifest.files.items()):
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleVerificationError(f"manifest lists a file outside the bundle: {name}", file=name)
        _check_inside(real_root, path, name)
        try:
            st = path.stat()
        except FileNotFoundError as err:
            raise BundleVerificationError(f"{name}: missing from {root}", file=name) from err
        except OSError as err:
            raise BundleVerificationError(f"{name}: cannot read it: {err.strerror or err}", file=name) from err
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the hashing, a device never end it
            raise BundleVerificationError(f"{name}: not a regular file", file=name)
        if st.st_size != int(info["size"]):
            raise BundleVerificationError(f"{name}: size {st.st_size} does not match the manifest ({info['size']})", file=name)
        if mode == "none":
            continue
        s = stamp.get(name)
        if (
            mode == "fast"
            and st.st_size >= _FAST_SKIP_MIN_BYTES
            and isinstance(s, dict)
            and s.get("size") == st.st_size
            and s.get("mtime_ns") == st.st_mtime_ns
            and s.get("sha256") == info["sha256"]
        ):
            continue
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise BundleVerificationError(f"{name}: SHA-256 mismatch (file changed or damaged)", file=name)
        after = path.stat()
        if mode == "fast" and st.st_size >= _FAST_SKIP_MIN_BYTES and (after.st_size, after.st_mtime_ns) == (
                st.st_size, st.st_mtime_ns):  # not written to while it was hashed
            hashed[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": info["sha256"]}
    # the graph may name a weights file the manifest does not list (any name, not only *.data): it would load unchecked
    try:
        unlisted = sorted(_graph_data_files(manifest.model_file) - set(map(os.path.normpath, manifest.files)))
    except (OSError, ValueError) as err:
        why = f"not an ONNX graph ({err})" if isinstance(err, ValueError) else str(err)
        raise BundleVerificationError(f"cannot read {manifest.model_file}: {why}", file=manifest.raw.get(
            "model_file", "model.onnx")) from err
    if unlisted:
        raise BundleVerificationError(f"{manifest.path}: field 'files' must list {unlisted[0]}: the graph reads "
                                      "weights from it, which would load unchecked", file=MANIFEST_NAME)
    if hashed:
        _refresh_stamp(root, {**stamp, **hashed})
    return manifest


def _refresh_stamp(root: Path, stamp: dict[str, Any]) -> None:
    """Write the build stamp again after fast verification hashed files it did not match (a copied bundle, whose
    mtimes are new): otherwise every later load hashes them again. A read-only bundle keeps its stamp."""
    with contextlib.suppress(OSError):
        _save_stamp(root, stamp)
