"""Budget gate: a cap on cloud spend per period; once spent, requests are answered locally and say so.

Thread-safe: an escalation reserves its estimated cost under a lock when it
is admitted, so concurrent requests cannot overshoot the cap together; the
runtime then settles the reservation with the real cost (``Policy.settle``).
Periods are fixed windows aligned to the Unix epoch (a day runs from 00:00
UTC, a week from Thursday 00:00 UTC) and move only forwards. Spend survives a
restart of the process only with a ``state_file``: the period's committed
amount (settled plus reserved: a reservation in flight when the process died
may have been billed) is written there at every change and read back at start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._files import write_text_whole
from ..errors import ConfigError
from ._base import Decision, Policy, Reason, RequestContext, check_keys, number
from ._registry import register_policy

__all__ = ["Budget", "budget_exhausted"]

log = logging.getLogger(__name__)

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


def _read_regular(path: Path, limit_bytes: int = 65536) -> bytes:
    """A small regular file's bytes, not through a symlink: a link or a FIFO planted in a shared directory made the
    daemon read another file's spend, hang at start, or read /dev/zero until memory ran out."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit_bytes:
            raise OSError(f"not a regular file of at most {limit_bytes} bytes")
        return os.read(fd, limit_bytes + 1)
    finally:
        os.close(fd)


