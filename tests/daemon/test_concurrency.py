"""Many clients at once, the bounded queue, client disconnects and deadlines."""

from __future__ import annotations

import json
import socket
import threading
import time

from .conftest import ASK, Http, SlowEngine, metric, runtime, wait_for


def test_32_concurrent_clients_are_each_answered_or_refused_with_429_and_the_metrics_add_up(engine, start_daemon):
    slow = SlowEngine(engine, delay_s=0.004)  # ~30 ms a request: the queue fills
    daemon = start_daemon(runtime(slow, {"type": "never"}), queue_size=4)
    n = 32
    barrier = threading.Barrier(n)
    outcomes: list[tuple[int, dict, dict] | BaseException] = [RuntimeError("never ran")] * n

    def client(i: int) -> None:
        c = Http(daemon.port, timeout_s=30.0)
        try:
            barrier.wait(10)
            stream = i % 2 == 1  # half of them stream
            status, headers, raw = c.request("POST", "/v1/chat/completions",
                                             {"messages": ASK, "max_tokens": 6, "stream": stream})
            if status == 200 and stream:
                events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                body = next(json.loads(e) for e in reversed(events[:-1]) if json.loads(e)["choices"])
                body["choices"][0]["message"] = {"content": "".join(
                    json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])}
            else:
                body = json.loads(raw)
            outcomes[i] = (status, headers, body)
        except BaseException as err:  # a hang or a broken connection fails the test below
            outcomes[i] = err
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert time.perf_counter() - t0 < 30
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert not errors, errors
    answered = [o for o in outcomes if o[0] == 200]
    refused = [o for o in outcomes if o[0] == 429]
    assert len(answered) + len(refused) == n, sorted({o[0] for o in outcomes})
    assert len(answered) >= 5 and refused  # 1 slot + 4 places ran; the rest was refused, not queued forever
    for _status, headers, body in refused:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
    for _, _, body in answered:
        assert body["routing"]["route"] == "local" and body["choices"][0]["message"]["content"]

    c = Http(daemon.port)
    _, _, text = c.request("GET", "/metrics")
    c.close()
    m = text.decode()
    total = metric(m, "edge_runtime_requests_total", transport="http")
    assert total == n
    assert metric(m, "edge_runtime_requests_total", outcome="answered") == len(answered)
    assert metric(m, "edge_runtime_requests_total", outcome="rejected") == len(refused)
    assert total == len(answered) + len(refused)
    assert metric(m, "edge_runtime_answers_total") == len(answered)
    assert metric(m, "edge_runtime_request_duration_seconds_count") == len(answered)
    assert metric(m, "edge_runtime_tokens_total", side="local", kind="completion") == 6 * len(answered)
    assert metric(m, "edge_runtime_queue_depth") == 0 and metric(m, "edge_runtime_requests_in_progress") == 0


def _raw_post(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
              b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_a_client_that_disconnects_cancels_its_generation(engine, start_daemon, http):
    slow = SlowEngine(engine, delay_s=0.05)
    daemon = start_daemon(runtime(slow, {"type": "never"}))
    for stream in (False, True):
        slow.started.clear()
        before = len(slow.finished)
        s = _raw_post(daemon.port, {"messages": ASK, "max_tokens": 200, "stream": stream})
        assert slow.started.wait(10)
        time.sleep(0.2)
        s.close()  # the client leaves mid-generation
        assert wait_for(lambda n=before: len(slow.finished) > n, 5.0)
        assert slow.finished[-1] == "cancelled"  # stopped after a few of its 200 tokens, not run to the end
    assert wait_for(lambda: daemon.service.active_jobs == 0)
    _, _, text = http(daemon.port).request("GET", "/metrics")
    assert metric(text.decode(), "edge_runtime_requests_total", outcome="cancelled") == 2
    # and the daemon serves the next one
    status, _, done = http(daemon.port).json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2})
    assert status == 200 and done["usage"]["completion_tokens"] == 2


def test_a_request_past_its_deadline_is_stopped_with_504(engine, start_daemon, http):
    slow = SlowEngine(engine, delay_s=0.05)
    daemon = start_daemon(runtime(slow, {"type": "never"}), request_timeout_s=0.3)
    t0 = time.perf_counter()
    status, _, body = http(daemon.port).json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 200})
    assert status == 504 and body["error"]["code"] == "request_timeout"
    assert time.perf_counter() - t0 < 3.0 and slow.finished[-1] == "cancelled"


def test_a_client_that_leaves_before_the_escalation_costs_no_cloud_call(engine, bridge, start_daemon):
    from .conftest import cloud_client

    slow = SlowEngine(engine, delay_s=0.05)
    cloud = cloud_client(bridge.address)
    daemon = start_daemon(runtime(slow, {"type": "threshold", "p": 0.999}, cloud=cloud))
    echo = bridge.server.backends["big"]
    s = _raw_post(daemon.port, {"messages": ASK, "max_tokens": 200, "stream": True})
    assert slow.started.wait(10)
    time.sleep(0.2)
    s.close()  # nothing was shown yet (the draft is held back): the watcher still sees the client leave
    assert wait_for(lambda: slow.finished and daemon.service.active_jobs == 0, 5.0)
    assert slow.finished == ["cancelled"] and echo.generations == []
    cloud.close()


def test_a_client_that_hangs_up_during_a_held_back_answer_does_not_flood_the_log(engine, start_daemon, caplog):
    import struct

    daemon = start_daemon(runtime(engine, {"type": "never"}))  # `auto` holds the answer back, then sends it at once
    with caplog.at_level("WARNING", logger="asyncio"):
        for _ in range(8):  # the reset must land while the burst is being written: not every time
            s = _raw_post(daemon.port, {"messages": ASK, "max_tokens": 200, "stream": True, "model": "auto"})
            buf = b""
            while buf.count(b"data: ") < 3:
                data = s.recv(4096)
                if not data:
                    break
                buf += data
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, mid-burst
            s.close()
        assert wait_for(lambda: daemon.service.active_jobs == 0)
        time.sleep(0.3)
    assert not [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]


def test_a_connection_that_never_completes_its_request_is_closed(engine, start_daemon, http, monkeypatch):
    import edge_runtime.daemon._http as http_module
    from edge_runtime.daemon._protocol import H11WithHeadersTimeout

    monkeypatch.setattr(H11WithHeadersTimeout, "headers_timeout_s", 0.3)
    monkeypatch.setattr(http_module, "BODY_TIMEOUT_S", 0.3)
    daemon = start_daemon(runtime(engine, {"type": "never"}))
    silent = socket.create_connection(("127.0.0.1", daemon.port))  # says nothing
    trickle = socket.create_connection(("127.0.0.1", daemon.port))  # headers a byte at a time
    trickle.sendall(b"POST /v1/chat/com")
    slow_body = socket.create_connection(("127.0.0.1", daemon.port))  # headers, then not all of the body
    slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{\"messages\": ")
    for s in (silent, trickle, slow_body):
        s.settimeout(5)
    assert silent.recv(100) == b""  # closed by the daemon
    time.sleep(0.2)
    trickle.sendall(b"p")
    assert trickle.recv(100) == b""
    answer = slow_body.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert b"connection: close" in answer.lower()  # the rest of that body is never read
    for s in (silent, trickle, slow_body):
        s.close()
    # a request that arrives in time is served as ever, on a fresh connection and on a kept-alive one
    c = http(daemon.port)
    assert c.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2})[0] == 200
    assert c.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2})[0] == 200
