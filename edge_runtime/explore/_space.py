"""The design space: policy families × parameter grids, replayed offline, and the Pareto frontier.

Each point is one policy configuration replayed over the cached runs
(:func:`edge_runtime.policies.replay`): accuracy, escalation rate, cloud USD
per 1,000 requests, device joules per request (local decoding, plus for each
escalation the radio energy from the cost model and the device's idle draw while it
waits for the cloud), p50/p95 latency, overall and per
task family. The frontier keeps the points no other point beats on all of
(accuracy ↑, cloud USD ↓, device J ↓, p50 latency ↓).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..policies import replay, threshold_for_rate
from ._data import Measurements

__all__ = ["Point", "policy_grid", "evaluate", "pareto_front", "family_label"]

_THRESHOLDS = tuple(round(x, 2) for x in np.arange(0.05, 1.0, 0.05))
_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_EARLY_BARS = (0.2, 0.3, 0.4, 0.5, 0.6)
_EARLY_MIN_TOKENS = (2, 4, 8)
_PRE_BARS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
_BUDGET_SHARES = (0.1, 0.25, 0.5)
_GAINS = (-0.3, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3)  # budget caps as shares of what always-cloud would spend


@dataclass(frozen=True)
class Point:
    name: str
    family: str
    config: dict[str, Any]
    overall: dict[str, float]
    by_family: dict[str, dict[str, float]] = field(default_factory=dict)

    def metric(self, key: str, task_family: str | None = None) -> float:
        src = self.overall if task_family is None else self.by_family[task_family]
        return float(src[key])


def family_label(config: Mapping[str, Any]) -> str:
    if "chain" in config:
        return "+".join(str(p.get("type")) for p in config["chain"])
    return str(config.get("type"))


def policy_grid(m: Measurements) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, config) for every policy family and parameter setting explored."""
    yield "always-local", {"type": "never"}
    yield "always-cloud", {"type": "always"}
    for p in _THRESHOLDS:
        yield f"threshold(p={p:g})", {"type": "threshold", "p": p}
    for r in _RATES:
        # the threshold that escalates a share r of calibration (dev) traffic, fixed into the config
        t = threshold_for_rate(m.dev_p_correct, r)
        yield f"target_rate(r={r:g})", {"type": "target_rate", "rate": r, "threshold": round(float(t), 6)}
    for bar in _EARLY_BARS:
        for k in _EARLY_MIN_TOKENS:
            for p in (0.2, 0.3, 0.4):
                yield (f"early_exit(min_prob<{bar:g},k={k})+threshold(p={p:g})",
                       {"chain": [{"type": "early_exit", "bar": bar, "min_tokens": k, "signal": "min_prob"},
                                  {"type": "threshold", "p": p}]})
    for g in _GAINS:
        yield f"gain(min={g:g})", {"type": "gain", "min_gain": g}
        yield (f"early_exit(min_prob<0.2,k=4)+gain(min={g:g})",
               {"chain": [{"type": "early_exit", "bar": 0.2, "min_tokens": 4, "signal": "min_prob"}, {"type": "gain", "min_gain": g}]})
    for bar in _PRE_BARS:
        yield f"pre_route(bar={bar:g},local)", {"type": "pre_route", "bar": bar, "decide_local": True}
        for p in (0.2, 0.3, 0.4):
            yield f"pre_route(bar={bar:g})+threshold(p={p:g})", {"chain": [{"type": "pre_route", "bar": bar},
                                                                         {"type": "threshold", "p": p}]}
    full_spend = float(m.records.cloud_usd.sum())
    if full_spend > 0:
        for share in _BUDGET_SHARES:
            cap = round(full_spend * share, 8)
            for p in (0.3, 0.5):
                yield (f"budget({share:.0%} of always-cloud)+threshold(p={p:g})",
                       {"chain": [{"type": "budget", "usd": cap, "period_s": 10 ** 9}, {"type": "threshold", "p": p}]})


def _summary(result: Any, net_j: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    s = result.summary(mask)
    m = np.ones(result.n, bool) if mask is None else mask
    escalation_j = np.where(result.escalated[m], net_j[m], 0.0)  # the radio's and the wait's: always estimates
    device_j = result.local_joules[m] + escalation_j
    return {
        "n": s["n"],
        "accuracy": s["accuracy"],
        "escalation_rate": s["escalation_rate"],
        "cloud_usd_per_1k": s["cloud_usd_per_1k"],
        "device_j_per_request": float(device_j.mean()),
        "estimated_j_per_request": float(escalation_j.mean()),
        "local_j_per_request": s["local_joules_per_request"],
        "latency_p50_ms": s["latency_p50_ms"],
        "latency_p95_ms": s["latency_p95_ms"],
        "early_exit_rate": s["early_exit_rate"],
        "pre_decode_escalation_rate": s["pre_decode_escalation_rate"],
        "forced_local_rate": s["forced_local_rate"],
    }


def evaluate(m: Measurements) -> list[Point]:
    """Replay every grid point; metrics overall and per task family."""
    families = m.families
    masks = {f: families == f for f in sorted(set(families.tolist()))}
    points = []
    for name, config in policy_grid(m):
        result = replay(config, m.records)
        points.append(Point(
            name=name, family=family_label(config), config=config, overall=_summary(result, m.network_j),
            by_family={f: _summary(result, m.network_j, mask) for f, mask in masks.items()},
        ))
    return points


def pareto_front(points: list[Point], task_family: str | None = None) -> list[Point]:
    """Points not dominated on (accuracy ↑, cloud USD ↓, device J ↓, p50 latency ↓); of points with identical
    metrics (e.g. a pre-route bar above every score, which is always-cloud) only the first listed is kept."""
    def vec(p: Point) -> np.ndarray:
        # compared at the 6 significant digits points.csv and frontier.csv show: two policies that differ in the
        # 9th digit of their joules (float noise of the replay) are the same point there, and must be here
        v = np.array([-p.metric("accuracy", task_family), p.metric("cloud_usd_per_1k", task_family),
                      p.metric("device_j_per_request", task_family), p.metric("latency_p50_ms", task_family)])
        return np.array([float(f"{x:.6g}") for x in v])

    vs = [vec(p) for p in points]
    front = []
    for i, v in enumerate(vs):
        # dominated: another point at least as good everywhere and better somewhere; of identical points keep the first
        dominated = any(((w <= v).all() and (w < v).any()) or (j < i and (w == v).all()) for j, w in enumerate(vs) if j != i)
        if not dominated:
            front.append(points[i])
    return front
