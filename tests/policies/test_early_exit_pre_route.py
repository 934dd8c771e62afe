"""early_exit (running confidence during decoding) and pre_route (prompt-only, before decoding)."""

import logging
import math

import numpy as np
import pytest

from edge_runtime.engine.types import TokenInfo
from edge_runtime.errors import ConfigError, InvalidRequestError
from edge_runtime.policies import (
    PRE_ROUTERS, Budget, Chain, EarlyExit, PreRoute, Reason, RequestContext, Threshold, policy_from_config,
    register_pre_router, running_confidence,
)

LOGPROBS = [-0.1, -0.2, -3.0, -0.1]
MARGINS = [0.9, 0.5, 0.05, 0.8]
TOKENS = [TokenInfo(id=i, text="x", logprob=lp, entropy=0.0, margin=m)
          for i, (lp, m) in enumerate(zip(LOGPROBS, MARGINS))]
CTX = RequestContext.from_prompt("Tell me something")


def test_running_signals_by_hand():
    mean = running_confidence(LOGPROBS, signal="mean_prob")
    assert mean == pytest.approx([math.exp(-0.1), math.exp(-0.15), math.exp(-1.1), math.exp(-0.85)])
    mins = running_confidence(LOGPROBS, signal="min_prob")
    assert mins == pytest.approx([math.exp(-0.1), math.exp(-0.2), math.exp(-3.0), math.exp(-3.0)])
    assert running_confidence(LOGPROBS, MARGINS, signal="min_margin") == pytest.approx([0.9, 0.5, 0.05, 0.05])
    assert len(running_confidence([], signal="mean_prob")) == 0
    with pytest.raises(InvalidRequestError, match="margins"):  # a bare AssertionError before (QA UU)
        running_confidence(LOGPROBS, signal="min_margin")


def test_stops_at_the_first_token_below_the_bar():
    ee = EarlyExit(bar=0.5, min_tokens=2)
    seen = [ee.during(CTX, TOKENS[: t + 1]).action for t in range(4)]
    assert seen == ["continue", "continue", "cloud", "cloud"]
    d = ee.during(CTX, TOKENS[:3])
    assert (d.reason, d.policy, d.threshold) == (Reason.EARLY_EXIT, "early_exit", 0.5)
    assert d.value == pytest.approx(math.exp(-1.1)) and "after 3 tokens" in d.detail
    assert ee.should_stop(TOKENS[:3]) and not ee.should_stop(TOKENS[:2])


def test_min_tokens_delays_the_check():
    ee = EarlyExit(bar=0.5, min_tokens=4)
    assert [ee.should_stop(TOKENS[: t + 1]) for t in range(4)] == [False, False, False, True]


def test_signal_choice_and_token_dicts():
    as_dicts = [{"logprob": lp, "margin": m} for lp, m in zip(LOGPROBS, MARGINS)]
    assert EarlyExit(bar=0.1, min_tokens=1, signal="min_margin").should_stop(as_dicts[:3])
    assert not EarlyExit(bar=0.1, min_tokens=1, signal="mean_prob").should_stop(as_dicts[:3])


def test_trajectory_signal_uses_the_given_function():
    ee = EarlyExit(bar=0.4, min_tokens=1, signal="trajectory", confidence_fn=lambda toks: 1.0 / len(toks))
    assert [ee.should_stop(TOKENS[: t + 1]) for t in range(4)] == [False, False, True, True]
    with pytest.raises(ConfigError, match="needs a confidence_fn"):
        EarlyExit(bar=0.3, signal="trajectory").should_stop(TOKENS)


def test_an_early_exit_the_budget_forbids_becomes_local_forced():
    policy = Chain([EarlyExit(bar=0.5, min_tokens=1), Budget(0.0)])
    d = policy.during(RequestContext.from_prompt("q", estimated_cloud_usd=0.01), TOKENS[:3])
    assert (d.action, d.reason) == ("local_forced", Reason.BUDGET_EXHAUSTED)


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"type": "early_exit"}, "policy.bar"),
        ({"type": "early_exit", "bar": 0.3, "min_tokens": 0}, "policy.min_tokens"),
        ({"type": "early_exit", "bar": 0.3, "min_tokens": 2.5}, "policy.min_tokens"),
        ({"type": "early_exit", "bar": 0.3, "signal": "vibes"}, "policy.signal"),
    ],
)
def test_early_exit_config_errors(cfg, field):
    with pytest.raises(ConfigError) as err:
        policy_from_config(cfg)
    assert err.value.field == field


def test_early_exit_round_trip():
    ee = policy_from_config({"type": "early_exit", "bar": 0.4, "min_tokens": 3, "signal": "min_prob"})
    assert ee.to_config() == {"type": "early_exit", "bar": 0.4, "min_tokens": 3, "signal": "min_prob"}
    assert policy_from_config(ee.to_config()) == ee


# --- pre_route ---------------------------------------------------------------------------------------------

