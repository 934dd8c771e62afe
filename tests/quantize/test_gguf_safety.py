"""A damaged or hostile GGUF header is refused in a line before anything trusts it: gguf's reader, transformers,
the RoPE tables. Every file here is a few KB, written in tmp_path; gguf's reader is replaced by a tripwire where the
unfixed code would hand it a file that sends it looping past the end (memory without bound)."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import quantize.source as source
from edge_runtime.cli import main
from edge_runtime.errors import BuildError
from quantize.source import check_source

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _header(n_tensors: int, n_keys: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _array(itype: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", itype, count) + payload


def _tensor_info(name: str, dims: list[int], dtype: int = 0, offset: int = 0) -> bytes:
    shape = b"".join(struct.pack("<Q", d) for d in dims)
    return _s(name) + struct.pack("<I", len(dims)) + shape + struct.pack("<IQ", dtype, offset)


ARCH = _kv("general.architecture", STR, _s("llama"))

DAMAGED = {
    # the QA reproduction: gguf's reader loops 2**62 times past the end of the file, growing without bound
    "array_u8_huge": _header(0, 2) + ARCH + _kv("x.arr", ARR, _array(U8, 2**62)),
    "array_str_huge": _header(0, 2) + ARCH + _kv("x.arr", ARR, _array(STR, 2**62)),
    "array_arr_huge": _header(0, 2) + ARCH + _kv("x.arr", ARR, _array(ARR, 2**62)),
    "array_string_cut": _header(0, 2) + ARCH + _kv("x.arr", ARR, _array(STR, 2, _s("ok") + struct.pack("<Q", 2**62))),
    "arrays_nested_deep": _header(0, 2) + ARCH + _kv("x.arr", ARR, _array(ARR, 1) * 10 + _array(U8, 0)),
    "key_length_huge": _header(0, 1) + struct.pack("<Q", 2**62) + b"general.architecture",
    "value_length_huge": _header(0, 1) + _kv("general.architecture", STR, struct.pack("<Q", 2**62) + b"llama"),
    "value_type_unknown": _header(0, 1) + _kv("general.architecture", 99, b"x"),
    "key_count_huge": _header(0, 2**63) + ARCH,
    "tensor_count_huge": _header(2**63, 1) + ARCH,
    "tensor_dims_count_huge": _header(1, 1) + ARCH + _s("token_embd.weight") + struct.pack("<I", 2**31) + bytes(64),
    "tensor_offset_wraps": _header(1, 1) + ARCH + _tensor_info("token_embd.weight", [4, 4], 0, 2**64 - 16) + bytes(64),
    "version_unknown": _header(0, 0, version=99),
    "magic_only": b"GGUF",
    "key_too_long": _header(0, 1) + _kv("k" * 70_000, U8, b"\0"),
}


class _ReaderReached(BaseException):
    """gguf's reader was given the file: a BaseException, so no `except Exception` on the way turns it into an error."""


@pytest.fixture()
def no_gguf_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    def tripwire(*args, **kwargs):
        raise _ReaderReached("gguf.GGUFReader was given a file the pre-scan should have refused")

    monkeypatch.setattr(gguf, "GGUFReader", tripwire)


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_gguf_header_is_refused_before_the_gguf_reader_sees_it(tmp_path, no_gguf_reader, case):
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(DAMAGED[case])
    with pytest.raises(BuildError, match="is damaged or truncated") as info:
        check_source(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) < 400


