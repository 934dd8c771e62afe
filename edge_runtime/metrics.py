"""Metrics for a confidence score and the escalation it drives (numpy only).

Used by ``edge-runtime eval`` and by the design-space explorer. Conventions:

- ``labels`` / ``local_correct`` / ``cloud_correct`` are per-item booleans (0/1).
- A *confidence* is the local model's ``p_correct``: higher means "keep it local".
  Escalation sends the lowest-confidence items to the cloud first.
- Rates and shares are fractions in [0, 1], not percentages.
- Undefined values (one class only, no gap between local and cloud) are ``nan``,
  never an exception, so per-family tables can be filled blindly; no items at all is a
  ``ValueError`` for the routing curves (there is no curve to draw).

Routing metrics follow RouteLLM (Ong et al., 2024, "RouteLLM: Learning to Route
LLMs with Preference Data"): with ``acc(r)`` the accuracy when a fraction ``r``
of items goes to the cloud,

- PGR(r)  = (acc(r) - acc_local) / (acc_cloud - acc_local)   (performance gap recovered)
- APGR    = integral of PGR(r) dr over r in [0, 1]  (their ``evaluate.py`` takes the
  trapezoid area under the accuracy curve and normalises it by the areas of
  always-weak and always-strong; the two are the same number)
- CPT(x)  = the smallest escalation rate at which PGR reaches x.

Two deliberate differences from RouteLLM's script: the curve here is exact (one
point per item, ties in the confidence averaged, see :func:`escalation_curve`)
instead of sampled at ~10 thresholds, and CPT takes the *first* crossing of the
curve, where ``np.interp`` over a non-monotonic accuracy column is undefined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "auroc",
    "expected_calibration_error",
    "reliability_table",
    "ReliabilityBin",
    "EscalationCurve",
    "escalation_curve",
    "random_curve",
    "oracle_curve",
    "apgr",
    "cpt",
    "RoutingMetrics",
    "routing_metrics",
]


def _as_float(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def _as_bool(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0/1 or booleans")
        a = a.astype(bool)
    return a


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("arrays differ in length: " + ", ".join(f"{k}={n}" for k, n in lengths.items()))
    return next(iter(lengths.values()))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (True = positive).

    Equals P(score of a random positive > score of a random negative), a tie
    counting one half (the Mann-Whitney U statistic). ``nan`` with one class only.
    """
    s = _as_float(scores, "scores")
    y = _as_bool(labels, "labels")
    _same_length(scores=s, labels=y)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: predictions in ``[lo, hi)`` (the last bin includes ``hi``)."""

    lo: float
    hi: float
    count: int
    mean_confidence: float  # nan when empty
    accuracy: float  # nan when empty

    @property
    def gap(self) -> float:
        return abs(self.accuracy - self.mean_confidence) if self.count else 0.0


def _bin_edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)) if len(p) else np.linspace(0.0, 1.0, n_bins + 1)
        edges[0], edges[-1] = 0.0, 1.0
        return np.maximum.accumulate(edges)
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def reliability_table(
    p_correct: ArrayLike, labels: ArrayLike, *, n_bins: int = 10, strategy: Literal["uniform", "quantile"] = "uniform"
) -> list[ReliabilityBin]:
    """Bin predictions and compare mean predicted probability with observed accuracy per bin.

    ``uniform``: equal-width bins over [0, 1]; ``quantile``: equal-count bins.
    """
    p = _as_float(p_correct, "p_correct")
    y = _as_bool(labels, "labels")
    _same_length(p_correct=p, labels=y)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p_correct must lie in [0, 1]")
    edges = _bin_edges(p, n_bins, strategy)
    # bin i holds edges[i] <= p < edges[i+1]; p == 1.0 goes to the last bin
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    out = []
    for i in range(n_bins):
        c = int(counts[i])
        out.append(
            ReliabilityBin(
                lo=float(edges[i]),
                hi=float(edges[i + 1]),
                count=c,
                mean_confidence=float(sum_p[i] / c) if c else float("nan"),
                accuracy=float(sum_y[i] / c) if c else float("nan"),
            )
        )
    return out


def expected_calibration_error(
    p_correct: ArrayLike, labels: ArrayLike, *, n_bins: int = 10, strategy: Literal["uniform", "quantile"] = "uniform"
) -> float:
    """ECE = sum over bins of (bin count / N) * |accuracy - mean confidence|; ``nan`` when empty."""
    table = reliability_table(p_correct, labels, n_bins=n_bins, strategy=strategy)
    total = sum(b.count for b in table)
    if total == 0:
        return float("nan")
    return float(sum(b.count * b.gap for b in table) / total)


@dataclass(frozen=True)
class EscalationCurve:
    """Accuracy as a function of the escalation rate.

    ``rates[k] = k / n`` and ``accuracy[k]`` is the (expected) accuracy when the
    ``k`` lowest-confidence items are answered by the cloud. The curve is
    piecewise linear between points.
    """

    rates: np.ndarray
    accuracy: np.ndarray
    local_accuracy: float
    cloud_accuracy: float

    @property
    def n(self) -> int:
        return len(self.rates) - 1

    def accuracy_at(self, rate: float) -> float:
        """Accuracy at an escalation rate in [0, 1] (linear between items)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        return float(np.interp(rate, self.rates, self.accuracy))

    def auc(self) -> float:
        """Trapezoid area under accuracy over rate in [0, 1]."""
        if not self.n:
            return float(self.accuracy[0])
        # written out: np.trapz is deprecated in numpy 2 and np.trapezoid missing in numpy 1
        return float(np.sum((self.accuracy[1:] + self.accuracy[:-1]) * np.diff(self.rates)) / 2.0)


