"""Budget gate: a cap on cloud spend per period; once spent, requests are answered locally and say so.

Thread-safe: an escalation reserves its estimated cost under a lock when it
is admitted, so concurrent requests cannot overshoot the cap together; the
runtime then settles the reservation with the real cost (``Policy.settle``).
Periods are fixed windows aligned to the Unix epoch (a day runs from 00:00
UTC); spend does not survive a restart of the process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._base import Decision, Policy, Reason, RequestContext, check_keys, number
from ._registry import register_policy

__all__ = ["Budget", "budget_exhausted"]

# sums of cents in binary floating point drift (100 x 0.01 != 1.0): forgive that much
_EPS_USD = 1e-9


def budget_exhausted(committed_usd: float, estimate_usd: float, cap_usd: float) -> bool:
    """True when nothing more may be spent: the cap is reached or this request would pass it."""
    return committed_usd >= cap_usd - _EPS_USD or committed_usd + estimate_usd > cap_usd + _EPS_USD

_PERIOD_ALIASES = {"usd_per_hour": 3600.0, "usd_per_day": 86400.0, "usd_per_week": 7 * 86400.0}


def _usd(amount: float) -> str:
    """Dollars for people: cents, or two significant digits below 10 cents (a $0.0001 cap read "$0.00")."""
    decimals = 2 if amount >= 0.1 or amount <= 0 else 1 - math.floor(math.log10(amount))
    return f"{amount:.{decimals}f}"


@register_policy
class Budget(Policy):
    """At most ``usd`` of cloud spend per ``period_s`` seconds (default: a day)."""

    type_name = "budget"
    is_gate = True

    def __init__(self, usd: float, period_s: float = 86400.0, *, clock: Callable[[], float] = time.time) -> None:
        if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not math.isfinite(usd) or usd < 0:
            raise ConfigError(f"must be a non-negative amount, got {usd!r}", field="policy.usd")
        if (isinstance(period_s, bool) or not isinstance(period_s, (int, float)) or not math.isfinite(period_s)
                or period_s <= 0):
            raise ConfigError(f"must be a positive number of seconds, got {period_s!r}", field="policy.period_s")
        self.usd = float(usd)
        self.period_s = float(period_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._period = self._period_index()
        self._spent = 0.0
        self._reserved: dict[str, float] = {}
        self._reserved_in: dict[str, int] = {}  # the period each reservation was made in

    # ---- state (call with the lock held) -------------------------------------------------------

    def _period_index(self) -> int:
        return int(self._clock() // self.period_s)

    def _roll(self) -> None:
        now = self._period_index()
        if now != self._period:
            # escalations still in flight keep their reservations: they settle into the new period. One older than
            # the period before was never settled (an embedder that settled another context): it is let go
            self._period, self._spent = now, 0.0
            stale = [k for k, p in self._reserved_in.items() if p < now - 1]
            for k in stale:
                self._reserved.pop(k, None)
                self._reserved_in.pop(k, None)

    def _committed(self) -> float:
        return self._spent + sum(self._reserved.values())

    def _exhausted(self, estimate: float) -> bool:
        return budget_exhausted(self._committed(), estimate, self.usd)

    def _veto(self, estimate: float) -> Decision:
        if math.isinf(estimate):  # the runtime cannot bound what the escalation would cost
            return Decision("local_forced", Reason.BUDGET_PRICES_UNKNOWN,
                            "the bridge's prices could not be read yet, so what an escalation would cost is unknown: "
                            "answered on the device until they are", policy=self.type_name, value=self._committed(),
                            threshold=self.usd)
        resets = datetime.fromtimestamp((self._period + 1) * self.period_s, tz=timezone.utc)
        return Decision(
            "local_forced", Reason.BUDGET_EXHAUSTED,
            f"cloud budget ${_usd(self._committed())} of ${_usd(self.usd)} per {self._period_words()} used"
            f"{f' (this request would cost about ${_usd(estimate)})' if estimate else ''}; answered on the device "
            f"until {resets.isoformat(timespec='seconds')}",
            policy=self.type_name, value=self._committed(), threshold=self.usd,
        )

    def _period_words(self) -> str:
        return {3600.0: "hour", 86400.0: "day", 7 * 86400.0: "week"}.get(self.period_s, f"{self.period_s:g} s")

    # ---- public read-outs ------------------------------------------------------------------------

    def spent_usd(self) -> float:
        """Settled plus reserved spend in the current period."""
        with self._lock:
            self._roll()
            return self._committed()

    def remaining_usd(self) -> float:
        return max(self.usd - self.spent_usd(), 0.0)

    # ---- hooks -----------------------------------------------------------------------------------------

    def _before(self, ctx: RequestContext) -> Decision | None:
        with self._lock:
            self._roll()
            return self._veto(ctx.estimated_cloud_usd) if self._exhausted(ctx.estimated_cloud_usd) else None

    def _admit(self, ctx: RequestContext) -> Decision | None:
        with self._lock:
            self._roll()
            if self._exhausted(ctx.estimated_cloud_usd):
                return self._veto(ctx.estimated_cloud_usd)
            self._reserved[ctx.admission_id] = self._reserved.get(ctx.admission_id, 0.0) + ctx.estimated_cloud_usd
            self._reserved_in[ctx.admission_id] = self._period
            return None

    def _release(self, ctx: RequestContext) -> None:
        with self._lock:
            self._reserved.pop(ctx.admission_id, None)
            self._reserved_in.pop(ctx.admission_id, None)

    def _settle(self, ctx: RequestContext, usd: float) -> None:
        with self._lock:
            self._roll()
            self._reserved.pop(ctx.admission_id, None)
            self._reserved_in.pop(ctx.admission_id, None)
            self._spent += max(float(usd), 0.0)

    # ---- config ----------------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {"usd": self.usd, "period_s": self.period_s}

    def _describe(self) -> str:
        return f"budget(${self.usd:g}/{self._period_words()})"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Budget:
        check_keys(cfg, ("usd", "period_s", *_PERIOD_ALIASES), where)
        given = [k for k in ("usd", *_PERIOD_ALIASES) if k in cfg]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of usd (with period_s), {', '.join(_PERIOD_ALIASES)}",
                              field=f"{where}.{given[1] if len(given) > 1 else 'usd'}")
        key = given[0]
        usd = number(cfg, key, where, lo=0.0)
        if key == "usd":
            period = number(cfg, "period_s", where, default=86400.0, lo=1.0)  # a budget per second at the least
        else:
            if "period_s" in cfg:
                raise ConfigError(f"{key} already sets the period", field=f"{where}.period_s")
            period = _PERIOD_ALIASES[key]
        return cls(usd, period)

    # ---- offline replay: sequential, see _replay.py --------------------------------------------

    def _replay_periods(self, records: Any) -> np.ndarray:
        ts = records.timestamps_s
        if ts is None:
            return np.zeros(records.n, dtype=np.int64)
        return np.floor_divide(ts, self.period_s).astype(np.int64)
