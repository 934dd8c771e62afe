"""The throughput benchmark's own code path, on the tiny bundle, this engine only (no peers are set up)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def throughput(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.throughput as module

    return module


def _ok_result(label: str, kind: str, precision: str, decode: float, rss: float, load: float = 500.0) -> dict:
    median = {
        "decode_tokens_per_s": decode, "prefill_long_tokens_per_s": 1000.0, "ttft_short_ms": 50.0,
        "peak_rss_mb": rss, "load_ms": load,
    }
    return {"label": label, "kind": kind, "precision": precision, "status": "ok", "median": median}


def test_engine_only_run_writes_the_results_schema(throughput, tiny_bundle: Path, tmp_path: Path) -> None:
    doc = throughput.run_benchmark(
        threads=1, repetitions=2, warmup=1, load_repetitions=2, decode_tokens=4, short_tokens=6, long_tokens=24,
        bundles={"edge-runtime tiny": tiny_bundle}, peers=("no-such-peer",), setup_peers=False,
        build_bundles=False, bandwidth_mb=8, load_sample_s=0.05, timeout_s=60, log=lambda _msg: None,
        reference_bundle=tiny_bundle, quality_tokens=40,
    )
    json_path, md_path = throughput.write_results(doc, tmp_path, host="test")
    assert json_path.name == "throughput-test.json" and md_path.name == "throughput-test.md"
    data = json.loads(json_path.read_text())

    assert data["schema_version"] == throughput.SCHEMA_VERSION
    host = data["host"]
    assert host["threads_used"] == 1 and host["cpu_model"] and host["logical_cpus"] >= 1
    assert data["settings"]["prompt_tokens"] == {"short": 6, "long": 24}
    assert [len(data["prompts"]["short"]), len(data["prompts"]["long"])] == [6, 24]
    assert data["memory_bandwidth"]["best_gb_per_s"] > 0
    assert set(data["load"]["before"]) >= {"loadavg_1_5_15", "busy_processes"}

    engine, peer = data["results"]
    assert peer["status"] == "skipped" and "unknown peer" in peer["reason"]
    assert engine["status"] == "ok", engine.get("reason")
    assert engine["versions"]["edge-runtime"] and engine["versions"]["onnxruntime"]
    (run,) = engine["rounds"]
    assert run["threads"] == 1 and len(run["load_ms"]) == 2
    assert run["peak_rss_mb"] > 10  # a real process that loaded onnxruntime
    short, long = run["repetitions"]["short"], run["repetitions"]["long"]
    assert len(short) == len(long) == 2
    for rep in short:
        assert rep["prompt_tokens"] == 6 and 1 <= rep["generated_tokens"] <= 4
        assert 0 < rep["prefill_ms"] <= rep["ttft_ms"] <= rep["wall_ms"]
        assert rep["energy"]["source"] and isinstance(rep["energy"]["estimated"], bool)
        assert rep["extra"]["finish_reason"] in ("length", "eos")
    assert all(rep["prompt_tokens"] == 24 and rep["generated_tokens"] == 1 for rep in long)
    median = engine["median"]
    assert median["repetitions"] == 2 and median["load_ms"] > 0 and median["prefill_long_tokens_per_s"] > 0
    if min(rep["generated_tokens"] for rep in short) > 1:
        assert median["decode_tokens_per_s"] > 0
    # no int4 bundle among the targets: no ratios are invented
    assert data["summary"]["reference"] is None

    # quality: the sample's first 40 ids, scored by the reference and by the runtime in its (only) round
    quality = data["quality"]
    assert quality["sample"] == "quantize/data/quality_sample.txt" and quality["tokens"] == 40
    assert quality["sample_tokens"] > 40 and len(quality["token_ids"]) == 40
    ref = quality["reference"]
    assert "error" not in ref, ref.get("error")
    assert ref["perplexity"] > 1 and len(ref["top1"]) == len(ref["logprobs"]) == 39
    scored = run["quality"]
    assert scored["tokens"] == 40 and scored["tokenizer"]["matches"]
    # the engine row runs the reference bundle itself: exactly the reference's figures
    assert engine["quality"]["ppl_ratio_vs_reference"] == 1.0
    assert engine["quality"]["top1_agreement_vs_reference"] == 1.0
    assert engine["quality"]["perplexity"] == ref["perplexity"]

    table = md_path.read_text()
    assert "| edge-runtime tiny |" in table and "no-such-peer: skipped" in table
    assert "| ppl | ppl ÷ fp32 | top-1 = fp32 |" in table
    assert "| 1.000 | 100.0% |" in table


def test_summary_ratios_targets_and_ceiling(throughput) -> None:
    results = [
        _ok_result("edge-runtime int4", "engine", "int4", decode=120.0, rss=300.0, load=400.0),
        _ok_result("edge-runtime int8", "engine", "int8", decode=90.0, rss=350.0),
        _ok_result("llama.cpp Q4_1", "peer", "q4_1", decode=80.0, rss=320.0),
        _ok_result("onnxruntime-genai int4", "peer", "int4", decode=100.0, rss=290.0),
        {"label": "other", "kind": "peer", "status": "skipped", "reason": "not set up"},
    ]
    bandwidth = {"best_gb_per_s": 25.0}
    size = {"bytes": 100_000_000, "quantized_weight_codes_bytes": 50_000_000, "file_bytes": 90_000_000}
    s = throughput.summarize(results, bandwidth, size)
    assert s["reference"] == "edge-runtime int4"
    assert s["decode_ratio_vs"] == {"llama.cpp Q4_1": 1.5, "onnxruntime-genai int4": 1.2}
    assert s["faster_peer"] == "onnxruntime-genai int4" and s["decode_ratio_vs_faster_peer"] == 1.2
    assert s["decode_target"]["met"] and s["decode_target"]["stretch_met"]
    assert s["load"]["met"]
    assert not s["peak_rss"]["met"]  # 300 MB is above genai's 290 MB
    ceiling = s["bandwidth_ceiling"]
    assert ceiling["ceiling_tokens_per_s"] == 250.0 and ceiling["engine_share"] == 0.48
    assert ceiling["codes_only_ceiling_tokens_per_s"] == 500.0


def test_the_default_bundle_is_measured_with_and_without_prompt_lookup(throughput, tiny_bundle: Path, tmp_path: Path) -> None:
    targets = throughput.engine_targets({"edge-runtime int4": tiny_bundle, "edge-runtime int8": tiny_bundle}, build=False)
    assert [t.label for t in targets] == ["edge-runtime int4", throughput.LOOKUP_LABEL, "edge-runtime int8"]
    assert targets[1].model == targets[0].model and targets[1].options == {"prompt_lookup": 3} and not targets[0].options
    # the option reaches the engine in the runner's process, and the drafts are counted there
    spec = {"threads": 1, "prompts": {"short": [1, 2, 3, 1, 2, 3, 1, 2], "long": [1, 2, 3, 4]}, "decode_tokens": 6,
            "repetitions": 1, "warmup": 0, "load_repetitions": 1, "repo_root": str(ROOT)}
    docs = [throughput._run_target(t, spec, 120) for t in targets[:2]]
    for doc, lookup in zip(docs, (0, 3)):
        assert "error" not in doc, doc.get("error")
        assert doc["load_info"][0]["prompt_lookup"] == lookup
        assert doc["repetitions"]["short"][0]["extra"]["draft_tokens"] >= 0
    assert docs[0]["repetitions"]["short"][0]["extra"]["draft_tokens"] == 0

    without = _ok_result("edge-runtime int4", "engine", "int4", decode=100.0, rss=300.0)
    without["median"].update(draft_tokens=0, accepted_draft_tokens=0, generated_tokens=128)
    with_drafts = _ok_result(throughput.LOOKUP_LABEL, "engine", "int4", decode=120.0, rss=300.0)
    with_drafts["median"].update(draft_tokens=40, accepted_draft_tokens=25, generated_tokens=128)
    genai = _ok_result("onnxruntime-genai int4", "peer", "int4", decode=110.0, rss=290.0)
    s = throughput.summarize([without, with_drafts, genai], {"best_gb_per_s": 25.0}, None)
    assert s["prompt_lookup"] == {"label": throughput.LOOKUP_LABEL, "draft_tokens": 40, "accepted_draft_tokens": 25,
                                  "generated_tokens": 128, "decode_tokens_per_s": 120.0, "speedup": 1.2,
                                  "ratio_vs_faster_peer": 1.091}
    # the targets are the default's, and the faster peer is a peer, never the row with drafts
    assert s["reference"] == "edge-runtime int4" and s["decode_ratio_vs_faster_peer"] == 0.909
    # the row with drafts is never the reference, even listed first or alone
    with_drafts["details"] = {"engine_options": {"prompt_lookup": 3}}
    assert throughput.summarize([with_drafts, without, genai], {"best_gb_per_s": 25.0}, None)["reference"] == "edge-runtime int4"
    assert throughput.summarize([with_drafts, genai], {"best_gb_per_s": 25.0}, None)["reference"] is None


def test_quality_comparison_against_the_reference(throughput) -> None:
    ref = {"tokens": 5, "perplexity": 10.0, "nll": 2.302585, "score_ms": 1.0, "top1": [1, 2, 3, 4]}
    runtime = {"tokens": 5, "perplexity": 12.5, "nll": 2.5257, "score_ms": 2.0, "top1": [1, 2, 9, 4],
               "tokenizer": {"matches": False}}
    q = throughput.compare_quality(runtime, ref)
    assert q["ppl_ratio_vs_reference"] == 1.25 and q["top1_agreement_vs_reference"] == 0.75
    assert q["own_tokenizer_matches"] is False
    # a reference scored on other ids (another length) gives no ratio rather than a wrong one
    assert throughput.compare_quality(runtime, {**ref, "top1": [1, 2, 3]})["ppl_ratio_vs_reference"] is None
    assert throughput.compare_quality(None, ref) is None


def test_next_token_stats_matches_a_direct_log_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.peers._harness import next_token_stats

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 11)).astype(np.float32) * 5
    ids = [3, 1, 4, 1, 5, 9, 2]
    logprobs, top1 = next_token_stats(logits, ids, rows=3)  # slices of 3 rows: 6 positions in 2 slices
    x = logits[:6].astype(np.float64)
    expected = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    assert np.allclose(logprobs, expected[np.arange(6), ids[1:]])
    assert top1 == x.argmax(axis=-1).tolist()


def test_summary_puts_every_row_speed_next_to_its_quality(throughput) -> None:
    int4 = _ok_result("edge-runtime int4", "engine", "int4", decode=150.0, rss=300.0)
    int4["quality"] = {"ppl_ratio_vs_reference": 1.07, "top1_agreement_vs_reference": 0.82}
    zp = _ok_result("edge-runtime int4-zp", "engine", "int4", decode=200.0, rss=300.0)
    zp["quality"] = {"ppl_ratio_vs_reference": 1.36, "top1_agreement_vs_reference": 0.65}
    genai = _ok_result("onnxruntime-genai int4", "peer", "int4", decode=250.0, rss=380.0)
    llama = _ok_result("llama.cpp Q4_1", "peer", "q4_1", decode=125.0, rss=200.0)
    rows = {r["label"]: r for r in throughput.summarize([int4, zp, genai, llama], {"best_gb_per_s": 25.0}, None)
            ["speed_and_quality"]}
    assert rows["edge-runtime int4-zp"]["decode_ratio_vs"] == {"onnxruntime-genai int4": 0.8, "llama.cpp Q4_1": 1.6}
    assert rows["edge-runtime int4-zp"]["ppl_ratio_vs_reference"] == 1.36
    assert rows["onnxruntime-genai int4"]["decode_ratio_vs"] == {"llama.cpp Q4_1": 2.0}
    assert rows["llama.cpp Q4_1"]["ppl_ratio_vs_reference"] is None  # not scored: no figure invented


def test_the_model_column_names_each_int4_layout(throughput) -> None:
    def cell(**quantization) -> str:
        result = _ok_result("edge-runtime int4", "engine", "int4", decode=1.0, rss=1.0)
        result["details"] = {"quantization": {"int4_offsets": False, "rescore_top_k": 32, **quantization}}
        return throughput._model_cell(result)

    assert cell() == "edge bundle int4, integer zero points, top 32 logits rescored (MatMulNBits)"
    assert cell(int4_offsets=True) == "edge bundle int4, float block offsets, top 32 logits rescored (MatMulNBits)"
    # a symmetric build stores no zero points: the row must not say it does
    assert cell(int4_symmetric=True) == "edge bundle int4, symmetric (zero point 8), top 32 logits rescored (MatMulNBits)"
    assert "int4-sym" in throughput.OPTIONAL_VARIANTS


def test_the_model_column_does_not_give_an_fp32_bundle_4_bit_kernels(throughput) -> None:
    # `--bundle fp32=<cache>/bundles/smollm2-135m-instruct-fp32`: its graph has plain MatMul nodes, no MatMulNBits
    result = _ok_result("fp32", "engine", "fp32", decode=1.0, rss=1.0)
    result["details"] = {"quantization": {"precision": "fp32"}}
    assert throughput._model_cell(result) == "edge bundle fp32 (MatMul)"


def test_prompts_have_exact_lengths_and_share_ids(throughput, tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    bos = manifest["tokens"].get("bos_token_id")
    prompts = throughput.make_prompts(tiny_bundle / "tokenizer.json", bos, 20, 500)
    assert len(prompts["short"]) == 20 and len(prompts["long"]) == 500
    if bos is not None:
        assert prompts["short"][0] == bos == prompts["long"][0]


def test_cli_bench_throughput_runs_the_script_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from edge_runtime.cli import main

    calls = []
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.throughput as module

    monkeypatch.setattr(module, "run_from_args", lambda args: calls.append(args) or 0)
    assert main(["bench", "throughput", "--peers", "none", "--repetitions", "2", "--out-dir", str(tmp_path)]) == 0
    (args,) = calls
    assert args.peers == "none" and args.repetitions == 2 and args.out_dir == tmp_path
    assert "benchmarks.throughput" in sys.modules
    monkeypatch.undo()  # the real run_from_args: it refuses an unknown peer before any work
    monkeypatch.setattr(module, "run_benchmark", lambda **kw: pytest.fail("an unknown peer must stop the run first"))
    assert main(["bench", "throughput", "--peers", "llamacpp,bogus", "--out-dir", str(tmp_path)]) == 1


def test_a_run_on_a_busy_machine_is_discarded_and_rerun(throughput, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = throughput._run_target
    calls: list[int] = []

    def first_one_noisy(target, spec, timeout_s):
        doc = real_run(target, spec, timeout_s)
        if not calls:
            doc["conditions"]["other_cpu_share"] = 1.0  # as if another program had taken every CPU
        calls.append(1)
        return doc

    waits: list[float] = []
    monkeypatch.setattr(throughput, "_run_target", first_one_noisy)
    monkeypatch.setattr(throughput, "wait_for_idle", lambda seconds, log=print: waits.append(seconds) or True)
    doc = throughput.run_benchmark(
        threads=1, repetitions=1, warmup=0, load_repetitions=1, decode_tokens=2, short_tokens=4, long_tokens=8,
        bundles={"tiny": tiny_bundle}, peers=(), build_bundles=False, bandwidth_mb=4, load_sample_s=0.01,
        max_other_cpu=0.99, noisy_retries=2, idle_wait_s=7.0, quality=False, log=lambda _msg: None,
    )
    (result,) = doc["results"]
    assert len(calls) == 2 and waits == [7.0]
    assert len(result["rejected_rounds"]) == 1 and result["rejected_rounds"][0]["conditions"]["other_cpu_share"] == 1.0
    (kept,) = result["rounds"]
    assert kept["conditions"]["other_cpu_share"] < 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--warmup", "-3"], "--warmup: must be >= 0"),
        (["--noisy-retries", "-1"], "--noisy-retries: must be >= 0"),
        (["--idle-wait", "nan"], "--idle-wait: must be a number of seconds"),
        (["--peers", ","], "--peers: name at least one peer"),
        (["--out-dir", __file__], "--out-dir:"),
        (["--host", "lab/pi5"], "--host: must be a plain name"),  # the results file is written after the run
        (["--host", "../x"], "--host: must be a plain name"),
    ],
)
def test_bad_bench_flags_are_refused_before_anything_runs(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "throughput", *flags])
    assert message in capsys.readouterr().err


def test_an_out_dir_before_a_refused_flag_is_not_left_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --out-dir was made while the arguments were parsed: a command refused for the flag after it left it there
    from edge_runtime.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--out-dir", str(tmp_path / "results" / "pi5"), "--warmup", "-3"])
    assert "--warmup: must be >= 0" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_an_out_dir_that_cannot_be_made_names_the_file_in_the_way(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime.cli import main

    (tmp_path / "results").write_text("")
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--out-dir", str(tmp_path / "results" / "pi5")])
    assert f"--out-dir: {tmp_path / 'results'} is not a directory" in capsys.readouterr().err


def test_a_bundle_label_given_twice_is_refused_before_anything_runs(tiny_bundle: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime.cli import main

    code = main(["bench", "throughput", "--peers", "none", "--out-dir", str(tmp_path),
                 "--bundle", f"a={tiny_bundle}", "--bundle", f"a={tmp_path}"])
    assert code == 1 and "--bundle" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_an_unusable_bundle_is_reported_before_any_peer_is_set_up(throughput, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_runtime.errors import BundleError

    def no_peers(*a, **k):
        raise AssertionError("peers were set up (minutes the first time) for a run that cannot happen")

    monkeypatch.setattr(throughput, "peer_targets", no_peers)
    with pytest.raises(BundleError, match="no usable engine bundle"):
        throughput.run_benchmark(bundles={"x": tmp_path / "nope"}, peers=("genai",), build_bundles=False,
                                 load_sample_s=0.01, log=lambda _msg: None)


def test_a_bundle_of_another_model_is_not_compared_with_smollm2(throughput, tiny_bundle: Path, tmp_path: Path) -> None:
    # the peers and the default quality reference run SmolLM2: a tiny model read "37x the faster peer", and its
    # perplexity was divided by SmolLM2's
    from edge_runtime.errors import ConfigError

    common = dict(threads=1, repetitions=1, warmup=0, load_repetitions=1, decode_tokens=2, short_tokens=6,
                  long_tokens=12, bundles={"tiny": tiny_bundle}, setup_peers=False, build_bundles=False,
                  bandwidth_mb=8, load_sample_s=0.01, timeout_s=60, quality_tokens=20)
    with pytest.raises(ConfigError, match="peers run smollm2-135m-instruct and these bundles are tiny-llama"):
        throughput.run_benchmark(peers=("genai",), log=lambda _msg: None, **common)
    said: list[str] = []
    doc = throughput.run_benchmark(peers=(), log=said.append, **common)
    assert "no fp32 reference for tiny-llama: quality is not compared" in said
    (engine,) = doc["results"]
    assert engine["status"] == "ok" and not engine["quality"]


def test_a_run_that_did_not_measure_every_runtime_exits_non_zero(throughput, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a runner killed by the OOM killer left its row out and the run exited 0, over the committed results
    doc = {"results": [{"label": "edge-runtime int4", "status": "ok"}, {"label": "llama.cpp", "status": "failed"}]}
    monkeypatch.setattr(throughput, "run_benchmark", lambda **_kw: doc)
    monkeypatch.setattr(throughput, "write_results", lambda *_a: (tmp_path / "a.json", tmp_path / "a.md"))
    monkeypatch.setattr(throughput, "render_markdown", lambda _doc: "table")
    assert throughput.main(["--peers", "none", "--out-dir", str(tmp_path)]) == 1
    assert "not measured: llama.cpp" in capsys.readouterr().err


def test_a_runner_killed_by_a_signal_is_reported_by_its_name(throughput, tmp_path: Path) -> None:
    # llama.cpp's AMX kernels die of SIGILL on some Xeons: "runner exited -4" said nothing
    import sys

    runner = tmp_path / "runner.py"
    runner.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    target = throughput.Target("crashes", "peer", Path(sys.executable), runner, tmp_path, "peer")
    doc = throughput._run_target(target, {}, 60)
    assert "was killed by SIGILL (illegal instruction" in doc["error"], doc["error"]


def test_the_llamacpp_build_avoids_amx_and_a_build_with_other_flags_is_made_again(monkeypatch) -> None:
    from benchmarks.peers import envs

    if envs.platform.machine().lower() in ("x86_64", "amd64"):
        assert "-mno-amx-int8" in envs._llamacpp_build_env()["CXXFLAGS"]
    tag = envs._llamacpp_build_tag()
    monkeypatch.setattr(envs, "LLAMACPP_CFLAGS", envs.LLAMACPP_CFLAGS + " -O3")
    assert envs._llamacpp_build_tag() != tag


def test_a_llamacpp_venv_built_with_other_flags_is_built_again(monkeypatch, tmp_path: Path) -> None:
    from benchmarks.peers import envs

    ran: list[list[str]] = []

    def run(cmd, log, *, env=None, timeout=3600):
        ran.append(cmd)
        if "wheel" in cmd[3:4]:  # pip wheel ... -w DIR: the build leaves a wheel there
            out = Path(cmd[cmd.index("-w") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"llama_cpp_python-{envs.LLAMACPP_VERSION}-py3-none-linux_x86_64.whl").write_bytes(b"")
        return ""

    venv = tmp_path / "llamacpp-venv"
    monkeypatch.setattr(envs, "peers_dir", lambda: tmp_path)
    monkeypatch.setattr(envs, "_run", run)
    monkeypatch.setattr(envs, "_probe", lambda python, code: envs.LLAMACPP_VERSION)  # the version imports
    monkeypatch.setattr(envs, "_make_venv", lambda v, log: (v.mkdir(exist_ok=True), envs._venv_python(v))[1])
    monkeypatch.setattr(envs, "_gguf", lambda log: tmp_path / "model.gguf")

    def builds() -> int:
        before = len(ran)
        envs.setup_llamacpp(log=lambda _msg: None)
        return sum(1 for cmd in ran[before:] if "wheel" in cmd[3:4])

    assert builds() == 1  # the right version, but no stamp: a venv from before the flags were recorded
    assert (venv / "edge-runtime-build-tag").read_text().strip() == envs._llamacpp_build_tag()
    assert builds() == 0 and len(ran) == 3  # stamped with these flags: nothing to do
    monkeypatch.setattr(envs, "LLAMACPP_CFLAGS", envs.LLAMACPP_CFLAGS + " -O3")
    assert builds() == 1  # other flags: another wheel, installed over the old one
    assert len(list((tmp_path / "wheels").iterdir())) == 2  # one wheel directory per set of flags
