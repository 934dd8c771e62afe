"""The daemon's gRPC service on a Unix socket: unary and streaming chat, errors with details, health, permissions."""

from __future__ import annotations

import stat

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from edge_runtime._proto.edgecloud.v1 import bridge_pb2, daemon_pb2, daemon_pb2_grpc
from edge_runtime.daemon._grpc import SERVICE_NAME

from .conftest import CLOUD_REPLY, cloud_client, runtime, stops_released_in_part


def _request(content: str = "what is 2 + 2?", **fields) -> daemon_pb2.ChatRequest:
    return daemon_pb2.ChatRequest(messages=[bridge_pb2.ChatMessage(role="user", content=content)], **fields)


@pytest.fixture
def channel_to():
    channels = []

    def make(daemon):
        ch = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
        channels.append(ch)
        return daemon_pb2_grpc.EdgeRuntimeStub(ch), health_pb2_grpc.HealthStub(ch)

    yield make
    for ch in channels:
        ch.close()


def _details(err: grpc.RpcError) -> list:
    status = rpc_status.from_call(err)
    out = []
    for any_ in status.details if status else ():
        for kind in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            if any_.Is(kind.DESCRIPTOR):
                msg = kind()
                any_.Unpack(msg)
                out.append(msg)
    return out


def test_the_socket_is_private_to_the_service_user(engine, start_daemon, tmp_path):
    daemon = start_daemon(runtime(engine), tmp_path)
    mode = daemon.grpc_socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    daemon.stop()
    assert not daemon.grpc_socket.exists()  # removed at exit


def test_unary_chat_returns_the_answer_with_routing_energy_cost_and_logprobs(engine, start_daemon, channel_to,
                                                                             tmp_path):
    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path)
    stub, health = channel_to(daemon)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    r = stub.Chat(_request(max_new_tokens=5, logprobs=True, top_logprobs=2), timeout=30)
    direct = engine.generate(messages=[{"role": "user", "content": "what is 2 + 2?"}], max_new_tokens=5)
    assert r.text == direct.text and r.model == engine.model_name
    assert r.routing.route == "local" and r.routing.reason == "policy_never" and r.routing.HasField("p_correct")
    assert r.energy.joules > 0 and r.energy.source == "test:constant" and r.cost.cloud_usd == 0
    # as HTTP's answer has them: a local answer's price is estimated exactly when its energy is; no self-check ran
    assert r.cost.device_energy_estimated == r.energy.estimated and r.energy.estimator_joules == 0
    assert r.usage.local.completion_tokens == 5 and r.usage.cloud.completion_tokens == 0
    kept = [t for t in direct.tokens if t.id not in engine.eos_token_ids]
    assert [t.token for t in r.logprobs] == [t.text for t in kept]
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in r.logprobs)
    assert r.finish_reason in (bridge_pb2.FINISH_REASON_LENGTH, bridge_pb2.FINISH_REASON_EOS)


def test_streamed_chat_sends_deltas_then_the_final_response(engine, start_daemon, channel_to, tmp_path):
    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path)
    stub, _ = channel_to(daemon)
    events = list(stub.ChatStream(_request(max_new_tokens=8), timeout=30))
    deltas = [e.delta.text for e in events if e.HasField("delta")]
    assert len(deltas) >= 2 and events[-1].HasField("final")
    final = events[-1].final
    assert "".join(deltas) == final.text and final.routing.route == "local"
    from .conftest import metric, wait_for

    # a gRPC stream's time to its first text is measured, as an HTTP stream's is
    assert wait_for(lambda: metric(daemon.service.metrics.render(), "edge_runtime_time_to_first_token_seconds_count") == 1)


