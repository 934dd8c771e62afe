"""Load a checkpoint (GGUF file or Hugging Face directory) into a ModelSpec + weights.

transformers reads both: for GGUF it dequantizes every tensor to float (it needs
the ``gguf`` package), so one code path serves both kinds of source and the
PyTorch model doubles as the fp32 reference for the quality report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import sha256_file
from edge_runtime.errors import BuildError, UnsupportedModelError

from .graph import LayerWeights, ModelSpec, ModelWeights

__all__ = ["SUPPORTED_ARCHITECTURES", "LoadedSource", "check_source", "load_source"]

log = logging.getLogger(__name__)

# model_type -> whether q/k/v projections carry a bias
SUPPORTED_ARCHITECTURES = {"llama": False, "qwen2": True, "mistral": False}

GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedSource:
    model: Any  # transformers PreTrainedModel, fp32, eval mode
    tokenizer: Any  # transformers fast tokenizer
    spec: ModelSpec
    weights: ModelWeights
    kind: str  # "gguf" or "hf"
    path: Path
    source_sha256: str
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    name: str


def _dir_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# Upper bounds on the dimensions that size allocations, by transformers' config name: (GGUF key after the
# architecture, bound). Each is past the models this builder is for (edge SLMs) and past the largest published ones
# (126 layers, 128 heads, head_dim 256, a 16k-wide hidden state, 53k-wide MLPs, 262k-token vocabularies, and a
# few long-context fine-tunes of 4M positions), so only a damaged or hostile header reaches one: a 2**31-1
# context_length made the RoPE tables ask for 137 GB (8M positions ask ~2 GB), and a block_count of 100,000
# kept transformers building layers for minutes.
_DIMENSION_LIMITS: dict[str, tuple[str, int]] = {
    "max_position_embeddings": ("context_length", 1 << 23),
    "num_hidden_layers": ("block_count", 1024),
    "num_attention_heads": ("attention.head_count", 1024),
    "num_key_value_heads": ("attention.head_count_kv", 1024),
    "head_dim": ("rope.dimension_count", 1024),
    "hidden_size": ("embedding_length", 1 << 16),
    "intermediate_size": ("feed_forward_length", 1 << 18),
    "vocab_size": ("vocab_size", 1 << 21),
}


def _check_dimension_limits(values: Mapping[str, object], where: Callable[[str], str]) -> None:
    """Refuse a dimension past its bound in ``_DIMENSION_LIMITS``; ``values`` holds them by transformers' config
    name, ``where(name)`` names one as the source spells it."""
    for name, (_, limit) in _DIMENSION_LIMITS.items():
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            # a size written as 1e9 or "64" is no size: transformers would carry it into the build, past the bound
            raise BuildError(f"{where(name)} is {value!r:.40}: not an integer (a damaged file?)")
        if isinstance(value, int) and value > limit:
            raise BuildError(f"{where(name)} is {value}: more than the {limit} this builder accepts "
                             "(a damaged file?)")


# the fewest bytes a checkpoint directory stores a parameter in (fp16/bf16 take 2; 4-bit formats 0.5)
_MIN_BYTES_PER_PARAMETER = 0.25


def _declared_parameters(values: Mapping[str, object]) -> int:
    """The parameters the dimensions in ``values`` (by transformers' config names) make at least: the embedding table
    and each layer's projections (norms and biases left out)."""
    def dim(name: str) -> int:
        value = values.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    hidden, heads = dim("hidden_size"), dim("num_attention_heads")
    kv_heads = dim("num_key_value_heads") or heads
    head_dim = dim("head_dim") or (hidden // heads if heads else 0)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o, k and v
    return dim("vocab_size") * hidden + dim("num_hidden_layers") * (attention + 3 * hidden * dim("intermediate_size"))


def _check_stored_weights(config: Any, path: Path, kind: str, gguf_stored: int | None) -> None:
    """Refuse a config far larger than the weights stored, before transformers builds the model: it fills a missing
    weight with random numbers at the size the config declares (its defaults for a size the source leaves out),
    before a missing weight can be seen (a 296-byte config.json beside a 16 KB checkpoint passed 5 GB of memory on its
    way to 17 GB). A GGUF lists its tensors' element counts: exact; a checkpoint directory, by its files' bytes."""
    declared = _declared_parameters({name: getattr(config, name, None) for name in _DIMENSION_LIMITS})
    if kind == "gguf":
        if gguf_stored is not None and declared > gguf_stored:
            raise BuildError(f"{path} declares a model of at least {declared:,} parameters, but its tensors hold "
                             f"{gguf_stored:,} (a damaged or incomplete model?)")
        return
    weight_bytes = sum(f.stat().st_size for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
    if declared * _MIN_BYTES_PER_PARAMETER > weight_bytes:
        raise BuildError(f"{path / 'config.json'} declares a model of at least {declared:,} parameters, but its "
                         f"weight files take {weight_bytes:,} bytes (a damaged or incomplete model?)")


# GGUF value types, by the number the format gives them
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INT_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
_GGUF_TYPE_NAMES = {6: "float32", 7: "bool", 8: "string", 9: "array", 12: "float64"}
# gguf's reader keeps about 1 KB per array value and per key or tensor it reads (Qwen2.5's header, 455k array values,
# takes it 535 MB and 5 s), so a header of many small values costs it ~700x its size in memory: cap the counts far
# above real headers (a 262k vocabulary with scores and types is ~800k values, a model has ~300-1,100 tensors)
_GGUF_MAX_ARRAY_VALUES = 1 << 21
_GGUF_MAX_KEYS = 1 << 16
_GGUF_MAX_TENSORS = 1 << 16
# the format allows arrays of arrays; real files never nest them, and gguf's reader recurses once per level
_GGUF_MAX_ARRAY_DEPTH = 8
# where tensor data is aligned when a file has no general.alignment (GGUF_DEFAULT_ALIGNMENT in ggml and gguf)
_GGUF_DEFAULT_ALIGNMENT = 32
# key-value pair: key length + type + a 1-byte value; tensor info: name length + dimension count + type + offset
_GGUF_MIN_KV_BYTES = 8 + 4 + 1
_GGUF_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def _shown(name: str) -> str:
    """A key or tensor name as an error message shows it: a damaged one can be megabytes long."""
    return name if len(name) <= 80 else f"{name[:80]}..."


class _DamagedGGUF(Exception):
    """A GGUF header field that cannot be right; the message names it."""


@dataclass
class _GGUFHeader:
    architecture: str | None
    ints: dict[str, int]  # the integer scalars, by key
    blocks: set[int]  # the N of the blk.N.* tensors
    # the keys holding anything else, with the type's name: a size stored as a float would skip every bound in ints
    others: dict[str, str] = field(default_factory=dict)


class _GGUFHeaderScan:
    """A walk over a GGUF header (key-value pairs, then tensor infos) that checks every count and length against the
    bytes left in the file before using it. gguf's reader trusts them: an array of 2**62 values with no data sent it
    looping past the end of the file, growing without bound. Fixed-size values are stepped over, not read."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.end = len(buf)
        self.pos = 4  # past the magic
        self.order = "<"
        self.values = 0  # array values seen so far, against _GGUF_MAX_ARRAY_VALUES

    def take(self, n: int, what: str) -> int:
        """Step over the ``n`` bytes of ``what``; returns where they start."""
        left = self.end - self.pos
        if n > left:
            raise _DamagedGGUF(f"{what} would take {n} bytes, only {left} are left in the file")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack_from(self.order + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        """A key or a tensor name: the format caps keys at 65,535 bytes (ggml, tensor names at 64)."""
        n = self.unpack("Q", f"the length of {what}")
        start = self.take(n, what)
        if n > 0xFFFF:
            raise _DamagedGGUF(f"{what} is {n} bytes long, more than the 65535 the format allows")
        return self.buf[start:start + n]

    def count(self, what: str, limit: int, min_bytes: int) -> int:
        n = self.unpack("Q", f"the count of {what}")
        if n * min_bytes > self.end - self.pos:
            raise _DamagedGGUF(f"the header claims {n} {what}, more than the {self.end - self.pos} bytes left can hold")
        if n > limit:
            raise _DamagedGGUF(f"the header claims {n} {what}, more than the {limit} any real model needs")
        return n

    def scan(self) -> _GGUFHeader:
        version = self.unpack("I", "the version")
        if version & 0xFFFF == 0:  # written on a big-endian machine, as gguf's reader detects it
            self.order = ">"
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise _DamagedGGUF(f"GGUF version {version} (versions 2 and 3 are read)")
        header = _GGUFHeader(architecture=None, ints={}, blocks=set())
        n_tensors = self.count("tensors", _GGUF_MAX_TENSORS, _GGUF_MIN_TENSOR_INFO_BYTES)
        n_keys = self.count("keys", _GGUF_MAX_KEYS, _GGUF_MIN_KV_BYTES)
        for i in range(n_keys):
            key = self.string(f"key {i}").decode("utf-8", "replace")
            vtype = self.unpack("I", f"the type of {_shown(key)}")
            value = self.value(vtype, _shown(key), 0)
            if isinstance(value, int):
                header.ints[key] = value
            else:
                header.others[key] = _GGUF_TYPE_NAMES.get(vtype, "value")
                if key == "general.architecture" and isinstance(value, bytes):
                    header.architecture = value.decode("utf-8", "replace")
        alignment = header.ints.get("general.alignment", _GGUF_DEFAULT_ALIGNMENT)
        if alignment < 1 or alignment & (alignment - 1):
            raise _DamagedGGUF(f"general.alignment is {alignment}, not a power of two")
        tensors: list[tuple[str, int, int, int]] = []  # name, values, type, offset
        for i in range(n_tensors):
            name = self.string(f"the name of tensor {i}").decode("utf-8", "replace")
            if match := _BLOCK_TENSOR.match(name):
                header.blocks.add(int(match.group(1)))
            name = _shown(name)
            n_dims = self.unpack("I", f"the dimension count of tensor {name}")
            start = self.take(8 * n_dims, f"the {n_dims} dimensions of tensor {name}")
            values = 1
            for dim in struct.unpack_from(f"{self.order}{n_dims}Q", self.buf, start):
                values *= dim  # a Python int: numpy's uint64 product (gguf's reader) wraps round to a small count
            ttype = self.unpack("I", f"the type of tensor {name}")
            # the offset counts from the end of the header: past the file's size it cannot be right (gguf's reader
            # adds it in uint64, where an offset near 2**64 wraps round to a plausible one)
            offset = self.unpack("Q", f"the offset of tensor {name}")
            if offset > self.end:
                raise _DamagedGGUF(f"tensor {name} starts past the end of the file")
            tensors.append((name, values, ttype, offset))
        self.data_layout(tensors, alignment)
        return header

    def data_layout(self, tensors: list[tuple[str, int, int, int]], alignment: int) -> None:
        """Each tensor's type, and its data where llama.cpp reads it: right after the previous one's, padded to the
        alignment, and inside the file. gguf's reader takes any offset: one moved by 4 bytes (misaligned, reaching
        into the next tensor) was read shifted and built into a bundle of another model, which llama.cpp refuses."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        data = -(-self.pos // alignment) * alignment  # the tensor data starts at the next multiple of the alignment
        expected = 0
        for name, values, ttype, offset in tensors:
            if ttype not in GGML_QUANT_SIZES:
                raise _DamagedGGUF(f"tensor {name} has an unknown type {ttype}")
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
            kind = qtype.name
            if values % block:
                raise _DamagedGGUF(f"tensor {name} holds {values} values, not whole {kind} blocks of {block}")
            if offset != expected:
                raise _DamagedGGUF(f"tensor {name} starts at byte {offset} of the tensor data, not at {expected}, "
                                   "right after the tensor before it (misaligned or overlapping data)")
            size = values // block * type_size
            if data + offset + size > self.end:
                raise _DamagedGGUF(f"tensor {name} ({kind}, {size} bytes) ends past the end of the file")
            expected += -(-size // alignment) * alignment

    def value(self, vtype: int, what: str, depth: int) -> int | bytes | None:
        """Step over one value; returns it if it is an integer or a short string (the architecture), else None."""
        size = _GGUF_FIXED_SIZES.get(vtype)
        if size is not None:
            start = self.take(size, what)
            fmt = _GGUF_INT_FORMATS.get(vtype)
            return struct.unpack_from(self.order + fmt, self.buf, start)[0] if fmt else None
        if vtype == _GGUF_STRING:
            n = self.unpack("Q", f"the length of {what}")
            start = self.take(n, what)
            return self.buf[start:start + n] if n <= 256 else None
        if vtype == _GGUF_ARRAY:
            self.array(what, depth + 1)
            return None
        raise _DamagedGGUF(f"{what} has an unknown value type {vtype}")

    def array(self, what: str, depth: int) -> None:
        if depth > _GGUF_MAX_ARRAY_DEPTH:
            raise _DamagedGGUF(f"{what} nests arrays more than {_GGUF_MAX_ARRAY_DEPTH} deep")
        itype = self.unpack("I", f"the value type of array {what}")
        n = self.unpack("Q", f"the length of array {what}")
        size = _GGUF_FIXED_SIZES.get(itype)
        # every value takes some bytes (a string at least its 8-byte length, an array its type and length)
        least = size if size is not None else 8 if itype == _GGUF_STRING else 12
        if n * least > self.end - self.pos:
            raise _DamagedGGUF(f"array {what} claims {n} values, "
                               f"more than the {self.end - self.pos} bytes left can hold")
        self.values += n
        if self.values > _GGUF_MAX_ARRAY_VALUES:
            raise _DamagedGGUF(f"array {what} takes the header past {_GGUF_MAX_ARRAY_VALUES} array values, "
                               "far more than any real model has")
        if size is not None:
            self.take(n * size, f"array {what}")
        elif itype == _GGUF_STRING:
            self.skip_strings(n, what)
        elif itype == _GGUF_ARRAY:
            for i in range(n):
                self.array(f"{what}[{i}]", depth + 1)
        else:
            raise _DamagedGGUF(f"array {what} has an unknown value type {itype}")

    def skip_strings(self, n: int, what: str) -> None:
        # the hot loop: a tokenizer's tokens and merges are 50k-150k strings each, so no method call per string
        length = struct.Struct(self.order + "Q").unpack_from
        buf, pos, end = self.buf, self.pos, self.end
        for i in range(n):
            if end - pos < 8:
                raise _DamagedGGUF(f"string {i} of array {what} is cut short by the end of the file")
            size = length(buf, pos)[0]
            pos += 8
            if size > end - pos:
                raise _DamagedGGUF(f"string {i} of array {what} would take {size} bytes, "
                                   f"only {end - pos} are left in the file")
            pos += size
        self.pos = pos


def _scan_gguf_header(path: Path) -> _GGUFHeader:
    """The GGUF's magic and header, every length checked against the file's size: gguf's reader is safe to run
    on the file after this (it trusts the lengths it reads)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
            if head != GGUF_MAGIC:
                raise BuildError(f"{path} is not a GGUF file (bad magic {head!r})")
            # only the header's pages are read: the tensor data (100-500 MB) is never touched
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _GGUFHeaderScan(buf).scan()
    except OSError as err:
        raise BuildError(f"cannot read {path}: {err.strerror or err}") from err
    except _DamagedGGUF as err:
        raise BuildError(f"{path} is damaged or truncated: {err}") from err


def _check_gguf_dimensions(path: Path, header: _GGUFHeader) -> None:
    """Refuse, before transformers sizes anything by them, dimensions no real model has and a block count that
    does not match the blk.N tensors."""
    arch = header.architecture
    if arch is None:  # load_source names a missing or unreadable architecture
        return
    for key, _ in _DIMENSION_LIMITS.values():
        # gguf's reader hands a float on as it is, past every bound below (they are checked on integers)
        if (kind := header.others.get(f"{arch}.{key}")) is not None:
            raise BuildError(f"{path}: {arch}.{key} is stored as a {kind}, not an integer (a damaged header?)")
    values: dict[str, object] = {name: header.ints.get(f"{arch}.{key}")
                                 for name, (key, _) in _DIMENSION_LIMITS.items()}
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    derived_head_dim = values["head_dim"] is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0
    if derived_head_dim:  # what transformers does without the key (qwen2 never has it)
        values["head_dim"] = hidden // heads

    def where(name: str) -> str:
        if name == "head_dim" and derived_head_dim:
            return f"{path}: the head size, {arch}.embedding_length / {arch}.attention.head_count,"
        return f"{path}: {arch}.{_DIMENSION_LIMITS[name][0]}"

    _check_dimension_limits(values, where)
    blocks = header.ints.get(f"{arch}.block_count")
    if blocks is not None and header.blocks != set(range(blocks)):
        found = (f"tensors for {len(header.blocks)} block(s), blk.{min(header.blocks)} to blk.{max(header.blocks)}"
                 if header.blocks else "no blk.N tensors")
        raise BuildError(f"{path}: {arch}.block_count is {blocks} but the file has {found} (a damaged header?)")


# the GGUF metadata load_source reads itself (the rest is transformers'); None for a key the file does not have
_GGUF_ARCHITECTURE = "general.architecture"
_GGUF_ADD_BOS = "tokenizer.ggml.add_bos_token"
_GGUF_KEYS = (_GGUF_ARCHITECTURE, _GGUF_ADD_BOS)
_GGUF_STORED = "parameters stored"  # not a GGUF key: the element count of the tensors the file holds


def _refuse_gguf_rope_scaling(path: Path, reader: Any, arch: str | None) -> None:
    """A GGUF whose RoPE is scaled (a ``rope_freqs`` tensor, as Llama 3.1 and 3.2 carry, or a scaling type): this
    builder reads neither (transformers' GGUF loader skips them, unsaid), and the bundle came out byte-identical
    to the unscaled model's, passing the quality gate on a short sample. Refused, as sliding windows are."""
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise BuildError(f"{path} holds rope_freqs.weight (scaled RoPE frequencies, as Llama 3.1 has), which this "
                         "builder cannot apply from a GGUF: build from the Hugging Face checkpoint instead")
    key = f"{arch}.rope.scaling.type"
    try:
        field = reader.fields.get(key)
        kind = field.contents() if field is not None else None
    except Exception:  # a damaged string: _check_gguf's own reads name it
        kind = None
    if kind not in (None, "", "none"):
        raise BuildError(f"{path}: {key} is {kind!r}, a RoPE scaling this builder cannot apply from a GGUF: build "
                         "from the Hugging Face checkpoint instead")


def _check_gguf(path: Path) -> dict[str, Any]:
    """Check the file; the metadata load_source reads itself (``_GGUF_KEYS``), from the same parse of its header."""
    header = _scan_gguf_header(path)
    _check_gguf_dimensions(path, header)
    # a truncated file fails inside the gguf reader with a numpy error; check sizes first
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise BuildError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
        stored = sum(int(t.n_elements) for t in reader.tensors)
    except (BuildError, ImportError):  # a missing gguf package says nothing about the file
        raise
    except Exception as err:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise BuildError(f"{path} is damaged or truncated: {err}") from err
    _refuse_gguf_rope_scaling(path, reader, header.architecture)
    values: dict[str, Any] = {_GGUF_STORED: stored}
    for key in _GGUF_KEYS:
        try:
            field = reader.fields.get(key)
            values[key] = field.contents() if field is not None else None
        except Exception as err:  # a damaged string field: UnicodeDecodeError, or the reader's own errors
            raise BuildError(f"{path} is damaged: cannot read its {key} ({type(err).__name__}: {err})") from err
    return values




# the files a Hugging Face checkpoint keeps its weights in
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
# what transformers can build the fast tokenizer a bundle stores from
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_source(source: str | os.PathLike[str]) -> Path:
    """Fail fast, before any heavy loading: the source exists and looks like what it claims to be."""
    return _checked_source(source)[0]


def _checked_source(source: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """:func:`check_source`'s work; also a GGUF's metadata that load_source reads itself (``_GGUF_KEYS``)."""
    path = Path(source)
    if not path.exists():
        from edge_runtime.models import KNOWN_MODELS

        raise BuildError(f"source not found: {path} (a GGUF file, a Hugging Face model directory, or a known "
                         f"model: {', '.join(KNOWN_MODELS)})")
    if path.is_file():
        return path, _check_gguf(path)
    if not (path / "config.json").is_file():
        raise BuildError(f"{path} is neither a GGUF file nor a Hugging Face model directory (no config.json)")
    return path, {}


def _check_finite_weights(model: Any, path: Path) -> None:
    """Refuse a NaN or infinite weight, naming its tensor: quantized, it becomes an arbitrary finite code (an int8 or
    int4-offsets bundle built, silently, with a row of another model), and the calibration that picks int4 zero points
    failed on it with a bare ValueError naming no tensor."""
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not torch.is_floating_point(tensor) or bool(torch.isfinite(tensor).all()):
                continue
            bad = (~torch.isfinite(tensor)).nonzero()
            first = tuple(int(i) for i in bad[0])
            raise BuildError(f"{path}: weight {name} has {len(bad)} NaN or infinite value(s) (the first at index "
                             f"{list(first)}: {float(tensor[first])}); a bundle of it would compute another model")


def load_source(source: str | os.PathLike[str]) -> LoadedSource:
    """Load a GGUF file or a Hugging Face model directory with transformers (fp32)."""
    path, gguf_meta = _checked_source(source)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the install
        raise BuildError("building bundles needs the export extra: pip install 'edge-runtime[export]'") from err

    if path.is_file():
        arch = str(gguf_meta[_GGUF_ARCHITECTURE] or "unknown")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {arch!r} (GGUF key general.architecture) is not supported "
                                        f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        kind, load_dir, kwargs = "gguf", str(path.parent), {"gguf_file": path.name}
        sha = sha256_file(path)
    else:
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BuildError(f"{path / 'config.json'} is not a readable JSON file: {err}") from err
        if not isinstance(cfg, dict):
            raise BuildError(f"{path / 'config.json'}: expected a JSON object, got {type(cfg).__name__}")
        arch = cfg.get("model_type", "unknown")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"{path / 'config.json'}: model_type {arch!r} is not supported (supported: "
                                        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        _check_dimension_limits(cfg, lambda name: f"{path / 'config.json'}: {name}")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            # transformers would fail deep inside, with an AttributeError on a missing file name
            raise BuildError(f"{path} has no tokenizer ({', '.join(_TOKENIZER_FILES)}: none found)")
        kind, load_dir, kwargs = "hf", str(path), {}
        sha = _dir_sha256(path)

    # our build shows its own progress; transformers' GGUF progress bar and tokenizer notices would interleave with it
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the GGUF dequantization bar is a bare tqdm that ignores the setting above, and tqdm reads its TQDM_*
    # environment overrides only when it is imported: silence that one module's bar while loading
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    processors = getattr(gguf_utils, "TENSOR_PROCESSORS", {})
    llama_processor = processors.get("llama")
    if llama_processor is not None:
        processors["llama"] = _kv_heads_default(llama_processor)
    try:
        config = AutoConfig.from_pretrained(load_dir, **kwargs)
        _check_stored_weights(config, path, kind, gguf_meta.get(_GGUF_STORED))
        tokenizer = AutoTokenizer.from_pretrained(load_dir, **kwargs)
        model, loading = AutoModelForCausalLM.from_pretrained(load_dir, dtype=torch.float32, output_loading_info=True,
                                                              **kwargs)
    except BuildError:
        raise
    except Exception as err:  # transformers and safetensors raise many types on a damaged or incomplete model
        # one line: a config whose sizes do not fit its weights gets torch's multi-line state_dict report
        raise BuildError(f"transformers could not load {path}: {type(err).__name__}: {' '.join(str(err).split())}") from err
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if llama_processor is not None:
            processors["llama"] = llama_processor
    # transformers fills a weight the checkpoint lacks with random numbers (its warning is silenced above):
    # the bundle would pass its quality gate, which compares it with the same random model
    for what in ("missing_keys", "mismatched_keys"):
        keys = [str(k) for k in loading.get(what) or ()]
        if keys:
            raise BuildError(f"{path} is incomplete: {len(keys)} weight(s) {what.split('_')[0]} "
                             f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    # and it drops a checkpoint's weights its config has no place for (a config.json saying 1 layer beside a
    # 2-layer checkpoint built a 1-layer bundle, silently): another model than the checkpoint. Rotary buffers older
    # checkpoints saved are not weights. (A GGUF's tensors are checked against its metadata before loading.)
    unused = [str(k) for k in loading.get("unexpected_keys") or () if not str(k).endswith(".inv_freq")]
    if unused and kind == "hf":
        raise BuildError(f"{path}'s config.json does not match its weights: {len(unused)} weight(s) it has no place for "
                         f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})")
    model.eval()
    _check_finite_weights(model, path)
    if not getattr(tokenizer, "is_fast", False):  # the bundle carries tokenizer.json, which only a fast one writes
        raise BuildError(f"{path} has only a slow {type(tokenizer).__name__}: a bundle needs a fast tokenizer "
                         "(tokenizer.json), which the runtime reads with the tokenizers library")
    _check_attention_window(config)
    _check_vocabulary(config, tokenizer, path)
    spec = _spec_from_model(model, config, gguf_arch=arch if kind == "gguf" else None)
    weights = _weights_from_model(model, spec)

    gen = getattr(model, "generation_config", None)
    eos: list[int] = []
    for candidate in (getattr(gen, "eos_token_id", None), config.eos_token_id, tokenizer.eos_token_id):
        for tid in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if isinstance(tid, int) and tid not in eos:
                eos.append(tid)
    # chat models end a turn with a template marker that is not always the configured eos
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in eos and marker in (tokenizer.chat_template or "") + str(tokenizer.eos_token):
            eos.append(tid)
    bos = config.bos_token_id if isinstance(config.bos_token_id, int) else tokenizer.bos_token_id
    # the BOS a raw prompt starts with is the one the tokenizer adds, not always config.json's: DeepSeek-R1-Distill-Qwen
    # keeps Qwen2.5's config (bos <|endoftext|>) beside a tokenizer adding <｜begin▁of▁sentence｜>, and the engine
    # started raw prompts with the other token
    added = _added_bos(tokenizer, bos)
    if added is not None:
        bos = added
    # checked now, naming the source's field: found by the bundle's own check, after the whole conversion, the error
    # named a manifest in a staging directory already removed
    vocab = int(config.vocab_size)
    where = "the GGUF's tokenizer.ggml.eos_token_id" if kind == "gguf" else "config.json's eos_token_id"
    if not eos:
        raise BuildError(f"{path} names no end-of-sequence token ({where}, the tokenizer's eos_token): "
                         "generation could only stop at max_new_tokens")
    for tid in eos:
        if not 0 <= tid < vocab:
            raise BuildError(f"{path}: {where} lists {tid}, past the vocabulary of {vocab} tokens")
    if isinstance(bos, int) and not 0 <= bos < vocab:
        raise BuildError(f"{path}: its bos_token_id {bos} is past the vocabulary of {vocab} tokens")
    add_bos = added is not None
    if kind == "gguf":
        # the file says whether its model wants a BOS before a raw prompt, and llama.cpp follows it; transformers'
        # GGUF loader sets add_bos_token on some tokenizers regardless (SmolLM2's: its BOS is <|im_start|>, and a
        # raw "def f(n):" then started the definition over)
        flag = gguf_meta.get(_GGUF_ADD_BOS)
        if isinstance(flag, bool):
            add_bos = flag
    # of the absolute path: "." or "./" named the model "" (an empty model name in answers, runs and warnings)
    named = Path(os.path.abspath(path))
    name = named.stem if kind == "gguf" else named.name
    return LoadedSource(
        model=model, tokenizer=tokenizer, spec=spec, weights=weights, kind=kind, path=path, source_sha256=sha,
        eos_token_ids=eos, bos_token_id=bos, pad_token_id=config.pad_token_id if isinstance(config.pad_token_id, int) else None,
        add_bos_token=add_bos, chat_template=tokenizer.chat_template, name=name,
    )


def _kv_heads_default(processor: type) -> type:
    """transformers' llama tensor processor, reading a GGUF without ``llama.attention.head_count_kv`` as llama.cpp
    does: as many KV heads as heads. The key is optional (llama.cpp's converter writes it only when config.json has
    num_key_value_heads), and without it transformers left Q and K in llama.cpp's rotary order: the bundle was built
    and passed its quality gate, which compares it with the same model, but answered as another model."""

    class KVHeadsDefault(processor):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any = None) -> None:
            config = dict(config or {})
            if config.get("num_key_value_heads") is None:
                config["num_key_value_heads"] = config.get("num_attention_heads")
            super().__init__(config=config)

    return KVHeadsDefault


def _check_attention_window(config: Any) -> None:
    """Refuse sliding-window attention: the graph attends over the whole context, so such a model would be built
    and then answer as another model (its quality check read 4% top-1 agreement). Qwen2 turns its window on with
    ``use_sliding_window``; Mistral's is on whenever ``sliding_window`` is set."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not isinstance(window, int) or isinstance(window, bool):
        return
    # transformers' own per-layer list, where it has one: Qwen2's window starts at layer max_window_layers, so a
    # model with that many layers or fewer attends over the whole context in every layer
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types and "sliding_attention" not in layer_types:
        return
    if window < int(getattr(config, "max_position_embeddings", 0) or 0):
        raise UnsupportedModelError(f"sliding-window attention (sliding_window = {window}, shorter than the context "
                                    f"of {config.max_position_embeddings}) is not supported")


def _check_vocabulary(config: Any, tokenizer: Any, path: Path) -> None:
    """A tokenizer whose ids reach past the embedding table: the first such token would read outside it."""
    vocab, ids = getattr(config, "vocab_size", None), len(tokenizer)
    if isinstance(vocab, int) and ids > vocab:
        raise BuildError(f"{path}: the tokenizer has {ids} tokens but the model's vocab_size is {vocab} "
                         "(a tokenizer of another model?)")


def _added_bos(tokenizer: Any, bos: int | None) -> int | None:
    """The token the source's tokenizer starts a raw text with, or None: by its ``add_bos_token`` (its own
    ``bos_token``), or by what it does (a tokenizer.json post-processor adds it for Llama 3, whose fast tokenizer has
    no such attribute). ``bos``: the config's, for a tokenizer that names none."""
    own = tokenizer.bos_token_id if isinstance(tokenizer.bos_token_id, int) else bos
    flag = getattr(tokenizer, "add_bos_token", None)
    if isinstance(flag, bool):
        return own if flag else None
    if own is None:
        return None
    try:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot encode "a" is found by the quality check
        return None
    if with_special and with_special[0] in (own, bos) and (not plain or plain[0] != with_special[0]):
        return int(with_special[0])
    return None


def _rope_tables(model: Any, config: Any, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(torch.float64).cpu().numpy()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if inv_freq.shape[0] * 2 != head_dim:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    pos = np.arange(length, dtype=np.float64)
    freqs = np.outer(pos, inv_freq)
    return (np.cos(freqs) * scaling).astype(np.float32), (np.sin(freqs) * scaling).astype(np.float32)


def _rope_context(config: Any) -> int:
    """The context the graph's fixed RoPE tables are right for: ``max_position_embeddings``, except for LongRoPE.

    LongRoPE (Phi-3's scaling, which Llama configs accept) rotates with its short factors up to
    ``original_max_position_embeddings`` and with its long ones past it; transformers then recomputes the rotation
    of the whole sequence. The graph holds one table, the short factors': past that length it answers as another
    model, so the bundle's context stops there and a longer request gets the context-limit error before any work."""
    ctx = int(config.max_position_embeddings)
    scaling = getattr(config, "rope_scaling", None)
    if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "longrope":
        return ctx
    # transformers switches at the config's attribute; the key inside rope_scaling is read by none of its versions
    # yet, but a later one may: the shorter of the two is right either way
    originals = [getattr(config, "original_max_position_embeddings", None), scaling.get("original_max_position_embeddings")]
    originals = [o for o in originals if isinstance(o, int) and not isinstance(o, bool) and 0 < o < ctx]
    if originals:
        log.warning("LongRoPE scaling: the bundle's context is %d tokens (original_max_position_embeddings), not %d; "
                    "past it the model switches to its long factors, which this graph does not hold", min(originals), ctx)
        return min(originals)
    return ctx


def _spec_from_model(model: Any, config: Any, gguf_arch: str | None = None) -> ModelSpec:
    """The model's shapes and RoPE tables; ``gguf_arch`` (a GGUF source's architecture) names its keys in errors."""
    # a damaged header (a GGUF's llama.context_length of 0) would otherwise fail a minute into the build
    for name in ("max_position_embeddings", "num_hidden_layers", "num_attention_heads", "hidden_size",
                 "intermediate_size", "vocab_size"):
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BuildError(f"the model's {name} is {value!r}: a positive integer is needed (a damaged header?)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # check_source bounded what the GGUF or config.json says; this bounds what transformers made of it (a head_dim
    # derived from the hidden size), before the RoPE tables are sized by the context length and head_dim
    values = {name: getattr(config, name, None) for name in _DIMENSION_LIMITS} | {"head_dim": head_dim}

    def where(name: str) -> str:
        if not gguf_arch:
            return f"the model's {name}"
        key = f"{gguf_arch}.{_DIMENSION_LIMITS[name][0]}"
        if name == "head_dim":  # a GGUF without the key: transformers divided the hidden size by the heads
            key += f", or {gguf_arch}.embedding_length / {gguf_arch}.attention.head_count"
        return f"the model's {name} (GGUF key {key})"

    _check_dimension_limits(values, where)
    if head_dim % 16:  # else onnxruntime's GroupQueryAttention refuses it, at the quality check after the whole build
        # (its CPU kernel: "head_size shall be a multiple of 16" in 1.32; 24, 40 and 56 passed a check for 8)
        raise UnsupportedModelError(f"{where('head_dim')} is {head_dim}: onnxruntime's attention kernel needs a "
                                    "multiple of 16")
    ctx = _rope_context(config)
    cos, sin = _rope_tables(model, config, head_dim, ctx)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    _check_biases(model.model.layers[0])
    return ModelSpec(
        architecture=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        context_length=ctx,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(tied),
        attention_bias=attn.q_proj.bias is not None,
        rope_cos=cos,
        rope_sin=sin,
        rope_theta=float(getattr(config, "rope_theta", 10000.0)),
    )


def _check_biases(layer: Any) -> None:
    """Refuse biases the graph has no place for: only q/k/v projections carry one there. Llama's
    ``attention_bias`` also puts one on o_proj, and ``mlp_bias`` on the MLP's three: they were dropped, and the
    bundle answered as another model (fp32 greedy differed from transformers on 5 of 20 prompts)."""
    mlp = layer.mlp
    for key, modules in (("attention_bias", (layer.self_attn.o_proj,)),
                           ("mlp_bias", (mlp.gate_proj, mlp.up_proj, mlp.down_proj))):
        if any(getattr(m, "bias", None) is not None for m in modules):
            raise UnsupportedModelError(f"config.json: {key} = true is not supported (a bias on "
                                        f"{'o_proj' if key == 'attention_bias' else 'the MLP projections'}; "
                                        "only q/k/v biases, as Qwen2's, are)")


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _weights_from_model(model: Any, spec: ModelSpec) -> ModelWeights:
    inner = model.model

    def layers() -> Iterator[LayerWeights]:
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            if getattr(m, "act_fn", None) is not None and type(m.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                raise UnsupportedModelError(f"MLP activation {type(m.act_fn).__name__} is not supported (SiLU only)")
            yield LayerWeights(
                attn_norm=_np(layer.input_layernorm.weight),
                q=_np(a.q_proj.weight), k=_np(a.k_proj.weight), v=_np(a.v_proj.weight), o=_np(a.o_proj.weight),
                mlp_norm=_np(layer.post_attention_layernorm.weight),
                gate=_np(m.gate_proj.weight), up=_np(m.up_proj.weight), down=_np(m.down_proj.weight),
                q_bias=_np(a.q_proj.bias) if a.q_proj.bias is not None else None,
                k_bias=_np(a.k_proj.bias) if a.k_proj.bias is not None else None,
                v_bias=_np(a.v_proj.bias) if a.v_proj.bias is not None else None,
            )

    return ModelWeights(
        embed=_np(inner.embed_tokens.weight),
        final_norm=_np(inner.norm.weight),
        lm_head=None if spec.tie_word_embeddings else _np(model.lm_head.weight),
        layers=layers,
    )