def test_the_array_bomb_is_a_one_line_error_from_quantize(tmp_path, no_gguf_reader, capsys):
    path = tmp_path / "bomb.gguf"
    path.write_bytes(DAMAGED["array_u8_huge"])
    assert main(["quantize", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bomb.gguf is damaged or truncated" in err and "x.arr" in err, err
    assert not (tmp_path / "out").exists()


def test_a_header_of_more_array_values_than_any_model_is_refused(tmp_path, no_gguf_reader, monkeypatch):
    # gguf's reader keeps ~1 KB per array value: a file of small values costs it hundreds of times its size
    monkeypatch.setattr(source, "_GGUF_MAX_ARRAY_VALUES", 100)
    path = tmp_path / "many.gguf"
    path.write_bytes(_header(0, 2) + ARCH + _kv("x.arr", ARR, _array(U8, 101, bytes(101))))
    with pytest.raises(BuildError, match="past 100 array values"):
        check_source(path)


def _writer_gguf(path: Path, *, big_endian: bool = False, rope_freqs: bool = False, scaling: str | None = None,
                 **overrides: int) -> Path:
    """A small well-formed llama GGUF written by gguf's own writer: every value type, token arrays, blk.N tensors
    (and, when asked, Llama 3.1's rope_freqs tensor or a RoPE scaling type)."""
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if scaling is not None:
        w.add_string("llama.rope.scaling.type", scaling)
    dims = {"context_length": 256, "block_count": 2, "embedding_length": 64, "feed_forward_length": 128,
            "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 8, **overrides}
    for key, value in dims.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_uint8("x.u8", 7)
    w.add_int8("x.i8", -7)
    w.add_uint16("x.u16", 700)
    w.add_int16("x.i16", -700)
    w.add_int32("x.i32", -70000)
    w.add_float32("x.f32", 1.5)
    w.add_bool("x.bool", True)
    w.add_uint64("x.u64", 2**40)
    w.add_int64("x.i64", -(2**40))
    w.add_float64("x.f64", 2.5)
    w.add_string("x.long_string", "{% for m in messages %}" * 40)
    w.add_token_list([f"tok{i}" for i in range(8)])
    w.add_token_types([1] * 8)
    w.add_token_scores([0.5] * 8)
    w.add_array("x.empty", [])
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("big_endian", [False, True])
def test_the_pre_scan_agrees_with_gguf_on_a_well_formed_file(tmp_path, big_endian):
    import gguf

    path = _writer_gguf(tmp_path / "ok.gguf", big_endian=big_endian)
    header = source._scan_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    ints = {k: f.contents() for k, f in reader.fields.items()
            if len(f.types) == 1 and f.types[0] not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.BOOL,
                                                        gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64)
            and not k.startswith("GGUF.")}
    assert header.architecture == "llama" and header.blocks == {0, 1}
    assert header.ints == ints and header.ints["x.i64"] == -(2**40)
    assert check_source(path) == path


def _damage_tensor_info(path: Path, index: int, *, dtype: int | None = None, offset_by: int = 0) -> bytes:
    """The bytes of a GGUF with tensor ``index``'s type or data offset changed in its header."""
    from gguf.gguf_reader import GGUFReader  # the module's own: no_gguf_reader replaces gguf.GGUFReader

    field = GGUFReader(str(path)).tensors[index].field
    at = int(field.offset) + sum(int(part.nbytes) for part in field.parts[:4])  # its type, then its offset
    data = bytearray(path.read_bytes())
    if dtype is not None:
        data[at:at + 4] = struct.pack("<I", dtype)
    offset = struct.unpack_from("<Q", data, at + 4)[0] + offset_by
    data[at + 4:at + 12] = struct.pack("<Q", offset)
    return bytes(data)


@pytest.mark.parametrize(("damage", "message"), [
    # gguf's reader took the offset as it was and read the tensor shifted: the bundle was built, of another model
    ({"index": 0, "offset_by": 4}, "tensor token_embd.weight starts at byte 4 of the tensor data, not at 0"),
    ({"index": 1, "offset_by": 32}, "tensor blk.0.attn_norm.weight starts at byte 2080 of the tensor data, not at 2048"),
    ({"index": 0, "dtype": 99}, "tensor token_embd.weight has an unknown type 99"),
    ({"index": 0, "dtype": 1}, "tensor blk.0.attn_norm.weight starts at byte 2048 of the tensor data, not at 1024"),
])
def test_tensor_data_llama_cpp_would_not_read_is_refused_naming_the_tensor(tmp_path, no_gguf_reader, damage, message):
    good = _writer_gguf(tmp_path / "good.gguf")
    path = tmp_path / "damaged.gguf"
    path.write_bytes(_damage_tensor_info(good, **damage))
    with pytest.raises(BuildError) as info:
        check_source(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_gguf_cut_short_in_its_tensor_data_names_the_tensor(tmp_path, no_gguf_reader):
    good = _writer_gguf(tmp_path / "good.gguf")
    path = tmp_path / "cut.gguf"
    path.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(BuildError, match=r"cut.gguf is damaged or truncated: tensor blk.1.attn_norm.weight \(F32, "
                                         r"256 bytes\) ends past the end of the file"):
        check_source(path)


@pytest.mark.parametrize(("extra", "message"), [
    ({"rope_freqs": True}, "holds rope_freqs.weight"),
    ({"scaling": "linear"}, "llama.rope.scaling.type is 'linear'"),
])
def test_a_gguf_with_scaled_rope_is_refused_not_built_unscaled(tmp_path, extra, message):
    # transformers' GGUF loader skips both, unsaid: the bundle was byte-identical to the unscaled model's, and a
    # quality sample shorter than the scaling's reach passed the gate
    path = _writer_gguf(tmp_path / "scaled.gguf", **extra)
    with pytest.raises(BuildError, match=message):
        check_source(path)
    assert check_source(_writer_gguf(tmp_path / "none.gguf", scaling="none")).name == "none.gguf"


def test_a_real_sized_tokenizer_header_scans_in_a_blink(tmp_path):
    # what a 150k-token vocabulary brings: its tokens, its merges (strings) and its token types (fixed size)
    tokens = b"".join(_s(f"tok{i:06d}") for i in range(150_000))
    merges = b"".join(_s(f"t{i} m{i}") for i in range(150_000))
    data = (_header(0, 4) + ARCH + _kv("tokenizer.ggml.tokens", ARR, _array(STR, 150_000, tokens))
            + _kv("tokenizer.ggml.merges", ARR, _array(STR, 150_000, merges))
            + _kv("tokenizer.ggml.token_type", ARR, _array(I32, 150_000, bytes(600_000))))
    path = tmp_path / "vocab.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    source._scan_gguf_header(path)
    # ~0.15 s here; a per-string method call would take seconds: the bound leaves room for a loaded machine
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"context_length": 2**31 - 1}, "llama.context_length is 2147483647: more than the 8388608 this builder accepts"),
    ({"block_count": 100_000}, "llama.block_count is 100000: more than the 1024 this builder accepts"),
    ({"attention.head_count": 5000}, "llama.attention.head_count is 5000"),
    ({"vocab_size": 2**31}, "llama.vocab_size is 2147483648"),
    ({"embedding_length": 65536, "attention.head_count": 1},
     "the head size, llama.embedding_length / llama.attention.head_count, is 65536"),
    ({"block_count": 3}, "llama.block_count is 3 but the file has tensors for 2 block(s), blk.0 to blk.1"),
    ({"block_count": 1}, "llama.block_count is 1 but the file has tensors for 2 block(s)"),
])
def test_dimensions_past_any_real_model_are_refused_before_transformers(tmp_path, overrides, message):
    path = _writer_gguf(tmp_path / "dims.gguf", **overrides)
    with pytest.raises(BuildError) as info:
        check_source(path)
    assert message in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(("key", "add"), [
    ("block_count", "add_float32"), ("context_length", "add_float64"), ("embedding_length", "add_string"),
    ("attention.head_count", "add_bool"),
])
def test_a_dimension_stored_as_anything_but_an_integer_is_refused(tmp_path, monkeypatch, key, add):
    import gguf

    # a float of 1e9 layers passed as no value at all: every bound is checked on the integers
    value = {"add_float32": 1e9, "add_float64": 1e12, "add_string": "64", "add_bool": True}[add]
    real_add_uint32 = gguf.GGUFWriter.add_uint32

    def add_uint32(self, name, number):
        if name == f"llama.{key}":
            return getattr(self, add)(name, value)
        return real_add_uint32(self, name, number)

    monkeypatch.setattr(gguf.GGUFWriter, "add_uint32", add_uint32)
    path = _writer_gguf(tmp_path / "typed.gguf")
    with pytest.raises(BuildError) as info:
        check_source(path)
    kind = {"add_float32": "float32", "add_float64": "float64", "add_string": "string", "add_bool": "bool"}[add]
    assert f"llama.{key} is stored as a {kind}, not an integer" in str(info.value) and str(path) in str(info.value)


