"""Per-device quotas: token buckets, RESOURCE_EXHAUSTED with RetryInfo, and a client that honours it."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cloud_bridge import QuotaSettings
from cloud_bridge._quota import QuotaManager, TokenBucket
from cloud_bridge.backends import BackendChunk, BackendResult
from edge_runtime._proto.edgecloud.v1 import bridge_pb2
from edge_runtime.engine.types import SamplingParams
from edge_runtime.errors import CloudQuotaError

from .conftest import OTHER_TOKEN, TOKEN

HI = [{"role": "user", "content": "hi"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_up_to_capacity():
    bucket = TokenBucket(rate_per_s=2.0, capacity=3.0, now_s=0.0)
    assert bucket.seconds_until(3.0, 0.0) == 0.0
    bucket.take(3.0, 0.0)
    assert bucket.seconds_until(1.0, 0.0) == pytest.approx(0.5)
    assert bucket.seconds_until(1.0, 0.25) == pytest.approx(0.25)
    assert bucket.seconds_until(3.0, 100.0) == 0.0 and bucket.level == 3.0  # never above capacity


def test_requests_per_minute_with_burst_and_per_device_buckets():
    clock = FakeClock()
    quotas = QuotaManager(QuotaSettings(requests_per_minute=30, requests_burst=2, tokens_per_minute=0), clock=clock)
    assert quotas.admit("a") is None and quotas.admit("a") is None
    rejection = quotas.admit("a")
    assert rejection is not None and rejection.limit == "requests_per_minute"
    assert rejection.retry_after_s == pytest.approx(2.0)  # 30/min = one every 2 s
    assert quotas.admit("b") is None  # another device has its own bucket
    clock.now += 2.0
    assert quotas.admit("a") is None
    assert quotas.admit("a") is not None  # a rejected request took nothing: exactly one came back


def test_tokens_are_charged_after_the_answer_and_debt_is_waited_out():
    clock = FakeClock()
    quotas = QuotaManager(QuotaSettings(requests_per_minute=0, tokens_per_minute=600, tokens_burst=100), clock=clock)
    assert quotas.admit("a") is None
    quotas.charge_tokens("a", 130)  # one long answer: 30 tokens in debt
    rejection = quotas.admit("a")
    assert rejection is not None and rejection.limit == "tokens_per_minute"
    assert rejection.retry_after_s == pytest.approx(3.0)  # 600/min = 10 tokens/s
    clock.now += 3.01
    assert quotas.admit("a") is None


def test_with_both_quotas_spent_the_retry_hint_is_the_longer_wait():
    # the request limit's 10 s was advised, and a retry then was refused for the tokens' 20 s
    clock = FakeClock()
    quotas = QuotaManager(QuotaSettings(requests_per_minute=6, requests_burst=1, tokens_per_minute=60, tokens_burst=30),
                          clock=clock)
    assert quotas.admit("a") is None
    quotas.charge_tokens("a", 50)  # 20 tokens in debt: 20 s at 1 token/s
    rejection = quotas.admit("a")
    assert rejection is not None and rejection.limit == "tokens_per_minute"
    assert rejection.retry_after_s == pytest.approx(20.0, abs=0.01)
    clock.now += rejection.retry_after_s + 0.01
    assert quotas.admit("a") is None  # the advised wait was enough


def test_a_stream_cut_after_its_first_tokens_pays_for_its_prompt(start_bridge, raw_stub):
    # only the delivered tokens were charged: a device could have any prompt prefilled for about one token
    class Slow(_Unheeding):  # 100 tokens over 5 s: the cancel lands mid-stream even on a loaded machine
        def stream(self, request, cancel):
            for i in range(100):
                time.sleep(0.05)
                yield BackendChunk(f" w{i}", 1)
            yield BackendChunk("", 0, BackendResult("...", "length", 1, 100, self.model))

    bridge = start_bridge(backends={"echo": Slow()}, models={},
                          quota={"requests_per_minute": 0, "tokens_per_minute": 60, "tokens_burst": 100})
    stub = raw_stub(bridge)
    auth = [("authorization", f"Bearer {TOKEN}")]
    long = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="x" * 4000)],
                                      max_new_tokens=100)
    stream = stub.GenerateStream(long, metadata=auth, timeout=10)
    next(stream)
    stream.cancel()  # one token read: its ~1,000-token prompt is charged as well, 900 tokens past the burst
    time.sleep(0.5)
    probe = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")], max_new_tokens=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(probe, metadata=auth, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_minute" in info.value.details()


def test_over_quota_is_resource_exhausted_with_retry_info(start_bridge, raw_stub):
    bridge = start_bridge(quota={"requests_per_minute": 6, "requests_burst": 1})
    stub = raw_stub(bridge)
    request = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")])
    stub.Generate(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rpc_status.from_call(info.value).details
    retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert any(d.Unpack(retry) for d in details) and any(d.Unpack(failure) for d in details)
    assert 9.0 < retry.retry_delay.ToTimedelta().total_seconds() <= 10.0  # 6/min = one every 10 s
    assert failure.violations[0].subject == "device:device-a"
    # the other device is not affected
    stub.Generate(request, metadata=[("authorization", f"Bearer {OTHER_TOKEN}")], timeout=5)


def test_the_client_waits_the_servers_retry_delay_when_its_deadline_allows(start_bridge, make_client):
    bridge = start_bridge(quota={"requests_per_minute": 200, "requests_burst": 1})  # one every 0.3 s
    client = make_client(bridge, timeout_s=5)
    client.generate(HI)
    started = time.monotonic()
    result = client.generate(HI)
    elapsed = time.monotonic() - started
    assert result.attempts == 2
    assert 0.25 < elapsed < 1.5  # waited the bridge's delay, not its own 0.1 s backoff


def test_the_client_gives_up_at_once_when_the_retry_delay_outlasts_its_deadline(start_bridge, make_client):
    bridge = start_bridge(quota={"requests_per_minute": 6, "requests_burst": 1})
    client = make_client(bridge, timeout_s=2)
    client.generate(HI)
    started = time.monotonic()
    with pytest.raises(CloudQuotaError) as info:
        client.generate(HI)
    assert time.monotonic() - started < 0.5  # no pointless sleep until the deadline
    assert info.value.retry_after_s == pytest.approx(10.0, abs=0.5)


def test_a_long_answer_exhausts_the_token_quota(start_bridge, make_client):
    bridge = start_bridge(quota={"requests_per_minute": 0, "tokens_per_minute": 60, "tokens_burst": 4})
    client = make_client(bridge, max_attempts=1)
    assert client.generate(HI, params=SamplingParams(max_new_tokens=5)).completion_tokens == 5  # 1 + 5 tokens: in debt
    with pytest.raises(CloudQuotaError) as info:
        client.generate(HI)
    assert "tokens_per_minute" in str(info.value)
    assert info.value.retry_after_s == pytest.approx(2.0, abs=0.2)  # 2 tokens of debt at 1 token/s


def test_a_request_refused_for_a_full_queue_gets_its_quota_back():
    clock = FakeClock()
    quotas = QuotaManager(QuotaSettings(requests_per_minute=60, requests_burst=1, tokens_per_minute=0), clock=clock)
    assert quotas.admit("a") is None
    quotas.refund_request("a")
    assert quotas.admit("a") is None  # the refunded request is available again
    assert quotas.admit("a") is not None


class _Unheeding:
    """A backend that streams without watching the cancel token (a fast upstream, an engine between checks)."""

    kind, model, context_length = "unheeding", "unheeding-1", 0

    def generate(self, request, cancel):
        return BackendResult("w", "eos", 1, 1, self.model)

    def stream(self, request, cancel):
        for i in range(request.params.max_new_tokens):
            time.sleep(0.005)
            yield BackendChunk(f" w{i}", 1)
        yield BackendChunk("", 0, BackendResult("...", "length", 1, request.params.max_new_tokens, self.model))

    def close(self):
        pass


def test_a_stream_the_caller_cancels_is_charged_for_what_it_was_sent(start_bridge, raw_stub):
    bridge = start_bridge(backends={"echo": _Unheeding()}, models={},
                          quota={"requests_per_minute": 0, "tokens_per_minute": 60, "tokens_burst": 20})
    stub = raw_stub(bridge)
    auth = [("authorization", f"Bearer {TOKEN}")]
    request = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")],
                                         max_new_tokens=50)
    stream = stub.GenerateStream(request, metadata=auth, timeout=10)
    sent = 0
    for message in stream:
        sent += message.delta.token_count
        if sent >= 30:
            break
    stream.cancel()  # read 30 tokens, then leave before the final message: it used to cost nothing
    time.sleep(0.5)
    probe = bridge_pb2.GenerateRequest(messages=[bridge_pb2.ChatMessage(role="user", content="hi")], max_new_tokens=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(probe, metadata=auth, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_minute" in info.value.details()


def test_a_request_quota_below_one_a_minute_still_admits_one_request():
    clock = FakeClock()
    quotas = QuotaManager(QuotaSettings(requests_per_minute=0.5, tokens_per_minute=0), clock=clock)
    assert quotas.admit("a") is None  # the bucket holds one whole request, not half of one
    assert quotas.admit("a") is not None
    clock.now += 120.0
    assert quotas.admit("a") is None


def test_a_spent_device_quota_skips_the_cloud_until_its_retry_time_without_opening_the_circuit(start_bridge, make_client):
    bridge = start_bridge(quota={"requests_per_minute": 6, "requests_burst": 1})
    clock = FakeClock()
    client = make_client(bridge, timeout_s=2, circuit_failure_threshold=1, clock=clock)
    client.generate(HI)
    with pytest.raises(CloudQuotaError) as refused:
        client.generate(HI)
    assert refused.value.reason == "QUOTA_EXCEEDED"
    # the bridge is healthy and serves other devices: this device's quota is not an outage
    assert client.circuit.state == "closed"
    clock.now += 5.0
    with pytest.raises(CloudQuotaError) as skipped:  # refused at once, without asking the bridge
        client.generate(HI)
    assert "quota at the bridge is spent" in str(skipped.value) and skipped.value.retry_after_s == pytest.approx(5.0, abs=0.6)
    assert client.circuit.state == "closed"
    clock.now += 6.0  # past the retry time the bridge gave (10 s at 6 requests a minute), on the client's clock
    with pytest.raises(CloudQuotaError) as asked:  # the bridge is asked again (its own clock has not moved)
        client.generate(HI)
    assert "cloud skipped" not in str(asked.value) and asked.value.reason == "QUOTA_EXCEEDED"
    assert [m.alias for m in client.list_models()]  # ListModels is not charged to the quota: never skipped


def test_the_client_skips_a_spent_quota_for_at_most_five_minutes(start_bridge, make_client):
    # a retry time of days (a deep token debt) would keep a device off a bridge whose operator raised its quota
    from edge_runtime.cloud._client import QUOTA_EXCEEDED

    bridge = start_bridge()
    clock = FakeClock()
    client = make_client(bridge, clock=clock)
    client._record(CloudQuotaError("spent", retry_after_s=3 * 86400.0, reason=QUOTA_EXCEEDED))
    assert client._quota_until_s == pytest.approx(clock.now + 300.0)
    clock.now += 301.0
    assert client.generate(HI).text  # asked again, and answered


def test_usage_more_than_the_request_can_have_charges_the_quota_at_most_that_and_is_logged(start_bridge, make_client,
                                                                                           caplog):
    # an upstream (or a proxy) reporting millions of tokens for a short answer locked the device out of its token
    # quota for days: charged as reported
    class Inflating(_Unheeding):
        def generate(self, request, cancel):
            return BackendResult("w", "eos", 3_000_000, 5_000_000, self.model)

    bridge = start_bridge(backends={"inflating": Inflating()}, models={},
                          quota={"requests_per_minute": 0, "tokens_per_minute": 600_000, "tokens_burst": 50_000})
    client = make_client(bridge, max_attempts=1)
    with caplog.at_level("WARNING", logger="cloud_bridge.access"):
        result = client.generate(HI, params=SamplingParams(max_new_tokens=8))
    assert (result.prompt_tokens, result.completion_tokens) == (3_000_000, 5_000_000)  # the bill keeps them
    assert "more than the request can have" in caplog.text and "completion_tokens=5000000" in caplog.text
    # charged at most 2 bytes of prompt + the template's allowance (32 + 256), and the 8 tokens asked for plus a
    # reasoning model's allowance (32,768): 33,066 a call
    assert client.generate(HI, params=SamplingParams(max_new_tokens=8)).completion_tokens == 5_000_000
    with pytest.raises(CloudQuotaError) as info:  # the second call takes the bucket below 0, the third waits
        for _ in range(3):
            client.generate(HI, params=SamplingParams(max_new_tokens=8))
    assert info.value.retry_after_s < 10  # seconds (16,132 tokens at 10,000 a second), not the 13 min of 8 million
