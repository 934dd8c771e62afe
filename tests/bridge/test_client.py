"""CloudClient: retries only what is retryable, backoff with jitter inside the deadline, the circuit breaker."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from pathlib import Path

import pytest

from cloud_bridge import ServerSettings, TokenStore, add_device_token, create_server
from cloud_bridge.backends import BackendChunk, BackendResult
from cloud_bridge.backends.echo import EchoBackend
from edge_runtime.cloud import CircuitBreaker, CloudClient, CloudSettings
from edge_runtime.engine.types import SamplingParams
from edge_runtime.errors import (
    BackendError,
    CircuitOpenError,
    CloudCancelledError,
    CloudError,
    CloudQuotaError,
    CloudResponseTooLargeError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    InvalidRequestError,
)
from edge_runtime.settings import load_runtime_settings

from .conftest import TOKEN, bridge_settings

HI = [{"role": "user", "content": "hi"}]


class FlakyBackend:
    """Fails its first ``failures`` calls with ``error``, then answers; counts every call."""

    kind = "flaky"
    model = "flaky-1"
    context_length = 0

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or BackendError("upstream hiccup", code="UNAVAILABLE")
        self.calls = 0
        self._lock = threading.Lock()

    def _next(self) -> None:
        with self._lock:
            self.calls += 1
            if self.calls <= self.failures:
                raise self.error

    def generate(self, request, cancel):
        self._next()
        return BackendResult("fine", "eos", 1, 1, self.model)

    def stream(self, request, cancel):
        self._next()
        yield BackendChunk("fine", 1)
        yield BackendChunk("", 0, BackendResult("fine", "eos", 1, 1, self.model))

    def close(self) -> None:
        pass


class FakeTime:
    """A clock that only moves when the client sleeps: backoff arithmetic without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_unavailable_is_retried_with_growing_jittered_backoff(start_bridge, make_client):
    flaky = FlakyBackend(failures=3)
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    fake = FakeTime()
    client = make_client(
        bridge,
        max_attempts=5,
        backoff_initial_s=0.1,
        backoff_multiplier=2.0,
        jitter=0.5,
        clock=fake.clock,
        sleep=fake.sleep,
        rng=random.Random(7),
    )
    result = client.generate(HI)
    assert result.text == "fine" and result.attempts == 4 and flaky.calls == 4
    assert len(fake.sleeps) == 3
    for attempt, slept in enumerate(fake.sleeps):
        base = 0.1 * 2**attempt
        assert base * 0.5 <= slept <= base  # exponential, with up to half drawn at random
    assert len(set(fake.sleeps)) == 3


def test_backoff_is_capped_and_jitter_spreads_devices():
    client = CloudClient(
        address="127.0.0.1:1", insecure=True, backoff_initial_s=0.5, backoff_max_s=2.0, jitter=1.0, rng=random.Random(1)
    )
    try:
        delays = [client._backoff_s(10) for _ in range(200)]
    finally:
        client.close()
    assert max(delays) <= 2.0 and min(delays) >= 0.0
    assert max(delays) - min(delays) > 1.0  # full jitter: devices refused together do not come back together


def test_errors_that_are_not_retryable_are_raised_after_one_attempt(start_bridge, make_client):
    flaky = FlakyBackend(failures=10, error=BackendError("upstream said no", code="INVALID_ARGUMENT"))
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    client = make_client(bridge, max_attempts=5)
    with pytest.raises(CloudError) as info:
        client.generate(HI)
    assert info.value.code == "INVALID_ARGUMENT" and flaky.calls == 1
    assert type(info.value) is CloudError
    assert client.circuit.consecutive_failures == 0


def test_retries_stop_at_max_attempts(start_bridge, make_client):
    flaky = FlakyBackend(failures=10)
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    with pytest.raises(CloudUnavailableError):
        make_client(bridge, max_attempts=3, backoff_initial_s=0.01).generate(HI)
    assert flaky.calls == 3


