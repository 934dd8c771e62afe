"""Offline replay: hand-computed cases, agreement with the live policy item by item, and speed."""

import dataclasses
import math
import time

import numpy as np
import pytest

from edge_runtime.engine.types import TokenInfo
from edge_runtime.policies import (
    Budget, Chain, Reason, ReplayRecords, RequestContext, TargetRate, policy_from_config, replay,
)

# six items: p_correct, local right?, cloud right?, cloud cost, full local energy/latency
SIX = dict(
    p_correct=[0.9, 0.2, 0.6, 0.4, 0.1, 0.8],
    local_correct=[1, 0, 1, 0, 0, 1],
    cloud_correct=[1, 1, 0, 1, 1, 1],
    cloud_usd=[0.01, 0.02, 0.01, 0.03, 0.01, 0.01],
    local_joules=[2.0, 4.0, 2.0, 4.0, 6.0, 2.0],
    local_ms=[100, 200, 100, 200, 300, 100],
    cloud_ms=[500] * 6,
)


def test_threshold_by_hand():
    r = replay({"type": "threshold", "p": 0.5}, ReplayRecords(**SIX))
    # items 1, 3, 4 (p < .5) escalate after decoding
    assert r.routes() == ["local", "cloud", "local", "cloud", "cloud", "local"]
    assert r.stage.tolist() == [2] * 6
    assert r.correct.tolist() == [1, 1, 1, 1, 1, 1]
    s = r.summary()
    assert s["accuracy"] == 1.0 and s["escalation_rate"] == 0.5
    assert s["cloud_usd_total"] == pytest.approx(0.06) and s["cloud_usd_per_1k"] == pytest.approx(10.0)
    assert s["local_joules_per_request"] == pytest.approx(20 / 6)  # the local answer was paid for every item
    assert r.latency_ms.tolist() == [100, 700, 100, 700, 800, 100]
    assert s["reasons"] == {Reason.BELOW_THRESHOLD: 3, Reason.AT_OR_ABOVE_THRESHOLD: 3}
    assert r.policy == {"type": "threshold", "p": 0.5}


def test_always_and_never():
    recs = ReplayRecords(**SIX)
    always = replay("always", recs)
    assert always.routes() == ["cloud"] * 6 and always.local_tokens.tolist() == [0] * 6
    assert always.local_joules.tolist() == [0.0] * 6 and always.summary()["accuracy"] == pytest.approx(5 / 6)
    never = replay("never", recs)
    assert never.routes() == ["local"] * 6 and never.cloud_usd.sum() == 0
    assert never.summary()["accuracy"] == 0.5


def test_summary_of_a_subset():
    r = replay({"type": "threshold", "p": 0.5}, ReplayRecords(**SIX))
    s = r.summary(np.array([True, True, False, False, False, False]))
    assert s["n"] == 2 and s["escalation_rate"] == 0.5 and s["latency_p50_ms"] == pytest.approx(400)
    assert r.summary(np.zeros(6, bool)) == {"n": 0}


def test_early_exit_by_hand():
    recs = ReplayRecords(
        p_correct=[0.9, 0.9, 0.9],
        local_correct=[1, 1, 1],
        cloud_correct=[0, 0, 0],
        token_logprobs=[[-0.1, -0.1, -0.1, -0.1], [-0.1, -3.0, -0.1, -0.1], [-2.0]],
        local_joules=[10.0, 10.0, 10.0],
        local_prefill_joules=[2.0, 2.0, 2.0],
        local_ms=[90, 90, 90],
        local_prefill_ms=[10, 10, 10],
    )
    r = replay({"type": "early_exit", "bar": 0.5, "min_tokens": 1, "signal": "min_prob"}, recs)
    # item 1 stops after its second token (exp(-3) < .5), item 2 after its only token (exp(-2) < .5)
    assert r.routes() == ["local", "cloud", "cloud"] and r.stage.tolist() == [2, 1, 1]
    assert r.local_tokens.tolist() == [4, 2, 1]
    # prefill + decode x share of tokens decoded: 2 + 8 * 2/4 = 6 ; the last item decoded all of its one token
    assert r.local_joules.tolist() == pytest.approx([10.0, 6.0, 10.0])
    assert r.latency_ms.tolist() == pytest.approx([90, 10 + 80 * 0.5, 90])
    later = replay({"type": "early_exit", "bar": 0.5, "min_tokens": 3, "signal": "min_prob"}, recs)
    assert later.local_tokens.tolist() == [4, 3, 1] and later.routes() == ["local", "cloud", "local"]


