"""The prompt-lookup benchmark's own code path on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def lookup(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.lookup as module

    return module


def test_writes_each_workload_with_and_without_drafts(lookup, tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lookup-test.json"
    assert lookup.main(["--bundle", str(tiny_bundle), "--rounds", "2", "--tasks", "3", "--threads", "1",
                        "--idle-wait", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"] == {"rounds": 2, "tasks": 3, "threads": 1, "prompt_lookup": 3}
    w = doc["workloads"]
    assert list(w) == ["story", "chat", "tasks"]
    assert [w[k]["requests"] for k in w] == [1, len(lookup.CHAT), 3]
    for stats in w.values():
        assert len(stats["speedup_per_round"]) == 2 and stats["speedup"] > 0
        assert stats["decode_tokens_per_s"]["without"] > 0 and stats["decode_tokens_per_s"]["with"] > 0
        assert 0 <= stats["accepted_draft_tokens"] <= stats["draft_tokens"]
        # the tiny bundle is fp32: drafts never change an answer
        assert stats["identical_answers"] == stats["requests"]
        assert stats["generated_tokens"]["with"] == stats["generated_tokens"]["without"]
    costs = doc["step_costs"]
    assert list(costs["ms"]) == ["1", "2", "3", "4"] and all(ms > 0 for ms in costs["ms"].values())
    assert costs["relative_to_one_row"]["1"] == 1.0
    table = out.with_suffix(".md").read_text()
    assert "A decode step feeding 2 rows costs" in table
    assert "| chat | 10 |" in table and table in capsys.readouterr().out


def test_bad_flags_are_refused(lookup, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit):
        lookup.main(["--out", str(tmp_path / "results" / "lookup.json"), "--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the results file's directory is made when it is written, not before
    # "x.md": the JSON was written there, then overwritten by the table
    with pytest.raises(SystemExit):
        lookup.main(["--out", str(tmp_path / "lookup.md")])
    assert "--out: the results file must end in .json" in capsys.readouterr().err


def test_a_workload_with_no_requests_reports_no_speed(lookup, tiny_bundle: Path, tmp_path: Path) -> None:
    # --tasks 0 read "0.0 tok/s" with and without drafts, as if measured
    out = tmp_path / "lookup-test.json"
    assert lookup.main(["--bundle", str(tiny_bundle), "--rounds", "1", "--tasks", "0", "--threads", "1",
                        "--idle-wait", "0", "--out", str(out)]) == 0
    tasks = json.loads(out.read_text())["workloads"]["tasks"]
    assert tasks["requests"] == 0 and tasks["decode_tokens_per_s"] == {"without": None, "with": None}
    assert "| tasks | 0 | – | – |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(("script", "args", "message"), [
    ("lookup", ["--out", "/proc/nope/lookup.json"], "argument --out: cannot create /proc/nope"),
    ("daemon", ["--out", "{tmp}"], "is a directory: give the results file's path"),
    ("bridge", ["--out", "/proc/nope/bridge.json"], "argument --out: cannot create /proc/nope"),
    ("bridge", ["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    ("bridge", ["--token-delay-ms", "-1"], "must be a number of milliseconds >= 0"),
    ("lookup", ["--bundle", "{tmp}/none"], "--bundle: {tmp}/none is not a bundle; build the default one with"),
    ("decode_step", ["--bundle", "{tmp}/none"], "--bundle: {tmp}/none is not a bundle"),
    # a file as --out was a FileExistsError traceback after every bundle was scored; results are named by --host
    ("bundles", ["--out", "{tmp}/file"], "argument --out: {tmp}/file is not a directory"),
    ("bundles", ["--host", "../x"], "argument --host: must be a plain name"),
    ("bridge", ["--bundle", "{tmp}/none"], "--bundle: {tmp}/none is not a bundle"),  # it was after 2,000 round trips
])
def test_bad_arguments_are_refused_before_measuring(monkeypatch, tmp_path, capsys, script, args, message):
    # a results path that cannot be written lost the whole run at its end, with a traceback
    import importlib

    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(f"benchmarks.{script}")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:
        module.main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert info.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


@pytest.mark.parametrize("script", ["lookup.py", "long_prompt.py", "daemon.py"])
def test_a_thread_count_below_one_is_refused_when_parsed(script):
    # QA GGG: daemon.py took --threads 0 as "not set" only after its idle wait and a daemon's start
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--threads", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--threads: must be >= 1" in done.stderr