def test_retries_are_bounded_by_the_overall_deadline(start_bridge, make_client):
    flaky = FlakyBackend(failures=1000)
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    client = make_client(bridge, max_attempts=1000, backoff_initial_s=0.05, backoff_max_s=0.2, timeout_s=0.6)
    started = time.monotonic()
    # unavailable after the last retry that could finish in time; on a loaded machine a retry started in time can
    # still meet the deadline, which is then the error
    with pytest.raises((CloudUnavailableError, CloudTimeoutError)):
        client.generate(HI)
    elapsed = time.monotonic() - started
    assert elapsed < 0.9  # no retry is started that could not finish in time (0.6 s + slack for a busy machine)
    assert 2 < flaky.calls < 20


def test_a_dead_bridge_fails_fast_and_then_the_circuit_skips_it(start_bridge, make_client):
    bridge = start_bridge()
    bridge.server.stop(0)
    client = make_client(bridge, max_attempts=2, backoff_initial_s=0.01, circuit_failure_threshold=2, timeout_s=2)
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(CloudUnavailableError):
            client.generate(HI)
        assert time.monotonic() - started < 1.0
    assert client.circuit.state == "open"
    with pytest.raises(CircuitOpenError) as info:
        client.generate(HI)
    assert "next try in" in str(info.value)
    with pytest.raises(CircuitOpenError):
        next(client.stream(HI))


def _circuit_before_a_flaky_bridge(start_bridge, make_client, failures: int):
    """(backend failing its first ``failures`` calls, a client whose circuit opens after as many, its fake clock)."""
    flaky = FlakyBackend(failures=failures)
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    fake = FakeTime()
    client = make_client(bridge, max_attempts=1, circuit_failure_threshold=failures, circuit_cooldown_s=30,
                         clock=fake.clock, sleep=fake.sleep)
    return flaky, client, fake


def test_half_open_lets_one_probe_through_and_success_closes_the_circuit(start_bridge, make_client):
    flaky, client, fake = _circuit_before_a_flaky_bridge(start_bridge, make_client, failures=2)
    for _ in range(2):
        with pytest.raises(CloudUnavailableError):
            client.generate(HI)
    with pytest.raises(CircuitOpenError):
        client.generate(HI)
    assert flaky.calls == 2  # the open circuit did not call the bridge
    fake.now += 30
    other_probe = client.circuit.admit()  # another call is testing the bridge: this one is refused, and says why
    with pytest.raises(CircuitOpenError, match="one call is testing the bridge now") as info:
        client.generate(HI)
    assert "0.0 s" not in str(info.value)
    client.circuit.record_neutral(probe=other_probe)
    assert client.generate(HI).text == "fine"  # the probe
    assert client.circuit.state == "closed" and flaky.calls == 3


def test_a_models_read_outside_the_circuit_neither_opens_it_nor_takes_its_probe(start_bridge, make_client):
    # a runtime's background read of the bridge's limits, failing in an outage, opened the circuit after one
    # escalation; made in a half-open circuit, it took the probe meant for an escalation
    bridge = start_bridge()
    bridge.server.stop(0)
    client = make_client(bridge, max_attempts=1, circuit_failure_threshold=1, timeout_s=2)
    with pytest.raises(CloudUnavailableError):
        client.list_models(circuit=False)
    assert client.circuit.state == "closed" and client.circuit.consecutive_failures == 0
    flaky, client, fake = _circuit_before_a_flaky_bridge(start_bridge, make_client, failures=1)
    with pytest.raises(CloudUnavailableError):
        client.generate(HI)
    assert [m.alias for m in client.list_models(circuit=False)] == ["flaky"]  # made while the circuit is open
    assert client.circuit.state == "open"  # and its success did not close it
    fake.now += 30
    client.list_models(circuit=False)
    assert client.circuit.state == "half_open"
    assert client.generate(HI).text == "fine"  # the probe was still there for the escalation
    assert client.circuit.state == "closed"


def test_a_call_refused_for_its_timeout_leaves_a_half_open_circuit_to_the_next_call(start_bridge, make_client):
    flaky, client, fake = _circuit_before_a_flaky_bridge(start_bridge, make_client, failures=1)
    with pytest.raises(CloudUnavailableError):
        client.generate(HI)
    fake.now += 30
    assert client.circuit.state == "half_open"
    # the probe was taken before the argument was checked, and never given back: every later call was skipped
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        client.generate(HI, timeout_s=0)
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        next(client.stream(HI, timeout_s=float("nan")))
    assert client.generate(HI).text == "fine"  # the probe
    assert client.circuit.state == "closed" and flaky.calls == 2


