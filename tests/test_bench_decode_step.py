"""The decode-step benchmark's own code path on the tiny bundle (the genai peer is not set up in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def decode_step(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.decode_step as module

    return module


def test_writes_the_graph_and_loop_timings_and_skips_a_missing_genai_model(decode_step, tiny_bundle: Path,
                                                                             tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-genai-model"
    assert decode_step.main(["--bundle", str(tiny_bundle), "--genai-model", str(missing), "--no-rescore-bundle", "none",
                             "--rounds", "2",
                             "--steps", "5", "--threads", "1", "--out-dir", str(tmp_path), "--host", "test"]) == 0
    doc = json.loads((tmp_path / "decode-step-test.json").read_text())
    assert set(doc["per_round_ms"]) == {"engine graph", "engine loop"}
    assert all(len(v) == 2 and all(ms > 0 for ms in v) for v in doc["per_round_ms"].values())
    assert str(missing) in doc["skipped"]["genai graph"]
    summary = doc["summary"]
    # the bare steps and Engine.run decode the same greedy tokens
    assert summary["tokens_match"] is True and len(summary["first_tokens"]["engine graph"]) == 5
    assert summary["loop_overhead_ms"] == pytest.approx(summary["engine_loop_ms"] - summary["engine_graph_ms"])
    rounds = doc["per_round_ms"]
    assert summary["loop_overhead_paired_ms"] == pytest.approx(  # two rounds: the mean of their own differences
        sum(loop - graph for loop, graph in zip(rounds["engine loop"], rounds["engine graph"])) / 2)
    assert "genai_graph_ms" not in summary
    assert "tokens match: True" in capsys.readouterr().out


def test_none_skips_genai_and_bad_flags_are_refused(decode_step, tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    doc = decode_step.run_benchmark(tiny_bundle, None, threads=1, rounds=1, steps=3, log=lambda _msg: None)
    assert "not asked for" in doc["skipped"]["genai graph"]
    with pytest.raises(SystemExit):
        decode_step.main(["--bundle", str(tiny_bundle), "--steps", "1"])
    assert "--steps" in capsys.readouterr().err


def test_a_no_rescoring_bundle_gives_the_rescoring_cost(decode_step, tiny_bundles, tmp_path: Path) -> None:
    rescored, plain = tiny_bundles("llama", "int4"), tiny_bundles("llama", "fp32")
    doc = decode_step.run_benchmark(rescored, None, no_rescore_bundle=plain, threads=1, rounds=2, steps=4,
                                    log=lambda _msg: None)
    assert set(doc["per_round_ms"]) == {"engine graph", "engine loop", decode_step.NO_RESCORE}
    s = doc["summary"]
    assert s["rescoring_ms"] == pytest.approx(s["engine_graph_ms"] - s["no_rescore_graph_ms"])
    assert doc["settings"]["no_rescore_bundle"] == str(plain)
    missing = decode_step.run_benchmark(rescored, None, no_rescore_bundle=tmp_path, threads=1, rounds=1, steps=3,
                                        log=lambda _msg: None)
    assert str(tmp_path) in missing["skipped"][decode_step.NO_RESCORE] and "rescoring_ms" not in missing["summary"]
    # a bundle that rescores its own logits cannot stand for the plain projection
    with pytest.raises(SystemExit, match="--rescore-top-k 0"):
        decode_step.run_benchmark(rescored, None, no_rescore_bundle=rescored, threads=1, rounds=1, steps=3,
                                  log=lambda _msg: None)


def test_compare_steps_another_build_of_the_same_model(decode_step, tiny_bundles, tiny_bundle: Path, tmp_path: Path,
                                                       capsys) -> None:
    int4, fp32 = tiny_bundles("llama", "int4"), tiny_bundle
    assert decode_step.main(["--bundle", str(int4), "--genai-model", "none", "--no-rescore-bundle", "none",
                             "--compare", f"fp32={fp32}", "--rounds", "2", "--steps", "4", "--threads", "1",
                             "--out-dir", str(tmp_path), "--host", "test"]) == 0
    doc = json.loads((tmp_path / "decode-step-test.json").read_text())
    assert set(doc["per_round_ms"]) == {"engine graph", "engine loop", "graph fp32"}
    c = doc["summary"]["compare"]["fp32"]
    assert c["engine_speed_ratio"] == pytest.approx(c["graph_ms"] / doc["summary"]["engine_graph_ms"])
    assert c["bundle"] == str(fp32) and c["quantization"]["block_size"] is None
    assert "fp32 " in capsys.readouterr().out
    for bad in ("fp32", "=x", "label="):
        with pytest.raises(SystemExit, match="LABEL=DIR"):
            decode_step.main(["--bundle", str(int4), "--genai-model", "none", "--compare", bad])
    with pytest.raises(SystemExit, match="given twice"):  # the second silently replaced the first
        decode_step.main(["--bundle", str(int4), "--genai-model", "none", "--compare", f"a={fp32}", "--compare", f"a={int4}"])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(SystemExit):  # refused before measuring, not after the whole run
        decode_step.main(["--bundle", str(int4), "--out-dir", str(not_a_dir)])
    assert "is not a directory" in capsys.readouterr().err
