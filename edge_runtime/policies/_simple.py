"""The plain deciders: never, always, a fixed p_correct threshold, and a threshold set by a target rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._base import Decision, Policy, Reason, RequestContext, check_keys, number
from ._registry import register_policy

__all__ = ["Never", "Always", "Threshold", "TargetRate"]


@register_policy
class Never(Policy):
    """Answer every request on the device."""

    type_name = "never"

    def _before(self, ctx: RequestContext) -> Decision:
        return Decision("local", Reason.NEVER, "policy 'never': always answered on the device", policy=self.type_name)

    def _after(self, ctx: RequestContext, p_correct: float) -> Decision:
        return Decision("local", Reason.NEVER, "policy 'never': always answered on the device", policy=self.type_name,
                        value=p_correct)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Never:
        check_keys(cfg, (), where)
        return cls()

    def _replay_before(self, records: Any) -> tuple[np.ndarray, str]:
        return np.ones(records.n, dtype=np.int8), Reason.NEVER


@register_policy
class Always(Policy):
    """Send every request to the cloud without decoding locally (gates may still keep it local)."""

    type_name = "always"

    def _before(self, ctx: RequestContext) -> Decision:
        return Decision("cloud", Reason.ALWAYS, "policy 'always': every request goes to the cloud",
                        policy=self.type_name)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Always:
        check_keys(cfg, (), where)
        return cls()

    def _replay_before(self, records: Any) -> tuple[np.ndarray, str]:
        return np.full(records.n, 2, dtype=np.int8), Reason.ALWAYS


def _check_p(p: Any, field: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
        raise ConfigError(f"must be a probability in [0, 1], got {p!r}", field=field)
    return float(p)


class _ThresholdBase(Policy):
    threshold: float

    def _after(self, ctx: RequestContext, p_correct: float) -> Decision | None:
        t = self.threshold
        if not math.isfinite(p_correct):  # no estimate: no opinion (NaN compares false, and read as "at or above")
            return None
        if p_correct < t:
            return Decision("cloud", Reason.BELOW_THRESHOLD,
                            f"p_correct {p_correct:.3f} < {t:.3f}: escalating to the cloud",
                            policy=self.type_name, value=p_correct, threshold=t)
        return Decision("local", Reason.AT_OR_ABOVE_THRESHOLD,
                        f"p_correct {p_correct:.3f} >= {t:.3f}: answered locally",
                        policy=self.type_name, value=p_correct, threshold=t)

    def _replay_after(self, records: Any) -> tuple[np.ndarray, np.ndarray]:
        below = records.p_correct < self.threshold
        codes = np.where(below, 2, 1).astype(np.int8)
        reasons = np.where(below, Reason.BELOW_THRESHOLD, Reason.AT_OR_ABOVE_THRESHOLD).astype(object)
        return codes, reasons


@register_policy
class Threshold(_ThresholdBase):
    """Escalate when ``p_correct < p``."""

    type_name = "threshold"

    def __init__(self, p: float) -> None:
        self.threshold = _check_p(p, "policy.p")

    @property
    def p(self) -> float:
        return self.threshold

    def _params(self) -> dict[str, Any]:
        return {"p": self.threshold}

    def _describe(self) -> str:
        return f"threshold(p={self.threshold:g})"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Threshold:
        check_keys(cfg, ("p",), where)
        return cls(number(cfg, "p", where, lo=0.0, hi=1.0))


def threshold_for_rate(calibration: Sequence[float] | np.ndarray, rate: float) -> float:
    """The threshold that escalates (``p < threshold``) a fraction ``rate`` of ``calibration``.

    It sits halfway between the k-th and (k+1)-th smallest value (k = round(rate * n)),
    so traffic like the calibration set escalates about ``rate``; with ties at the
    cut, fewer items escalate (a tie cannot be split by a threshold).
    """
    v = np.sort(np.asarray(calibration, dtype=float))
    n = len(v)
    k = int(round(rate * n))
    if k <= 0:
        return 0.0
    if k >= n:
        return float(np.nextafter(1.0, 2.0))  # above any probability: escalate everything
    return float((v[k - 1] + v[k]) / 2.0)


@register_policy
class TargetRate(_ThresholdBase):
    """Escalate a target fraction ``rate`` of traffic: the threshold is the matching quantile of the
    ``p_correct`` values seen on calibration traffic (or given directly, as saved in a config)."""

    type_name = "target_rate"

    def __init__(self, rate: float, calibration: Sequence[float] | np.ndarray | None = None, *,
                 threshold: float | None = None) -> None:
        self.rate = _check_p(rate, "policy.rate")
        if calibration is None and threshold is None:
            raise ConfigError("needs a threshold (`edge-runtime explore` writes one for each rate into its configs) "
                              "or calibration: a list of p_correct values of traffic like yours (the daemon returns "
                              "one per answer in routing.p_correct), whose quantile becomes the threshold",
                              field="policy.threshold")
        if calibration is not None and threshold is not None:
            raise ConfigError("give calibration p_correct values or a threshold, not both", field="policy.calibration")
        if calibration is not None:
            if isinstance(calibration, (list, tuple)) and any(
                    isinstance(v, (bool, str, bytes)) for v in calibration):  # numpy would read True and "0.2" as numbers
                raise ConfigError("must be a list of p_correct values (numbers)", field="policy.calibration")
            try:
                values = np.asarray(calibration, dtype=float)
            except (TypeError, ValueError) as err:  # ["a"], [[0.1, 0.2], 0.3]
                raise ConfigError("must be a list of p_correct values (numbers)", field="policy.calibration") from err
            if values.ndim != 1 or len(values) == 0:
                raise ConfigError("must be a non-empty list of p_correct values", field="policy.calibration")
            if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
                raise ConfigError("p_correct values must lie in [0, 1]", field="policy.calibration")
            self.threshold = threshold_for_rate(values, self.rate)
            self.calibration_size = len(values)
            self.achieved_rate = float(np.mean(values < self.threshold))
        else:
            valid = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
            if not valid or not 0.0 <= threshold <= math.nextafter(1.0, 2.0):
                raise ConfigError(f"must be in [0, 1], got {threshold!r}", field="policy.threshold")
            self.threshold = float(threshold)
            self.calibration_size = 0
            self.achieved_rate = float("nan")

    def _params(self) -> dict[str, Any]:
        return {"rate": self.rate, "threshold": self.threshold}

    def _describe(self) -> str:
        return f"target_rate(r={self.rate:g})"

    def _after(self, ctx: RequestContext, p_correct: float) -> Decision | None:
        d = super()._after(ctx, p_correct)
        if d is None:  # no estimate
            return None
        detail = f"{d.detail} (threshold set to escalate {self.rate:.0%} of calibration traffic)"
        return Decision(d.action, d.reason, detail, policy=d.policy, value=d.value, threshold=d.threshold)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> TargetRate:
        check_keys(cfg, ("rate", "calibration", "threshold"), where)
        rate = number(cfg, "rate", where, lo=0.0, hi=1.0)
        cal = cfg.get("calibration")
        if cal is not None and (isinstance(cal, (str, bytes)) or not isinstance(cal, Sequence)):
            raise ConfigError("must be a list of p_correct values", field=f"{where}.calibration")
        try:
            return cls(rate, cal, threshold=cfg.get("threshold"))
        except ConfigError as err:
            raise ConfigError(str(err).split(": ", 1)[-1],
                              field=(err.field or "").replace("policy", where, 1)) from None