def test_circuit_breaker_states():
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=fake.clock)
    assert breaker.allow()
    breaker.record_failure()
    breaker.record_success()  # a success resets the count: failures must be consecutive
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.retry_after_s() == pytest.approx(10)
    fake.now += 10
    # the cool-down is over: the state says what the next call meets, before any call has come
    assert breaker.state == "half_open" and breaker.retry_after_s() == 0
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time
    breaker.record_failure()  # the probe failed: open again for a full cool-down
    assert breaker.state == "open" and not breaker.allow()
    fake.now += 10
    assert breaker.allow()
    breaker.record_neutral()  # a probe that said nothing frees the probe slot
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"


def test_a_stream_is_retried_before_its_first_text_but_never_after(start_bridge, make_client):
    flaky = FlakyBackend(failures=1)
    bridge = start_bridge(backends={"flaky": flaky, "tiny": EchoBackend(fail_after_tokens=2)}, models={})
    client = make_client(bridge, backoff_initial_s=0.01)
    chunks = list(client.stream(HI, model="flaky"))
    assert chunks[-1].result is not None and chunks[-1].result.attempts == 2 and flaky.calls == 2

    echo = bridge.backend("tiny")
    received = []
    with pytest.raises(CloudUnavailableError):
        for chunk in client.stream([{"role": "user", "content": "one two three four"}], model="tiny"):
            received.append(chunk.text)
    assert received == ["one", " two"]  # what was shown stays shown; nothing was repeated
    assert len(echo.generations) == 1


def test_quota_errors_carry_the_retry_delay_and_count_towards_the_circuit(start_bridge, make_client):
    flaky = FlakyBackend(failures=10, error=BackendError("slow down", code="RESOURCE_EXHAUSTED", retry_after_s=30.0))
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    client = make_client(bridge, timeout_s=1, circuit_failure_threshold=1)
    with pytest.raises(CloudQuotaError) as info:
        client.generate(HI)
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert client.circuit.state == "open"


def test_a_retry_after_of_zero_still_waits_the_backoff(start_bridge, make_client):
    # an upstream's "Retry-After: 0" on a 429 sent the four attempts 4 ms apart
    flaky = FlakyBackend(failures=2, error=BackendError("slow down", code="RESOURCE_EXHAUSTED", retry_after_s=0.0))
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    slept: list[float] = []
    client = make_client(bridge, backoff_initial_s=0.2, backoff_multiplier=2.0, jitter=0.0, max_attempts=3,
                         sleep=slept.append)
    assert client.generate(HI, model="flaky").text == "fine"
    assert slept == pytest.approx([0.2, 0.4])


def test_a_local_deadline_is_a_timeout_error(start_bridge, make_client):
    bridge = start_bridge(models={"tiny": {"backend": "echo", "reply": "a b c d e f g h", "token_delay_ms": 100}})
    with pytest.raises(CloudTimeoutError) as info:
        list(make_client(bridge).stream(HI, timeout_s=0.2))
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_a_deadline_the_caller_chose_shorter_than_timeout_s_is_not_a_bridge_outage(start_bridge, make_client):
    flaky = FlakyBackend(failures=10, error=BackendError("upstream too slow", code="DEADLINE_EXCEEDED"))
    bridge = start_bridge(
        backends={"flaky": flaky},
        models={"tiny": {"backend": "echo", "reply": "a b c d e f g h", "token_delay_ms": 100}},
    )
    client = make_client(bridge, timeout_s=10, circuit_failure_threshold=3)
    # a daemon's own request deadline cut these short: a healthy bridge, three times
    for call in (
        lambda: client.generate(HI, model="tiny", timeout_s=0.2),
        lambda: list(client.stream(HI, model="tiny", timeout_s=0.2)),
        lambda: client.generate(HI, model="tiny", timeout_s=0.2),
    ):
        with pytest.raises(CloudTimeoutError):
            call()
    assert client.circuit.state == "closed" and client.circuit.consecutive_failures == 0
    assert len(bridge.backend("tiny").wait_for_generations(3)) == 3  # and none was retried
    # a timeout the bridge relays long before the caller's deadline is the bridge's (its upstream's) failure
    with pytest.raises(CloudTimeoutError):
        client.generate(HI, model="flaky", timeout_s=5)
    assert client.circuit.consecutive_failures == 1 and flaky.calls == 1
    # and so is running out of the configured deadline
    configured = make_client(bridge, timeout_s=0.2, circuit_failure_threshold=1)
    with pytest.raises(CloudTimeoutError):
        configured.generate(HI, model="tiny")
    assert configured.circuit.state == "open"


