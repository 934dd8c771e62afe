"""Expected-gain routing: escalate when the cloud is expected to be right more often than the device.

``p_correct`` says how likely the local answer is right; it says nothing about
whether the cloud would do better. On a question both models fail, escalating
costs money and gains nothing. With a prompt-only estimate of the cloud's
chance (``p_cloud``, which a calibrated estimator fitted with cloud labels
provides: see ``edge-runtime calibrate --cloud-bundle``), this policy escalates
when ``p_cloud - p_correct >= min_gain``. The runtime puts ``p_cloud`` in
``RequestContext.features``; without it the policy has no opinion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._base import Decision, Policy, RequestContext, check_keys, number
from ._registry import register_policy

__all__ = ["Gain", "GAIN_ABOVE", "GAIN_BELOW"]

GAIN_ABOVE = "expected_gain_at_or_above_min"
GAIN_BELOW = "expected_gain_below_min"


@register_policy
class Gain(Policy):
    """Escalate when ``p_cloud - p_correct >= min_gain`` (``p_cloud`` from ``ctx.features``)."""

    type_name = "gain"

    def __init__(self, min_gain: float = 0.0) -> None:
        if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not -1.0 <= min_gain <= 1.0:
            raise ConfigError(f"must be in [-1, 1], got {min_gain!r}", field="policy.min_gain")
        self.min_gain = float(min_gain)

    def _params(self) -> dict[str, Any]:
        return {"min_gain": self.min_gain}

    def _describe(self) -> str:
        return f"gain(min={self.min_gain:g})"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Gain:
        check_keys(cfg, ("min_gain",), where)
        return cls(number(cfg, "min_gain", where, lo=-1.0, hi=1.0, default=0.0))

    def _after(self, ctx: RequestContext, p_correct: float) -> Decision | None:
        p_cloud = ctx.features.get("p_cloud")
        if p_cloud is None or not math.isfinite(float(p_cloud)) or not math.isfinite(p_correct):
            return None  # no opinion: the next part of a chain decides
        gain = float(p_cloud) - p_correct
        if gain >= self.min_gain:
            return Decision("cloud", GAIN_ABOVE, f"expected gain {gain:+.3f} (cloud {p_cloud:.3f} vs local {p_correct:.3f}) "
                            f">= {self.min_gain:g}: escalating", policy=self.type_name, value=p_correct, threshold=self.min_gain)
        return Decision("local", GAIN_BELOW, f"expected gain {gain:+.3f} (cloud {p_cloud:.3f} vs local {p_correct:.3f}) "
                        f"< {self.min_gain:g}: answered locally", policy=self.type_name, value=p_correct, threshold=self.min_gain)

    def _replay_after(self, records: Any) -> tuple[np.ndarray, np.ndarray]:
        p_cloud = records.require("p_cloud", "replaying a gain policy")
        gain = p_cloud - records.p_correct
        known = ~np.isnan(gain)
        up = known & (gain >= self.min_gain)
        codes = np.where(~known, 0, np.where(up, 2, 1)).astype(np.int8)
        reasons = np.where(up, GAIN_ABOVE, GAIN_BELOW).astype(object)
        return codes, reasons
