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


def test_a_request_that_fails_in_a_client_thread_fails_the_throughput_phase(monkeypatch):
    """A connection reset (the daemon died, or restarted) in a client thread was only a traceback on stderr: the
    thread's other requests were never made, and the phase returned the rest as a complete measurement."""
    import itertools
    import threading

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import daemon as bench

    calls, lock = itertools.count(), threading.Lock()

    def chat(self, max_tokens):
        with lock:
            i = next(calls)
        if i == 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        return 200, {"usage": {"completion_tokens": max_tokens}}

    monkeypatch.setattr(bench.Client, "chat", chat)

    class FakeDaemon:
        port = 1

    with pytest.raises(SystemExit, match="ConnectionResetError"):
        bench.throughput(FakeDaemon(), 1, 5, 4)