def test_a_host_that_never_answers_still_opens_the_circuit_under_short_caller_deadlines():
    import socket
    import threading

    from edge_runtime.cloud import CloudClient

    # accepts connections and never speaks: no bridge accepted the call, so its expiry is the host's failure
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        # until the test closes the listener (accept then raises, which pytest reported in whatever test ran next)
        with contextlib.suppress(OSError):
            for _ in range(8):
                held.append(listener.accept()[0])

    accepting = threading.Thread(target=accept, daemon=True)
    accepting.start()
    client = CloudClient(address=f"127.0.0.1:{listener.getsockname()[1]}", token="ebt_x", insecure=True, timeout_s=30,
                         max_attempts=1, circuit_failure_threshold=2)
    try:
        for _ in range(2):
            with pytest.raises(CloudTimeoutError):
                list(client.stream(HI, timeout_s=0.3))  # shorter than timeout_s, as a daemon's deadline is
        assert client.circuit.state == "open"
    finally:
        client.close()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not, on Linux)
        accepting.join(5)
        listener.close()
        for conn in held:
            conn.close()


def test_an_answer_too_large_for_grpc_is_neither_retried_nor_a_cloud_outage(start_bridge, make_client):
    big = {"tiny": {"backend": "echo", "reply": "x" * 6000}}
    bridge = start_bridge(models=big)
    sleeps: list[float] = []
    client = make_client(bridge, max_message_bytes=2048, circuit_failure_threshold=1, sleep=sleeps.append)
    for call in (lambda: client.generate(HI), lambda: list(client.stream(HI))):
        with pytest.raises(CloudResponseTooLargeError) as info:
            call()
        assert "cloud.max_message_bytes" in str(info.value) and info.value.code == "RESOURCE_EXHAUSTED"
        assert sleeps == [] and client.circuit.state == "closed"  # not retried (re-billed), not counted
    assert len(bridge.backend().wait_for_generations(2)) == 2  # a stream's ends after the client has given up
    # over the bridge's own limit on what it sends
    small = start_bridge(server={"max_message_bytes": 1024}, models=big)
    other = make_client(small, circuit_failure_threshold=1, sleep=sleeps.append)
    with pytest.raises(CloudResponseTooLargeError) as info:
        list(other.stream(HI))
    assert "server.max_message_bytes" in str(info.value)
    assert sleeps == [] and other.circuit.state == "closed" and len(small.backend().wait_for_generations(1)) == 1


def test_a_stream_cancelled_during_a_retry_backoff_is_not_retried(start_bridge, make_client):
    flaky = FlakyBackend(failures=10)
    bridge = start_bridge(backends={"flaky": flaky}, models={})
    client = make_client(bridge, backoff_initial_s=5.0, backoff_max_s=5.0, jitter=0.0, circuit_failure_threshold=1)
    started = time.monotonic()
    with pytest.raises(CloudCancelledError):
        list(client.stream(HI, cancel=lambda: time.monotonic() - started > 0.3))
    assert time.monotonic() - started < 1.0  # not after the 5 s backoff
    assert flaky.calls == 1 and client.circuit.state == "closed"
    with pytest.raises(CloudCancelledError):  # cancelled before it began: nothing is sent
        next(client.stream(HI, cancel=lambda: True))
    assert flaky.calls == 1 and client.circuit.state == "closed"


