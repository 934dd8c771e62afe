"""The openai backend against an OpenAI-compatible HTTP server started in the test (stdlib http.server)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cloud_bridge import OpenAIModelSettings
from cloud_bridge.backends import BackendRequest, CancelToken, UnusableAnswerError
from cloud_bridge.backends.openai import OpenAIBackend, SSEParser
from edge_runtime.engine.types import SamplingParams
from edge_runtime.errors import BackendError, CloudError, CloudQuotaError, CloudUnavailableError, ConfigError

Responder = Callable[[BaseHTTPRequestHandler, dict[str, Any]], None]


class FakeOpenAI:
    """Records requests; ``respond`` decides what each POST gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.respond: Responder = completion("hello")
        self.disconnected = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    fake.respond(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    fake.disconnected.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(handler: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(raw)


def completion(text: str, finish: str = "stop") -> Responder:
    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        _send(
            handler,
            200,
            {
                "id": "c1",
                "model": "upstream-model-2024",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 3},
            },
        )

    return respond


def raw_200(payload: bytes) -> Responder:
    """Answer 200 with ``payload`` as it is (not JSON, or not UTF-8)."""

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    return respond


def sse(events: list[str], *, delay_s: float = 0.0, done: bool = True) -> Responder:
    """Stream raw SSE ``events`` (already formatted lines) with chunked transfer encoding."""

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for event in events + (["data: [DONE]\n\n"] if done else []):
            raw = event.encode()
            handler.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            handler.wfile.flush()
            if delay_s:
                time.sleep(delay_s)
        handler.wfile.write(b"0\r\n\r\n")

    return respond


def delta(text: str, finish: str | None = None) -> str:
    return (
        "data: "
        + json.dumps(
            {
                "model": "upstream-model-2024",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
            }
        )
        + "\n\n"
    )


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


def make_backend(upstream: FakeOpenAI, **fields: Any) -> OpenAIBackend:
    fields.setdefault("timeout_s", 5.0)
    settings = OpenAIModelSettings(
        base_url=upstream.base_url, model="gpt-test", api_key_env="TEST_UPSTREAM_KEY", **fields
    )
    return OpenAIBackend(settings, environ={"TEST_UPSTREAM_KEY": "sk-secret"})


def _failure(backend: OpenAIBackend, streaming: bool) -> Any:
    """The BackendError one call raises, streamed or not."""
    with pytest.raises(BackendError) as info:
        if streaming:
            list(backend.stream(REQUEST, CancelToken()))
        else:
            backend.generate(REQUEST, CancelToken())
    return info


REQUEST = BackendRequest(
    "r1",
    [{"role": "user", "content": "hi"}],
    SamplingParams(max_new_tokens=16, temperature=0.2, stop=("\n\n",), seed=5),
)


def test_non_streaming_completion_and_what_is_sent(upstream):
    result = make_backend(upstream).generate(REQUEST, CancelToken())
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "hello",
        "stop",
        11,
        3,
    )
    assert result.model == "upstream-model-2024"
    (sent,) = upstream.requests
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-secret"
    assert sent["body"] == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "temperature": pytest.approx(0.2),
        "top_p": 1.0,
        "stream": False,
        "seed": 5,
        "stop": ["\n\n"],
    }


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_model_fields_cap_and_omitted_sampling(upstream, stream):
    # OpenAI's reasoning models refuse max_tokens (max_completion_tokens instead), temperature and top_p: every
    # escalation to one was an HTTP 400 until the alias could say so
    if stream:
        upstream.respond = sse([delta("hello"), "data: " + json.dumps({"choices": [], "usage": {
            "prompt_tokens": 9, "completion_tokens": 2}}) + "\n\n"])
    backend = make_backend(upstream, max_tokens_field="max_completion_tokens", omit_params=["temperature", "top_p"])
    if stream:
        assert list(backend.stream(REQUEST, CancelToken()))[-1].result.text == "hello"
    else:
        assert backend.generate(REQUEST, CancelToken()).text == "hello"
    (sent,) = upstream.requests
    body = sent["body"]
    assert body["max_completion_tokens"] == 16 and body["stop"] == ["\n\n"] and body["seed"] == 5
    assert not {"max_tokens", "temperature", "top_p"} & body.keys()


def test_sse_stream_with_comments_split_events_and_usage(upstream):
    upstream.respond = sse(
        [
            ": keep-alive\n\n",
            delta("Hel"),
            "data: "
            + json.dumps({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]})[
                :20
            ],  # split ...
            json.dumps({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]})[20:]
            + "\n\n",  # ... event
            "event: message\r\ndata: "
            + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            + "\r\n\r\n",
            "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}) + "\n\n",
        ]
    )
    chunks = list(make_backend(upstream).stream(REQUEST, CancelToken()))
    assert [c.text for c in chunks[:-1]] == ["Hel", "lo"]
    result = chunks[-1].result
    assert result is not None
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "Hello",
        "length",
        9,
        2,
    )
    sent = upstream.requests[0]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_sse_parser_joins_multi_line_data_and_ignores_other_fields():
    parser = SSEParser()
    assert [parser.feed(line) for line in ["id: 1", "data: a", "data:b", "retry: 10", ": note"]] == [None] * 5
    assert parser.feed("") == "a\nb"
    assert parser.feed("") is None