@register_policy
class Budget(Policy):
    """At most ``usd`` of cloud spend per ``period_s`` seconds (default: a day)."""

    type_name = "budget"
    is_gate = True

    def __init__(self, usd: float, period_s: float = 86400.0, *, state_file: str | os.PathLike[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
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
        self.state_file: Path | None = None
        self._state_field = "state_file"  # the setting an error about the file names
        self._state_notes: list[tuple[int, str, tuple[Any, ...]]] = []  # what reading it found, logged at the claim
        self._state_warned = False
        # closes the lock's descriptor (also when garbage-collected); set while this budget holds the file's lock
        self._unlock: Callable[[], Any] | None = None
        self._claims = 0  # runtimes using this budget (one instance may serve several): the last release gives it up
        self._released = False  # given up: nothing more is written until a runtime claims the file again
        self._write_lock = threading.Lock()  # held by the thread writing the file (outside self._lock)
        self._pending_lock = threading.Lock()
        self._pending: tuple[int, dict[str, Any]] | None = None  # the newest snapshot not yet written
        self._state_seq = self._written_seq = 0  # snapshots numbered, and the last one written
        if state_file not in (None, ""):
            self._open_state(Path(os.path.expanduser(state_file)), "state_file")

    # ---- the state file --------------------------------------------------------------------------

    def _open_state(self, path: Path, field: str) -> None:
        """Keep the spend in ``path``; take what a previous process committed there in this period (or in a later
        one: the clock went back since). Errors name ``field``."""
        if not os.access(path.parent, os.W_OK):  # fail at start, not at the first escalation
            raise ConfigError(f"cannot write in {str(path.parent)!r}", field=field)
        self.state_file, self._state_field = path, field
        try:
            text = _read_regular(path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise ConfigError(f"cannot read {str(path)!r}: {err}", field=field) from err
        try:
            state = json.loads(text)
            period_s, period, spent = float(state["period_s"]), int(state["period"]), float(state["committed_usd"])
            if not 0 <= period * period_s < 1e11:  # a time before 1970 or after the year 5000 is no period of ours
                raise ValueError(f"period {period} is out of range")
            if not (math.isfinite(spent) and spent >= 0):  # a spend of Infinity read back as $0 lifted the cap
                raise ValueError(f"committed_usd {spent!r} is no amount")
        except (TypeError, KeyError, ValueError, OverflowError, RecursionError) as err:  # a hand edit, a bad disk
            raise ConfigError(f"{str(path)!r} is not a budget's state file ({err!r})", field=field) from err
        # said when the runtime using it claims the file: a config read to check it (serve reads it twice) says nothing
        if period_s != self.period_s:
            self._state_notes.append((logging.WARNING, "budget state %s was kept for periods of %g s, not %g s: this "
                                      "one starts at $0", (path, period_s, self.period_s)))
        elif period >= self._period:
            if period > self._period + 1:  # written under a clock far ahead: see _roll
                self._state_notes.append((logging.WARNING, "budget state %s is for the period from %s: the clock was "
                                          "wrong then or is now; counting its spend in this period",
                                          (path, self._period_start(period))))
                period = self._period
            self._period, self._spent = period, spent
            # a budget already spent at start is what an operator needs to see (serve shows warnings only)
            self._state_notes.append((logging.WARNING if budget_exhausted(spent, 0.0, self.usd) else logging.INFO,
                                      "budget: $%s of $%s per %s already spent (%s)",
                                      (_usd(spent), _usd(self.usd), self._period_words(), path)))

    def claim_state(self) -> None:
        """Take the state file for this budget's life, before it admits anything (a HybridRuntime does, so a daemon
        fails at start): two daemons on one file each spent the whole cap, and the file kept one of the figures.
        ConfigError naming the field when another budget holds it. Reading a config only (to check it, or to
        explore its policy) takes nothing. Counted: :meth:`release_state` gives the file up at the last release."""
        with self._write_lock:
            self._lock_state_file()  # first: a claim refused (ConfigError) is not counted
            self._claims += 1
            self._released = False

    def _lock_state_file(self) -> None:
        """Take the file's lock (call with the write lock held)."""
        if self.state_file is None or self._unlock is not None:
            return
        try:
            # not through a link another user planted beside it (a shared directory): O_NOFOLLOW
            fd = os.open(self.state_file.with_name(self.state_file.name + ".lock"),
                         os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            raise ConfigError(f"cannot create the lock beside {str(self.state_file)!r}: {err}",
                              field=self._state_field) from err
        try:
            import fcntl
        except ImportError:  # not a POSIX system: not checked
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                raise ConfigError(f"another budget (another process?) keeps its spend in {str(self.state_file)!r}: "
                                  "each would spend the whole cap; give each its own file",
                                  field=self._state_field) from err
        self._unlock = weakref.finalize(self, os.close, fd)  # closing the descriptor releases the lock
        for level, message, args in self._state_notes:
            log.log(level, message, *args)
        self._state_notes.clear()  # said once, not again when a runtime claims the file anew

    def release_state(self) -> None:
        """At the last release of the runtimes that claimed it (``HybridRuntime.close``): write the spend a last time
        and give the file up, so that a runtime built next on the same file, in this process too, takes it over.
        Escalations still in flight stay reserved in what was written (the next owner counts them spent); their
        settlements are not written over the next owner's file."""
        with self._write_lock:  # held throughout: no writer of an older snapshot runs after the last one
            self._claims = max(0, self._claims - 1)
            if self._claims or self._released or self.state_file is None:
                return
            with self._lock:
                snapshot = self._snapshot()
            with self._pending_lock:
                self._pending = None  # older than this one
            if snapshot is not None:
                self._write(*snapshot)
            self._released = True
            if self._unlock is not None:
                self._unlock()
            self._unlock = None

    def _snapshot(self) -> tuple[int, dict[str, Any]] | None:
        """What to write to the state file now (call with the lock held), numbered; None without one."""
        if self.state_file is None:
            return None
        self._state_seq += 1
        return self._state_seq, {"period_s": self.period_s, "period": self._period,
                                 "committed_usd": self._committed(), "usd": self.usd}

    def _save_state(self, snapshot: tuple[int, dict[str, Any]] | None) -> None:
        """Write a snapshot, outside the budget's lock: the write fsyncs twice, and on an SD card that held every
        admission and the daemon's /metrics (its event loop) meanwhile. Writes are coalesced: while one is under
        way, later snapshots wait as the newest pending one, which its writer writes next (six admissions at
        once made six writes, one after another). A failed write is logged, once until one succeeds, and
        requests go on: the spend held in memory still caps this process."""
        if snapshot is None or self.state_file is None or self._released:
            return
        if self._unlock is None:  # a budget used without a HybridRuntime takes its file at its first write
            try:
                with self._write_lock:
                    self._lock_state_file()
            except ConfigError as err:
                log.error("%s: this process's spend is not saved there (its own cap still holds)", err)
                self.state_file = None
                return
        with self._pending_lock:
            if self._pending is None or snapshot[0] > self._pending[0]:
                self._pending = snapshot
        while self._write_lock.acquire(blocking=False):  # else the writer under way takes it
            try:
                while True:
                    with self._pending_lock:
                        pending, self._pending = self._pending, None
                    if pending is None:
                        break
                    self._write(*pending)
            finally:
                self._write_lock.release()
            with self._pending_lock:  # one left between the writer's last look and its release
                if self._pending is None:
                    return

    def _write(self, seq: int, state: dict[str, Any]) -> None:
        if seq <= self._written_seq or self.state_file is None or self._released:  # (with the write lock held)
            return
        try:
            write_text_whole(self.state_file, json.dumps(state) + "\n")
        except OSError as err:
            if not self._state_warned:
                log.warning("cannot save the budget's spend (a restart will not know it): %s", err)
            self._state_warned = True
        else:
            self._state_warned = False
            self._written_seq = seq

    # ---- state (call with the lock held) -------------------------------------------------------

    def _period_index(self) -> int:
        return int(self._clock() // self.period_s)

    def _roll(self) -> None:
        now = self._period_index()
        # only forwards: a wall clock stepped back (NTP correcting a Raspberry Pi that booted at its saved time, a
        # laptop's resume) wiped the spend, and the period's cap was spent again
        if now > self._period:
            # escalations still in flight keep their reservations: they settle into the new period. One older than
            # the period before was never settled (an embedder that settled another context): it is let go
            self._period, self._spent = now, 0.0
            stale = [k for k, p in self._reserved_in.items() if p < now - 1]
            for k in stale:
                self._reserved.pop(k, None)
                self._reserved_in.pop(k, None)
        elif now < self._period - 1:
            # More than a whole period back: the earlier time was the wrong one (a clock set years ahead, then
            # corrected), and keeping its period refused every escalation until that date. This period takes the
            # spend over, so nothing spent is forgotten either.
            log.warning("budget: the clock went back by more than a %s, to %s: counting the spend in this period",
                        self._period_words(), self._period_start(now))
            self._period = now
            for k, p in self._reserved_in.items():
                self._reserved_in[k] = min(p, now)

    def _period_start(self, index: int) -> str:
        return datetime.fromtimestamp(index * self.period_s, tz=timezone.utc).isoformat(timespec="seconds")

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
            snapshot = self._snapshot()
        self._save_state(snapshot)
        return None

    def _release(self, ctx: RequestContext) -> None:
        with self._lock:
            snapshot = self._snapshot() if self._reserved.pop(ctx.admission_id, None) is not None else None
            self._reserved_in.pop(ctx.admission_id, None)
        self._save_state(snapshot)

    def _settle(self, ctx: RequestContext, usd: float) -> None:
        with self._lock:
            period = self._period
            self._roll()
            reserved = self._reserved.pop(ctx.admission_id, None) is not None
            self._reserved_in.pop(ctx.admission_id, None)
            # a bill that is no amount counts as nothing rather than disabling the cap (nothing compares below NaN);
            # the runtime settles such a bill at its reservation before it comes here
            spent = float(usd) if math.isfinite(usd) and usd > 0 else 0.0
            self._spent += spent
            # written only when something changed: every request settles, and a local one that reserved nothing
            # wrote the same file (two fsyncs on an SD card) every time
            snapshot = self._snapshot() if reserved or spent or self._period != period else None
        self._save_state(snapshot)

    # ---- config ----------------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"usd": self.usd, "period_s": self.period_s}
        if self.state_file is not None:
            params["state_file"] = str(self.state_file)
        return params

    def _describe(self) -> str:
        return f"budget(${self.usd:g}/{self._period_words()})"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Budget:
        check_keys(cfg, ("usd", "period_s", "state_file", *_PERIOD_ALIASES), where)
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
        state_file = cfg.get("state_file")
        if state_file is not None and (not isinstance(state_file, str) or not state_file):
            raise ConfigError(f"must be a file path, got {state_file!r}", field=f"{where}.state_file")
        budget = cls(usd, period)
        if state_file is not None:
            budget._open_state(Path(os.path.expanduser(state_file)), f"{where}.state_file")
        return budget

    # ---- offline replay: sequential, see _replay.py --------------------------------------------

    def _replay_periods(self, records: Any) -> np.ndarray:
        ts = records.timestamps_s
        if ts is None:
            return np.zeros(records.n, dtype=np.int64)
        return np.floor_divide(ts, self.period_s).astype(np.int64)