def test_client_settings_are_validated():
    with pytest.raises(ConfigError):
        CloudSettings(address="x:1", cert_file="c.pem")  # a certificate without its key
    with pytest.raises(ConfigError):
        CloudSettings(jitter=1.5)
    # values that pass a plain "> 0" check but break every call or the backoff arithmetic
    for field, value in (("timeout_s", 0), ("timeout_s", float("nan")), ("timeout_s", float("inf")), ("timeout_s", 1e12),
                         ("circuit_cooldown_s", float("inf")), ("backoff_multiplier", float("nan")),
                         ("backoff_multiplier", 1e200), ("max_message_bytes", 0), ("max_message_bytes", -1),
                         ("max_message_bytes", 1 << 40)):
        with pytest.raises(ConfigError) as info:
            CloudSettings(**{field: value})
        assert info.value.field == f"cloud.{field}"
    # from the environment too: not a finite number is refused where it is read
    with pytest.raises(ConfigError) as info:
        load_runtime_settings(env={"EDGE_RUNTIME_CLOUD_TIMEOUT_S": "nan"})
    assert info.value.field == "cloud.timeout_s"
    # and in a file: TOML and JSON allow an integer past a float's range (it raised OverflowError)
    with pytest.raises(ConfigError) as info:
        load_runtime_settings(data={"cloud": {"timeout_s": 10 ** 400}}, env={})
    assert info.value.field == "cloud.timeout_s"


def test_python_api_values_of_the_wrong_type_are_errors_naming_the_field(start_bridge, make_client):
    # a config file's values are converted when it is read; the API's were used as given: timeout_s="5" failed later
    # as a TypeError, insecure="false" meant true
    for field, value in (("timeout_s", "5"), ("token", 5), ("keepalive_s", None), ("insecure", "yes"),
                         ("max_attempts", 2.5), ("address", 1)):
        with pytest.raises(ConfigError) as info:
            CloudSettings(**{field: value})
        assert info.value.field == f"cloud.{field}"
        assert "5" not in str(info.value) or field != "token"  # the type is named, never a token's value
    assert CloudSettings(timeout_s=5).timeout_s == 5.0 and isinstance(CloudSettings(timeout_s=5).timeout_s, float)
    with pytest.raises(ConfigError) as info:
        CloudClient("127.0.0.1:1")  # the address as the first argument, which is the settings
    assert info.value.field == "settings" and "address=" in str(info.value)
    client = make_client(start_bridge())
    for call, field in ((lambda: client.generate("hi"), "messages"),
                        (lambda: client.generate(["hi"]), "messages[0]"),
                        (lambda: client.generate(HI, params={"max_new_tokens": 2}), "params"),
                        (lambda: client.generate(HI, timeout_s="1"), "timeout_s"),
                        (lambda: client.generate(HI, timeout_s=0), "timeout_s")):
        with pytest.raises(InvalidRequestError) as caught:
            call()
        assert caught.value.field == field


def test_a_token_file_set_over_a_token_from_another_layer_is_refused_not_ignored(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    token_file.chmod(0o600)
    config = tmp_path / "edge.toml"
    config.write_text('[cloud]\naddress = "127.0.0.1:50051"\ntoken = "inline"\n')
    config.chmod(0o600)
    with pytest.raises(ConfigError, match="token or token_file, not both") as info:
        load_runtime_settings(config, env={"EDGE_RUNTIME_CLOUD_TOKEN_FILE": str(token_file)})
    assert info.value.field == "cloud.token_file"


def test_a_token_written_in_a_config_file_others_can_read_is_refused(tmp_path):
    # a token file readable by others is refused; the same token inline in a 0644 config passed silently
    config = tmp_path / "edge.toml"
    config.write_text('[cloud]\naddress = "127.0.0.1:50051"\ntoken = "ebt_inline-secret"\n')
    config.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        load_runtime_settings(config, env={})
    assert info.value.field == "cloud.token" and "ebt_inline-secret" not in str(info.value)
    config.chmod(0o600)
    assert load_runtime_settings(config, env={}).cloud.token == "ebt_inline-secret"


def test_a_closed_client_raises_cloud_errors_and_answers_health_checks_false(start_bridge, make_client):
    client = make_client(start_bridge())
    assert client.check_health()
    client.close()
    for call in (lambda: client.generate(HI), lambda: list(client.stream(HI)), client.list_models):
        with pytest.raises(CloudError) as info:
            call()
        assert info.value.code == "CLOSED"
    assert client.check_health() is False  # grpcio crashed the process on a stub made for a closed channel
    assert client.circuit.state == "closed" and client.circuit.consecutive_failures == 0


def test_a_client_closed_while_a_call_waits_to_retry_raises_a_cloud_error():
    # a daemon shutting down while an escalation backs off: the hybrid runtime falls back on a CloudError only
    from edge_runtime._child import free_port

    for call in (lambda c: c.list_models(timeout_s=5), lambda c: c.generate(HI, timeout_s=5),
                 lambda c: list(c.stream(HI, timeout_s=5))):
        holder = {}
        client = CloudClient(address=f"127.0.0.1:{free_port()}", insecure=True, token="t", max_attempts=4,
                             sleep=lambda _s: holder["client"].close())
        holder["client"] = client
        with pytest.raises(CloudError) as info:
            call(client)
        assert info.value.code == "CLOSED"


@pytest.mark.parametrize(
    "address", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "bridge:https", "ipv4:127.0.0.1:1,127.0.0.1:70000",
                "unix:", "unix://", "unix-abstract:"]  # an empty socket path made every call an outage
)
def test_a_port_out_of_range_or_a_malformed_address_names_cloud_address(address):
    # gRPC itself would dial port 99999 as 34463, and a missing port as 443
    with pytest.raises(ConfigError) as info:
        CloudClient(address=address, token="t", insecure=True)
    assert info.value.field == "cloud.address"
    with pytest.raises(ConfigError) as info:
        load_runtime_settings(data={"cloud": {"address": address}}, env={})  # the daemon's [cloud] section
    assert info.value.field == "cloud.address"