def test_budget_by_hand():
    recs = ReplayRecords(p_correct=[0.1] * 5, local_correct=[0] * 5, cloud_correct=[1] * 5,
                         cloud_usd=[0.4, 0.4, 0.4, 0.1, 0.2])
    r = replay({"chain": [{"type": "budget", "usd": 1.0}, {"type": "threshold", "p": 0.5}]}, recs)
    # 0.4 + 0.4 = 0.8; the third (0.4) would pass the cap; the fourth (0.1) fits: 0.9; the fifth would pass it
    assert r.routes() == ["cloud", "cloud", "local_forced", "cloud", "local_forced"]
    assert r.reason[2] == Reason.BUDGET_EXHAUSTED and r.stage[2] == 0  # forced before decoding
    assert r.cloud_usd.sum() == pytest.approx(0.9)


def test_budget_periods_follow_timestamps():
    recs = ReplayRecords(p_correct=[0.1] * 4, local_correct=[0] * 4, cloud_correct=[1] * 4,
                         cloud_usd=[0.6, 0.6, 0.6, 0.6], timestamps_s=[0, 10, 3600, 3700])
    r = replay({"chain": [{"type": "threshold", "p": 0.5}, {"type": "budget", "usd": 1.0, "period_s": 3600}]}, recs)
    assert r.routes() == ["cloud", "local_forced", "cloud", "local_forced"]


def test_missing_inputs_are_named():
    recs = ReplayRecords(p_correct=[0.5], local_correct=[1], cloud_correct=[1])
    with pytest.raises(ValueError, match="privacy policy needs the prompts: ReplayRecords.texts is missing"):
        replay("privacy", recs)
    with pytest.raises(ValueError, match="pre_route_p is missing"):
        replay({"type": "pre_route", "bar": 0.5}, recs)
    with pytest.raises(ValueError, match="token_logprobs is missing"):
        replay({"type": "early_exit", "bar": 0.5}, recs)
    with pytest.raises(ValueError, match="expected 1"):
        ReplayRecords(p_correct=[0.5], local_correct=[1, 0], cloud_correct=[1])


def test_from_rows():
    rows = [{"p_correct": 0.2, "local_correct": False, "cloud_correct": True, "prompt": "mail a@b.io"},
            {"p_correct": 0.2, "local_correct": False, "cloud_correct": True,
             "messages": [{"role": "user", "content": "what is 2+2"}]}]
    r = replay({"chain": ["privacy", {"type": "threshold", "p": 0.5}]}, ReplayRecords.from_rows(rows))
    assert r.routes() == ["local_forced", "cloud"] and r.reason[0] == "privacy_pattern:email"


# --- replay agrees with the live policy ------------------------------------------------------------------

def _records(n=240, seed=11, reserve=False):
    rng = np.random.default_rng(seed)
    n_tok = rng.integers(1, 25, n)
    texts = []
    for i in range(n):
        u = rng.random()
        texts.append(["You are helpful.", "mail me at x.y@example.org" if u < 0.1 else
                      "call +44 20 7946 0958" if u < 0.15 else f"what is {i} + {i}?"])
    pre = rng.random(n)
    pre[rng.random(n) < 0.1] = np.nan
    return ReplayRecords(
        p_correct=rng.random(n),
        local_correct=rng.random(n) < 0.4,
        cloud_correct=rng.random(n) < 0.7,
        cloud_usd=rng.uniform(0.001, 0.01, n),
        local_joules=rng.uniform(1, 5, n),
        n_tokens=n_tok,
        token_logprobs=[-rng.exponential(0.4, k) for k in n_tok],
        token_margins=[rng.random(k) for k in n_tok],
        pre_route_p=pre,
        texts=texts,
        timestamps_s=np.sort(rng.uniform(0, 3 * 3600, n)),
        # a live budget reserves a worst case, more than the bill: before decoding, and more with the draft after
        **({"reserve_usd": (r := rng.uniform(0.01, 0.03, n)), "reserve_after_usd": r + 0.01} if reserve else {}),
    )


