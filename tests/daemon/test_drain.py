"""SIGTERM drains: in-flight requests finish, health turns 503, new requests are refused, the process exits 0.

SIGHUP drains the same way and exits 129 (a failure to systemd's Restart=on-failure, which restarts it)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import ASK, TOKEN, Http, SlowEngine, metric, runtime, start_bridge, wait_for

REPLY = "one two three four five six seven eight nine ten"


@pytest.mark.parametrize("sig, exit_status", [(signal.SIGTERM, 0), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_lets_the_request_in_flight_finish_then_the_process_exits_0(tiny_bundle, tmp_path, sig, exit_status):
    # the cloud answers slowly (10 words, 80 ms each): a request long enough to be in flight at SIGTERM.
    # SIGHUP killed the daemon at once (Python's default): no log line, the answer lost, the socket left behind
    bridge = start_bridge(reply=REPLY, token_delay_ms=80.0)
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[engine]\nbundle = "{tiny_bundle}"\nmax_new_tokens = 4\n'
        f'[policy]\ntype = "never"\n'
        f'[cloud]\naddress = "{bridge.address}"\ninsecure = true\n'
        f'[server]\nport = 0\ngrpc_socket = "{tmp_path / "edge.sock"}"\ndrain_timeout_s = 20\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME_") or k == "EDGE_RUNTIME_CACHE"}
    env["EDGE_RUNTIME_CLOUD_TOKEN"] = TOKEN  # the token from the environment, not the file
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                            env=env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    log_lines: list[str] = []
    try:
        port = None
        for line in proc.stderr:
            log_lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "".join(log_lines)
        threading.Thread(target=lambda: log_lines.extend(proc.stderr), daemon=True).start()
        probe = Http(port, timeout_s=10)
        assert wait_for(lambda: probe.request("GET", "/health")[0] == 200, 30), "".join(log_lines)

        answer: dict = {}

        def ask() -> None:
            c = Http(port, timeout_s=30)
            answer["status"], _, answer["body"] = c.json("POST", "/v1/chat/completions",
                                                          {"model": "cloud", "messages": ASK, "max_tokens": 12})
            c.close()

        asker = threading.Thread(target=ask)
        asker.start()
        assert wait_for(lambda: metric(probe.request("GET", "/metrics")[2].decode(),
                                        "edge_runtime_requests_in_progress") == 1, 10)
        proc.send_signal(sig)
        # draining: health says so and new requests are refused, while the one in flight goes on
        assert wait_for(lambda: probe.request("GET", "/health")[0] == 503, 5)
        status, _, health = probe.json("GET", "/health")
        assert health["status"] == "draining"
        status, _, refused = probe.json("POST", "/v1/chat/completions", {"messages": ASK})
        assert status == 503 and refused["error"]["code"] == "shutting_down"
        asker.join(30)
        assert answer["status"] == 200, answer
        assert answer["body"]["choices"][0]["message"]["content"] == REPLY
        assert answer["body"]["routing"]["route"] == "cloud"
        probe.close()
        assert proc.wait(20) == exit_status, "".join(log_lines)
        assert not (tmp_path / "edge.sock").exists()
        assert any("drained" in line for line in log_lines)
        hangup = "SIGHUP: settings are read only at start; draining and stopping (restart to apply changes)"
        assert any(hangup in line for line in log_lines) == (sig == signal.SIGHUP), "".join(log_lines)
        # the log has sizes and timings, never the prompt or the answer (log_content is off)
        assert not any(REPLY in line or "2 + 2" in line for line in log_lines), "".join(log_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        bridge.server.stop(0)


def test_a_drain_that_times_out_cancels_what_is_left_and_stops(engine, start_daemon, http):
    slow = SlowEngine(engine, delay_s=0.05)
    daemon = start_daemon(runtime(slow, {"type": "never"}))
    answer: dict = {}

    def ask() -> None:
        c = Http(daemon.port, timeout_s=30)
        answer["status"], _, answer["body"] = c.request("POST", "/v1/chat/completions",
                                                        {"messages": ASK, "max_tokens": 200})
        c.close()

    asker = threading.Thread(target=ask)
    asker.start()
    assert slow.started.wait(10)
    t0 = time.perf_counter()
    daemon.drain(timeout_s=0.2)
    assert daemon.wait(10) and time.perf_counter() - t0 < 3
    asker.join(10)
    assert answer["status"] == 503 and json.loads(answer["body"])["error"]["code"] == "shutting_down"
    assert slow.finished == ["cancelled"]


class _SlowEncode(SlowEngine):
    """Tokenizing takes ``encode_s`` (a long prompt on a small device), off the event loop."""

    def __init__(self, engine, delay_s: float, encode_s: float) -> None:
        super().__init__(engine, delay_s)
        self.encode_s = encode_s
        self.encoding = threading.Event()
        self.encode_threads: list[str] = []

    def encode(self, *args, **kwargs):
        self.encode_threads.append(threading.current_thread().name)
        self.encoding.set()
        time.sleep(self.encode_s)
        return self._engine.encode(*args, **kwargs)


def test_a_request_being_tokenized_when_the_drain_begins_is_drained_too(engine, start_daemon, monkeypatch):
    import edge_runtime.daemon._http as http_module

    monkeypatch.setattr(http_module, "OFF_LOOP_BYTES", 0)  # every body is parsed in a worker thread
    slow = _SlowEncode(engine, delay_s=0.05, encode_s=0.5)  # 3 s of generation: past uvicorn's 2 s close grace
    daemon = start_daemon(runtime(slow, {"type": "never"}), drain_timeout_s=20)
    answer: dict = {}

    def ask() -> None:
        c = Http(daemon.port, timeout_s=30)
        try:
            answer["r"] = c.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 60})
        finally:
            c.close()

    client = threading.Thread(target=ask)
    client.start()
    assert slow.encoding.wait(10)
    daemon.drain()  # while the request is past the state check but not yet a job
    client.join(30)
    status, _, body = answer["r"]
    assert status == 200 and body["usage"]["completion_tokens"] == 60
    assert daemon.wait(10)
    # and the tokenizing ran in a worker thread, not on the daemon's event loop
    assert slow.encode_threads and all(name.startswith("edge-runtime-parse") for name in slow.encode_threads)


def test_a_drain_that_stops_an_escalation_returns_the_whole_local_answer_as_the_fallback(engine, start_daemon):
    from .conftest import cloud_client

    slow = start_bridge(reply=" ".join(["word"] * 10), token_delay_ms=500.0)  # 6 words: ~3 s
    cloud = cloud_client(slow.address, timeout_s=20.0)
    daemon = start_daemon(runtime(engine, {"type": "threshold", "p": 0.999}, cloud=cloud))
    answer: dict = {}

    def ask() -> None:
        c = Http(daemon.port, timeout_s=30)
        answer["r"] = c.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 6})
        c.close()

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.7)  # the local answer is made; the request waits for the bridge
    daemon.drain(timeout_s=0.2)
    asker.join(10)
    assert daemon.wait(10)
    status, _, body = answer["r"]
    local_answer = engine.generate(messages=ASK, max_new_tokens=6).text
    assert status == 200 and body["routing"]["route"] == "fallback"
    assert "shut down" in body["routing"]["cloud_error"]
    assert body["choices"][0]["message"]["content"] == local_answer
    # counted by its cause, as any failed escalation (it read error="other")
    assert metric(daemon.service.metrics.render(), "edge_runtime_cloud_errors_total",
                  error="ServiceUnavailableError") == 1
    slow.server.stop(0)
    cloud.close()


def test_a_drain_that_fails_still_stops_the_daemon(engine, start_daemon, monkeypatch, caplog, tmp_path):
    # no thread could be started for stopping the gRPC server (memory or a tasks limit): the daemon answered
    # 503 shutting_down until it was killed
    import asyncio

    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path)
    assert daemon.grpc_server is not None

    async def no_thread(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    daemon.drain(timeout_s=1)
    assert daemon.wait(10)
    assert any("drain failed (RuntimeError: can't start new thread): stopping now" in r.getMessage()
               for r in caplog.records)


def test_serve_stops_cleanly_where_the_event_loop_has_no_signal_handlers(tiny_bundle, tmp_path):
    # Windows' asyncio loops raise NotImplementedError from add_signal_handler: serve died at start with a bare
    # traceback. Simulated here on Linux: the daemon falls back to signal.signal and still drains on SIGTERM.
    config = tmp_path / "edge.toml"
    config.write_text(f'[engine]\nbundle = "{tiny_bundle}"\n[policy]\ntype = "never"\n'
                      f'[server]\nport = 0\ngrpc_socket = ""\n')
    script = ("import asyncio.unix_events as u, sys\n"
              "def refuse(*_a, **_k):\n    raise NotImplementedError\n"
              "u._UnixSelectorEventLoop.add_signal_handler = refuse\n"
              "from edge_runtime.cli import main\nrc = main(['serve', '--config', sys.argv[1]])\n"
              "import signal\nprint('SIGINT restored:', signal.getsignal(signal.SIGINT) is signal.default_int_handler,\n"
              "      file=sys.stderr)\nsys.exit(rc)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME_") or k == "EDGE_RUNTIME_CACHE"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(config)], env=env, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    log_lines: list[str] = []
    try:
        for line in proc.stderr:
            log_lines.append(line)
            if "ready" in line or "Traceback" in line:
                break
        reader = threading.Thread(target=lambda: log_lines.extend(proc.stderr), daemon=True)
        reader.start()
        assert any("ready" in line for line in log_lines), "".join(log_lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, "".join(log_lines)
        reader.join(5)
        assert any("draining" in line for line in log_lines), "".join(log_lines)
        # the plain handlers are undone with the loop (they would call into the closed loop: RuntimeError)
        assert any("SIGINT restored: True" in line for line in log_lines), "".join(log_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