@pytest.mark.parametrize(
    "address",
    [
        "dns:bridge.example:50051",
        "dns:///bridge.example:50051",
        "dns://8.8.8.8/bridge.example:50051",  # a DNS server to ask
        "dns://8.8.8.8:53/bridge.example:50051",
        "dns:[2001:db8::1]:50051",
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
    ],
)
def test_every_grpc_target_form_is_accepted(address):
    assert CloudSettings(address=address).address == address
    assert load_runtime_settings(data={"cloud": {"address": address}}, env={}).cloud.address == address


@pytest.mark.parametrize(
    "address", ["dns:bridge.example", "dns:bridge.example:70000", "dns://8.8.8.8", "dns://bridge.example:50051"]
)
def test_a_dns_target_without_a_valid_port_names_cloud_address(address):
    with pytest.raises(ConfigError) as info:
        CloudSettings(address=address)
    assert info.value.field == "cloud.address"


def test_a_client_dials_a_dns_scheme_target(start_bridge, make_client):
    bridge = start_bridge()
    client = make_client(bridge, address=f"dns:localhost:{bridge.port}")  # plaintext: localhost is loopback
    assert client.generate(HI).text == "the answer is forty two"


def test_a_request_too_large_for_grpc_is_the_requests_fault_not_a_cloud_outage(start_bridge, make_client):
    bridge = start_bridge(server={"max_message_bytes": 64 << 10}, limits={"max_prompt_chars": 10_000_000})
    sleeps: list[float] = []
    client = make_client(bridge, max_message_bytes=1 << 20, circuit_failure_threshold=1, sleep=sleeps.append)
    # over the client's own limit (gRPC refuses to send it), then over the bridge's (gRPC refuses to receive it)
    for size in (2 << 20, 100 << 10):
        big = [{"role": "user", "content": "x" * size}]
        for call in (lambda: client.generate(big), lambda: list(client.stream(big))):
            with pytest.raises(InvalidRequestError) as info:
                call()
            assert info.value.field == "messages" and isinstance(info.value, CloudError)  # a fallback still happens
            assert sleeps == [] and client.circuit.state == "closed"  # not retried, not counted
    assert client.generate(HI).text == "the answer is forty two"


