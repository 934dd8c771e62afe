"""Bad requests get OpenAI-shaped errors with the right status and type, and the daemon keeps serving."""

from __future__ import annotations

import json
import threading
import time

import pytest

from edge_runtime.daemon import create_server, is_loopback_host
from edge_runtime.errors import ConfigError

from .conftest import ASK, daemon_settings, metric, runtime

OK = {"messages": ASK, "max_tokens": 2}

# (request body or raw bytes, status, type, code, param)
BAD = [
    (b"{not json", 400, "invalid_request_error", "invalid_json", None),
    (b"\xff\xfe", 400, "invalid_request_error", "invalid_json", None),
    (b"[" * 2000 + b"]" * 2000, 400, "invalid_request_error", "invalid_json", None),  # deeper than json's recursion
    ([1, 2, 3], 400, "invalid_request_error", "invalid_value", None),
    ({**OK, "model": "gpt-4o"}, 404, "invalid_request_error", "model_not_found", "model"),
    ({**OK, "model": 7}, 400, "invalid_request_error", "invalid_value", "model"),
    # echoed in the error: a lone surrogate has no UTF-8 encoding (it gave a plain-text 500)
    ({**OK, "model": "\ud800"}, 404, "invalid_request_error", "model_not_found", "model"),
    # ... and refused by strict JSON readers as an escape: a field name is echoed with U+FFFD for it (QA OO)
    ({**OK, "\ud800": 1}, 400, "invalid_request_error", "invalid_value", "\ufffd"),
    ({"max_tokens": 2}, 400, "invalid_request_error", "invalid_value", "messages"),
    ({**OK, "messages": []}, 400, "invalid_request_error", "invalid_value", "messages"),
    ({**OK, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request_error", "invalid_value",
     "messages[0].role"),
    ({**OK, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request_error", "invalid_value",
     "messages[0].content"),
    ({**OK, "temperature": -1}, 400, "invalid_request_error", "invalid_value", "temperature"),
    ({**OK, "temperature": "hot"}, 400, "invalid_request_error", "invalid_value", "temperature"),
    ({**OK, "top_p": 0}, 400, "invalid_request_error", "invalid_value", "top_p"),
    ({**OK, "max_tokens": 0}, 400, "invalid_request_error", "invalid_value", "max_tokens"),
    ({**OK, "max_tokens": 2.5}, 400, "invalid_request_error", "invalid_value", "max_tokens"),
    ({**OK, "max_completion_tokens": -3}, 400, "invalid_request_error", "invalid_value", "max_completion_tokens"),
    ({**OK, "max_completion_tokens": 3, "max_tokens": "abc"}, 400, "invalid_request_error", "invalid_value",
     "max_tokens"),  # the newer name wins, but a bad value under the older one is not ignored
    ({**OK, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "invalid_request_error", "invalid_value",
     "stream_options.include_usage"),
    # options for a stream not asked for: ignored, where OpenAI's API refuses them
    ({**OK, "stream_options": {"include_usage": True}}, 400, "invalid_request_error", "invalid_value", "stream_options"),
    ({**OK, "stream": False, "stream_options": {}}, 400, "invalid_request_error", "invalid_value", "stream_options"),
    ({**OK, "seed": "x"}, 400, "invalid_request_error", "invalid_value", "seed"),
    ({**OK, "stop": [1]}, 400, "invalid_request_error", "invalid_value", "stop"),
    ({**OK, "stop": [""]}, 400, "invalid_request_error", "invalid_value", "stop[0]"),
    ({**OK, "logprobs": "yes"}, 400, "invalid_request_error", "invalid_value", "logprobs"),
    ({**OK, "top_logprobs": 3}, 400, "invalid_request_error", "invalid_value", "top_logprobs"),
    ({**OK, "logprobs": True, "top_logprobs": 21}, 400, "invalid_request_error", "invalid_value", "top_logprobs"),
    ({**OK, "n": 2}, 400, "invalid_request_error", "invalid_value", "n"),
    ({**OK, "stream": "true"}, 400, "invalid_request_error", "invalid_value", "stream"),
    ({**OK, "user": 12}, 400, "invalid_request_error", "invalid_value", "user"),
    ({**OK, "seed": -2 ** 63 - 1, "temperature": 0.5}, 400, "invalid_request_error", "invalid_value", "seed"),
    # values no sampler can take: a float past 1e308, a seed past the bridge's int64, JSON's true for n
    ({**OK, "temperature": 10 ** 400}, 400, "invalid_request_error", "invalid_value", "temperature"),
    ({**OK, "seed": 2 ** 64, "temperature": 0.5}, 400, "invalid_request_error", "invalid_value", "seed"),
    ({**OK, "n": True}, 400, "invalid_request_error", "invalid_value", "n"),
    ({**OK, "stream": True, "stream_options": {"include_usge": True}}, 400, "invalid_request_error", "invalid_value",
     "stream_options.include_usge"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, "invalid_request_error", "invalid_value", "messages[0].content[0]"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, 400, "invalid_request_error",
     "invalid_value", "messages[0].content[0].text"),
    # asked for, not supported: refused rather than answered as if not asked
    ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "invalid_request_error", "invalid_value", "tools"),
    ({**OK, "response_format": {"type": "json_object"}}, 400, "invalid_request_error", "invalid_value", "response_format"),
    ({**OK, "logit_bias": {"50256": -100}}, 400, "invalid_request_error", "invalid_value", "logit_bias"),
    ({**OK, "presence_penalty": 0.5}, 400, "invalid_request_error", "invalid_value", "presence_penalty"),
    # false == 0 in Python only; OpenAI's harmless fields are still type-checked
    ({**OK, "frequency_penalty": False}, 400, "invalid_request_error", "invalid_value", "frequency_penalty"),
    ({**OK, "metadata": {"a": 1}}, 400, "invalid_request_error", "invalid_value", "metadata"),
    ({**OK, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "invalid_request_error", "invalid_value", "metadata"),
    ({**OK, "store": "yes"}, 400, "invalid_request_error", "invalid_value", "store"),
    ({**OK, "prompt_cache_key": 5}, 400, "invalid_request_error", "invalid_value", "prompt_cache_key"),
    # inside a message: OpenAI's fields are type-checked, and tool calling is refused as at the top level
    ({**OK, "messages": [{"role": "user", "content": "hi", "name": 5}]}, 400, "invalid_request_error",
     "invalid_value", "messages[0].name"),
    ({**OK, "messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                         {"role": "user", "content": "hi"}]}, 400, "invalid_request_error", "invalid_value",
     "messages[0].tool_calls"),
    # the tiny model's context window is 256 tokens
    ({"messages": [{"role": "user", "content": "one two three " * 200}], "max_tokens": 8}, 400,
     "invalid_request_error", "context_length_exceeded", "messages"),
    ({**OK, "max_tokens": 300}, 400, "invalid_request_error", "context_length_exceeded", "max_tokens"),
]


@pytest.fixture
def daemon(engine, start_daemon):
    return start_daemon(runtime(engine, {"type": "never"}), max_body_bytes=4096)


def test_each_bad_request_gets_its_status_and_error_type_and_the_daemon_keeps_serving(daemon, http):
    c = http(daemon.port)
    for body, status, kind, code, param in BAD:
        raw = body if isinstance(body, bytes) else None
        got, headers, answer = c.json("POST", "/v1/chat/completions", None if raw else body, raw=raw)
        assert (got, answer["error"]["type"], answer["error"]["code"], answer["error"]["param"]) == (
            status, kind, code, param), (body, answer)
        assert answer["error"]["message"] and headers["content-type"] == "application/json"
        # same connection, next request: still answered
    status, _, done = c.json("POST", "/v1/chat/completions", OK)
    assert status == 200 and done["usage"]["completion_tokens"] == 2
    _, _, text = c.request("GET", "/metrics")
    m = text.decode()
    assert metric(m, "edge_runtime_requests_total", outcome="invalid") == len(BAD)
    assert metric(m, "edge_runtime_requests_total", outcome="answered") == 1


def test_metadata_and_unsupported_fields_that_ask_for_nothing_are_accepted_unknown_ones_refused(daemon, http):
    c = http(daemon.port)
    status, _, done = c.json("POST", "/v1/chat/completions", {
        **OK, "presence_penalty": 0, "tools": [], "tool_choice": "auto", "response_format": {"type": "text"},
        "logit_bias": {"50256": 0}, "metadata": {"a": "b"}, "store": False, "parallel_tool_calls": True, "service_tier": "auto",
        # a history that appends returned messages whole (model_dump()): annotations, audio, function_call, ...
        "messages": [{"role": "user", "content": "hi", "name": "ann"},
                     {"role": "assistant", "content": "yo", "refusal": None, "annotations": [], "audio": None,
                      "function_call": None, "tool_calls": None, "x_vendor_field": 1},
                     {"role": "user", "content": "and?"}],
        "prediction": None})
    assert status == 200 and done["choices"][0]["message"]["content"] is not None
    # a misspelt field used to be ignored: "max_token" generated to the default limit
    for extra in ({"max_token": 2}, {"whatever": {"x": 1}}):
        status, _, body = c.json("POST", "/v1/chat/completions", {**OK, **extra})
        assert status == 400 and body["error"]["param"] == next(iter(extra)), body
        assert "unknown field" in body["error"]["message"]


def test_http_level_errors_are_in_openai_shape_too(daemon, http):
    c = http(daemon.port)
    status, _, body = c.json("POST", "/v1/chat/completions", raw=b'{"messages": "' + b"x" * 5000 + b'"}')
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, _, body = c.json("GET", "/v1/nowhere")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, headers, body = c.json("GET", "/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed" and headers["allow"] == "POST"


def test_health_is_503_while_the_model_loads_then_200(tiny_bundle, tmp_path, monkeypatch, http):
    from edge_runtime import hybrid

    release = threading.Event()
    real = hybrid.HybridRuntime.from_settings.__func__

    def slow_load(cls, settings, **kw):
        assert release.wait(10)
        return real(cls, settings, **kw)

    monkeypatch.setattr(hybrid.HybridRuntime, "from_settings", classmethod(slow_load))
    settings = daemon_settings(tmp_path)
    settings = settings.replace(engine=type(settings.engine)(bundle=str(tiny_bundle), max_new_tokens=4))
    daemon, port = create_server(settings)
    daemon.start()
    try:
        c = http(port)
        status, _, health = c.json("GET", "/health")
        assert status == 503 and health["status"] == "loading"
        status, headers, body = c.json("POST", "/v1/chat/completions", OK)
        assert status == 503 and body["error"]["code"] == "model_loading" and int(headers["retry-after"]) >= 1
        release.set()
        assert daemon.wait_ready(10)
        status, _, health = c.json("GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["model"] == "tiny-llama"
        status, _, done = c.json("POST", "/v1/chat/completions", OK)
        assert status == 200 and done["usage"]["completion_tokens"] == 2
    finally:
        release.set()
        daemon.stop()


def test_a_model_that_cannot_load_stops_the_daemon_with_exit_code_1(tmp_path):
    settings = daemon_settings(tmp_path)
    settings = settings.replace(engine=type(settings.engine)(bundle=str(tmp_path / "no-such-bundle")))
    daemon, _ = create_server(settings)
    daemon.start()
    assert daemon.wait(10) and daemon.exit_code == 1
    assert daemon.service.state == "failed" and not (tmp_path / "edge.sock").exists()


def test_binding_beyond_loopback_needs_allow_remote():
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("192.168.1.4") and not is_loopback_host("pi.local")
    with pytest.raises(ConfigError) as info:
        create_server(daemon_settings(host="0.0.0.0"))
    assert info.value.field == "server.host" and "allow_remote" in str(info.value)


def test_a_daemon_bound_beyond_loopback_warns_that_it_has_no_authentication(monkeypatch, caplog):
    import edge_runtime.daemon._server as server_module

    class Bound(Exception):
        pass

    def bind(host, port):  # a test binds nothing beyond loopback
        raise Bound

    monkeypatch.setattr(server_module, "_bind", bind)
    with caplog.at_level("WARNING", logger="edge_runtime.daemon"), pytest.raises(Bound):
        create_server(daemon_settings(host="0.0.0.0", allow_remote=True))
    assert "no authentication" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="edge_runtime.daemon"), pytest.raises(Bound):
        create_server(daemon_settings(host="127.0.0.1", allow_remote=True))
    assert "no authentication" not in caplog.text


def test_a_sane_x_request_id_is_kept_for_tracing_and_a_bad_one_replaced(daemon, http):
    c = http(daemon.port)
    status, headers, done = c.json("POST", "/v1/chat/completions", OK, headers={"x-request-id": "app-42.req:7"})
    assert status == 200 and headers["x-request-id"] == "app-42.req:7" and done["id"] == "chatcmpl-app-42.req:7"
    status, headers, done = c.json("POST", "/v1/chat/completions", OK, headers={"x-request-id": "no spaces/please"})
    assert status == 200 and headers["x-request-id"] != "no spaces/please" and len(headers["x-request-id"]) == 32


@pytest.mark.parametrize("log_content", [False, True])
def test_prompts_and_answers_are_logged_only_with_log_content(engine, start_daemon, http, caplog, log_content):
    daemon = start_daemon(runtime(engine, {"type": "never"}), log_content=log_content)
    secret = "my bank PIN is 9713, what is 2 + 2?"
    with caplog.at_level("INFO", logger="edge_runtime.daemon"):
        status, _, done = http(daemon.port).json("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": secret}], "max_tokens": 4})
        assert status == 200
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "route=local" in text and f"prompt_chars={len(secret)}" in text  # sizes and timings always
    answer = done["choices"][0]["message"]["content"]
    assert ("9713" in text) is log_content
    assert (repr(answer) in text) is (log_content and bool(answer))


def test_a_model_name_with_a_newline_cannot_forge_a_log_line(engine, start_daemon, http, caplog, monkeypatch):
    # the answering model's name comes from a bundle or from the cloud's upstream: neither is the daemon's own text
    monkeypatch.setattr(type(engine), "model_name", property(lambda self: "tiny\nINFO edge_runtime.daemon: forged"))
    daemon = start_daemon(runtime(engine, {"type": "never"}))
    with caplog.at_level("INFO", logger="edge_runtime.daemon"):
        status, _, done = http(daemon.port).json("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and done["model"] == "tiny\nINFO edge_runtime.daemon: forged"
    line = next(r.getMessage() for r in caplog.records if "route=local" in r.getMessage())
    assert "\n" not in line and "answered_by=tiny\\nINFO" in line


def test_a_compressed_body_is_refused_as_unsupported_not_read_as_json(daemon, http):
    # gzip was read as broken JSON (400 "not valid JSON"), and a false Content-Encoding header was ignored (200)
    import gzip

    c = http(daemon.port)
    raw = json.dumps(OK).encode()
    for body, encoding in ((gzip.compress(raw), "gzip"), (raw, "br")):
        status, _, reply = c.json("POST", "/v1/chat/completions", headers={"content-encoding": encoding}, raw=body)
        assert status == 415 and reply["error"]["code"] == "unsupported_media_type" and encoding in reply["error"]["message"]
    assert c.json("POST", "/v1/chat/completions", OK, headers={"content-encoding": "identity"})[0] == 200


def test_web_pages_cannot_drive_the_daemon_but_local_clients_can(daemon, http):
    c = http(daemon.port)
    # a cross-site page: text/plain needs no CORS preflight, but the browser names its origin
    status, _, body = c.json("POST", "/v1/chat/completions", OK,
                             headers={"origin": "http://attacker.example", "content-type": "text/plain"})
    assert status == 403 and body["error"]["code"] == "forbidden_origin" and "attacker.example" in body["error"]["message"]
    status, _, body = c.json("POST", "/v1/chat/completions", OK, headers={"origin": "null"})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    # DNS rebinding: a same-origin GET from the page arrives with the page's host name
    for host in ("attacker.example", f"attacker.example:{daemon.port}", "127.0.0.1.nip.io"):
        status, _, body = c.json("GET", "/metrics", headers={"host": host})
        assert status == 403 and body["error"]["code"] == "forbidden_host", host
    assert metric(c.request("GET", "/metrics")[2].decode(), "edge_runtime_requests_total", transport="http",
                  outcome="ok") == 0
    # curl, SDKs and pages served from loopback itself
    for headers in ({}, {"origin": "http://localhost:3000"}, {"host": f"localhost:{daemon.port}"},
                    {"host": f"[::1]:{daemon.port}"}, {"origin": "https://127.0.0.1"}):
        assert c.json("POST", "/v1/chat/completions", OK, headers=headers)[0] == 200, headers


def test_with_allow_remote_only_the_origin_is_checked():
    from edge_runtime.daemon._guard import BrowserGuard

    remote, local = BrowserGuard(None, check_host=False), BrowserGuard(None, check_host=True)  # type: ignore[arg-type]
    assert remote._refusal({"host": "pi.lan:8080"}) is None
    assert local._refusal({"host": "pi.lan:8080"})[0] == "forbidden_host"
    assert remote._refusal({"host": "pi.lan", "origin": "http://pi.lan"})[0] == "forbidden_origin"


def test_an_integer_past_pythons_digit_limit_is_invalid_json_not_a_crash(engine, start_daemon, http):
    daemon = start_daemon(runtime(engine, {"type": "never"}))  # the default body limit: 1 MB
    c = http(daemon.port)
    status, _, body = c.json("POST", "/v1/chat/completions", raw=b'{"max_tokens": ' + b"1" * 5000 + b"}")
    assert status == 400 and body["error"]["code"] == "invalid_json" and "digits" in body["error"]["message"]
    assert c.json("POST", "/v1/chat/completions", OK)[0] == 200


def test_an_exit_during_the_model_load_waits_for_the_load(monkeypatch):
    # a process that exits while onnxruntime builds a session in the load thread aborts (SIGABRT, not exit 0)
    import edge_runtime.daemon._server as server_module

    loading, finished = threading.Event(), threading.Event()

    def slow_load(self):
        loading.set()
        time.sleep(1.0)
        finished.set()

    monkeypatch.setattr(server_module.DaemonServer, "_load", slow_load)
    server, _port = create_server(daemon_settings())

    def drain_when_loading():
        loading.wait(10)
        server.drain()

    threading.Thread(target=drain_when_loading, daemon=True).start()
    assert server.serve_forever() == 0
    assert finished.is_set()


def test_accept_failing_for_lack_of_descriptors_is_logged_once_per_interval(caplog):
    # asyncio logs a traceback for every failed accept(): ~10,000 lines a second under a connection flood
    from edge_runtime.daemon._server import _AcceptErrorsOncePer

    class Loop:
        def __init__(self) -> None:
            self.forwarded: list[dict] = []

        def default_exception_handler(self, context: dict) -> None:
            self.forwarded.append(context)

    loop, handler = Loop(), _AcceptErrorsOncePer(10.0)
    flood = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    with caplog.at_level("ERROR", logger="edge_runtime.daemon"):
        for _ in range(1000):
            handler(loop, flood)  # type: ignore[arg-type]
        handler(loop, {"message": "something else"})  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files" in lines[0] and "LimitNOFILE" in lines[0]
    assert loop.forwarded == [{"message": "something else"}]
    handler._next_s = 0.0  # the interval is over: the next line counts what it held back
    with caplog.at_level("ERROR", logger="edge_runtime.daemon"):
        handler(loop, flood)  # type: ignore[arg-type]
    assert "999 more since the last report" in caplog.records[-1].getMessage()


def test_a_clients_values_reach_the_log_escaped_and_cut(daemon, http, caplog):
    caplog.set_level("INFO", logger="edge_runtime.daemon")
    c = http(daemon.port)
    forged = "x\n2026-01-01 00:00:00,000 ERROR edge_runtime.daemon: FORGED"
    for body in ({**OK, "model": forged}, {**OK, "model": "y" * 3000}, {**OK, forged: 1}):
        status, _, answer = c.json("POST", "/v1/chat/completions", body)
        assert status in (400, 404) and len(answer["error"]["message"]) < 300
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3 and all("\n" not in m and len(m) < 700 for m in refused)


def test_a_context_length_error_speaks_the_apis_names_and_gives_advice_it_can_take(daemon, http):
    c = http(daemon.port)
    for body in ({**OK, "max_tokens": 300}, {"messages": [{"role": "user", "content": "one two three " * 200}],
                                              "max_completion_tokens": 8}):
        status, _, answer = c.json("POST", "/v1/chat/completions", body)
        message = answer["error"]["message"]
        assert status == 400 and "max_new_tokens" not in message and "truncat" not in message, message
    assert "max_completion_tokens" in message


def test_a_huge_prompt_is_refused_from_its_length_and_its_memory_given_back(engine, start_daemon, http, monkeypatch):
    # a 900 kB prompt (under max_body_bytes) was tokenized whole to be refused, and glibc kept the ~300 MB that took
    # for the daemon's life; now its length refuses it, and a large body's freed memory is handed back after it
    from edge_runtime.daemon import _http

    trims = []
    monkeypatch.setattr(_http, "release_free_heap", lambda: trims.append(1))
    c = http(start_daemon(runtime(engine, {"type": "never"})).port)
    huge = [{"role": "user", "content": "hello world " * 75_000}]
    for body in ({"messages": huge, "max_tokens": 8}, {"messages": huge}):
        status, _, answer = c.json("POST", "/v1/chat/completions", body)
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
        assert answer["error"]["param"] == "messages" and "900,0" in answer["error"]["message"]
        assert "max_new_tokens" not in answer["error"]["message"] and "truncat" not in answer["error"]["message"]
    assert "max_tokens 8" not in answer["error"]["message"]  # unset: no advice to lower it
    deadline = time.monotonic() + 5
    while len(trims) < 2 and time.monotonic() < deadline:  # each after its response, on the parser's thread
        time.sleep(0.01)
    assert len(trims) == 2
    status, _, _ = c.json("POST", "/v1/chat/completions", OK)  # a small body: nothing to give back
    time.sleep(0.3)
    assert status == 200 and len(trims) == 2


def test_an_unset_max_tokens_means_what_fits_the_window(engine, start_daemon, http):
    # the daemon's default (250 here) does not fit beside this prompt in the tiny model's 256 tokens: OpenAI's
    # API generates what fits when max_tokens is unset, and so does this one; a max_tokens asked for still errs
    from edge_runtime.hybrid import HybridRuntime

    daemon = start_daemon(HybridRuntime(engine, policy={"type": "never"}, default_max_new_tokens=250))
    c = http(daemon.port)
    long_ask = [{"role": "user", "content": "one two three " * 10}]
    prompt_tokens = len(engine.encode(messages=long_ask))
    status, _, done = c.json("POST", "/v1/chat/completions", {"messages": long_ask})
    assert status == 200 and done["usage"]["prompt_tokens"] == prompt_tokens
    assert done["usage"]["completion_tokens"] <= engine.context_length - prompt_tokens
    status, _, refused = c.json("POST", "/v1/chat/completions", {"messages": long_ask, "max_tokens": 250})
    assert status == 400 and refused["error"]["code"] == "context_length_exceeded"
    # a prompt that fills the window with max_tokens unset: no advice to lower what was not asked for
    status, _, full = c.json("POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "one two three " * 100}]})
    assert status == 400 and full["error"]["code"] == "context_length_exceeded", full
    assert full["error"]["param"] == "messages" and "max_tokens" not in full["error"]["message"], full


def test_a_request_with_two_framings_is_refused_and_its_connection_closed(daemon):
    # Content-Length and Transfer-Encoding together: a proxy in front may read the other framing and smuggle a
    # request inside this one's body (RFC 9112 6.1); it was answered, and the next request on the connection too
    import socket

    body = json.dumps({**OK, "max_tokens": 2}).encode()
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" + smuggled)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 400") and out.count(b"HTTP/1.1 ") == 1, out
    assert b"connection: close" in out.lower() and b"Content-Length and Transfer-Encoding" in out


def test_every_refusal_is_logged_with_its_request_id_and_counted(daemon, http, caplog):
    # invalid JSON, a body too large and a web page's Origin left no log line (the 403 was not even counted), and
    # refusals carried no request id in the log or the response
    caplog.set_level("INFO", logger="edge_runtime.daemon")
    c = http(daemon.port)
    cases = [({"x-request-id": "trace-1"}, None, b"{not json", 400),
             ({"x-request-id": "trace-2"}, {**OK, "temperature": 9}, None, 400),
             ({"x-request-id": "trace-3"}, None, b"x" * 5000, 413),
             ({"x-request-id": "trace-4", "origin": "http://evil.example"}, OK, None, 403)]
    for headers, body, raw, expected in cases:
        status, answer_headers, _ = c.json("POST", "/v1/chat/completions", body, raw=raw, headers=headers)
        assert status == expected
        if expected != 403:  # the guard answers before a request id is read
            assert answer_headers.get("x-request-id") == headers["x-request-id"]
        if expected == 413:
            c = http(daemon.port)  # the daemon closed that connection (its body was left unread)
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    for rid in ("trace-1", "trace-2", "trace-3"):
        assert any(rid in m for m in logged), (rid, logged)
    assert any("forbidden_origin" in m for m in logged)
    m = daemon.service.metrics.render()
    assert metric(m, "edge_runtime_requests_total", transport="http", outcome="invalid") == 4


class _FailingEngine:
    """The real engine, whose generations fail with one of the project's errors that no client is told about."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream_tokens(self, *args, **kwargs):
        from edge_runtime.errors import EdgeRuntimeError

        raise EdgeRuntimeError("onnxruntime failed while running the model: out of memory\nforged line")


def test_an_internal_error_is_logged_with_its_cause_while_the_client_is_told_to_see_the_log(engine, start_daemon, http,
                                                                                            caplog):
    daemon = start_daemon(runtime(_FailingEngine(engine)))
    with caplog.at_level("ERROR", logger="edge_runtime.daemon"):
        status, _, body = http(daemon.port).json("POST", "/v1/chat/completions", OK, headers={"x-request-id": "r-1"})
    assert status == 500 and body["error"]["code"] == "internal_error" and "see its log" in body["error"]["message"]
    assert "out of memory" not in json.dumps(body)  # internals stay in the log
    lines = [r.getMessage() for r in caplog.records if "r-1" in r.getMessage()]
    assert lines and "out of memory" in lines[0] and "\n" not in lines[0], caplog.text  # escaped: no forged lines


@pytest.mark.parametrize("stream", [False, True])
def test_no_worker_thread_for_a_request_is_a_json_500_and_its_slot_comes_back(daemon, http, monkeypatch, stream):
    # under memory pressure or a tasks limit the executor queues the job, then cannot start its thread: the client
    # got Starlette's plain-text 500, and the job kept its place until some worker found it
    executor = daemon.service.executor
    real = executor._adjust_thread_count
    failures = []

    def no_thread():
        if not failures:
            failures.append(1)
            raise RuntimeError("can't start new thread")
        real()

    monkeypatch.setattr(executor, "_adjust_thread_count", no_thread)
    c = http(daemon.port)
    status, headers, body = c.request("POST", "/v1/chat/completions", {**OK, "stream": stream})
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    assert failures
    for _ in range(3):  # one slot: each would wait for ever behind a job that kept it
        status, _, answer = c.json("POST", "/v1/chat/completions", OK)
        assert status == 200 and answer["choices"][0]["message"]["content"] is not None
    assert metric(c.request("GET", "/metrics")[2].decode(), "edge_runtime_requests_in_progress") == 0


def test_an_error_no_handler_expected_is_a_json_500(daemon, http, monkeypatch):
    def broken():
        raise KeyError("internals")

    monkeypatch.setattr(daemon.service, "health", broken)
    status, headers, body = http(daemon.port).request("GET", "/health")
    assert status == 500 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "internal_error" and b"internals" not in body