def test_a_stream_without_usage_counts_deltas(upstream):
    upstream.respond = sse([delta("a"), delta(" b"), delta(" c", "stop")])
    result = list(make_backend(upstream).stream(REQUEST, CancelToken()))[-1].result
    assert result is not None and (result.completion_tokens, result.finish_reason) == (3, "stop")
    assert result.prompt_tokens == 1  # "hi": estimated from its characters, not counted as free


def test_an_answer_without_usage_is_estimated_not_free(upstream, caplog):
    upstream.respond = lambda handler, body: _send(handler, 200, {
        "choices": [{"message": {"content": "twelve chars"}, "finish_reason": "stop"}]})
    result = make_backend(upstream).generate(REQUEST, CancelToken())
    assert (result.prompt_tokens, result.completion_tokens) == (1, 3)  # ~4 characters a token, rounded up
    assert any("no usage" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (400, "INVALID_ARGUMENT", "UPSTREAM_BAD_REQUEST"),
        (401, "INTERNAL", "UPSTREAM_AUTH_FAILED"),
        (404, "NOT_FOUND", "UPSTREAM_NOT_FOUND"),
        (429, "RESOURCE_EXHAUSTED", "UPSTREAM_RATE_LIMITED"),
        (500, "UNAVAILABLE", "UPSTREAM_ERROR"),
        (503, "UNAVAILABLE", "UPSTREAM_UNAVAILABLE"),
        (418, "INTERNAL", "UPSTREAM_UNEXPECTED_STATUS"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_http_errors_map_to_grpc_codes(upstream, status, code, reason, streaming):
    upstream.respond = lambda handler, body: _send(
        handler,
        status,
        {"error": {"message": f"nope {status}", "type": "x"}},
        {"Retry-After": "7"} if status == 429 else None,
    )
    info = _failure(make_backend(upstream), streaming)
    assert (info.value.code, info.value.reason) == (code, reason)
    assert f"nope {status}" in str(info.value)
    assert info.value.retry_after_s == (7.0 if status == 429 else None)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_long_upstream_error_is_cut_so_the_device_still_gets_it(upstream, streaming):
    long = "bad request: " + "y" * 30_000  # whole, it overflowed gRPC's 16 KiB trailers: a retryable RESOURCE_EXHAUSTED
    if streaming:
        upstream.respond = sse(["data: " + json.dumps({"error": {"message": long}}) + "\n\n"])
    else:
        upstream.respond = lambda handler, body: _send(handler, 400, {"error": {"message": long}})
    info = _failure(make_backend(upstream), streaming)
    assert "bad request: yyy" in str(info.value) and len(str(info.value)) < 1000


def test_an_upstream_that_does_not_answer_in_time_is_a_deadline_error(upstream):
    upstream.respond = lambda handler, body: time.sleep(1.0)
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        make_backend(upstream, timeout_s=0.2).generate(REQUEST, CancelToken())
    assert info.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - started < 0.8


def test_a_stream_that_stalls_hits_the_timeout(upstream):
    upstream.respond = sse([delta("a"), delta("b")], delay_s=1.0)
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        list(make_backend(upstream, timeout_s=0.3).stream(REQUEST, CancelToken()))
    assert info.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - started < 0.9


def _trickle(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
    """A whole answer sent one byte every 0.1 s: each read is quick, the answer takes 20 s."""
    payload = json.dumps({"choices": [{"message": {"content": "x" * 150}, "finish_reason": "stop"}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    try:
        for byte in payload:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:  # the bridge hung up at its deadline
        pass


def test_an_upstream_that_sends_slowly_is_cut_at_the_timeout_not_per_read(upstream):
    upstream.respond = _trickle
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        make_backend(upstream, timeout_s=0.5).generate(REQUEST, CancelToken())
    assert info.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - started < 1.5


@pytest.mark.parametrize("streaming", [False, True])
def test_an_answer_too_large_to_deliver_is_refused_without_holding_it(upstream, streaming):
    big = "y" * (9 << 20)
    if streaming:
        upstream.respond = sse([delta(big[i:i + (1 << 20)]) for i in range(0, len(big), 1 << 20)])
    else:
        upstream.respond = completion(big)
    info = _failure(make_backend(upstream), streaming)
    assert info.value.reason == "UPSTREAM_ANSWER_TOO_LARGE" and info.value.code == "INTERNAL"


def test_cancelling_stops_the_upstream_stream_at_once(upstream):
    upstream.respond = sse([delta(f"w{i} ") for i in range(100)], delay_s=0.05)
    cancel = CancelToken()
    stream = make_backend(upstream).stream(REQUEST, cancel)
    assert next(stream).text == "w0 "
    threading.Timer(0.1, cancel.cancel).start()
    started = time.monotonic()
    chunks = list(stream)
    assert time.monotonic() - started < 0.5
    assert chunks[-1].result is not None and chunks[-1].result.finish_reason == "cancelled"
    assert len(chunks) < 20
    assert upstream.disconnected.wait(3)  # the upstream saw its client go away


def test_a_stream_cut_off_before_it_finished_is_unavailable(upstream):
    upstream.respond = sse([delta("a")], done=False)
    with pytest.raises(BackendError) as info:
        list(make_backend(upstream).stream(REQUEST, CancelToken()))
    assert info.value.reason == "UPSTREAM_CONNECTION_LOST"


@pytest.mark.parametrize("payload", [b"not json", b'{"choices": []}'])
def test_unusable_responses_are_unavailable(upstream, payload):
    upstream.respond = raw_200(payload)
    with pytest.raises(BackendError) as info:
        make_backend(upstream).generate(REQUEST, CancelToken())
    assert (info.value.code, info.value.reason) == ("UNAVAILABLE", "UPSTREAM_BAD_RESPONSE")


def test_an_unreachable_upstream_is_unavailable(upstream):
    backend = make_backend(upstream)
    upstream.close()
    with pytest.raises(BackendError) as info:
        backend.generate(REQUEST, CancelToken())
    assert (info.value.code, info.value.reason) == ("UNAVAILABLE", "UPSTREAM_UNREACHABLE")


def test_a_missing_api_key_fails_at_start_not_per_request(upstream):
    settings = OpenAIModelSettings(base_url=upstream.base_url, model="m", api_key_env="NO_SUCH_VARIABLE_FOR_TESTS")
    with pytest.raises(ConfigError) as info:
        OpenAIBackend(settings, environ={})
    assert "NO_SUCH_VARIABLE_FOR_TESTS" in str(info.value)


def test_through_the_bridge_streaming_and_rate_limits(upstream, start_bridge, make_client, monkeypatch):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-secret")
    models = {
        "gpt": {
            "backend": "openai",
            "base_url": upstream.base_url,
            "model": "gpt-test",
            "api_key_env": "TEST_UPSTREAM_KEY",
            "usd_per_million_input_tokens": 2.0,
            "usd_per_million_output_tokens": 8.0,
        }
    }
    bridge = start_bridge(models=models)
    client = make_client(bridge, max_attempts=1)
    upstream.respond = sse(
        [
            delta("Paris"),
            delta(".", "stop"),
            "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 2}}) + "\n\n",
        ]
    )
    chunks = list(client.stream([{"role": "user", "content": "capital of France?"}]))
    result = chunks[-1].result
    assert [c.text for c in chunks[:-1]] == ["Paris", "."]
    assert result.model == "upstream-model-2024" and result.model_alias == "gpt"
    assert result.cost_usd == pytest.approx((20 * 2.0 + 2 * 8.0) / 1e6)

    upstream.respond = lambda handler, body: _send(
        handler, 429, {"error": {"message": "slow down"}}, {"Retry-After": "12"}
    )
    with pytest.raises(CloudQuotaError) as info:
        client.generate([{"role": "user", "content": "again"}])
    assert info.value.retry_after_s == pytest.approx(12.0)

    upstream.respond = lambda handler, body: _send(handler, 502, {"error": {"message": "bad gateway"}})
    with pytest.raises(CloudUnavailableError) as unavailable:
        client.generate([{"role": "user", "content": "again"}])
    assert "UPSTREAM_ERROR" in str(unavailable.value)


def test_the_api_key_is_cut_out_of_upstream_text_sent_to_devices_and_logged(
    upstream, start_bridge, make_client, monkeypatch, caplog
):
    key = "sk-SUPERSECRET123"
    monkeypatch.setenv("TEST_UPSTREAM_KEY", key)
    model = {"backend": "openai", "base_url": upstream.base_url, "model": "m", "api_key_env": "TEST_UPSTREAM_KEY"}
    bridge = start_bridge(models={"gpt": model})
    client = make_client(bridge, max_attempts=1, circuit_failure_threshold=100)
    caplog.set_level(logging.DEBUG)

    def echo_header(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        _send(handler, 401, {"error": {"message": f"invalid key: key was {handler.headers['Authorization']}"}})

    upstream.respond = echo_header
    with pytest.raises(CloudError) as info:
        client.generate([{"role": "user", "content": "hi"}])
    assert key not in str(info.value) and "key was Bearer ***" in str(info.value)
    for events in ([f'data: {{"error": {{"message": "key was Bearer {key}"}}}}\n\n'], [f"data: not json {key}\n\n"]):
        upstream.respond = sse(events)
        with pytest.raises(CloudError) as info:
            list(client.stream([{"role": "user", "content": "hi"}]))
        assert key not in str(info.value) and "***" in str(info.value)
    assert "backend 'gpt' failed: upstream" in caplog.text and key not in caplog.text


def _send_text(handler: BaseHTTPRequestHandler, status: int, text: str) -> None:
    raw = text.encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)


@pytest.mark.parametrize(
    ("streaming", "respond"),
    [
        # not JSON, so the first 200 characters are kept: the echoed key starts at 185 and runs past the cut
        (False, lambda h, body: _send_text(h, 401, "x" * 162 + " Authorization: " + h.headers["Authorization"])),
        (True, lambda h, body: _send_text(h, 401, "x" * 162 + " Authorization: " + h.headers["Authorization"])),
        # an event that is not JSON is quoted to 80 characters: the key starts at 68
        (True, lambda h, body: sse([f"data: {'y' * 60} {h.headers['Authorization']}\n\n"])(h, body)),
    ],
)
def test_no_part_of_the_api_key_survives_when_upstream_text_is_shortened(upstream, streaming, respond):
    key = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    settings = OpenAIModelSettings(base_url=upstream.base_url, model="m", api_key_env="KEY", timeout_s=5.0)
    backend = OpenAIBackend(settings, environ={"KEY": key})
    upstream.respond = respond
    info = _failure(backend, streaming)
    message = str(info.value)
    assert key[:8] not in message and "Bearer ***" in message


def test_part_of_the_api_key_echoed_by_the_upstream_is_cut_out_too(upstream):
    key = "sk-SUPERSECRET1234567890"
    settings = OpenAIModelSettings(base_url=upstream.base_url, model="m", api_key_env="KEY", timeout_s=5.0)
    backend = OpenAIBackend(settings, environ={"KEY": key})

    def masked(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        _send(handler, 401, {"error": {"message": f"Incorrect API key provided: {key[:11]}*********{key[-4:]}. "
                                                  "See your API keys page"}})

    upstream.respond = masked
    message = str(_failure(backend, False).value)
    assert key[:8] not in message and "Incorrect API key provided: ***" in message and "API keys page" in message
    assert backend._redact("no key here, sk-other-key") == "no key here, sk-other-key"


def test_a_key_in_the_base_urls_query_is_cut_out_of_upstream_text_too(upstream):
    # `cloud-bridge config` hid it, but an upstream error echoing the URL showed it to devices and in the log
    secret = "AIzaSyA-0123456789abcdefghij/klm"
    settings = OpenAIModelSettings(base_url=f"{upstream.base_url}?key={urllib.parse.quote(secret, safe='')}"
                                            "&api-version=2024-10-21", model="m", timeout_s=5.0)
    backend = OpenAIBackend(settings, environ={})

    def echo_url(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        _send(handler, 400, {"error": {"message": f"bad request to {handler.path} (key {secret})"}})

    upstream.respond = echo_url
    message = str(_failure(backend, False).value)
    assert secret not in message and urllib.parse.quote(secret, safe="") not in message
    assert "key=***" in message and "api-version=2024-10-21" in message


def _answer(message: Any, usage: Any, finish: Any = "stop") -> Responder:
    return lambda handler, body: _send(handler, 200, {"model": "m", "usage": usage, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": finish}]})


@pytest.mark.parametrize("usage", [{"prompt_tokens": 10**20, "completion_tokens": 3}, {"prompt_tokens": 1, "completion_tokens": -5},
                                   {"prompt_tokens": 2.5, "completion_tokens": 1}, {"prompt_tokens": True, "completion_tokens": 1},
                                   {"prompt_tokens": "7", "completion_tokens": 1}, [1, 2]])
@pytest.mark.parametrize("streaming", [False, True])
def test_usage_no_call_can_have_is_an_unusable_response_not_a_bill(upstream, usage, streaming):
    # billed and charged to the device's quota: negative made calls free, 10**20 crashed the call and locked
    # the device out of the bridge until it restarted
    if streaming:
        upstream.respond = sse([delta("a", "stop"), "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"])
        if not isinstance(usage, dict):  # a usage that is not an object is ignored in a stream: counted from deltas
            return
    else:
        upstream.respond = _answer("a", usage)
    info = _failure(make_backend(upstream), streaming)
    assert (info.value.code, info.value.reason) == ("UNAVAILABLE", "UPSTREAM_BAD_RESPONSE")


@pytest.mark.parametrize("streaming", [False, True])
def test_usage_null_is_estimated_and_finish_reasons_are_ours(upstream, streaming):
    usage = {"prompt_tokens": None, "completion_tokens": 2.0}
    if streaming:
        upstream.respond = sse([delta("a", "cancelled"), "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"])
        chunks = list(make_backend(upstream).stream(REQUEST, CancelToken()))
        result = chunks[-1].result
    else:
        upstream.respond = _answer([{"type": "text", "text": "a"}], usage, finish="cancelled")
        result = make_backend(upstream).generate(REQUEST, CancelToken())
    # nobody cancelled: an upstream's unknown reason is a stop in both paths; content parts are joined
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == ("a", "stop", 1, 2)


@pytest.mark.parametrize("event", [{"choices": {"0": {}}}, {"choices": [{"delta": {"content": 5}}]},
                                   {"choices": [{"delta": {"content": "a"}, "finish_reason": ["stop"]}]}])
def test_events_of_the_wrong_shape_are_unusable_responses_not_crashes(upstream, event):
    upstream.respond = sse(["data: " + json.dumps(event) + "\n\n"])
    info = _failure(make_backend(upstream), True)
    assert info.value.reason == "UPSTREAM_BAD_RESPONSE"


@pytest.mark.parametrize(("header", "expected"), [("inf", 1.0), ("1e30", 3600.0), ("nan", 1.0), ("-5", 0.0), ("12", 12.0)])
def test_odd_retry_after_values_still_give_a_rate_limit_with_a_usable_delay(upstream, header, expected):
    upstream.respond = lambda handler, body: _send(handler, 429, {"error": {"message": "slow down"}}, {"Retry-After": header})
    info = _failure(make_backend(upstream), False)
    assert info.value.code == "RESOURCE_EXHAUSTED" and info.value.retry_after_s == expected


@pytest.mark.parametrize("streaming", [False, True])
def test_the_upstreams_model_name_is_redacted_and_kept_to_one_short_line(upstream, streaming):
    # the name is passed on to devices, their logs and run records: an upstream that echoes the request's
    # headers in it, or writes a newline and a forged log line, must not carry that through
    key = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    settings = OpenAIModelSettings(base_url=upstream.base_url, model="m", api_key_env="KEY", timeout_s=5.0)
    backend = OpenAIBackend(settings, environ={"KEY": key})

    def echoing(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        name = f"{handler.headers['Authorization']}\nINFO forged line {'x' * 5000}"
        if streaming:
            event = {"model": name, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
            sse([f"data: {json.dumps(event)}\n\n"])(handler, body)
        else:
            _send(handler, 200, {"model": name, "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                                 "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})

    upstream.respond = echoing
    if streaming:
        result = list(backend.stream(REQUEST, CancelToken()))[-1].result
    else:
        result = backend.generate(REQUEST, CancelToken())
    assert result.text == "hi"
    assert key[:8] not in result.model and result.model.startswith("Bearer ***?INFO forged line")
    assert result.model.isprintable() and len(result.model) == 200
    upstream.respond = completion("hi")
    assert backend.generate(REQUEST, CancelToken()).model == "upstream-model-2024"  # a real name is kept as it is


def test_an_api_key_with_a_trailing_newline_is_trimmed_and_one_with_spaces_inside_is_refused(upstream):
    settings = OpenAIModelSettings(base_url=upstream.base_url, model="m", api_key_env="K")
    assert OpenAIBackend(settings, environ={"K": "sk-secret-from-a-file\n"}).api_key == "sk-secret-from-a-file"
    with pytest.raises(ConfigError) as info:
        OpenAIBackend(settings, environ={"K": "sk-secret\nsecond-line"})
    assert info.value.field == "api_key_env" and "sk-secret" not in str(info.value)


def test_an_unforeseen_error_holding_the_api_key_is_redacted(upstream, monkeypatch):
    backend = make_backend(upstream)
    key = backend.api_key

    def broken(*args, **kwargs):
        raise ValueError(f"Invalid header value b'Bearer {key}'")

    monkeypatch.setattr(http.client.HTTPConnection, "putheader", broken)
    info = _failure(backend, False)
    assert key not in str(info.value) and info.value.reason == "BACKEND_CRASHED"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_call_cut_short_by_the_device_still_pays_for_the_prompt_the_upstream_had(upstream):
    # the upstream had the prompt (a hosted API bills it): a cancelled call is not free for the device's token quota
    upstream.respond = lambda handler, body: time.sleep(1.0)
    cancel = CancelToken()
    threading.Timer(0.2, cancel.cancel).start()
    result = make_backend(upstream).generate(REQUEST, cancel)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0
    assert result.prompt_tokens == -(-sum(len(m["content"]) for m in REQUEST.messages) // 4) > 0


def test_a_timeout_names_the_budget_that_applied(upstream):
    upstream.respond = lambda handler, body: time.sleep(1.0)
    with pytest.raises(BackendError) as info:
        make_backend(upstream, timeout_s=0.2).generate(REQUEST, CancelToken())
    assert "0.2 s (timeout_s)" in str(info.value)
    call_deadline = time.monotonic() + 0.3  # the device's deadline, shorter than the alias's 120 s
    cancel = CancelToken(deadline_s=call_deadline)
    from cloud_bridge.backends.openai import _Call

    assert "device's deadline" in _Call(make_backend(upstream), cancel)._timeout_error().args[0]


@pytest.mark.parametrize(("base_url", "warned"), [
    ("http://192.0.2.10/v1", True), ("http://127.0.0.1:8000/v1", False), ("http://localhost/v1", False),
    ("https://192.0.2.10/v1", False),
])
def test_an_api_key_sent_over_plain_http_off_this_machine_is_warned_about(base_url, warned, caplog):
    with caplog.at_level("WARNING", logger="cloud_bridge"):
        OpenAIBackend(OpenAIModelSettings(base_url=base_url, model="m", api_key_env="K"), environ={"K": "sk-secret"})
    assert ("plain http" in caplog.text) == warned and "sk-secret" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cloud_bridge"):  # no key, nothing to leak
        OpenAIBackend(OpenAIModelSettings(base_url=base_url, model="m"), environ={})
    assert "plain http" not in caplog.text


def test_a_query_in_base_url_is_sent_and_a_fragment_refused(upstream):
    # Azure OpenAI's deployments need ?api-version=...: it was dropped from every request
    backend = OpenAIBackend(OpenAIModelSettings(base_url=upstream.base_url + "?api-version=2024-06-01", model="gpt-test",
                                                timeout_s=5.0))
    backend.generate(REQUEST, CancelToken())
    assert upstream.requests[-1]["path"] == "/v1/chat/completions?api-version=2024-06-01"
    with pytest.raises(ConfigError) as info:
        OpenAIModelSettings(base_url="https://api.example.com/v1#x", model="m").validate()
    assert info.value.field == "base_url"


def test_half_characters_from_the_upstream_are_joined_or_replaced_never_a_failed_call(upstream, start_bridge,
                                                                                         make_client, monkeypatch):
    """Servers that count in UTF-16 may cut an emoji in two at a stream chunk's end or a length limit, and JSON
    escapes each half (QA OO). protobuf cannot encode half a character: the call failed as UNKNOWN, unbilled, and
    three of them opened the device's circuit. A half the next delta completes is joined; one nothing completes is
    U+FFFD."""
    upstream.respond = sse([delta("smile \ud83d"), delta("\ude00 end"), delta(" a\ud83db"), delta("\ud83d", "stop")])
    chunks = list(make_backend(upstream).stream(REQUEST, CancelToken()))
    assert [c.text for c in chunks[:-1]] == ["smile ", "\U0001f600 end", " a\ufffdb", "\ufffd"]
    assert sum(c.token_count for c in chunks) == 4  # one per upstream delta, as without the halves
    result = chunks[-1].result
    assert result is not None and result.text == "smile \U0001f600 end a\ufffdb\ufffd" and result.completion_tokens == 4
    upstream.respond = completion("caf\u00e9 \ud83d")
    assert make_backend(upstream).generate(REQUEST, CancelToken()).text == "caf\u00e9 \ufffd"

    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-secret")
    bridge = start_bridge(models={"gpt": {"backend": "openai", "base_url": upstream.base_url, "model": "gpt-test",
                                          "api_key_env": "TEST_UPSTREAM_KEY", "usd_per_million_input_tokens": 2.0,
                                          "usd_per_million_output_tokens": 8.0}})
    client = make_client(bridge, max_attempts=1)
    upstream.respond = sse([delta("\ud83d"), delta("\ude00", "stop"),
                            "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
                            + "\n\n"])
    result = list(client.stream([{"role": "user", "content": "an emoji"}]))[-1].result
    assert result.text == "\U0001f600" and result.cost_usd == pytest.approx((5 * 2.0 + 1 * 8.0) / 1e6)
    upstream.respond = lambda handler, body: _send(handler, 400, {"error": {"message": "bad \ud800 input"}})
    with pytest.raises(CloudError) as info:
        client.generate([{"role": "user", "content": "again"}])
    assert "bad \ufffd input" in str(info.value)


_USAGE = {"prompt_tokens": 20, "completion_tokens": 7}
_PARIS = "Paris is the capital."  # 21 characters: 6 tokens estimated


def _choice(message: Any = None, finish: Any = "stop", **fields: Any) -> dict[str, Any]:
    return {"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": finish, **fields}


@pytest.mark.parametrize(("payload", "billed"), [
    # the upstream's usage, where it is usable, is what it charged
    ({"usage": _USAGE, "choices": [{"index": 0, "message": None, "finish_reason": "stop"}]}, (20, 7, False)),
    ({"usage": _USAGE, "choices": []}, (20, 7, False)),
    ({"usage": _USAGE, "choices": [_choice(_PARIS, finish=["stop"])]}, (20, 7, False)),
    ({"usage": _USAGE, "choices": [_choice(5)]}, (20, 7, False)),
    # a count no call can have is estimated: the completion from the answer's text, the prompt from the request
    ({"usage": {"prompt_tokens": 20, "completion_tokens": -5}, "choices": [_choice(_PARIS)]}, (20, 6, False)),
    ({"usage": {"prompt_tokens": "x", "completion_tokens": 10**20}, "choices": [_choice(_PARIS)]}, (5, 6, True)),
    # nothing says the upstream generated anything (a proxy's page, an empty object): nothing is billed, as a stream
    # that fails before its first word
    ("not json", None),
    ({"choices": []}, None),
])
def test_a_unary_answer_the_bridge_cannot_use_is_billed_as_the_upstream_billed_it(upstream, start_bridge, make_client,
                                                                                   monkeypatch, caplog, payload,
                                                                                   billed):
    # the upstream charged for the answer: a stream that fails after its first words was charged to the device's
    # token quota and written to the access log (the bill's source); a unary call whose answer turned out unusable
    # was neither
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-secret")
    bridge = start_bridge(models={"gpt": {"backend": "openai", "base_url": upstream.base_url, "model": "gpt-test",
                                          "api_key_env": "TEST_UPSTREAM_KEY", "usd_per_million_input_tokens": 2.0,
                                          "usd_per_million_output_tokens": 8.0}},
                          quota={"requests_per_minute": 0, "tokens_per_minute": 1, "tokens_burst": 1000})
    if isinstance(payload, str):
        upstream.respond = lambda handler, body: _send_text(handler, 200, payload)
    else:
        upstream.respond = lambda handler, body: _send(handler, 200, {"model": "m", **payload})
    caplog.set_level("INFO", logger="cloud_bridge")
    with pytest.raises(CloudUnavailableError) as info:
        make_client(bridge, max_attempts=1).generate([{"role": "user", "content": "capital of France?"}])
    assert "UPSTREAM_BAD_RESPONSE" in str(info.value) and "unusable response" in str(info.value)  # the device's error
    lines = [r.getMessage() for r in caplog.records if " finish=" in r.getMessage()]
    bucket = bridge.server.service.quotas._tokens["device-a"]
    if billed is None:
        assert lines == [] and bucket.level == pytest.approx(1000, abs=1) and info.value.billed is None
        return
    prompt_tokens, completion_tokens, estimated = billed
    # the device's error carries the bill, for its budget and its result's cost
    assert info.value.billed == ((prompt_tokens * 2.0 + completion_tokens * 8.0) / 1e6, prompt_tokens, completion_tokens)
    (line,) = lines
    assert "device=device-a model=gpt finish=backend_failed" in line
    assert f" prompt_tokens={prompt_tokens} " in line and f" completion_tokens={completion_tokens} " in line
    assert ("prompt_tokens_estimated=true" in line) == estimated
    assert f"cost_usd={(prompt_tokens * 2.0 + completion_tokens * 8.0) / 1e6:.12f}" in line
    assert bucket.level == pytest.approx(1000 - prompt_tokens - completion_tokens, abs=1)  # charged once


def test_an_unusable_answer_keeps_what_to_bill_when_the_api_key_is_cut_out_of_its_error(upstream):
    # the guard that cuts the key out of errors made a plain BackendError of them: the bill was lost with the type
    backend = make_backend(upstream)
    upstream.respond = _answer("Paris", {"prompt_tokens": f"echo {backend.api_key}", "completion_tokens": 3})
    info = _failure(backend, False)
    assert isinstance(info.value, UnusableAnswerError) and backend.api_key not in str(info.value)
    assert (info.value.prompt_tokens, info.value.completion_tokens, info.value.prompt_estimated) == (1, 3, True)
    assert (info.value.code, info.value.reason) == ("UNAVAILABLE", "UPSTREAM_BAD_RESPONSE")


def _usage_event(prompt: int, completion: int) -> str:
    return "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}) + "\n\n"


def test_a_stream_that_finished_and_then_lost_its_connection_keeps_its_answer_and_usage(upstream):
    # it failed as UNAVAILABLE and was billed from guesses (1 + 2 tokens for the upstream's 700 + 500)
    def respond(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()  # no length, no chunking: the body ends when the connection does
        for event in (delta("hello "), delta("world", "stop"), _usage_event(700, 500)):
            handler.wfile.write(event.encode())
        handler.wfile.flush()
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()  # a reset before "data: [DONE]"

    upstream.respond = respond
    *_, last = make_backend(upstream).stream(REQUEST, CancelToken())
    result = last.result
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "hello world", "stop", 700, 500)


def test_a_unary_answer_with_a_byte_that_is_not_utf8_is_answered(upstream):
    # one bad byte failed the whole answer, unbilled, and the device asked again (four generations)
    raw = json.dumps({"choices": [{"message": {"content": "caf@"}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 2}}).encode().replace(b"@", b"\xc3")
    upstream.respond = raw_200(raw)
    result = make_backend(upstream).generate(REQUEST, CancelToken())
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("caf\ufffd", 5, 2)


def test_a_stream_whose_events_carry_error_null_is_answered(upstream):
    # "error": null in every chunk (some servers send it) failed the call at its first event
    event = "data: " + json.dumps({"error": None, "choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]})
    upstream.respond = sse([event + "\n\n"])
    *_, last = make_backend(upstream).stream(REQUEST, CancelToken())
    assert last.result.text == "ok"


@pytest.mark.parametrize(("status", "payload", "said"), [
    (400, {"object": "error", "message": "max_tokens is too large"}, "HTTP 400: max_tokens is too large"),  # vLLM
    (404, {"detail": "Not Found"}, "HTTP 404: Not Found"),  # FastAPI
    (200, {"error": {"message": "the model is overloaded"}}, "upstream failed: the model is overloaded"),
])
def test_an_upstreams_error_text_in_other_shapes_reaches_the_device(upstream, status, payload, said):
    # they came out as "upstream answered HTTP 400" alone, and a 200 holding an error as "KeyError: 'choices'"
    upstream.respond = lambda handler, body: _send(handler, status, payload)
    info = _failure(make_backend(upstream), streaming=False)
    assert said in str(info.value)


def test_an_upstream_that_does_not_take_the_connection_in_time_is_unreachable_not_a_timeout(upstream):
    # reported as "did not answer within 30 s (timeout_s)" after connect_timeout_s, DEADLINE_EXCEEDED, not retried
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(64):  # fill the accept queue: a connect then waits (the kernel drops the SYNs)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            fillers.append(s)
        settings = OpenAIModelSettings(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1", model="m",
                                       api_key_env="K", timeout_s=30.0, connect_timeout_s=0.5)
        with pytest.raises(BackendError) as info:
            OpenAIBackend(settings, environ={"K": "k"}).generate(REQUEST, CancelToken())
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert (info.value.code, info.value.reason) == ("UNAVAILABLE", "UPSTREAM_UNREACHABLE")
    assert "connect_timeout_s" in str(info.value)


@pytest.mark.parametrize(("payload", "said"), [
    # an upstream that does not stream (or a proxy that buffers) answers the stream request whole
    ({"model": "m", "choices": [{"message": {"content": "Paris"}, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 7, "completion_tokens": 2}}, None),
    # and a 200 holding an error, whose text reaches the device as a unary call's does
    ({"error": {"message": "the model is overloaded"}}, "upstream failed: the model is overloaded"),
])
def test_a_stream_request_answered_with_a_whole_json_body_is_read_as_that_answer(upstream, payload, said):
    # the SSE parser skipped its lines: "upstream stream ended before it finished" (UPSTREAM_CONNECTION_LOST), the
    # error text lost, and the device asked again, each answer generated (and billed by the upstream) for nothing
    upstream.respond = lambda handler, body: _send(handler, 200, payload)
    if said is not None:
        info = _failure(make_backend(upstream), streaming=True)
        assert said in str(info.value) and info.value.reason == "UPSTREAM_ERROR"
        return
    chunks = list(make_backend(upstream).stream(REQUEST, CancelToken()))
    assert [(c.text, c.token_count) for c in chunks[:-1]] == [("Paris", 2)]
    result = chunks[-1].result
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens, result.model) == (
        "Paris", "stop", 7, 2, "m")


def test_a_whole_answer_cut_short_of_its_content_length_is_a_lost_connection(upstream):
    # http.client hands over what arrived without an error: the device was told the upstream sent an unusable
    # response ("JSONDecodeError: Unterminated string ..."), sending its operator after the upstream's JSON
    def respond(handler, body):
        raw = json.dumps({"choices": [{"message": {"content": "hello world"}, "finish_reason": "stop"}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw[:30])
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)

    upstream.respond = respond
    for streaming in (False, True):  # a stream request answered whole is read the same way
        info = _failure(make_backend(upstream), streaming)
        assert (info.value.code, info.value.reason) == ("UNAVAILABLE", "UPSTREAM_CONNECTION_LOST")
        assert "short of its Content-Length" in str(info.value)