class _PathLike:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def test_file_paths_may_be_str_or_path_like(start_bridge, make_client, certs, tmp_path):
    server = {"tls_cert": str(certs.server_cert), "tls_key": _PathLike(certs.server_key), "client_ca": str(certs.ca)}
    settings = dataclasses.replace(bridge_settings(), server=ServerSettings(address="127.0.0.1:0", **server))
    assert settings.server.tls_key == certs.server_key
    tokens = tmp_path / "tokens.toml"
    token = add_device_token(str(tokens), "pi-1")
    assert TokenStore(tokens_file=str(tokens)).authenticate(token) == "pi-1"
    server_, port = create_server(settings)
    server_.start()
    try:
        client = CloudClient(
            address=f"127.0.0.1:{port}",
            token=TOKEN,
            ca_file=str(certs.ca),
            cert_file=_PathLike(certs.client_cert),
            key_file=str(certs.client_key),
            timeout_s=10,
        )
        with client:
            assert client.settings.ca_file == certs.ca and client.settings.cert_file == certs.client_cert
            assert client.generate(HI).text == "the answer is forty two"
    finally:
        server_.stop(0)
    with pytest.raises(ConfigError) as info:
        CloudSettings(ca_file=42)
    assert info.value.field == "cloud.ca_file"


@pytest.mark.parametrize("mode", [0o755, 0o700])
def test_a_token_file_that_is_a_directory_is_named_as_one(tmp_path, mode):
    # a directory's usual 755 was "readable by others: chmod 600 it", and after that chmod "Is a directory"
    path = tmp_path / "tokens"
    path.mkdir(mode=mode)
    with pytest.raises(ConfigError) as info:
        CloudSettings(address="127.0.0.1:1", token_file=path).resolve_token()
    assert info.value.field == "cloud.token_file" and "is a directory" in str(info.value)
    assert "chmod" not in str(info.value)


@pytest.mark.parametrize("token", ["tök_en", "two words", "tab\there"])
def test_a_token_grpc_metadata_cannot_carry_is_refused_at_start_without_echoing_it(tmp_path, token):
    with pytest.raises(ConfigError) as info:
        CloudSettings(address="127.0.0.1:1", token=token).resolve_token()
    assert info.value.field == "cloud.token" and token not in str(info.value)
    path = tmp_path / "token"
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        CloudClient(address="127.0.0.1:1", token_file=path)
    assert info.value.field == "cloud.token_file" and token not in str(info.value)


def test_a_request_protobuf_cannot_encode_is_a_cloud_error_so_the_caller_falls_back() -> None:
    from types import SimpleNamespace

    from edge_runtime.cloud._client import _request

    params = SimpleNamespace(max_new_tokens=4, temperature=0.5, top_p=1.0, top_k=0, seed=2 ** 64, stop=[])
    with pytest.raises(CloudError, match="cannot encode"):
        _request([{"role": "user", "content": "hi"}], model="m", params=params, escalation=None,  # type: ignore[arg-type]
                 request_id="r1")


def test_a_call_from_before_the_circuit_opened_ending_neutral_does_not_free_the_probe_slot():
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10, clock=fake.clock)
    long_call = breaker.admit()  # started while closed, still running
    assert long_call == 0
    breaker.record_failure(probe=0)  # another call failed: open
    fake.now += 10
    probe = breaker.admit()  # the one probe goes out
    assert probe and probe > 0
    breaker.record_neutral(probe=long_call)  # the long call's caller gave up: says nothing, and is not the probe
    assert breaker.admit() is None  # no second probe while the first still runs
    breaker.record_failure(probe=long_call)  # nor when that old call fails late: the probe decides
    assert breaker.state == "half_open" and breaker.admit() is None
    breaker.record_success()
    assert breaker.admit() == 0


def test_an_older_probe_ending_does_not_free_the_current_probes_slot():
    fake = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10, clock=fake.clock)
    breaker.record_failure()
    fake.now += 10
    first = breaker.admit()
    breaker.record_failure(probe=first)  # the first probe failed: open again
    fake.now += 10
    second = breaker.admit()
    assert second and second != first
    breaker.record_neutral(probe=first)  # a late word from the first probe's call
    assert breaker.admit() is None  # the second probe keeps its slot


def test_close_ends_a_retry_wait_at_once_not_after_the_whole_delay():
    from edge_runtime._child import free_port

    client = CloudClient(address=f"127.0.0.1:{free_port()}", insecure=True, token="t", max_attempts=3,
                         backoff_initial_s=5.0, backoff_max_s=5.0, jitter=0.0, timeout_s=30)
    threading.Timer(0.3, client.close).start()
    t0 = time.monotonic()
    with pytest.raises(CloudError) as info:
        client.list_models()  # refused, then waits 5 s to retry: close() ends the wait
    assert info.value.code == "CLOSED" and time.monotonic() - t0 < 2.0