def test_pre_route_with_a_scorer():
    scorer = lambda ctx: 0.9 if "2 + 2" in ctx.prompt_text else 0.1  # noqa: E731
    pr = PreRoute(0.5, scorer)
    hard = pr.before(RequestContext.from_prompt("Prove the Riemann hypothesis"))
    assert (hard.action, hard.reason, hard.value, hard.threshold) == ("cloud", Reason.PRE_ROUTE_LOW, 0.1, 0.5)
    assert pr.before(RequestContext.from_prompt("What is 2 + 2?")).action == "continue"
    sure = PreRoute(0.5, scorer, decide_local=True).before(RequestContext.from_prompt("What is 2 + 2?"))
    assert (sure.action, sure.reason) == ("local", Reason.PRE_ROUTE_HIGH)


def test_pre_route_reads_the_context_score_by_default():
    pr = PreRoute(0.4)
    assert pr.before(RequestContext.from_prompt("x", pre_route_p_correct=0.2)).action == "cloud"
    assert pr.before(RequestContext.from_prompt("x", pre_route_p_correct=0.6)).action == "continue"
    assert pr.before(RequestContext.from_prompt("x")).action == "continue"  # no score: no opinion


def test_pre_route_then_threshold():
    policy = Chain([PreRoute(0.3), Threshold(0.6)])
    c = RequestContext.from_prompt("x", pre_route_p_correct=0.5)
    assert policy.before(c).action == "continue"
    assert policy.after(c, 0.4).reason == Reason.BELOW_THRESHOLD


def test_a_broken_pre_router_is_logged_and_ignored(caplog):
    def boom(ctx):
        raise RuntimeError("embedding model missing")

    with caplog.at_level(logging.ERROR):
        assert PreRoute(0.5, boom).before(CTX).action == "continue"
    assert "pre-router failed" in caplog.text


def test_pre_router_registry_in_config():
    @register_pre_router("test_length")
    def make(max_chars=20):
        return lambda ctx: 1.0 if len(ctx.prompt_text) <= max_chars else 0.0

    try:
        pr = policy_from_config({"type": "pre_route", "bar": 0.5, "scorer": {"type": "test_length", "max_chars": 5}})
        assert pr.before(RequestContext.from_prompt("a long question")).action == "cloud"
        assert pr.before(RequestContext.from_prompt("hi")).action == "continue"
        cfg = pr.to_config()
        assert cfg == {"type": "pre_route", "bar": 0.5, "scorer": {"type": "test_length", "max_chars": 5},
                       "decide_local": False}
        assert policy_from_config(cfg) == pr
        plain = policy_from_config({"type": "pre_route", "bar": 0.2})
        assert plain.to_config()["scorer"] == "context" and policy_from_config(plain.to_config()) == plain
        with pytest.raises(ConfigError) as err:
            policy_from_config({"type": "pre_route", "bar": 0.5, "scorer": {"type": "test_length", "nope": 1}})
        assert err.value.field == "policy.scorer"
    finally:
        PRE_ROUTERS.pop("test_length")


def test_a_pre_route_with_its_own_scorer_runs_with_any_estimator(tiny_bundle):
    # it was refused at start for want of the estimator's prompt-only score, which it never reads
    from edge_runtime.engine import Engine
    from edge_runtime.hybrid import HybridRuntime

    engine = Engine(tiny_bundle, energy_meter=None)

    @register_pre_router("test_always_low")
    def make():
        return lambda ctx: 0.0

    try:
        policy = {"chain": [{"type": "pre_route", "bar": 0.5, "scorer": {"type": "test_always_low"}},
                            {"type": "never"}]}
        rt = HybridRuntime(engine, policy=policy)  # the built-in estimator: no prompt-only score
        r = rt.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
        assert (r.route, r.reason) == ("local_forced", "cloud_not_configured")  # it asked for the cloud
        with pytest.raises(ConfigError, match="pre_route needs an estimator"):
            HybridRuntime(engine, policy={"type": "pre_route", "bar": 0.5})  # the context scorer still needs one
    finally:
        PRE_ROUTERS.pop("test_always_low")
        engine.close()


def test_a_python_callable_cannot_be_loaded_back_from_config():
    cfg = PreRoute(0.5, lambda ctx: 0.5).to_config()
    assert cfg["scorer"].startswith("python:")
    with pytest.raises(ConfigError, match="unknown pre-router") as err:
        policy_from_config(cfg)
    assert err.value.field == "policy.scorer.type"


def test_replay_ignores_unknown_pre_route_scores():
    from edge_runtime.policies import ReplayRecords, replay

    recs = ReplayRecords(p_correct=[0.9, 0.9, 0.9], local_correct=[1, 1, 1], cloud_correct=[1, 1, 1],
                         pre_route_p=[0.1, np.nan, 0.9])
    assert replay({"type": "pre_route", "bar": 0.5}, recs).routes() == ["cloud", "local", "local"]
