"""Offline replay: what a policy would have decided on cached runs, vectorised over items.

The design-space explorer runs every item once on the device and once in the
cloud, caches the results as :class:`ReplayRecords`, then replays thousands of
policy configurations with :func:`replay` (a threshold, early-exit or
pre-route policy costs well under a millisecond per thousand items). The
decisions are the ones a live runtime gets from the same policy, item by item
in record order (the tests check this), under these assumptions:

- a budget sees escalations in record order; each is admitted against its
  reservation (``reserve_usd`` before or during decoding, ``reserve_after_usd``
  after it, as the live runtime reserves; ``cloud_usd`` when not given) and
  then costs exactly ``cloud_usd``; without ``timestamps_s`` all records fall
  in one budget period;
- a pre-route policy uses the cached ``pre_route_p`` whatever scorer it names;
- energy and latency of a partial (early-exited) decode are the prefill part
  plus the decode part scaled by the share of tokens decoded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._base import Policy, Reason
from ._budget import Budget, budget_exhausted
from ._early_exit import _running_matrix
from ._registry import policy_from_config

__all__ = ["ReplayRecords", "ReplayResult", "replay", "ROUTES", "STAGES"]

ROUTES = ("local", "cloud", "local_forced")  # ReplayResult.route codes 0, 1, 2
STAGES = ("before", "during", "after")  # ReplayResult.stage codes 0, 1, 2

_RAGGED = ("token_logprobs", "token_margins", "trajectory")
_FLOAT_DEFAULT_ZERO = ("cloud_usd", "local_joules", "local_prefill_joules", "local_ms", "local_prefill_ms", "cloud_ms")


class ReplayRecords:
    """Per-item cached runs, as arrays (one entry per item, in arrival order).

    Required: ``p_correct``, ``local_correct``, ``cloud_correct``. Optional (zero
    or absent when not given): ``cloud_usd`` (cost of escalating the item),
    ``local_joules`` / ``local_ms`` (the full local answer, prefill included),
    ``local_prefill_joules`` / ``local_prefill_ms``, ``cloud_ms`` (network and
    cloud), ``n_tokens`` (local tokens generated), per-token ``token_logprobs``
    and ``token_margins`` (ragged lists of arrays), ``trajectory`` (a running
    confidence per token computed elsewhere), ``pre_route_p`` (NaN where
    unknown), ``p_cloud`` (prompt-only estimate of the cloud's p_correct, for
    gain policies; NaN where unknown), ``texts`` (each item's message texts, for privacy),
    ``timestamps_s`` (for budget periods) and ``reserve_usd`` / ``reserve_after_usd`` (what
    a live budget reserves for escalating the item before decoding, and after it with the
    local answer as the draft; ``cloud_usd`` when not given).
    """

    def __init__(
        self,
        *,
        p_correct: Any,
        local_correct: Any,
        cloud_correct: Any,
        cloud_usd: Any = None,
        local_joules: Any = None,
        local_prefill_joules: Any = None,
        local_ms: Any = None,
        local_prefill_ms: Any = None,
        cloud_ms: Any = None,
        n_tokens: Any = None,
        token_logprobs: Sequence[Sequence[float]] | None = None,
        token_margins: Sequence[Sequence[float]] | None = None,
        trajectory: Sequence[Sequence[float]] | None = None,
        pre_route_p: Any = None,
        p_cloud: Any = None,
        texts: Sequence[str | Sequence[str]] | None = None,
        timestamps_s: Any = None,
        reserve_usd: Any = None,
        reserve_after_usd: Any = None,
    ) -> None:
        self.p_correct = np.asarray(p_correct, dtype=float)
        self.n = len(self.p_correct)
        if self.p_correct.ndim != 1 or np.isnan(self.p_correct).any():
            raise ValueError("p_correct must be a 1-D array without NaN")
        self.local_correct = self._bools(local_correct, "local_correct")
        self.cloud_correct = self._bools(cloud_correct, "cloud_correct")
        given = locals()
        for name in _FLOAT_DEFAULT_ZERO:
            value = given[name]
            setattr(self, name, np.zeros(self.n) if value is None else self._floats(value, name))
        self.token_logprobs = self._ragged(token_logprobs, "token_logprobs")
        self.token_margins = self._ragged(token_margins, "token_margins")
        self.trajectory = self._ragged(trajectory, "trajectory")
        if n_tokens is not None:
            self.n_tokens = np.asarray(n_tokens, dtype=np.int64)
            self._check_len(self.n_tokens, "n_tokens")
        else:
            ragged = self.token_logprobs or self.trajectory or self.token_margins
            self.n_tokens = np.array([len(x) for x in ragged], dtype=np.int64) if ragged else np.ones(self.n, np.int64)
        self.pre_route_p = None if pre_route_p is None else self._floats(pre_route_p, "pre_route_p", nan_ok=True)
        self.p_cloud = None if p_cloud is None else self._floats(p_cloud, "p_cloud", nan_ok=True)
        if texts is not None:
            texts = [[t] if isinstance(t, str) else list(t) for t in texts]
            if len(texts) != self.n:
                raise ValueError(f"texts has {len(texts)} entries, expected {self.n}")
        self.texts = texts
        self.timestamps_s = None if timestamps_s is None else self._floats(timestamps_s, "timestamps_s")
        self.reserve_usd = self.cloud_usd if reserve_usd is None else self._floats(reserve_usd, "reserve_usd")
        self.reserve_after_usd = (self.reserve_usd if reserve_after_usd is None
                                  else self._floats(reserve_after_usd, "reserve_after_usd"))
        self._cache: dict[Hashable, Any] = {}

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> ReplayRecords:
        """From one mapping per item with the same keys as the constructor (``texts`` may be given
        as ``prompt`` or ``messages``)."""
        rows = list(rows)
        columns: dict[str, list[Any]] = {}
        for r in rows:
            if "texts" not in r and ("prompt" in r or "messages" in r):
                r = dict(r)
                r["texts"] = [r["prompt"]] if "prompt" in r else [str(m.get("content", "")) for m in r["messages"]]
            for k, v in r.items():
                if k in ("prompt", "messages"):
                    continue
                columns.setdefault(k, []).append(v)
        for k, v in columns.items():
            if len(v) != len(rows):
                raise ValueError(f"{k!r} is missing in {len(rows) - len(v)} of {len(rows)} rows")
        return cls(**columns)

    # ---- validation helpers -------------------------------------------------------------------

    def _check_len(self, a: Any, name: str) -> None:
        if len(a) != self.n:
            raise ValueError(f"{name} has {len(a)} entries, expected {self.n}")

    def _bools(self, x: Any, name: str) -> np.ndarray:
        a = np.asarray(x)
        self._check_len(a, name)
        return a.astype(bool)

    def _floats(self, x: Any, name: str, nan_ok: bool = False) -> np.ndarray:
        a = np.asarray(x, dtype=float)
        self._check_len(a, name)
        if not nan_ok and np.isnan(a).any():
            raise ValueError(f"{name} contains NaN")
        return a

    def _ragged(self, x: Sequence[Sequence[float]] | None, name: str) -> list[np.ndarray] | None:
        if x is None:
            return None
        self._check_len(x, name)
        return [np.asarray(v, dtype=float) for v in x]

    # ---- what policies read ---------------------------------------------------------------------

    def require(self, name: str, why: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{why}: ReplayRecords.{name} is missing")
        return value

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """Memoise a per-records computation (privacy scans, running signals)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def padded(self, name: str) -> np.ndarray:
        """A ragged per-token field as an items x tokens matrix, NaN after each item's last token."""

        def build() -> np.ndarray:
            rows = self.require(name, f"replaying needs per-token {name}")
            width = max((len(r) for r in rows), default=0)
            m = np.full((self.n, width), np.nan)
            for i, r in enumerate(rows):
                m[i, : len(r)] = r
            return m

        return self.cached(("padded", name), build)

    def running(self, signal: str) -> np.ndarray:
        """Running confidence per item and token for an early-exit signal."""
        if signal == "trajectory":
            return self.padded("trajectory")
        return self.cached(
            ("running", signal),
            lambda: _running_matrix(
                self.padded("token_logprobs") if signal != "min_margin" else None,
                self.padded("token_margins") if signal == "min_margin" else None,
                signal,
            ),
        )


@dataclass(frozen=True)
class ReplayResult:
    """Per-item outcome of a replay. ``route``: index into :data:`ROUTES`; ``stage``: into :data:`STAGES`."""

    route: np.ndarray
    stage: np.ndarray
    reason: np.ndarray
    local_tokens: np.ndarray
    correct: np.ndarray
    cloud_usd: np.ndarray
    local_joules: np.ndarray
    latency_ms: np.ndarray
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.route)

    @property
    def escalated(self) -> np.ndarray:
        return self.route == 1

    def routes(self) -> list[str]:
        return [ROUTES[r] for r in self.route]

    def summary(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Totals over all items (or those in ``mask``, e.g. one task family)."""
        m = np.ones(self.n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        k = int(m.sum())
        if k == 0:
            return {"n": 0}
        esc = self.escalated[m]
        lat = self.latency_ms[m]
        return {
            "n": k,
            "accuracy": float(self.correct[m].mean()),
            "escalation_rate": float(esc.mean()),
            "forced_local_rate": float((self.route[m] == 2).mean()),
            "early_exit_rate": float((esc & (self.stage[m] == 1)).mean()),
            "pre_decode_escalation_rate": float((esc & (self.stage[m] == 0)).mean()),
            "cloud_usd_total": float(self.cloud_usd[m].sum()),
            "cloud_usd_per_1k": float(self.cloud_usd[m].mean() * 1000.0),
            "local_joules_per_request": float(self.local_joules[m].mean()),
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)),
            "reasons": dict(Counter(self.reason[m].tolist())),
        }


_CONTINUE, _LOCAL, _CLOUD, _FORCED = 0, 1, 2, 3


def _set(target: np.ndarray, mask: np.ndarray, values: Any) -> None:
    target[mask] = values[mask] if isinstance(values, np.ndarray) else values


def _take_definite(answer: tuple[np.ndarray, Any] | None, act: np.ndarray, reason: np.ndarray, undecided: np.ndarray) -> None:
    """Record one chain part's definite answers (codes, reasons) for the items still undecided; updates ``undecided`` in place."""
    if answer is None:
        return
    codes, reasons = answer
    hit = undecided & (codes != _CONTINUE)
    act[hit] = codes[hit]
    _set(reason, hit, reasons)
    undecided &= ~hit


def replay(policy: Policy | Mapping[str, Any] | str, records: ReplayRecords) -> ReplayResult:
    """Decisions, correctness, spend, energy and latency of ``policy`` over cached runs.

    ``policy`` may be a :class:`~edge_runtime.policies.Policy` or its config.
    """
    policy = policy_from_config(policy)
    parts = policy.parts()
    R = records
    n = R.n
    act = np.zeros(n, dtype=np.int8)
    stage = np.zeros(n, dtype=np.int8)
    reason = np.full(n, "", dtype=object)
    undecided = np.ones(n, dtype=bool)
    budget_reached: dict[int, np.ndarray] = {}

    # 1. before decoding: first definite answer in chain order
    for p in parts:
        if isinstance(p, Budget):
            # its check depends on earlier spend: done in the sequential pass, for the items that reach it
            budget_reached[id(p)] = undecided.copy()
            continue
        _take_definite(p._replay_before(R), act, reason, undecided)

    # 2. during decoding: the earliest stop wins (the first part in order on a tie)
    stop = np.full(n, -1, dtype=np.int64)
    for p in parts:
        idx = p._replay_during(R)
        if idx is None:
            continue
        take = undecided & (idx >= 0) & ((stop < 0) | (idx < stop))
        stop[take] = idx[take]
    stopped = undecided & (stop >= 0)
    act[stopped] = _CLOUD
    stage[stopped] = 1
    reason[stopped] = Reason.EARLY_EXIT
    undecided &= ~stopped

    # 3. after decoding, given p_correct
    stage[undecided] = 2
    for p in parts:
        _take_definite(p._replay_after(R), act, reason, undecided)
    act[undecided] = _LOCAL
    reason[undecided] = Reason.DEFAULT_LOCAL

    # 4. gates on every escalation, in chain order
    gates = [p for p in parts if p.is_gate]
    budgets = [p for p in gates if isinstance(p, Budget)]
    vetoes = {id(p): p._replay_veto(R) for p in gates if not isinstance(p, Budget)}
    if not budgets:
        for p in gates:
            mask, reasons = vetoes[id(p)]
            vetoed = (act == _CLOUD) & mask
            act[vetoed] = _FORCED
            _set(reason, vetoed, reasons)
    else:
        _budget_pass(R, gates, budgets, budget_reached, vetoes, act, stage, reason)

    # 5. consequences
    cloud = act == _CLOUD
    n_tok = R.n_tokens
    local_tokens = np.where(cloud & (stage == 0), 0, np.where(cloud & (stage == 1), stop + 1, n_tok))
    frac = np.divide(local_tokens, n_tok, out=np.zeros(n), where=n_tok > 0)
    decoded = ~(cloud & (stage == 0))  # a pre-decode escalation spends nothing locally
    local_j = np.where(decoded, R.local_prefill_joules + (R.local_joules - R.local_prefill_joules) * frac, 0.0)
    local_ms = np.where(decoded, R.local_prefill_ms + (R.local_ms - R.local_prefill_ms) * frac, 0.0)
    route = np.select([act == _LOCAL, act == _CLOUD], [0, 1], 2).astype(np.int8)
    return ReplayResult(
        route=route,
        stage=stage,
        reason=reason,
        local_tokens=local_tokens,
        correct=np.where(cloud, R.cloud_correct, R.local_correct),
        cloud_usd=np.where(cloud, R.cloud_usd, 0.0),
        local_joules=local_j,
        latency_ms=local_ms + np.where(cloud, R.cloud_ms, 0.0),
        policy=policy.to_config(),
    )


def _budget_pass(R: ReplayRecords, gates: list[Policy], budgets: list[Budget], reached: dict[int, np.ndarray],
                 vetoes: dict[int, Any], act: np.ndarray, stage: np.ndarray, reason: np.ndarray) -> None:
    """Budgets depend on what earlier items spent: walk the items in order."""
    cost = R.cloud_usd.tolist()
    reserve, reserve_after = R.reserve_usd.tolist(), R.reserve_after_usd.tolist()
    periods = {id(b): b._replay_periods(R).tolist() for b in budgets}
    reached_l = {id(b): reached[id(b)].tolist() for b in budgets}
    spent = {id(b): 0.0 for b in budgets}
    current = {id(b): None for b in budgets}
    order = [(p, isinstance(p, Budget)) for p in gates]
    veto_l = {k: (m.tolist(), r if isinstance(r, str) else r.tolist()) for k, (m, r) in vetoes.items()}
    acts = act.tolist()
    for i in range(R.n):
        for b in budgets:
            key = id(b)
            if periods[key][i] != current[key]:
                current[key], spent[key] = periods[key][i], 0.0
        c = cost[i]
        forced_before = False
        for b in budgets:  # the live check before decoding reserves for the prompt alone
            if reached_l[id(b)][i] and budget_exhausted(spent[id(b)], reserve[i], b.usd):
                act[i], stage[i], reason[i] = _FORCED, 0, Reason.BUDGET_EXHAUSTED
                forced_before = True
                break
        if forced_before or acts[i] != _CLOUD:
            continue
        vetoed = False
        # admitted after decoding, the escalation sends the local answer along: its reservation counts the draft
        r = reserve_after[i] if stage[i] == 2 else reserve[i]
        for p, is_budget in order:
            if is_budget:
                if budget_exhausted(spent[id(p)], r, p.usd):  # type: ignore[attr-defined]
                    act[i], reason[i], vetoed = _FORCED, Reason.BUDGET_EXHAUSTED, True
                    break
            else:
                mask, reasons = veto_l[id(p)]
                if mask[i]:
                    act[i], reason[i], vetoed = _FORCED, reasons if isinstance(reasons, str) else reasons[i], True
                    break
        if not vetoed:
            for b in budgets:
                spent[id(b)] += c
