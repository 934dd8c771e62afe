"""The bridge benchmark's own code path: the echo stand-in and a tiny bundle, few requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bridge_bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.bridge as module

    return module


def _run(bridge_bench, out: Path, *extra: str) -> dict:
    assert bridge_bench.main(["--requests", "20", "--per-client", "2", "--concurrency", "1,2", "--max-new-tokens", "4",
                              "--token-delay-ms", "0", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_the_echo_stand_in_says_so_and_loses_nothing(bridge_bench, tmp_path: Path) -> None:
    report = _run(bridge_bench, tmp_path / "bridge.json")
    assert report["cpu_model"]  # the hosts are all called "vm": the CPU tells their files apart
    load = report["throughput"]
    assert load["backend"].startswith("echo stand-in") and load["bundle"] is None and load["bundle_build"] is None
    assert [run["clients"] for run in load["runs"]] == [1, 2]
    assert all(run["answered"] == run["sent"] and run["lost"] == 0 for run in load["runs"])
    assert report["added_latency"]["requests"] == 20


def test_a_bundle_run_records_which_build_was_measured(bridge_bench, tiny_bundle: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_runtime.bundle import load_manifest

    report = _run(bridge_bench, tmp_path / "bridge.json", "--bundle", str(tiny_bundle), "--workers", "1")
    build = report["throughput"]["bundle_build"]
    manifest = load_manifest(tiny_bundle)
    # a later build at the same path (another quantization layout) is another measurement
    assert build["bundle_hash"] == manifest.bundle_hash
    assert build["quantization"]["precision"] == manifest.raw["quantization"]["precision"]
    assert report["throughput"]["runs"][-1]["answered"] == 4

    # the README's table names the build it came from, and the CPU
    import benchmarks.render_readme as render

    monkeypatch.setattr(render, "RESULTS", tmp_path)
    (tmp_path / "bridge.json").rename(tmp_path / "bridge-test.json")
    table = render._bridge("test")
    assert f"bundle build {manifest.bundle_hash[:12]} (fp32" in table and report["cpu_model"] in table


def test_cpu_model_reads_the_first_model_name_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks._host import cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9B14"
    assert cpu_model(tmp_path / "missing")  # platform's answer, never empty


def test_a_readme_block_of_an_unknown_name_is_skipped_and_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # a typo in a marker was a KeyError traceback
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.render_readme as render

    readme = tmp_path / "README.md"
    original = "intro\n<!-- results:thruput -->\nold\n<!-- /results -->\n"
    readme.write_text(original)
    monkeypatch.setattr(render, "ROOT", tmp_path)
    assert render.main(["--host", "nohost"]) == 0
    assert readme.read_text() == original
    assert "skipping unknown results block 'thruput' at README.md line 2" in capsys.readouterr().err


def test_the_command_shown_with_the_bridge_results_has_every_setting_that_made_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a run with --intra-op-threads 1 was shown as the plain command, which measures another configuration
    monkeypatch.syspath_prepend(str(ROOT))
    import json

    import benchmarks.render_readme as render

    doc = json.loads((ROOT / "benchmarks" / "results" / "bridge-vm.json").read_text())
    doc["throughput"].update(intra_op_threads=1, max_new_tokens=64)
    (tmp_path / "bridge-t1.json").write_text(json.dumps(doc))
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    command = render._bridge("t1").split("`")[1]
    assert command.endswith("--intra-op-threads 1 --max-new-tokens 64"), command


def test_the_requests_lost_are_named_whichever_client_count_lost_them(bridge_bench, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # the message named the last run's failures only: lost with 1 client, none with 2, it read "1 requests lost: []"
    def run_clients(port: int, clients: int, per_client: int, max_new_tokens: int) -> dict:
        lost = 1 if clients == 1 else 0
        return {"clients": clients, "sent": clients * per_client, "answered": clients * per_client - lost, "lost": lost,
                "retried_after_queue_full": 0, "requests_per_s": 1.0, "completion_tokens_per_s": 1.0,
                "latency_p50_ms": 1.0, "latency_p99_ms": 1.0,
                "failures": ["RESOURCE_EXHAUSTED: the queue is full"] if lost else []}

    monkeypatch.setattr(bridge_bench, "_run_clients", run_clients)
    assert bridge_bench.main(["--requests", "5", "--per-client", "2", "--concurrency", "1,2", "--token-delay-ms", "0",
                              "--out", str(tmp_path / "bridge.json")]) == 1
    err = capsys.readouterr().err
    assert "1 requests lost" in err and "RESOURCE_EXHAUSTED: the queue is full" in err and "1 client(s)" in err
