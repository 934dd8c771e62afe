"""never, always, threshold, target_rate: decisions, reasons and configs."""

import math

import numpy as np
import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.policies import (
    Always, Decision, Never, Reason, RequestContext, TargetRate, Threshold, policy_from_config, threshold_for_rate,
)

CTX = RequestContext.from_prompt("What is 2 + 2?")


def test_never_answers_locally_at_every_stage():
    d = Never().before(CTX)
    assert (d.action, d.reason, d.policy) == ("local", Reason.NEVER, "never")
    assert Never().after(CTX, 0.01).action == "local"


def test_always_escalates_before_decoding():
    d = Always().before(CTX)
    assert (d.action, d.reason) == ("cloud", Reason.ALWAYS) and d.escalate


def test_threshold_compares_strictly_below():
    t = Threshold(0.6)
    assert t.before(CTX).action == "continue"
    low, at, high = t.after(CTX, 0.59), t.after(CTX, 0.6), t.after(CTX, 0.9)
    assert (low.action, low.reason, low.value, low.threshold) == ("cloud", Reason.BELOW_THRESHOLD, 0.59, 0.6)
    assert (at.action, at.reason) == ("local", Reason.AT_OR_ABOVE_THRESHOLD)
    assert high.action == "local" and "0.900 >= 0.600" in high.detail


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.5", None, True, math.nan])
def test_threshold_rejects_non_probabilities(p):
    with pytest.raises(ConfigError) as err:
        Threshold(p)
    assert err.value.field == "policy.p"


def test_threshold_for_rate_by_hand():
    cal = [0.4, 0.1, 0.3, 0.2]
    assert threshold_for_rate(cal, 0.5) == pytest.approx(0.25)  # halfway between 0.2 and 0.3
    assert threshold_for_rate(cal, 0.25) == pytest.approx(0.15)
    assert threshold_for_rate(cal, 0.0) == 0.0
    assert threshold_for_rate(cal, 1.0) > 1.0  # escalates even p_correct == 1.0


def test_target_rate_escalates_the_share_of_calibration_traffic():
    rng = np.random.default_rng(0)
    cal = rng.random(10000)
    fresh = rng.random(4000)  # new traffic from the same distribution
    for rate in (0.1, 0.3, 0.5, 0.8):
        policy = TargetRate(rate, cal)
        assert policy.achieved_rate == pytest.approx(rate, abs=0.001)
        escalated = np.mean([policy.after(CTX, float(p)).escalate for p in fresh])
        assert escalated == pytest.approx(rate, abs=0.03)
    d = TargetRate(0.5, [0.1, 0.2, 0.3, 0.4]).after(CTX, 0.22)
    assert d.action == "cloud" and d.reason == Reason.BELOW_THRESHOLD and "50% of calibration" in d.detail


def test_target_rate_ties_escalate_fewer_never_more():
    policy = TargetRate(0.5, [0.2, 0.5, 0.5, 0.5, 0.5, 0.9])
    assert policy.threshold == 0.5 and policy.achieved_rate == pytest.approx(1 / 6)


def test_target_rate_config_keeps_the_threshold_not_the_data():
    policy = TargetRate(0.25, [0.4, 0.1, 0.3, 0.2])
    cfg = policy.to_config()
    assert cfg == {"type": "target_rate", "rate": 0.25, "threshold": pytest.approx(0.15)}
    again = policy_from_config(cfg)
    assert again == policy and again.after(CTX, 0.12).escalate and not again.after(CTX, 0.16).escalate
    from_data = policy_from_config({"type": "target_rate", "rate": 0.5, "calibration": [0.1, 0.2, 0.3, 0.4]})
    assert from_data.threshold == pytest.approx(0.25)


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"type": "target_rate", "rate": 0.5}, "policy.threshold"),
        ({"type": "target_rate", "rate": 0.5, "calibration": [0.1], "threshold": 0.2}, "policy.calibration"),
        ({"type": "target_rate", "rate": 0.5, "calibration": []}, "policy.calibration"),
        ({"type": "target_rate", "rate": 0.5, "calibration": [0.2, 1.7]}, "policy.calibration"),
        ({"type": "target_rate", "rate": 0.5, "calibration": "0.1,0.2"}, "policy.calibration"),
        ({"type": "target_rate", "rate": 2}, "policy.rate"),
        ({"type": "target_rate", "rate": 0.5, "threshold": -1}, "policy.threshold"),
    ],
)
def test_target_rate_config_errors(cfg, field):
    with pytest.raises(ConfigError) as err:
        policy_from_config(cfg)
    assert err.value.field == field


def test_a_target_rate_with_nothing_to_set_its_threshold_says_where_one_comes_from():
    # it said "give either ... (not both)" when neither was given
    with pytest.raises(ConfigError) as err:
        policy_from_config({"type": "target_rate", "rate": 0.3})
    assert "not both" not in str(err.value) and "edge-runtime explore" in str(err.value)
    with pytest.raises(ConfigError, match="not both"):
        policy_from_config({"type": "target_rate", "rate": 0.3, "calibration": [0.1], "threshold": 0.2})


def test_decision_validates_action_and_serialises():
    with pytest.raises(ValueError):
        Decision("maybe", "x")
    d = Threshold(0.5).after(CTX, 0.25)
    assert d.to_dict() == {"action": "cloud", "reason": "p_correct_below_threshold", "detail": d.detail,
                           "policy": "threshold", "value": 0.25, "threshold": 0.5}