def test_the_cloud_answers_over_grpc_too_and_reveal_draft_withdraws(engine, bridge, start_daemon, channel_to, tmp_path):
    cloud = cloud_client(bridge.address)
    daemon = start_daemon(runtime(engine, {"type": "threshold", "p": 0.999}, cloud=cloud), tmp_path)
    stub, _ = channel_to(daemon)
    r = stub.Chat(_request(max_new_tokens=6), timeout=30)
    assert r.text == CLOUD_REPLY and r.routing.route == "cloud" and r.model == "big-cloud-model"
    assert r.routing.draft and r.cost.cloud_usd > 0 and r.routing.threshold == pytest.approx(0.999)
    assert r.energy.network_joules > 0 and r.cost.device_energy_estimated  # the radio's energy is an estimate
    assert not r.cost.cloud_usd_unknown  # answered: its bill is known
    events = list(stub.ChatStream(_request(max_new_tokens=6, reveal_draft=True), timeout=30))
    kinds = [e.WhichOneof("event") for e in events]
    assert "withdraw" in kinds
    after = kinds.index("withdraw")
    assert "".join(e.delta.text for e in events[after + 1:] if e.HasField("delta")) == CLOUD_REPLY
    cloud.close()


def test_grpc_errors_carry_codes_and_details(engine, start_daemon, channel_to, tmp_path):
    daemon = start_daemon(runtime(engine), tmp_path)
    stub, _ = channel_to(daemon)
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(_request(model="gpt-4o"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(_request(sampling=bridge_pb2.SamplingParams(top_p=2.0)), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(info.value)[0].field_violations[0].field == "sampling.top_p"  # its path in ChatRequest
    with pytest.raises(grpc.RpcError) as info:  # OpenAI's range, as over HTTP (it was accepted here)
        stub.Chat(_request(sampling=bridge_pb2.SamplingParams(temperature=2.5)), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(info.value)[0].field_violations[0].field == "sampling.temperature"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ChatStream(_request("one two three " * 200, max_new_tokens=8), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(isinstance(d, error_details_pb2.ErrorInfo) and d.reason == "CONTEXT_LENGTH_EXCEEDED"
               for d in _details(info.value))
    assert stub.Chat(_request(max_new_tokens=2), timeout=10).usage.local.completion_tokens == 2  # still serving


def test_every_call_gets_a_request_id_its_caller_sees_even_when_refused(engine, start_daemon, channel_to, tmp_path,
                                                                       caplog):
    # a refused call without the caller's id was logged as "grpc - request refused", and its caller had no id to quote
    daemon = start_daemon(runtime(engine), tmp_path)
    stub, _ = channel_to(daemon)
    with caplog.at_level("INFO", logger="edge_runtime.daemon"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Chat(_request(logprobs=True, top_logprobs=50), timeout=10)
    rid = dict(info.value.initial_metadata())["x-request-id"]
    assert len(rid) == 32 and f"grpc {rid} request refused" in caplog.text
    answer, call = stub.Chat.with_call(_request(max_new_tokens=2), timeout=10)
    assert answer.request_id == dict(call.initial_metadata())["x-request-id"]
    for bad in ("two\nlines", "trailing\n"):  # an id that cannot be one is refused, under an id made for it
        with pytest.raises(grpc.RpcError) as info:
            stub.Chat(_request(request_id=bad), timeout=10)
        assert _details(info.value)[0].field_violations[0].field == "request_id"
    assert len(dict(info.value.initial_metadata())["x-request-id"]) == 32
    answer, call = stub.Chat.with_call(_request(max_new_tokens=2, request_id="app-7"), timeout=10)
    assert answer.request_id == dict(call.initial_metadata())["x-request-id"] == "app-7"
    stream = stub.ChatStream(_request(max_new_tokens=2), timeout=10)
    events = list(stream)
    assert events[-1].final.request_id == dict(stream.initial_metadata())["x-request-id"]
    # the x-request-id metadata, as HTTP's header, when the request has none (it was ignored); the field wins
    answer, call = stub.Chat.with_call(_request(max_new_tokens=2), metadata=(("x-request-id", "trace-9"),), timeout=10)
    assert answer.request_id == dict(call.initial_metadata())["x-request-id"] == "trace-9"
    answer = stub.Chat(_request(max_new_tokens=2, request_id="app-8"), metadata=(("x-request-id", "trace-9"),),
                       timeout=10)
    assert answer.request_id == "app-8"
    answer = stub.Chat(_request(max_new_tokens=2), metadata=(("x-request-id", "no spaces please"),), timeout=10)
    assert len(answer.request_id) == 32  # replaced, as HTTP replaces a bad header


def test_a_call_past_its_deadline_counts_as_a_timeout_and_one_cancelled_as_cancelled(engine, start_daemon,
                                                                                    channel_to, tmp_path):
    import threading

    from .conftest import SlowEngine, metric, wait_for

    slow = SlowEngine(engine, delay_s=0.05)
    daemon = start_daemon(runtime(slow, {"type": "never"}), tmp_path)
    stub, _ = channel_to(daemon)
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(_request(max_new_tokens=200), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = stub.ChatStream(_request(max_new_tokens=200), timeout=30)
    next(stream)
    threading.Timer(0.2, stream.cancel).start()
    with pytest.raises(grpc.RpcError):
        list(stream)
    assert wait_for(lambda: daemon.service.active_jobs == 0)
    text = daemon.service.metrics.render()
    assert metric(text, "edge_runtime_requests_total", outcome="timeout") == 1
    assert metric(text, "edge_runtime_requests_total", outcome="cancelled") == 1


def test_the_contract_has_chat_and_chat_stream_with_the_account():
    assert daemon_pb2.DESCRIPTOR.package == "edgecloud.v1" and SERVICE_NAME == "edgecloud.v1.EdgeRuntime"
    methods = {m.name: m for m in daemon_pb2.DESCRIPTOR.services_by_name["EdgeRuntime"].methods}
    assert set(methods) == {"Chat", "ChatStream"}
    assert methods["ChatStream"].server_streaming and not methods["Chat"].server_streaming
    assert methods["Chat"].input_type.fields_by_name["messages"].message_type is bridge_pb2.ChatMessage.DESCRIPTOR
    response = set(daemon_pb2.ChatResponse.DESCRIPTOR.fields_by_name)
    assert response >= {"text", "model", "routing", "energy", "cost", "usage", "latency", "logprobs", "finish_reason"}
    assert set(daemon_pb2.Routing.DESCRIPTOR.fields_by_name) >= {"route", "p_correct", "threshold", "policy", "reason"}
    assert daemon_pb2.Routing.DESCRIPTOR.fields_by_name["p_correct"].has_presence  # unset is not 0


def test_streamed_logprobs_are_those_of_the_text_not_of_a_stop_string_cut_from_it(engine, start_daemon, channel_to,
                                                                                   tmp_path):
    plain = engine.generate(messages=[{"role": "user", "content": "what is 2 + 2?"}], max_new_tokens=8)
    texts = [t.text for t in plain.tokens]
    k = next(i for i in range(len(texts) - 1) if len(texts[i]) >= 2 and texts[i + 1].isprintable() and texts[i + 1])
    stop = texts[k][1:] + texts[k + 1]  # starts inside token k: k shows a character, k + 1 none
    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path)
    stub, _ = channel_to(daemon)
    events = list(stub.ChatStream(_request(max_new_tokens=8, logprobs=True, sampling=bridge_pb2.SamplingParams(stop=[stop])), timeout=30))
    streamed = [e.delta.logprob.token for e in events if e.HasField("delta") and e.delta.HasField("logprob")]
    final = events[-1].final
    assert streamed == texts[:k + 1] == [t.token for t in final.logprobs]
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == final.text


def test_a_stream_whose_client_stops_reading_frees_its_slot_at_the_deadline(engine, start_daemon, tmp_path):
    # grpc advances the stream only when it can send: with the client's flow-control window full, the job was
    # never advanced, never saw its deadline, and held the only generation slot for as long as the client stalled
    import time

    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path, request_timeout_s=1.0)
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = daemon_pb2_grpc.EdgeRuntimeStub(ch)
        request = _request("count " * 4, max_new_tokens=engine.context_length - 40, logprobs=True, top_logprobs=20)
        stream = stub.ChatStream(request)  # no deadline of its own
        next(stream)  # then it stops reading
        started = time.monotonic()
        while daemon.service.active_jobs and time.monotonic() - started < 10:
            time.sleep(0.05)
        assert daemon.service.active_jobs == 0, "the stalled stream still holds its job"
        assert time.monotonic() - started < 4
        r = stub.Chat(_request(max_new_tokens=2), timeout=10)  # the slot serves the next request
        assert r.usage.local.completion_tokens >= 1
        stream.cancel()
    from .conftest import metric

    # it ended at its deadline: a timeout, not a client that left
    text = daemon.service.metrics.render()
    assert metric(text, "edge_runtime_requests_total", transport="grpc", outcome="timeout") == 1, [l for l in text.splitlines() if "requests_total{" in l]
    assert metric(text, "edge_runtime_requests_total", transport="grpc", outcome="cancelled") == 0


def test_a_refused_request_id_never_reaches_the_log_as_is(engine, start_daemon, channel_to, tmp_path, caplog):
    # the refusal may be of the id itself: a newline in it forged a log line
    caplog.set_level("INFO", logger="edge_runtime.daemon")
    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path)
    stub, _ = channel_to(daemon)
    forged = "x\n2026-01-01 00:00:00,000 WARNING edge_runtime.daemon: FORGED"
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(_request(request_id=forged), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all("\n" not in m and "FORGED" not in m.split("refused")[0] for m in refused)


class _BlockingService:
    """A ChatService stand-in whose jobs run until ``release`` is set: every call it admits stays in progress."""

    def __init__(self) -> None:
        import threading

        self.release, self.refusals, self.running = threading.Event(), [], 0

    def open(self, req, transport, *, timeout_s=None):
        service = self

        class _Job:
            request = req

            def run(self):
                service.running += 1
                service.release.wait(10)
                raise RuntimeError("released")

            def cancel(self, reason):
                pass

        return _Job()

    def refused(self, transport, err, request_id=None):
        self.refusals.append(err)


def test_a_socket_at_its_call_limit_still_answers_health_checks_and_refuses_more_calls_with_a_delay(tmp_path):
    # gRPC's own maximum_concurrent_rpcs counted health checks too: with every call slot taken the daemon's
    # health check was refused with RESOURCE_EXHAUSTED, and it looked dead to a supervisor
    import time

    from edge_runtime.daemon._grpc import create_grpc_server

    service = _BlockingService()
    server, health_servicer, path = create_grpc_server(service, tmp_path / "d.sock", max_calls=2)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        with grpc.insecure_channel(f"unix:{path}") as ch:
            stub = daemon_pb2_grpc.EdgeRuntimeStub(ch)
            held = [stub.Chat.future(_request(), timeout=20) for _ in range(2)]
            started = time.monotonic()
            while service.running < 2 and time.monotonic() - started < 10:
                time.sleep(0.01)
            assert service.running == 2
            with pytest.raises(grpc.RpcError) as refused:
                stub.Chat(_request(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = _details(refused.value)
            assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details)
            assert any(isinstance(d, error_details_pb2.ErrorInfo) and d.reason == "QUEUE_FULL" for d in details)
            assert "2 calls in progress" in refused.value.details() and len(service.refusals) == 1
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            service.release.set()
            for call in held:
                with pytest.raises(grpc.RpcError):
                    call.result()
            # the slots were given back: the next call is admitted (and runs)
            service.release.clear()
            service.release.set()
            with pytest.raises(grpc.RpcError) as after:
                stub.Chat(_request(), timeout=5)
            assert after.value.code() == grpc.StatusCode.INTERNAL
    finally:
        server.stop(0)


def test_prompt_tokens_kept_from_an_earlier_request_are_reported(engine, start_daemon, channel_to, http, tmp_path):
    # the daemon keeps the KV state of the last prompt: a follow-up turn prefills only its new tokens, which no
    # client could see (OpenAI reports its own prompt caching in usage.prompt_tokens_details.cached_tokens)
    from .conftest import metric

    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path)
    c = http(daemon.port)
    turn = [{"role": "user", "content": "count from one to twenty please"}]
    status, _, first = c.json("POST", "/v1/chat/completions", {"messages": turn, "max_tokens": 4})
    # the engine is shared with earlier tests: at most the chat template's opening is kept from them
    before = first["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert status == 200 and 0 <= before < first["usage"]["prompt_tokens"] // 2
    follow = turn + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "and back"}]
    status, _, second = c.json("POST", "/v1/chat/completions", {"messages": follow, "max_tokens": 4})
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert status == 200 and before < first["usage"]["prompt_tokens"] // 2 < cached < second["usage"]["prompt_tokens"]
    stub, _ = channel_to(daemon)
    again = stub.Chat(daemon_pb2.ChatRequest(messages=[bridge_pb2.ChatMessage(**m) for m in follow], max_new_tokens=4),
                      timeout=10)
    assert again.usage.cached_prompt_tokens >= cached
    text = c.request("GET", "/metrics")[2].decode()
    assert metric(text, "edge_runtime_cached_prompt_tokens_total") == before + cached + again.usage.cached_prompt_tokens


def test_a_chat_request_that_is_not_protobuf_is_refused_counted_and_logged(engine, start_daemon, http, tmp_path,
                                                                            caplog):
    # grpcio refused it with INTERNAL and an ERROR traceback, and the daemon never counted it
    from .conftest import metric

    daemon = start_daemon(runtime(engine), tmp_path)
    channel = grpc.insecure_channel(f"unix:{daemon.grpc_socket}")
    try:
        with caplog.at_level("INFO"), pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/{SERVICE_NAME}/ChatStream")(b"\x1a\x02\xc3\x28", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(dict(info.value.initial_metadata())["x-request-id"]) == 32
        assert not [r for r in caplog.records if r.levelname == "ERROR"] and "not a valid protobuf message" in caplog.text
        text = http(daemon.port).request("GET", "/metrics")[2].decode()
        assert metric(text, "edge_runtime_requests_total", transport="grpc", outcome="invalid") == 1
    finally:
        channel.close()


def test_a_call_that_ended_while_it_was_opened_cancels_its_job():
    # grpcio's add_callback returns False once the call is over (a client that gave up while a long prompt was
    # tokenized): the hook never ran, and the job generated to its end for nobody, holding the generation slot
    from types import SimpleNamespace

    from edge_runtime.daemon._grpc import EdgeRuntimeServicer
    from edge_runtime._proto.edgecloud.v1 import bridge_pb2, daemon_pb2

    cancelled = []
    job = SimpleNamespace(cancel=cancelled.append)
    service = SimpleNamespace(open=lambda req, transport, timeout_s=None: job)
    ended = SimpleNamespace(add_callback=lambda callback: False, time_remaining=lambda: None)
    request = daemon_pb2.ChatRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")])
    assert EdgeRuntimeServicer(service)._open(request, "r1", ended) is job
    assert cancelled == ["client_gone"]
    live = SimpleNamespace(add_callback=lambda callback: True, time_remaining=lambda: 5.0)
    EdgeRuntimeServicer(service)._open(request, "r2", live)
    assert cancelled == ["client_gone"]  # a live call's job runs; its hook cancels it when the call ends


def test_streamed_logprobs_leave_out_a_held_token_whose_text_a_stop_string_then_cuts(engine, start_daemon, channel_to,
                                                                                      tmp_path):
    ask = [{"role": "user", "content": "what is 2 + 2?"}]
    sampling, shown = stops_released_in_part(engine, ask)
    daemon = start_daemon(runtime(engine, {"type": "never"}), tmp_path)
    stub, _ = channel_to(daemon)
    events = list(stub.ChatStream(_request(max_new_tokens=40, logprobs=True,
                                           sampling=bridge_pb2.SamplingParams(**sampling)), timeout=30))
    streamed = [e.delta.logprob.token for e in events if e.HasField("delta") and e.delta.HasField("logprob")]
    final = events[-1].final
    assert final.text == "".join(shown) and [t.token for t in final.logprobs] == shown
    assert streamed == shown
