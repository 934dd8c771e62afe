"""Deadlines, cancellation, bounded queues, failing backends, shutdown: the bridge never hangs or crashes."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from cloud_bridge.backends import UnusableAnswerError
from cloud_bridge.backends.echo import EchoBackend
from edge_runtime._proto.edgecloud.v1 import bridge_pb2
from edge_runtime.engine.types import SamplingParams
from edge_runtime.errors import (
    BackendError,
    CircuitOpenError,
    CloudCancelledError,
    CloudTimeoutError,
    CloudUnavailableError,
)

from .conftest import TOKEN

AUTH = [("authorization", f"Bearer {TOKEN}")]
HI = [{"role": "user", "content": "hi"}]
LONG_REPLY = " ".join(f"w{i}" for i in range(200))


def slow(token_delay_ms: float, reply: str = LONG_REPLY, **extra):
    return {"tiny": {"backend": "echo", "reply": reply, "token_delay_ms": token_delay_ms, **extra}}


def _details(err: grpc.RpcError) -> dict[str, object]:
    out: dict[str, object] = {}
    for detail in rpc_status.from_call(err).details:
        for cls in (error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            message = cls()
            if detail.Unpack(message):
                out[cls.__name__] = message
    return out


def test_deadline_exceeded_stops_the_backend_generation(start_bridge, make_client, caplog):
    bridge = start_bridge(models=slow(20, usd_per_million_output_tokens=1.0))  # 200 tokens x 20 ms = 4 s
    client = make_client(bridge, max_attempts=1)
    started = time.monotonic()
    with caplog.at_level("INFO", logger="cloud_bridge"), pytest.raises(CloudTimeoutError):
        client.generate(HI, timeout_s=0.3)
    assert time.monotonic() - started < 1.0
    (record,) = bridge.backend().wait_for_generations(1, timeout_s=3)
    assert record.finish_reason == "cancelled"
    assert record.completion_tokens < 40
    assert record.ended_s - record.started_s < 1.0
    assert bridge.server.service.slots["tiny"].running == 0
    # what it generated is billed: the access log names the device, the model, the tokens and the cost
    deadline = time.monotonic() + 2
    while "finish=deadline_exceeded" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "device=device-a model=tiny finish=deadline_exceeded" in caplog.text and "cost_usd=" in caplog.text


def test_a_stream_the_caller_abandons_stops_the_backend_and_frees_its_worker(start_bridge, make_client, caplog):
    bridge = start_bridge(models=slow(20))
    stream = make_client(bridge).stream(HI)
    assert next(stream).text == "w0"
    caplog.set_level("INFO", logger="cloud_bridge")
    stream.close()  # the app went away
    (record,) = bridge.backend().wait_for_generations(1, timeout_s=3)
    assert record.finish_reason in ("cancelled", "closed") and record.completion_tokens < 40
    deadline = time.monotonic() + 2
    while bridge.server.service.slots["tiny"].running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bridge.server.service.slots["tiny"].running == 0
    # billed in the access log, with a finished call's keys ("prompt_tokens~N" was no key=value)
    deadline = time.monotonic() + 2
    while "finish=cancelled_by_caller" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    line = next(r.getMessage() for r in caplog.records if "finish=cancelled_by_caller" in r.getMessage())
    assert "~" not in line  # (whichever of the two cut paths wrote it: prompt_tokens_estimated=true on one)
    assert all(f" {key}=" in line for key in ("prompt_tokens", "completion_tokens", "cost_usd", "queue_ms", "total_ms"))
    again = make_client(bridge).generate(
        HI, params=SamplingParams(max_new_tokens=3), timeout_s=10
    )  # the worker serves again
    assert again.text == "w0 w1 w2"


def test_a_stream_cancelled_while_the_bridge_generates_stops_at_once_and_stops_the_backend(start_bridge, make_client):
    bridge = start_bridge(models=slow(2000, reply="a b c d e f g h i j k l m n o"))  # 15 words x 2 s = 30 s
    client = make_client(bridge, timeout_s=60, circuit_failure_threshold=1)
    started = time.monotonic()
    stream = client.stream(HI, cancel=lambda: time.monotonic() - started > 0.3)
    with pytest.raises(CloudCancelledError) as info:
        next(stream)  # waiting for the first word, 2 s away: only a watcher can see the cancel
    assert 0.3 <= time.monotonic() - started < 1.0  # not 2 s, at the first word
    assert info.value.code == "CANCELLED"
    (record,) = bridge.backend().wait_for_generations(1, timeout_s=3)
    assert record.finish_reason == "cancelled" and record.completion_tokens == 0
    assert record.ended_s - started < 1.0  # the bridge stopped generating (and billing) too
    assert client.circuit.state == "closed" and client.circuit.consecutive_failures == 0  # the caller's doing


def test_a_stream_cancelled_between_chunks_yields_no_more_text(start_bridge, make_client):
    bridge = start_bridge(models=slow(50))
    cancelled = threading.Event()
    client = make_client(bridge)
    stream = client.stream(HI, cancel=cancelled.is_set)
    assert next(stream).text == "w0"
    cancelled.set()
    with pytest.raises(CloudCancelledError):
        next(stream)
    (record,) = bridge.backend().wait_for_generations(1, timeout_s=3)
    assert record.finish_reason in ("cancelled", "closed") and record.completion_tokens < 40
    assert client.circuit.consecutive_failures == 0


def _one_worker_busy(start_bridge, raw_stub, queue_size: int, token_delay_ms: float = 30, **sections):
    """A bridge with one slow worker, that worker running a call: (bridge, stub, the request, the running call)."""
    bridge = start_bridge(models=slow(token_delay_ms, reply="a b c d e f g h i j", workers=1, queue_size=queue_size),
                          **sections)
    stub = raw_stub(bridge)
    request = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")])
    running = stub.Generate.future(request, metadata=AUTH, timeout=10)
    while bridge.server.service.slots["tiny"].running == 0:
        time.sleep(0.005)
    return bridge, stub, request, running


def test_a_full_queue_answers_resource_exhausted_at_once_with_a_retry_delay(start_bridge, raw_stub):
    bridge, stub, request, running = _one_worker_busy(start_bridge, raw_stub, queue_size=1)
    waiting = stub.Generate.future(request, metadata=AUTH, timeout=10)
    while bridge.server.service.slots["tiny"].waiting == 0:
        time.sleep(0.005)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=AUTH, timeout=10)
    assert time.monotonic() - started < 0.2  # refused, not queued without bound
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(info.value)
    assert details["ErrorInfo"].reason == "QUEUE_FULL"
    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
    # the two admitted calls are both answered
    assert running.result().text == waiting.result().text == "a b c d e f g h i j"


def test_a_call_whose_deadline_passes_in_the_queue_ends_as_a_deadline_not_a_cancel(start_bridge, raw_stub, caplog):
    # the bridge sees the caller's deadline a moment before the caller's clock does: it answered CANCELLED, which
    # the device counted as an outage (three of them opened its circuit breaker on a healthy, busy bridge)
    # the running call takes 1 s and the queued one's deadline is 0.4 s: long enough to reach the bridge on a
    # loaded machine (a call whose deadline passed on its way never reaches the bridge's code or its log)
    _, stub, request, running = _one_worker_busy(start_bridge, raw_stub, queue_size=4, token_delay_ms=100)
    with caplog.at_level("INFO", logger="cloud_bridge"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=AUTH, timeout=0.4)
        deadline = time.monotonic() + 2
        while "waiting for a worker" not in caplog.text and "waited for a worker" not in caplog.text \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "status=DEADLINE_EXCEEDED" in caplog.text and "call ended while waiting" not in caplog.text
    assert "status=DEADLINE_EXCEEDED peer=ipv" in caplog.text  # said where it came from (the ended call's was "")
    assert running.result().text == "a b c d e f g h i j"


def _wait_for_log(caplog, *texts: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in caplog.text for text in texts) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("ends", ["cancelled", "deadline"])
def test_a_call_that_ends_in_the_queue_gets_its_request_back_once_and_one_that_ran_does_not(start_bridge, raw_stub,
                                                                                              caplog, ends):
    # a call cancelled (or out of time) while it waited for a worker kept the request it took from the device's
    # quota: a device whose calls queue behind a busy model lost quota for work never done
    quota = {"requests_per_minute": 1, "requests_burst": 3, "tokens_per_minute": 0}  # refills 1/60 a second
    with caplog.at_level("INFO", logger="cloud_bridge"):
        bridge, stub, request, running = _one_worker_busy(start_bridge, raw_stub, queue_size=4, token_delay_ms=200,
                                                          quota=quota)  # the running call takes 2 s
        slots, quotas = bridge.server.service.slots["tiny"], bridge.server.service.quotas
        if ends == "cancelled":
            queued = stub.Generate.future(request, metadata=AUTH, timeout=10)
            while slots.waiting == 0:
                time.sleep(0.005)
            queued.cancel()
        else:
            queued = stub.Generate.future(request, metadata=AUTH, timeout=0.4)
        _wait_for_log(caplog, "waiting for a worker", "waited for a worker")
        # the running call's request is spent; the queued one's came back, once (the bucket holds 3)
        assert quotas._requests["device-a"].level == pytest.approx(2.0, abs=0.1)
        assert running.running() and not bridge.backend().generations  # the queued call never reached the backend
        # a call cancelled once its generation had started cost the backend's work: its request stays spent
        running.cancel()
        (record,) = bridge.backend().wait_for_generations(1, timeout_s=5)
        _wait_for_log(caplog, "finish=cancelled_by_caller")
    assert record.finish_reason == "cancelled" and "finish=cancelled_by_caller" in caplog.text
    assert quotas._requests["device-a"].level == pytest.approx(2.0, abs=0.1)
    assert slots.running == 0 and slots.waiting == 0


def test_a_failing_backend_is_unavailable_with_details_and_the_server_keeps_serving(
    start_bridge, raw_stub, make_client
):
    broken = EchoBackend(fail_after_tokens=2, failure=BackendError("GPU fell off", reason="ENGINE_FAILED"))
    crashing = EchoBackend(fail_after_tokens=0, failure=RuntimeError("segfault-ish"))
    bridge = start_bridge(backends={"broken": broken, "crashing": crashing})
    stub = raw_stub(bridge)
    for alias, reason in (("broken", "ENGINE_FAILED"), ("crashing", "BACKEND_CRASHED")):
        request = bridge_pb2.GenerateRequest(
            model=alias, messages=[bridge_pb2.ChatMessage(role="user", content="one two three")]
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=AUTH, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _details(info.value)["ErrorInfo"].reason == reason
        assert _details(info.value)["ErrorInfo"].metadata["model_alias"] == alias
    # the server is fine and the broken aliases' workers are free again
    assert make_client(bridge).generate(HI, model="tiny").text == "the answer is forty two"
    assert all(slots.running == 0 for slots in bridge.server.service.slots.values())


def test_a_stream_whose_backend_fails_after_its_first_words_is_charged_and_billed(start_bridge, make_client, caplog):
    broken = EchoBackend(fail_after_tokens=3, failure=BackendError("upstream failed mid-stream", reason="UPSTREAM_ERROR"))
    bridge = start_bridge(backends={"broken": broken}, models={},
                          quota={"requests_per_minute": 0, "tokens_per_minute": 1, "tokens_burst": 1000})
    caplog.set_level("INFO", logger="cloud_bridge")
    received = []
    with pytest.raises(CloudUnavailableError) as info:
        for chunk in make_client(bridge, max_attempts=1).stream([{"role": "user", "content": "one two three four five"}],
                                                                 model="broken"):
            received.append(chunk.text)
    assert "".join(received).split() == ["one", "two", "three"]
    # the device is told the bill (its prompt estimated, 23 characters at ~4 a token), its reason kept
    assert info.value.billed == (0.0, 6, 3) and "[UPSTREAM_ERROR]" in str(info.value)
    # an upstream bills what it streamed: the device's token quota and the access log (the bill's source) count it,
    # as they count a stream the caller cut; neither did
    (line,) = [r.getMessage() for r in caplog.records if "finish=backend_failed" in r.getMessage()]
    assert "device=device-a model=broken" in line and " completion_tokens=3 " in line and " cost_usd=" in line
    bucket = bridge.server.service.quotas._tokens["device-a"]
    assert bucket.level <= 1000 - 3
    # a failure before the first word costs nothing
    early = EchoBackend(fail_after_tokens=0, failure=BackendError("no capacity", reason="UPSTREAM_ERROR"))
    bridge = start_bridge(backends={"early": early}, models={})
    caplog.clear()
    with pytest.raises(CloudUnavailableError) as info:
        list(make_client(bridge, max_attempts=1).stream(HI, model="early"))
    assert "finish=" not in caplog.text and info.value.billed is None


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_an_answer_the_backend_could_not_use_is_billed_once_as_it_says_in_both_paths(start_bridge, raw_stub, caplog,
                                                                                     method):
    # a unary call whose upstream answered unusably was neither charged nor logged; a stream that failed after its
    # first words was, from the words it was sent: both now bill what the backend says the upstream billed, once
    unusable = UnusableAnswerError("upstream sent an unusable response: choices[0].finish_reason is a list",
                                   prompt_tokens=9, completion_tokens=4, prompt_estimated=False)
    broken = EchoBackend(fail_after_tokens=3, failure=unusable)
    bridge = start_bridge(backends={"broken": broken}, models={},
                          quota={"requests_per_minute": 0, "tokens_per_minute": 1, "tokens_burst": 1000})
    request = bridge_pb2.GenerateRequest(model="broken", messages=[bridge_pb2.ChatMessage(role="user",
                                                                                          content="one two three four")])
    caplog.set_level("INFO", logger="cloud_bridge")
    with pytest.raises(grpc.RpcError) as info:
        if method == "Generate":
            raw_stub(bridge).Generate(request, metadata=AUTH, timeout=5)
        else:
            list(raw_stub(bridge).GenerateStream(request, metadata=AUTH, timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "unusable response" in info.value.details()
    info_e = _details(info.value)["ErrorInfo"]
    assert info_e.reason == "UPSTREAM_BAD_RESPONSE"
    (line,) = [r.getMessage() for r in caplog.records if " finish=" in r.getMessage()]
    assert "finish=backend_failed prompt_tokens=9 completion_tokens=4 " in line
    # and the device is told the bill, to the digit the access line has (its budget counted the call as free)
    assert dict(info_e.metadata) == {"model_alias": "broken", "backend": "echo", "billed_cost_usd": "0.0",
                                     "billed_prompt_tokens": "9", "billed_completion_tokens": "4"}
    assert bridge.server.service.quotas._tokens["device-a"].level == pytest.approx(1000 - 13, abs=1)


@pytest.mark.parametrize("metadata, billed", [
    ({"billed_cost_usd": "0.017", "billed_prompt_tokens": "9", "billed_completion_tokens": "4"}, (0.017, 9, 4)),
    ({"billed_cost_usd": "1e-07", "billed_prompt_tokens": "0", "billed_completion_tokens": "0"}, (1e-07, 0, 0)),
    # what is no bill counts as none (as before the bridge said bills): never a negative or NaN settlement
    ({"billed_cost_usd": "nan", "billed_prompt_tokens": "9", "billed_completion_tokens": "4"}, None),
    ({"billed_cost_usd": "-1", "billed_prompt_tokens": "9", "billed_completion_tokens": "4"}, None),
    ({"billed_cost_usd": "0.1", "billed_prompt_tokens": "x", "billed_completion_tokens": "4"}, None),
    ({"billed_cost_usd": "0.1", "billed_prompt_tokens": "9"}, None),
    ({"model_alias": "m"}, None),
])
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_the_client_reads_a_failed_calls_bill_only_when_it_is_one(metadata, billed, code):
    # DEADLINE_EXCEEDED too: a stream the bridge's own timeout_s cut after its first words carries its bill, which the
    # client dropped (the device settled its estimate and called the cost unknown)
    from edge_runtime.cloud._errors import StatusDetails, translate_rpc_error

    class Failed(grpc.RpcError, grpc.Call):
        code = staticmethod(lambda: status)
        details = staticmethod(lambda: "backend failed")
        initial_metadata = trailing_metadata = time_remaining = cancel = is_active = add_callback = None

    status = code
    error = translate_rpc_error(Failed(), StatusDetails(reason="UPSTREAM_BAD_RESPONSE",
                                                        metadata=tuple(sorted(metadata.items()))))
    assert error.billed == billed


def test_a_bill_added_to_a_status_keeps_its_code_message_and_other_details():
    from google.rpc import status_pb2

    from cloud_bridge._status import error_info, make_status, retry_info, with_metadata

    def details(status):
        (proto,) = [status_pb2.Status.FromString(v) for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
        out = {}
        for detail in proto.details:
            for cls in (error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
                message = cls()
                if detail.Unpack(message):
                    out[cls.__name__] = message
        return out

    bill = {"billed_cost_usd": "0.5", "billed_prompt_tokens": "3", "billed_completion_tokens": "2"}
    status = make_status(grpc.StatusCode.UNAVAILABLE, "failed", retry_info(2.0), error_info("UPSTREAM_ERROR", {"a": "1"}))
    billed = with_metadata(status, bill)
    assert (billed.code, billed.details) == (status.code, status.details)
    got = details(billed)
    assert got["RetryInfo"].retry_delay.seconds == 2 and got["ErrorInfo"].reason == "UPSTREAM_ERROR"
    assert dict(got["ErrorInfo"].metadata) == {"a": "1", **bill}
    # a status without ErrorInfo gets one; nothing to add changes nothing
    bare = with_metadata(make_status(grpc.StatusCode.UNAVAILABLE, "ended"), bill)
    assert bare.details == "ended" and dict(details(bare)["ErrorInfo"].metadata) == bill
    assert with_metadata(status, {}) is status


def test_server_stopped_mid_stream_gives_a_clean_failure_and_opens_the_circuit(start_bridge, make_client):
    bridge = start_bridge(models=slow(20))
    client = make_client(bridge, circuit_failure_threshold=1, circuit_cooldown_s=60)
    stream = client.stream(HI)
    assert next(stream).text == "w0"
    threading.Thread(target=bridge.server.stop, args=(0,)).start()
    with pytest.raises(CloudUnavailableError):
        for _ in stream:
            pass
    assert client.circuit.state == "open"
    started = time.monotonic()
    with pytest.raises(CircuitOpenError):
        client.generate(HI)
    assert time.monotonic() - started < 0.05  # skipped without touching the network


def test_graceful_shutdown_completes_in_flight_calls_and_refuses_new_ones(start_bridge, make_client):
    bridge = start_bridge(models=slow(50, reply="one two three four five six seven eight"))  # ~0.4 s
    results, errors = [], []

    def call() -> None:
        try:
            results.append(make_client(bridge).generate(HI, timeout_s=10))
        except Exception as err:  # recorded for the assertion below
            errors.append(err)

    caller = threading.Thread(target=call)
    caller.start()
    while bridge.server.service.slots["tiny"].running == 0:
        time.sleep(0.005)
    with grpc.insecure_channel(bridge.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stopper = threading.Thread(target=bridge.server.stop, args=(5.0,))
        stopper.start()
        time.sleep(0.05)
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
        except grpc.RpcError:  # already refusing new calls: just as good
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(CloudUnavailableError):
            make_client(bridge, max_attempts=1).generate(HI, timeout_s=2)
    stopper.join(10)
    caller.join(10)
    assert errors == []
    assert results[0].text == "one two three four five six seven eight" and results[0].finish_reason == "eos"
    assert bridge.server.wait_for_termination(0)


def test_worker_slots_serve_waiters_first_come_first_served_and_drop_cancelled_ones():
    from cloud_bridge._admission import WorkerSlots

    slots = WorkerSlots(workers=1, queue_size=3)
    assert slots.acquire(lambda: False)
    order: list[int] = []
    cancelled = threading.Event()

    def wait(i: int, cancel=lambda: False) -> None:
        if slots.acquire(cancel):
            order.append(i)
            slots.release()

    threads = []
    for i, cancel in ((1, lambda: False), (2, cancelled.is_set), (3, lambda: False)):
        threads.append(threading.Thread(target=wait, args=(i, cancel)))
        threads[-1].start()
        while slots.waiting < i:
            time.sleep(0.001)
    from edge_runtime.errors import QueueFullError

    with pytest.raises(QueueFullError) as info:
        slots.acquire(lambda: False)
    assert info.value.retry_after_s > 0
    cancelled.set()  # waiter 2 gives up before its turn
    while slots.waiting > 2:
        time.sleep(0.001)
    time.sleep(0.1)
    assert slots.waiting == 2
    slots.release()
    for thread in threads:
        thread.join(2)
    assert order == [1, 3] and slots.running == 0 and slots.waiting == 0


class _Recorder:
    """A backend whose unary call takes 0.5 s without watching the cancel token (an engine mid-prefill);
    it records when that call ended and when the backend was closed."""

    kind, model, context_length = "recorder", "recorder-1", 0

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended_at: float | None = None
        self.closed_at: float | None = None

    def generate(self, request, cancel):
        from cloud_bridge.backends import BackendResult

        self.started.set()
        time.sleep(0.5)
        self.ended_at = time.monotonic()
        return BackendResult("...", "eos", 1, 1, self.model)

    def stream(self, request, cancel):
        raise NotImplementedError

    def close(self) -> None:
        self.closed_at = time.monotonic()


def test_a_shutdown_delay_shows_not_serving_while_calls_are_still_served(start_bridge, make_client):
    # gRPC's stop closes the listener at once: a load balancer polling the health check never saw NOT_SERVING,
    # and kept sending calls until they failed
    bridge = start_bridge()
    stopper = threading.Thread(target=bridge.server.stop, kwargs={"grace_s": 1.0, "delay_s": 1.5})
    with grpc.insecure_channel(bridge.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
        stopper.start()
        time.sleep(0.2)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert make_client(bridge, max_attempts=1).generate(HI, timeout_s=2).text  # still served meanwhile
    stopper.join(10)
    with pytest.raises(CloudUnavailableError):  # then refused
        make_client(bridge, max_attempts=1).generate(HI, timeout_s=2)


def test_shutdown_closes_backends_only_after_the_cancelled_calls_have_left_them(start_bridge, make_client):
    recorder = _Recorder()
    bridge = start_bridge(backends={"rec": recorder}, models={}, server={"grace_period_s": 0.05})
    caller = threading.Thread(target=lambda: pytest.raises(Exception, make_client(bridge, max_attempts=1).generate, HI))
    caller.start()
    assert recorder.started.wait(5)
    bridge.server.stop(0.05)  # the grace ends while the backend is still inside generate()
    caller.join(10)
    assert recorder.ended_at is not None and recorder.closed_at is not None
    assert recorder.closed_at >= recorder.ended_at  # not closed under a call still using it


def test_a_waiter_cancelled_as_its_slot_arrives_passes_the_slot_on_and_never_runs():
    # cancelled within the last poll before the grant, it kept the slot and the whole upstream call ran for nobody
    from cloud_bridge._admission import WorkerSlots

    slots = WorkerSlots(workers=1, queue_size=2)
    assert slots.acquire(lambda: False)
    gone = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire(gone.is_set)))
    waiter.start()
    while not slots.waiting:
        time.sleep(0.001)
    gone.set()
    slots.release()  # the slot arrives just as the call ends
    waiter.join(5)
    assert got == [False] and slots.running == 0 and not slots.waiting
    assert slots.acquire(lambda: False)  # the next caller gets the slot at once


def test_a_call_that_ended_before_it_asked_for_a_free_worker_does_not_take_it():
    # the free-worker path granted the slot without looking: the backend ran for a caller already gone
    from cloud_bridge._admission import WorkerSlots

    slots = WorkerSlots(workers=1, queue_size=1)
    assert slots.acquire(lambda: True) is False and slots.running == 0 and not slots.waiting
    assert slots.acquire(lambda: False) and slots.running == 1


def test_an_upstream_call_cancelled_before_it_was_sent_never_reaches_the_upstream_and_costs_nothing():
    from cloud_bridge._settings import OpenAIModelSettings
    from cloud_bridge.backends import BackendRequest, CancelToken
    from cloud_bridge.backends.openai import OpenAIBackend
    from edge_runtime.engine.types import SamplingParams

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts nothing: a sent request would be seen as a connection with bytes on it
    try:
        backend = OpenAIBackend(OpenAIModelSettings(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1",
                                                    model="m"))
        cancel = CancelToken()
        cancel.cancel()
        request = BackendRequest("r1", [{"role": "user", "content": "x" * 400}], SamplingParams())
        result = backend.generate(request, cancel)
        assert result.finish_reason == "cancelled" and result.prompt_tokens == 0
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # no connection was even made
    finally:
        listener.close()


def test_a_bridge_at_its_call_limit_still_answers_health_checks_and_refuses_more_calls_with_a_delay(start_bridge,
                                                                                                     raw_stub):
    # gRPC's own limit counted health checks too: a busy bridge looked dead to a load balancer
    bridge = start_bridge(models=slow(30, reply="a b c d e f g h i j", workers=4, queue_size=4),
                          server={"max_concurrent_rpcs": 2})
    stub = raw_stub(bridge)
    request = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")])
    running = [stub.Generate.future(request, metadata=AUTH, timeout=10) for _ in range(2)]
    while bridge.server.service.slots["tiny"].running < 2:
        time.sleep(0.005)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(info.value)
    assert details["ErrorInfo"].reason == "BRIDGE_BUSY" and details["RetryInfo"].retry_delay.seconds >= 1
    with grpc.insecure_channel(bridge.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.ListModels(bridge_pb2.ListModelsRequest(), metadata=AUTH, timeout=5).models
    assert [f.result().text for f in running] == ["a b c d e f g h i j"] * 2
    # the slots are free again
    assert stub.Generate(request, metadata=AUTH, timeout=10).text == "a b c d e f g h i j"


@pytest.mark.parametrize("raw", [b"\x12\xff\xff\xff\xff\x0f", b"\x1a\x02\xc3\x28"])  # truncated; a string not UTF-8
def test_a_request_that_is_not_protobuf_is_refused_like_any_bad_request(start_bridge, raw, caplog):
    # grpcio refused it with INTERNAL and an ERROR traceback per call, before the token was checked: a caller
    # without one filled the log at thousands of calls a second, and the access log never saw them
    bridge = start_bridge()
    channel = grpc.insecure_channel(bridge.address)
    try:
        def call(method: str, metadata=None, body=raw):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(method)(body, metadata=metadata, timeout=5)
            return info.value

        with caplog.at_level("INFO"):
            assert call("/edgecloud.v1.CloudBridge/Generate").code() == grpc.StatusCode.UNAUTHENTICATED
            bad = call("/edgecloud.v1.CloudBridge/GenerateStream", AUTH)
            assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in bad.details()
            truncated = b"\x12\xff\xff\xff\xff\x0f"  # (the health request has no string field 3 to misread)
            assert call("/grpc.health.v1.Health/Check", body=truncated).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        assert caplog.text.count("status=INVALID_ARGUMENT peer=") == 2 and "status=UNAUTHENTICATED peer=" in caplog.text
        # the one sent with a token names its device (it read device=-): which device sends garbage is the point
        assert caplog.text.count("device=device-a reason=UNDECODABLE_REQUEST") == 1
        ok = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")])
        assert channel.unary_unary("/edgecloud.v1.CloudBridge/Generate", request_serializer=ok.__class__.SerializeToString,
                                   response_deserializer=bridge_pb2.GenerateResponse.FromString)(
            ok, metadata=AUTH, timeout=5).text  # still serving
    finally:
        channel.close()


class _BlackHoleProxy:
    """A TCP proxy to ``target``; :meth:`black_hole` silently drops every byte of the connections open now, keeping
    them open (a NAT entry that expired, a middlebox that lost the flow). Later connections are forwarded."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[dict[str, bool]] = []
        self._sockets: list[socket.socket] = []
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            state = {"dead": False}
            self.connections.append(state)
            self._sockets += [client, upstream]
            self._pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, state), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, state: dict[str, bool]) -> None:
        try:
            while data := a.recv(65536):
                if not state["dead"]:
                    b.sendall(data)
        except OSError:
            pass

    def black_hole(self) -> None:
        for state in self.connections:
            state["dead"] = True

    def cut(self) -> None:
        """Break the connections open now, both ways (a network that went down, a proxy restarted)."""
        for pair in self._pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in (self.sock, *self._sockets):
            s.close()


