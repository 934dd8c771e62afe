"""benchmarks/daemon.py runs end to end on a tiny bundle and writes a consistent results file (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_daemon_benchmark_writes_its_results(tiny_bundles, tmp_path):
    out = tmp_path / "daemon.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "daemon.py"), "--bundle", str(tiny_bundles("llama", "int4")),
         "--rounds", "3", "--max-tokens", "4", "--per-client", "2", "--idle-wait", "0", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    over = doc["overhead"]
    # engine and runtime once per round, the daemon twice (each call follows one made by the other process)
    assert over["engine"]["n"] == over["runtime"]["n"] == 3 and over["daemon"]["n"] == 6
    assert set(over["daemon_overhead"]) == {"p50_ms", "p99_ms", "median_of_paired_differences_ms"}
    assert over["daemon_breakdown"]["queue_p50_ms"] >= 0
    assert [row["clients"] for row in doc["throughput"]] == [1, 4, 16]
    assert all(row["requests"] == row["n"] == row["clients"] * 2 and row["refused_429"] == 0 for row in doc["throughput"])
    assert doc["daemon_exit_code_after_sigterm"] == 0


def test_a_daemon_that_cannot_start_fails_at_once_with_its_reason(monkeypatch, tmp_path):
    import time

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.daemon import Daemon

    t0 = time.monotonic()
    with pytest.raises(SystemExit, match="bundle not found"):
        Daemon(tmp_path / "no-such-bundle", threads=1, queue_size=1, max_tokens=2)
    assert time.monotonic() - t0 < 30  # not the 120 s readiness wait