def test_messages_reach_the_bridge_as_the_engine_reads_them_and_bad_arguments_are_named(start_bridge, make_client):
    # OpenAI's content parts were sent as their Python repr ("[{'type': 'text', ...}]"), billed as the prompt; None
    # as "None"; a model or request id that is no string failed as a CloudError naming nothing
    bridge = start_bridge(models={"tiny": {"backend": "echo"}})  # answers with the last user message
    client = make_client(bridge)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " there"}]}]
    assert client.generate(parts).text == "hello there"
    for messages, field in (([{"role": "user", "content": None}], "messages[0].content"),
                            ([{"content": "hi"}], "messages[0].role")):
        with pytest.raises(InvalidRequestError) as info:
            client.generate(messages)
        assert info.value.field == field
    for kwargs, field in (({"model": 5}, "model"), ({"request_id": 5}, "request_id"),
                          ({"max_prices": "ab"}, "max_prices"), ({"max_prices": (1.0, float("nan"))}, "max_prices")):
        with pytest.raises(InvalidRequestError) as info:
            client.generate(HI, **kwargs)
        assert info.value.field == field


def test_a_client_closed_by_another_thread_during_a_call_is_closed_not_a_bridge_outage(start_bridge, make_client):
    # "Channel closed!" came back as CloudUnavailableError: counted against the circuit and as a cloud failure
    bridge = start_bridge(models={"tiny": {"backend": "echo", "reply": "w " * 100, "token_delay_ms": 50.0}})
    for streamed in (False, True):
        client = make_client(bridge, max_attempts=1)
        threading.Timer(0.5, client.close).start()
        with pytest.raises(CloudError) as info:
            list(client.stream(HI)) if streamed else client.generate(HI)
        assert info.value.code == "CLOSED" and not isinstance(info.value, CloudUnavailableError), info.value


def test_a_misspelt_setting_or_a_bad_health_check_argument_is_named():
    # a bare TypeError from the dataclass, and from grpc's deadline arithmetic
    with pytest.raises(ConfigError) as info:
        CloudClient(address="127.0.0.1:1", insecure=True, timeout=5)
    assert info.value.field == "cloud.timeout"
    client = CloudClient(address="127.0.0.1:1", insecure=True)
    try:
        for kwargs, field in (({"timeout_s": "x"}, "timeout_s"), ({"timeout_s": -1}, "timeout_s"),
                              ({"service": 1}, "service")):
            with pytest.raises(InvalidRequestError) as bad:
                client.check_health(**kwargs)
            assert bad.value.field == field
    finally:
        client.close()


def test_default_length_leaves_the_length_to_the_bridge():
    # unset, the bridge takes its default and fits it to its model's window (the proto's contract)
    client = CloudClient(address="127.0.0.1:1", token="t", insecure=True)
    params = SamplingParams(max_new_tokens=300)
    assert client._request(HI, params, None, None, None).max_new_tokens == 300
    assert not client._request(HI, params, None, None, None, default_length=True).HasField("max_new_tokens")
    client.close()


def test_impossible_token_counts_from_a_bridge_are_not_passed_on(caplog):
    # QA: a bridge's final message with usage {-100, -5} (or 2**62) reached the answer's usage as such: totals that
    # run backwards, or swamp every other figure
    from edge_runtime._proto.edgecloud.v1 import bridge_pb2
    from edge_runtime.cloud._client import _result

    def usage(prompt: int, completion: int):
        resp = bridge_pb2.GenerateResponse(text="ok", cost_usd=0.001,
                                           usage=bridge_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion))
        r = _result(resp, latency_ms=1.0, round_trip_ms=1.0, attempts=1)
        return r.prompt_tokens, r.completion_tokens

    assert usage(12, 3) == (12, 3)
    with caplog.at_level("WARNING"):
        assert usage(-100, -5) == (0, 0)
        assert usage(2**62, 3) == (0, 0)
    assert sum("is no count" in r.getMessage() for r in caplog.records) == 2