def test_a_connection_that_died_silently_is_replaced_not_used_for_ever(start_bridge, make_client):
    # every call on it timed out, the circuit's probes too, until the daemon was restarted; the bridge was fine
    bridge = start_bridge()
    proxy = _BlackHoleProxy(("127.0.0.1", bridge.port))
    try:
        client = make_client(bridge, address=f"127.0.0.1:{proxy.port}", keepalive_s=1.0, timeout_s=3.0,
                             circuit_failure_threshold=100)
        assert client.generate(HI).text == "the answer is forty two"
        proxy.black_hole()
        t0 = time.monotonic()
        # the call starts on the dead connection; its ping goes unanswered, the connection is dropped within two
        # keepalive periods, and the call is retried (UNAVAILABLE) on a new one, within its deadline
        assert client.generate(HI).text == "the answer is forty two"
        assert len(proxy.connections) == 2 and time.monotonic() - t0 < 3.0
    finally:
        proxy.close()


# unary: 50 of the reply's 200 words generated when the connection breaks, none sent; streamed: its first word not
# generated yet (a stream that showed words was never asked again)
@pytest.mark.parametrize("streamed, token_delay_ms", [(False, 20.0), (True, 2000.0)])
def test_a_call_the_bridge_had_taken_when_the_connection_broke_is_not_asked_again(start_bridge, make_client, streamed,
                                                                                  token_delay_ms):
    # the bridge's backend was generating when the connection broke: the bridge billed the prompt and what was
    # generated, and the client asked again on a new connection: billed twice, and the device counted only the second
    bridge = start_bridge(models=slow(token_delay_ms))
    proxy = _BlackHoleProxy(("127.0.0.1", bridge.port))
    try:
        client = make_client(bridge, address=f"127.0.0.1:{proxy.port}", timeout_s=20.0, backoff_initial_s=0.01)
        threading.Timer(1.0, proxy.cut).start()
        with pytest.raises(CloudUnavailableError) as info:
            if streamed:
                list(client.stream(HI))
            else:
                client.generate(HI)
        assert info.value.bridge_accepted and info.value.lost and info.value.billed is None
        echo = bridge.backend("tiny")
        assert echo.wait_for_generations(1)[0].completion_tokens < 200  # cut off by the broken connection
        time.sleep(0.5)
        assert len(echo.generations) == 1 and len(proxy.connections) == 1  # asked once
        # a bridge that refuses before taking the call cost nothing: that is still retried (the circuit's case)
        assert CloudUnavailableError.lost is False
    finally:
        proxy.close()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_call_the_bridges_stop_cuts_is_billed_as_the_bridges_doing(start_bridge, make_client, caplog, streamed):
    # the access log is the billing record: it said the device had cancelled the call
    bridge = start_bridge(models=slow(20.0))
    client = make_client(bridge, timeout_s=20.0, max_attempts=1)
    threading.Timer(0.5, bridge.server.stop, args=(0.2,)).start()
    with caplog.at_level("INFO", logger="cloud_bridge"), pytest.raises(CloudUnavailableError) as info:
        list(client.stream(HI)) if streamed else client.generate(HI)
    assert info.value.lost
    _wait_for_log(caplog, "finish=bridge_stopped")
    assert "cancelled_by_caller" not in caplog.text


def test_pings_during_a_long_silent_call_are_accepted_by_the_bridge(start_bridge, make_client, caplog):
    # a unary answer sends nothing until it is whole: the device pings all the while, and the bridge must not
    # take that for abuse: by gRPC's default it answered the third ping of a silent call with GOAWAY
    # "too_many_pings", and the call was retried from the start (billed twice) or failed
    bridge = start_bridge(models=slow(1000.0, reply="one two three four five six"))
    client = make_client(bridge, keepalive_s=1.0, timeout_s=20.0)
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="cloud_bridge.access"):
        assert client.generate(HI).text == "one two three four five six"
    assert time.monotonic() - t0 < 8.0  # 6 s of generation, once
    assert sum("finish=eos" in r.getMessage() or "finish=length" in r.getMessage() for r in caplog.records) == 1