def _check_pair(local_correct: ArrayLike, cloud_correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    lc = _as_bool(local_correct, "local_correct")
    cc = _as_bool(cloud_correct, "cloud_correct")
    n = _same_length(local_correct=lc, cloud_correct=cc)
    if n == 0:
        raise ValueError("no items")
    return lc, cc


def _curve(cum_gain: np.ndarray, lc: np.ndarray, cc: np.ndarray) -> EscalationCurve:
    n = len(lc)
    base = lc.sum()
    return EscalationCurve(
        rates=np.arange(n + 1) / n,
        accuracy=(base + cum_gain) / n,
        local_accuracy=float(lc.mean()),
        cloud_accuracy=float(cc.mean()),
    )


def escalation_curve(confidence: ArrayLike, local_correct: ArrayLike, cloud_correct: ArrayLike) -> EscalationCurve:
    """Accuracy vs escalation rate when escalating the lowest ``confidence`` first.

    Items with equal confidence cannot be ordered by the score, so within a tie
    group the curve is the expectation over a random order: linear between the
    group's end points. The result therefore does not depend on item order.
    """
    c = _as_float(confidence, "confidence")
    lc, cc = _check_pair(local_correct, cloud_correct)
    n = _same_length(confidence=c, local_correct=lc)
    order = np.argsort(c, kind="mergesort")
    cs = c[order]
    gain = (cc.astype(int) - lc.astype(int))[order]
    cum = np.r_[0.0, np.cumsum(gain)]
    # indices k (0..n) that fall on a tie-group boundary keep their exact value;
    # the others are interpolated linearly inside their group
    boundaries = np.r_[0, np.flatnonzero(cs[1:] != cs[:-1]) + 1, n]
    cum = np.interp(np.arange(n + 1), boundaries, cum[boundaries])
    return _curve(cum, lc, cc)


def random_curve(local_correct: ArrayLike, cloud_correct: ArrayLike) -> EscalationCurve:
    """Expected accuracy of routing a random fraction of items: the straight line local -> cloud."""
    lc, cc = _check_pair(local_correct, cloud_correct)
    n = len(lc)
    total_gain = float(cc.sum()) - float(lc.sum())
    return _curve(total_gain * np.arange(n + 1) / n, lc, cc)


def oracle_curve(local_correct: ArrayLike, cloud_correct: ArrayLike) -> EscalationCurve:
    """Best achievable accuracy at each rate: escalate items only the cloud gets right first,
    then those where it makes no difference, and items only the local model gets right last."""
    lc, cc = _check_pair(local_correct, cloud_correct)
    gain = cc.astype(int) - lc.astype(int)
    # sorting by -gain puts +1 first, then 0, then -1; no ties matter (equal gains)
    cum = np.r_[0.0, np.cumsum(np.sort(gain)[::-1])]
    return _curve(cum, lc, cc)


def apgr(curve: EscalationCurve) -> float:
    """Average performance gap recovered: (AUC - acc_local) / (acc_cloud - acc_local).

    Random routing scores 0.5, a perfect router more (it can exceed 1 when the
    local model is right on items the cloud gets wrong). ``nan`` when the cloud
    is not more accurate than the local model: with a negative gap the ratio
    flips, and the worst router would score best (as ``cpt``, no gap to recover).
    """
    gap = curve.cloud_accuracy - curve.local_accuracy
    if gap <= 0:
        return float("nan")
    return (curve.auc() - curve.local_accuracy) / gap


def cpt(curve: EscalationCurve, share: float) -> float:
    """Call-performance threshold: smallest escalation rate recovering ``share`` of the gap.

    ``share`` is a fraction (0.5 for CPT(50%)). ``nan`` when the cloud is not more
    accurate than the local model (there is no gap to recover).
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    gap = curve.cloud_accuracy - curve.local_accuracy
    if gap <= 0:
        return float("nan")
    target = curve.local_accuracy + share * gap
    acc = curve.accuracy
    # float tolerance: a point meant to sit exactly on the target must count as reaching it
    reached = acc >= target - 1e-12
    k = int(np.argmax(reached))  # always found: acc[-1] == cloud accuracy >= target
    if k == 0:
        return 0.0
    a0, a1 = acc[k - 1], acc[k]
    r0, r1 = curve.rates[k - 1], curve.rates[k]
    return float(r0 + (target - a0) / (a1 - a0) * (r1 - r0))


@dataclass(frozen=True)
class RoutingMetrics:
    """Routing quality of one confidence score, with the random and oracle references."""

    n: int
    local_accuracy: float
    cloud_accuracy: float
    auroc: float  # of the confidence for predicting local correctness
    apgr: float
    cpt: dict[float, float]  # share -> escalation rate
    random_apgr: float
    random_cpt: dict[float, float]
    oracle_apgr: float
    oracle_cpt: dict[float, float]
    ece: float | None = None  # only when the confidence is a probability
    curve: EscalationCurve | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        def num(x: float | None) -> float | None:
            return None if x is None or np.isnan(x) else round(float(x), 6)

        def shares(d: dict[float, float]) -> dict[str, float | None]:
            return {f"{round(s * 100):g}%": num(v) for s, v in d.items()}

        return {
            "n": self.n,
            "local_accuracy": num(self.local_accuracy),
            "cloud_accuracy": num(self.cloud_accuracy),
            "auroc": num(self.auroc),
            "ece": num(self.ece),
            "apgr": num(self.apgr),
            "cpt": shares(self.cpt),
            "random": {"apgr": num(self.random_apgr), "cpt": shares(self.random_cpt)},
            "oracle": {"apgr": num(self.oracle_apgr), "cpt": shares(self.oracle_cpt)},
        }


def routing_metrics(
    confidence: ArrayLike,
    local_correct: ArrayLike,
    cloud_correct: ArrayLike,
    *,
    shares: Sequence[float] = (0.5, 0.8),
    n_bins: int = 10,
) -> RoutingMetrics:
    """Everything ``edge-runtime eval`` prints for one confidence score.

    ECE is reported when every confidence lies in [0, 1] (a probability);
    otherwise (a raw logprob, say) it is ``None``.
    """
    c = _as_float(confidence, "confidence")
    lc, cc = _check_pair(local_correct, cloud_correct)
    _same_length(confidence=c, local_correct=lc)
    curve = escalation_curve(c, lc, cc)
    rnd = random_curve(lc, cc)
    orc = oracle_curve(lc, cc)
    is_prob = bool(((c >= 0) & (c <= 1)).all())
    return RoutingMetrics(
        n=len(c),
        local_accuracy=curve.local_accuracy,
        cloud_accuracy=curve.cloud_accuracy,
        auroc=auroc(c, lc),
        apgr=apgr(curve),
        cpt={s: cpt(curve, s) for s in shares},
        random_apgr=apgr(rnd),
        random_cpt={s: cpt(rnd, s) for s in shares},
        oracle_apgr=apgr(orc),
        oracle_cpt={s: cpt(orc, s) for s in shares},
        ece=expected_calibration_error(c, lc, n_bins=n_bins) if is_prob else None,
        curve=curve,
    )
