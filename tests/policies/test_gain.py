"""Gain policy: escalate when the prompt-only cloud estimate beats the local p_correct by a margin."""

import numpy as np
import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.policies import Gain, ReplayRecords, RequestContext, policy_from_config, replay


def _ctx(p_cloud):
    return RequestContext.from_prompt("What is 2 + 2?", features={} if p_cloud is None else {"p_cloud": p_cloud})


def test_live_decisions():
    g = Gain(0.1)
    assert g.after(_ctx(0.8), 0.5).action == "cloud"
    d = g.after(_ctx(0.55), 0.5)
    assert d.action == "local" and d.reason == "expected_gain_below_min"
    assert g.after(_ctx(None), 0.1).reason == "default_local"  # no estimate: no opinion


def test_replay_matches_live_item_by_item():
    rng = np.random.default_rng(3)
    p, pc = rng.random(50), rng.random(50)
    pc[::7] = np.nan
    records = ReplayRecords(p_correct=p, p_cloud=pc, local_correct=rng.random(50) < 0.5, cloud_correct=rng.random(50) < 0.5)
    for cfg in ({"type": "gain", "min_gain": 0.0}, {"chain": [{"type": "gain", "min_gain": 0.2}, {"type": "threshold", "p": 0.3}]}):
        policy = policy_from_config(cfg)
        result = replay(cfg, records)
        for i in range(50):
            ctx = _ctx(None if np.isnan(pc[i]) else float(pc[i]))
            assert result.routes()[i] == {"cloud": "cloud", "local": "local"}[policy.after(ctx, float(p[i])).action]


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="policy.min_gain"):
        policy_from_config({"type": "gain", "min_gain": 3})