CHAINS = [
    {"type": "threshold", "p": 0.5},
    {"chain": ["privacy", {"type": "threshold", "p": 0.6}]},
    {"chain": [{"type": "threshold", "p": 0.6}, "privacy"]},
    {"chain": [{"type": "early_exit", "bar": 0.45, "min_tokens": 3}, {"type": "threshold", "p": 0.5}]},
    {"chain": ["privacy", {"type": "budget", "usd": 0.3, "period_s": 3600},
               {"type": "early_exit", "bar": 0.3, "min_tokens": 2, "signal": "min_prob"},
               {"type": "threshold", "p": 0.6}]},
    {"chain": [{"type": "pre_route", "bar": 0.2}, {"type": "budget", "usd": 0.2, "period_s": 3600}, "privacy",
               {"type": "threshold", "p": 0.4}]},
    {"chain": [{"type": "budget", "usd": 0.1}, "always"]},
    {"chain": ["always", {"type": "budget", "usd": 0.3}, "privacy"]},
    {"chain": ["never", "privacy"]},
    {"chain": [{"type": "pre_route", "bar": 0.5, "decide_local": True},
               {"type": "early_exit", "bar": 0.1, "min_tokens": 1, "signal": "min_margin"},
               {"type": "budget", "usd": 0.05, "period_s": 1800}]},
    {"chain": [{"type": "early_exit", "bar": 0.6, "min_tokens": 4}, {"type": "early_exit", "bar": 0.2, "min_tokens": 1,
                                                                     "signal": "min_prob"}]},
    {"chain": [{"type": "budget", "usd": 0.2}, {"type": "budget", "usd": 0.05, "period_s": 600},
               {"type": "threshold", "p": 0.7}]},
    {"type": "target_rate", "rate": 0.3, "threshold": 0.27},
]


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def _live(cfg, R):
    """Run the policy the way a runtime does, one request after another."""
    clock = Clock()
    parts = [Budget(p.usd, p.period_s, clock=clock) if isinstance(p, Budget) else p
             for p in policy_from_config(cfg).parts()]
    policy = Chain(parts)
    out = []
    for i in range(R.n):
        clock.t = R.timestamps_s[i]
        pre = R.pre_route_p[i]
        # as the runtime does: the reservation before decoding is the prompt's; after it, the draft's too
        ctx = RequestContext(messages=[{"role": "user", "content": t} for t in R.texts[i]],
                             estimated_cloud_usd=R.reserve_usd[i], pre_route_p_correct=None if math.isnan(pre) else pre)
        n_tok = int(R.n_tokens[i])
        d = policy.before(ctx)
        if d.action != "continue":
            out.append((d.action, 0, d.reason, 0 if d.action == "cloud" else n_tok))
        else:
            tokens = [TokenInfo(id=0, text="t", logprob=float(lp), entropy=0.0, margin=float(m))
                      for lp, m in zip(R.token_logprobs[i], R.token_margins[i])]
            for t in range(n_tok):
                d = policy.during(ctx, tokens[: t + 1])
                if d.action != "continue":
                    out.append((d.action, 1, d.reason, t + 1 if d.action == "cloud" else n_tok))
                    break
            else:
                ctx = dataclasses.replace(ctx, estimated_cloud_usd=R.reserve_after_usd[i])
                d = policy.after(ctx, float(R.p_correct[i]))
                out.append((d.action, 2, d.reason, n_tok))
        if out[-1][0] == "cloud":
            policy.settle(ctx, float(R.cloud_usd[i]))
    return out


@pytest.mark.parametrize("cfg", CHAINS, ids=lambda c: policy_from_config(c).describe())
def test_replay_matches_the_live_policy(cfg):
    R = _records()
    live = _live(cfg, R)
    r = replay(cfg, R)
    got = list(zip(r.routes(), r.stage.tolist(), r.reason.tolist(), r.local_tokens.tolist()))
    assert got == live
    # the comparison is not vacuous: these runs mix routes
    if cfg not in ({"chain": ["never", "privacy"]},):
        assert len(set(r.routes())) >= 2


def test_replay_is_fast_enough_for_a_grid():
    R = _records(n=1000, seed=3)
    cal = R.p_correct[:500]
    configs = [{"type": "threshold", "p": p} for p in np.linspace(0, 1, 60)]
    configs += [{"chain": [{"type": "early_exit", "bar": b, "min_tokens": k}, {"type": "threshold", "p": 0.5}]}
                for b in np.linspace(0.05, 0.6, 12) for k in (1, 2, 4, 8)]
    configs += [TargetRate(r, cal) for r in np.linspace(0, 1, 20)]
    configs += [{"chain": ["privacy", {"type": "threshold", "p": p}]} for p in np.linspace(0, 1, 20)]
    replay(configs[0], R)
    start = time.perf_counter()
    for c in configs:
        replay(c, R)
    per_replay_ms = (time.perf_counter() - start) * 1000 / len(configs)
    assert per_replay_ms < 10, per_replay_ms  # typically ~0.5 ms on a Pi-class core


@pytest.mark.parametrize("cfg", [c for c in CHAINS if "budget" in repr(c)], ids=lambda c: policy_from_config(c).describe())
def test_replay_matches_a_live_budget_that_reserves_more_than_the_bill(cfg):
    R = _records(reserve=True)
    live = _live(cfg, R)
    r = replay(cfg, R)
    assert list(zip(r.routes(), r.stage.tolist(), r.reason.tolist(), r.local_tokens.tolist())) == live
    assert (r.reason == "budget_exhausted").any()
