"""Escalation through the daemon with a real bridge, and the fallback when the bridge is gone."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from edge_runtime._proto.edgecloud.v1 import bridge_pb2, daemon_pb2, daemon_pb2_grpc
from edge_runtime.engine import Engine

from .conftest import ASK, CLOUD_REPLY, SlowEngine, cloud_client, metric, runtime, start_bridge

ESCALATE = {"type": "threshold", "p": 0.999}  # the tiny random model is never that sure


def test_escalated_request_is_answered_by_the_cloud_then_falls_back_quickly_when_the_bridge_stops(
        engine, bridge, start_daemon, http):
    cloud = cloud_client(bridge.address, timeout_s=3.0, circuit_failure_threshold=1)
    daemon = start_daemon(runtime(engine, ESCALATE, cloud=cloud))
    c = http(daemon.port)
    body = {"model": "auto", "messages": ASK, "max_tokens": 6}
    status, _, up = c.json("POST", "/v1/chat/completions", body)
    assert status == 200 and up["routing"]["route"] == "cloud" and up["choices"][0]["message"]["content"] == CLOUD_REPLY
    assert up["model"] == "big-cloud-model" and up["cost"]["cloud_usd"] > 0
    local_answer = engine.generate(messages=ASK, max_new_tokens=6).text

    bridge.server.stop(0)
    answers = []
    for _ in range(3):
        t0 = time.perf_counter()
        status, _, down = c.json("POST", "/v1/chat/completions", body)
        answers.append((status, down, time.perf_counter() - t0))
    for status, down, _ in answers:
        # nothing lost: the local answer comes back, marked as a fallback with the reason
        assert status == 200 and down["routing"]["route"] == "fallback" and down["routing"]["reason"] == "cloud_error"
        assert down["choices"][0]["message"]["content"] == local_answer and down["model"] == engine.model_name
        assert down["routing"]["cloud_error"] and down["cost"]["cloud_usd"] == 0
    assert "CircuitOpenError" in answers[-1][1]["routing"]["cloud_error"]
    assert answers[-1][2] < 0.5  # the open circuit skips the cloud at once

    _, _, text = c.request("GET", "/metrics")
    m = text.decode()
    assert metric(m, "edge_runtime_answers_total", route="cloud") == 1
    assert metric(m, "edge_runtime_answers_total", route="fallback") == 3
    assert metric(m, "edge_runtime_escalation_ratio") == 1.0
    assert metric(m, "edge_runtime_cloud_cost_usd_total") == up["cost"]["cloud_usd"]
    assert metric(m, "edge_runtime_cloud_cost_unknown_total") == 0  # a bridge that was down billed nothing
    errors = {kind: metric(m, "edge_runtime_cloud_errors_total", error=kind)
              for kind in ("CloudUnavailableError", "CircuitOpenError")}
    assert errors == {"CloudUnavailableError": 1, "CircuitOpenError": 2}  # every fallback counted by its cause
    # the device's idle draw while each escalation waited (the open circuit's answers waited for nothing)
    waits = [up["energy"]["wait_joules"]] + [down["energy"]["wait_joules"] for _, down, _ in answers]
    assert waits[0] > 0 and waits[-1] == 0
    assert metric(m, "edge_runtime_wait_energy_joules_total") == pytest.approx(sum(waits), abs=1e-5)
    assert metric(m, "edge_runtime_tokens_total", route="cloud", side="cloud") == (
        up["usage"]["cloud"]["prompt_tokens"] + up["usage"]["cloud"]["completion_tokens"])
    cloud.close()


def test_privacy_gate_keeps_the_prompt_local_whatever_the_policy(engine, bridge, start_daemon, http):
    cloud = cloud_client(bridge.address)
    daemon = start_daemon(runtime(engine, {"chain": [{"type": "privacy"}, {"type": "always"}]}, cloud=cloud))
    status, _, done = http(daemon.port).json("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "email bob@example.com the sum of 2 + 2"}], "max_tokens": 4})
    assert status == 200 and done["routing"]["route"] == "local_forced"
    assert done["routing"]["reason"] == "privacy_pattern:email" and done["cost"]["cloud_usd"] == 0
    cloud.close()


def test_a_bridge_slower_than_the_request_deadline_gives_the_local_answer_as_a_fallback(engine, start_daemon, http):
    # the bridge needs ~3 s for the 6 words asked; the daemon's deadline is 1 s, the client's own timeout 20 s
    slow = start_bridge(reply=" ".join(["word"] * 10), token_delay_ms=500.0)
    cloud = cloud_client(slow.address, timeout_s=20.0)
    daemon = start_daemon(runtime(engine, ESCALATE, cloud=cloud), request_timeout_s=1.0)
    c = http(daemon.port)
    local_answer = engine.generate(messages=ASK, max_new_tokens=6).text
    t0 = time.perf_counter()
    status, _, done = c.json("POST", "/v1/chat/completions", {"model": "auto", "messages": ASK, "max_tokens": 6})
    assert time.perf_counter() - t0 < 1.5
    assert status == 200, done
    assert done["routing"]["route"] == "fallback" and "CloudTimeoutError" in done["routing"]["cloud_error"]
    assert done["choices"][0]["message"]["content"] == local_answer
    # streamed: the same answer, then a final chunk with the routing (no error event)
    status, _, raw = c.request("POST", "/v1/chat/completions", {"model": "auto", "messages": ASK, "max_tokens": 6, "stream": True})
    assert status == 200
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")) == local_answer
    assert events[-1]["routing"]["route"] == "fallback" and not any("error" in e for e in events)
    slow.server.stop(0)
    cloud.close()


def test_a_request_sent_to_the_cloud_first_keeps_time_to_make_the_local_fallback(engine, start_daemon, http):
    # nothing local exists when the bridge is asked, and the local answer takes ~0.5 s (20 tokens, 25 ms each):
    # the escalation must leave that time, not just the moment it leaves to return an answer already made
    slow = start_bridge(reply=" ".join(["word"] * 10), token_delay_ms=500.0)
    cloud = cloud_client(slow.address, timeout_s=20.0)
    local = SlowEngine(engine, delay_s=0.025)
    daemon = start_daemon(runtime(local, {"type": "always"}, cloud=cloud), request_timeout_s=2.0)
    c = http(daemon.port)
    expected = engine.generate(messages=ASK, max_new_tokens=20).text
    for attempt in range(2):  # the engine's pace unknown (half the time left is kept), then measured
        status, _, done = c.json("POST", "/v1/chat/completions", {"model": "cloud", "messages": ASK, "max_tokens": 20})
        assert status == 200, (attempt, done)
        assert done["routing"]["route"] == "fallback" and "CloudTimeoutError" in done["routing"]["cloud_error"]
        assert done["choices"][0]["message"]["content"] == expected
        assert 300 < done["latency"]["cloud_ms"] < done["latency"]["total_ms"]  # the wait for the bridge that failed
    slow.server.stop(0)
    cloud.close()


def test_an_escalation_hands_its_generation_slot_to_the_next_request(engine, start_daemon, http):
    slow = start_bridge(reply=" ".join(["word"] * 10), token_delay_ms=500.0)  # 4 words (max_tokens): ~2 s
    cloud = cloud_client(slow.address, timeout_s=20.0)
    daemon = start_daemon(runtime(engine, ESCALATE, cloud=cloud))  # one generation slot (max_sessions=1)
    answers: dict[str, tuple[int, dict, float]] = {}

    def ask(name: str, model: str) -> None:
        t0 = time.perf_counter()
        status, _, body = http(daemon.port).json("POST", "/v1/chat/completions",
                                                 {"model": model, "messages": ASK, "max_tokens": 4})
        answers[name] = (status, body, time.perf_counter() - t0)

    escalating = threading.Thread(target=ask, args=("cloud", "auto"))
    escalating.start()
    time.sleep(0.5)  # the first request is now waiting for the bridge
    ask("local", "local")
    escalating.join(10)
    status, body, local_s = answers["local"]
    assert status == 200 and body["routing"]["route"] == "local"
    assert local_s < 1.0  # not queued behind the ~2 s cloud call
    assert answers["cloud"][0] == 200 and answers["cloud"][1]["routing"]["route"] == "cloud"
    assert answers["cloud"][2] > 1.5 > local_s + 0.5
    slow.server.stop(0)
    cloud.close()


def test_requests_sent_to_the_cloud_first_hand_their_slot_on_too(engine, start_daemon, http):
    # with no local answer yet they kept the only generation slot for the whole bridge call: cloud calls ran one at
    # a time, and local requests queued behind them (or got 429) while the CPU was idle
    slow = start_bridge(reply=" ".join(["word"] * 10), token_delay_ms=400.0, workers=4)  # 4 words: ~1.6 s
    cloud = cloud_client(slow.address, timeout_s=20.0)
    daemon = start_daemon(runtime(engine, {"type": "always"}, cloud=cloud), queue_size=2)
    answers: dict[str, tuple[int, dict, float]] = {}

    def ask(name: str, model: str) -> None:
        t0 = time.perf_counter()
        status, _, body = http(daemon.port).json("POST", "/v1/chat/completions", {"model": model, "messages": ASK, "max_tokens": 4})
        answers[name] = (status, body, time.perf_counter() - t0)

    started = time.perf_counter()
    clouds = [threading.Thread(target=ask, args=(f"cloud{i}", "cloud")) for i in range(2)]
    for t in clouds:
        t.start()
    time.sleep(0.5)  # both are waiting for the bridge
    ask("local", "local")
    for t in clouds:
        t.join(20)
    both_s = time.perf_counter() - started
    assert {name: (status, body["routing"]["route"]) for name, (status, body, _s) in answers.items()} == {
        "cloud0": (200, "cloud"), "cloud1": (200, "cloud"), "local": (200, "local")}
    assert answers["local"][2] < 1.0  # not queued behind the cloud calls
    assert both_s < 3.0  # side by side (~1.6 s), not one after the other (~3.2 s)
    slow.server.stop(0)
    cloud.close()


def test_a_cloud_first_request_whose_escalation_fails_takes_a_slot_again_for_its_fallback(engine, start_daemon, http):
    # it gave its slot on while it waited; the bridge timed out while another request was generating: it waits
    # for the slot, first in line, and answers with the local fallback (never nothing)
    slow = start_bridge(reply=" ".join(["word"] * 30), token_delay_ms=500.0)  # never whole in time
    cloud = cloud_client(slow.address, timeout_s=20.0)
    local = SlowEngine(engine, delay_s=0.04)
    # the escalation gets half of the 8 s (the engine's pace is not known yet): it fails at ~4 s, while the
    # local request (100 tokens from 0.3 s: ~4.5 s) still holds the only slot; the fallback then takes ~0.9 s,
    # and ends at ~5.5 s, well before the deadline
    daemon = start_daemon(runtime(local, {"type": "always"}, cloud=cloud), queue_size=2, request_timeout_s=8.0)
    expected = engine.generate(messages=ASK, max_new_tokens=20).text
    assert engine.generate(messages=ASK, max_new_tokens=100).finish_reason == "length"
    answers: dict[str, tuple[int, dict]] = {}

    def ask(name: str, model: str, tokens: int) -> None:
        status, _, body = http(daemon.port).json("POST", "/v1/chat/completions",
                                                 {"model": model, "messages": ASK, "max_tokens": tokens})
        answers[name] = (status, body)

    first = threading.Thread(target=ask, args=("cloud", "cloud", 20))
    first.start()
    time.sleep(0.3)  # it is waiting for the bridge, with its slot given on
    ask("local", "local", 100)  # runs at once, and still runs when the escalation fails
    first.join(20)
    status, body = answers["cloud"]
    assert status == 200, body
    assert body["routing"]["route"] == "fallback" and "CloudTimeoutError" in body["routing"]["cloud_error"]
    assert body["choices"][0]["message"]["content"] == expected
    assert body["latency"]["queue_ms"] > 50  # it waited for the slot the local request held
    assert answers["local"][0] == 200 and answers["local"][1]["routing"]["route"] == "local"
    slow.server.stop(0)
    cloud.close()


def test_handed_over_escalations_are_bounded_and_every_request_keeps_a_thread(engine, start_daemon, http):
    slow = start_bridge(reply=" ".join(["word"] * 10), token_delay_ms=400.0)  # 4 words: ~1.6 s
    cloud = cloud_client(slow.address, timeout_s=20.0)
    # one slot, one queue place: one escalation may give its slot on (and keep its thread)
    daemon = start_daemon(runtime(engine, ESCALATE, cloud=cloud), queue_size=1)
    answers: dict[str, tuple[int, dict]] = {}

    def ask(name: str, model: str) -> None:
        status, _, body = http(daemon.port).json("POST", "/v1/chat/completions", {"model": model, "messages": ASK, "max_tokens": 4})
        answers[name] = (status, body)

    threads = [threading.Thread(target=ask, args=(f"auto{i}", "auto")) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # the first is waiting for the bridge, the second has its slot
    local = threading.Thread(target=ask, args=("local", "local"))
    local.start()
    time.sleep(0.3)
    m = http(daemon.port).request("GET", "/metrics")[2].decode()
    busy, running, queued = (metric(m, n) for n in ("edge_runtime_generation_slots_busy", "edge_runtime_requests_in_progress",
                                                     "edge_runtime_queue_depth"))
    assert busy <= 1 and running + queued == 3, m
    for t in (*threads, local):
        t.join(20)
    assert {name: (status, body["routing"]["route"]) for name, (status, body) in answers.items()} == {
        "auto0": (200, "cloud"), "auto1": (200, "cloud"), "local": (200, "local")}
    slow.server.stop(0)
    cloud.close()


def test_prompt_lookup_drafts_are_reported_in_the_usage_and_the_metrics(tiny_bundle, start_daemon, http, monkeypatch,
                                                                        tmp_path):
    from edge_runtime.engine import engine as engine_module
    from edge_runtime.engine._lookup import PromptLookup

    plain = Engine(tiny_bundle, energy_meter=None)
    answer = plain.generate(messages=ASK, max_new_tokens=8).token_ids

    class RightEveryOtherTime(PromptLookup):  # a tiny random model seldom repeats itself: drafts with known outcomes
        def __init__(self, tokens, **kw):
            super().__init__(tokens, **kw)
            self.start, self.calls = len(self), 0

        def draft(self, limit):
            self.calls += 1
            right = answer[len(self) - self.start]  # the token after the one the step feeds
            return [] if limit < 1 else [right] if self.calls % 2 else [right + 1]

    monkeypatch.setattr(engine_module, "PromptLookup", RightEveryOtherTime)
    daemon = start_daemon(runtime(Engine(tiny_bundle, energy_meter=None, prompt_lookup=2)), tmp_path)
    client = http(daemon.port)
    status, _, body = client.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 8})
    assert status == 200
    details = body["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] > 0
    # the gRPC service reports the same counts
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as channel:
        reply = daemon_pb2_grpc.EdgeRuntimeStub(channel).Chat(daemon_pb2.ChatRequest(
            messages=[bridge_pb2.ChatMessage(**m) for m in ASK], max_new_tokens=8), timeout=30)
    assert (reply.usage.accepted_prediction_tokens, reply.usage.rejected_prediction_tokens) == (
        details["accepted_prediction_tokens"], details["rejected_prediction_tokens"])
    _, _, m = client.request("GET", "/metrics")
    m = m.decode()
    assert metric(m, "edge_runtime_draft_tokens_total", outcome="accepted") == 2 * details["accepted_prediction_tokens"]
    assert metric(m, "edge_runtime_draft_tokens_total", outcome="rejected") == 2 * details["rejected_prediction_tokens"]
    # without drafts the usage is OpenAI's plain one
    plain_daemon = start_daemon(runtime(plain))
    status, _, body = http(plain_daemon.port).json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 8})
    assert status == 200 and "completion_tokens_details" not in body["usage"]


def test_metrics_show_each_budgets_cap_and_spend(engine, bridge, start_daemon, http):
    # an operator saw a budget's spend only in a veto's detail
    cloud = cloud_client(bridge.address)
    policy = {"chain": [{"type": "budget", "usd_per_day": 5.0}, {"type": "always"}]}
    daemon = start_daemon(runtime(engine, policy, cloud=cloud))
    c = http(daemon.port)
    status, _, done = c.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 4})
    assert status == 200 and done["routing"]["route"] == "cloud" and done["cost"]["cloud_usd"] > 0
    _, _, text = c.request("GET", "/metrics")
    text = text.decode()
    assert metric(text, "edge_runtime_budget_usd", budget="budget") == 5.0  # the cap is no label: a new one is no new series
    assert metric(text, "edge_runtime_budget_spent_usd", budget="budget") == pytest.approx(done["cost"]["cloud_usd"])


def test_metrics_and_the_log_say_why_answers_were_kept_on_the_device(engine, start_daemon, http, caplog):
    # a budget whose bridge was down at start kept every escalation local (budget_prices_unknown): no cloud error
    # was counted and nothing logged above debug, so an alert on the bridge never fired
    cloud = cloud_client("127.0.0.1:1", timeout_s=0.5)  # nothing listens there
    policy = {"chain": [{"type": "budget", "usd_per_day": 5.0}, {"type": "always"}]}
    with caplog.at_level("WARNING", logger="edge_runtime.hybrid"):
        daemon = start_daemon(runtime(engine, policy, cloud=cloud))
        c = http(daemon.port)
        for _ in range(2):
            status, _, done = c.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2})
            assert status == 200 and done["routing"]["reason"] == "budget_prices_unknown"
    assert sum("cannot read the bridge's prices" in r.getMessage() for r in caplog.records) == 1
    _, _, text = c.request("GET", "/metrics")
    assert metric(text.decode(), "edge_runtime_forced_local_total", reason="budget_prices_unknown") == 2


def test_a_price_rise_at_the_bridge_is_refused_unbilled_and_the_next_escalation_pays_the_new_price(engine, bridge):
    # a budget reserved at the prices it read up to 10 minutes before; the bridge billed at its new ones, and
    # escalations in flight took several times the cap. Now each call carries the prices it was budgeted at.
    import dataclasses

    cloud = cloud_client(bridge.address)
    rt = runtime(engine, {"chain": [{"type": "budget", "usd": 100.0}, {"type": "always"}]}, cloud=cloud)
    first = rt.chat(ASK, max_new_tokens=4)
    assert first.route == "cloud" and rt._prices.prices == (1000.0, 2000.0)
    settings = bridge.server.service.settings
    settings.models["big"] = dataclasses.replace(settings.models["big"], usd_per_million_input_tokens=10000.0,
                                                 usd_per_million_output_tokens=20000.0)
    refused = rt.chat(ASK, max_new_tokens=4)
    assert refused.route == "fallback" and "PRICE_ABOVE_LIMIT" in refused.cloud_error
    assert refused.cloud_error_type == "CloudPriceError" and refused.cost["cloud_usd"] == 0
    assert not refused.cost["cloud_usd_unknown"] and cloud.circuit.state == "closed"  # healthy, and nothing billed
    assert rt._prices.prices == (10000.0, 20000.0)  # taken from the refusal
    again = rt.chat(ASK, max_new_tokens=4)
    assert again.route == "cloud" and again.cost["cloud_usd"] == pytest.approx(10 * first.cost["cloud_usd"])
    assert rt.policy.parts()[0].spent_usd() == pytest.approx(first.cost["cloud_usd"] + again.cost["cloud_usd"])


def test_against_a_bridge_that_names_no_price_the_limit_is_the_cost_tables_and_the_operator_is_warned(engine, caplog):
    # the limit sent was the bridge's listed price, $0: the first price an operator set, even one below the device's
    # own table that the budget had reserved at, refused the calls in flight; and a budget against $0 bills limits
    # nothing, silently
    import dataclasses

    from edge_runtime.cost import CostSettings

    bridge = start_bridge(usd_per_million_input_tokens=0.0, usd_per_million_output_tokens=0.0)
    try:
        cloud = cloud_client(bridge.address)
        cost = CostSettings(prices={"*": {"input": 1000.0, "output": 2000.0}})
        rt = runtime(engine, {"chain": [{"type": "budget", "usd": 100.0}, {"type": "always"}]}, cloud=cloud, cost=cost)
        with caplog.at_level("WARNING", logger="edge_runtime.hybrid"):
            assert rt.chat(ASK, max_new_tokens=4).route == "cloud"
        assert "names no price" in caplog.text
        settings = bridge.server.service.settings
        settings.models["big"] = dataclasses.replace(settings.models["big"], usd_per_million_input_tokens=500.0,
                                                     usd_per_million_output_tokens=1000.0)
        assert rt.chat(ASK, max_new_tokens=4).route == "cloud"  # below what the table reserved at: not refused
        settings.models["big"] = dataclasses.replace(settings.models["big"], usd_per_million_input_tokens=5000.0,
                                                     usd_per_million_output_tokens=1000.0)
        assert rt.chat(ASK, max_new_tokens=4).cloud_error_type == "CloudPriceError"  # above it: refused
    finally:
        bridge.server.stop(0)


def test_a_table_dearer_overall_but_cheaper_on_one_side_does_not_lock_the_bridge_out(engine):
    # the limit sent was the table's pair when the table reserved more: lower than the bridge's input price, so
    # the bridge refused every budgeted call, and the refusal's prices changed nothing
    from edge_runtime.cost import CostSettings

    bridge = start_bridge(usd_per_million_input_tokens=180.0, usd_per_million_output_tokens=180.0)
    try:
        cost = CostSettings(prices={"*": {"input": 150.0, "output": 600.0}})
        rt = runtime(engine, {"chain": [{"type": "budget", "usd": 100.0}, {"type": "always"}]},
                     cloud=cloud_client(bridge.address), cost=cost)
        for _ in range(2):  # 64 new tokens: the table's output price makes it the dearer reservation
            r = rt.chat(ASK, max_new_tokens=64)
            assert r.route == "cloud", r.cloud_error
    finally:
        bridge.server.stop(0)