class _RopeReached(BaseException):
    """The RoPE tables were about to be sized by the context length."""


class _Tripwire:
    def detach(self):
        raise _RopeReached("the RoPE tables were about to be computed")


def _fake_model_and_config(**overrides):
    config = SimpleNamespace(model_type="llama", max_position_embeddings=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                             vocab_size=320, head_dim=None, rms_norm_eps=1e-5)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = SimpleNamespace(model=SimpleNamespace(rotary_emb=SimpleNamespace(inv_freq=_Tripwire())))
    return model, config


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_position_embeddings": 2**31 - 1}, "max_position_embeddings (GGUF key llama.context_length) is 2147483647"),
    ({"hidden_size": 65536, "num_attention_heads": 1}, "head_dim (GGUF key llama.rope.dimension_count, or "),
])
def test_the_spec_refuses_a_huge_dimension_before_the_rope_tables(overrides, message):
    model, config = _fake_model_and_config(**overrides)
    with pytest.raises(BuildError) as info:
        source._spec_from_model(model, config, gguf_arch="llama")
    assert message in str(info.value)
    with pytest.raises(BuildError, match=r"the model's \w+ is \d+: more than"):  # a Hugging Face directory's
        source._spec_from_model(model, config)


def test_a_config_json_with_a_huge_context_is_refused_before_transformers_loads_it(tiny_model_dirs, tmp_path,
                                                                                   monkeypatch, capsys):
    import json
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(tiny_model_dirs("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["max_position_embeddings"] = 2**31 - 1
    (src / "config.json").write_text(json.dumps(config))
    def tripwire(*args):
        raise _RopeReached("the RoPE tables were about to be sized by a 2**31 context")

    monkeypatch.setattr(source, "_rope_tables", tripwire)
    assert main(["quantize", str(src), "--out", str(tmp_path / "out"), "--precision", "fp32"]) == 1
    err = capsys.readouterr().err.strip()
    assert "config.json: max_position_embeddings is 2147483647: more than the 8388608 this builder accepts" in err and len(err.splitlines()) == 1


def test_part_of_the_export_extra_is_named_before_anything_is_fetched(tmp_path):
    # with onnx but not gguf, quantize fetched the 98 MB GGUF and then called it "damaged or truncated:
    # No module named 'gguf'"
    import subprocess
    import sys

    code = ("import sys; sys.modules['gguf'] = None\n"  # as if not installed
            "from edge_runtime.cli import main\n"
            f"sys.exit(main(['quantize', 'smollm2-135m-instruct', '--out', {str(tmp_path / 'out')!r}]))")
    env = {**__import__("os").environ, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "needs the export extra" in out.stderr and "missing gguf" in out.stderr and "damaged" not in out.stderr
    assert not (tmp_path / "cache" / "models").exists()  # nothing fetched


@pytest.mark.parametrize("head_count_kv", [True, False])
def test_a_llama_gguf_is_read_with_its_q_and_k_rows_back_in_order_with_or_without_its_kv_head_count(tmp_path,
                                                                                                     head_count_kv):
    # llama.attention.head_count_kv is optional (llama.cpp then takes as many KV heads as heads, and so does
    # transformers' config), but without it transformers left Q and K in llama.cpp's rotary order: the bundle was
    # built, passed a quality gate comparing it with that same model, and answered as another model
    import torch
    from tiny_models import hf_greedy, make_tiny_gguf, make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", kv_heads=4)
    path = make_tiny_gguf(hf, tmp_path / "tiny.gguf", head_count_kv=head_count_kv)
    src = source.load_source(path)
    reference = source.load_source(hf)
    for got, want in zip(src.model.model.layers, reference.model.model.layers):
        assert torch.equal(got.self_attn.q_proj.weight, want.self_attn.q_proj.weight)
        assert torch.equal(got.self_attn.k_proj.weight, want.self_attn.k_proj.weight)
    ids = [5, 17, 40, 88, 100, 7, 9]
    out = src.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False)
    assert out[0][len(ids):].tolist() == hf_greedy(hf, ids, 8)
