"""Background sampling, trapezoid integration and counter wrap tracking.

One :class:`Sampler` per meter serves every open window: a single daemon thread,
started on the first window, reads the source every ``interval_s`` while a
window is open (and for ``linger_s`` after the last one closes, so that
back-to-back requests continue one timeline); otherwise it sleeps without
wake-ups. Each domain keeps a :class:`DomainTrack`,
a timeline of cumulative joules:

* power readings (µW) are integrated with the trapezoid rule; between two
  readings the power is taken as linear, so the energy up to any instant inside
  a segment is exact for that line;
* energy counters (µJ) add the difference between readings; a counter lower
  than the previous reading has wrapped and gets ``max_range_uj`` added. Reading
  often enough (the thread does) counts every wrap, where a single
  start/end correction would miss all but one. A counter that goes backwards
  with no known range is not trusted: that interval is dropped with a warning;
* remaining-energy readings (a battery's ``energy_now``) add how much they fell.

A window ``[t0, t1]`` reads the cumulative energy at both instants. Cheap
sources are read afresh at both boundaries; expensive ones (a subprocess) use the
timeline, extrapolating the last power reading past the newest sample, and never
wait for a read in progress while the timeline is fresh. A window that saw fewer
than two power readings is therefore power × time, and says so.
Missing readings leave gaps that are not integrated, never negative joules; a
total domain that could not be read for part of the window is listed in
:attr:`WindowEnergy.incomplete`, so the meter does not pass what it did read off
as the whole window.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import EnergyError
from ._source import Energy, Power, PowerSource, Reading, Unreadable

__all__ = ["DomainTrack", "Sampler", "WindowEnergy"]

log = logging.getLogger(__name__)


@dataclass
class _Point:
    t: float
    e_j: float
    p_w: float | None
    # the segment ending here had no data (a read failure or a restart): nothing integrated
    after_gap: bool = False


# more than any one RAPL / hwmon domain draws: a counter step implying more is not energy
_MAX_PLAUSIBLE_W = 2000.0
# more than any one machine draws (a rack of GPUs included): a reading or a step past it is garbage
_MAX_DEVICE_W = 100_000.0
# a window at least this long in which a total's energy counter did not move measured nothing. RAPL and hwmon
# counters step every millisecond or so in microjoules, and a device draws at least a watt: ~0.25 J by then
STUCK_COUNTER_S = 0.25


def _plausible(reading: Reading) -> Reading:
    """``reading``, or Unreadable when it is not a number a device can show (an infinite rail, a megawatt)."""
    if isinstance(reading, Power):
        w = abs(float(reading.uw)) * 1e-6
        if not math.isfinite(w) or w > _MAX_DEVICE_W:
            return Unreadable(f"implausible power reading ({w:.3g} W)")
    elif not isinstance(reading, Unreadable) and not math.isfinite(float(reading.uj)):
        return Unreadable("implausible energy reading (not finite)")
    return reading


class DomainTrack:
    """Cumulative joules of one domain over time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kind: str | None = None  # "energy" | "power" | "remaining"
        self.points: list[_Point] = []
        self.times: list[float] = []
        self.last_raw: float | None = None
        self.changed_t: float | None = None  # when last_raw took its value
        self.failing_since: float | None = None
        self.failure: str | None = None
        self.events: list[tuple[float, str]] = []
        # spans whose energy is unknown because the domain could not be read (a power rail's gap, a battery
        # on AC); an energy counter's outage is not one: the counter kept counting and its delta bridges it
        self.lost: list[tuple[float, float]] = []

    # --- feeding ---------------------------------------------------------------------------

    def add(self, t: float, reading: Reading) -> None:
        reading = _plausible(reading)
        if isinstance(reading, Unreadable):
            if self.failing_since is None:
                self.failing_since, self.failure = t, reading.reason
                self.events.append((t, f"{self.name} unreadable ({reading.reason})"))
            return
        if self.points and t < self.times[-1]:
            t = self.times[-1]
        kind = "power" if isinstance(reading, Power) else "energy" if isinstance(reading, Energy) else "remaining"
        if self.kind is not None and kind != self.kind:
            self.last_raw = None  # the reading method changed: start a new segment
        self.kind = kind
        prev = self.points[-1] if self.points else None
        e_prev = prev.e_j if prev else 0.0
        failed_for = None if self.failing_since is None else t - self.failing_since

        if prev is not None and failed_for is not None and kind != "energy":
            self.lost.append((prev.t, t))
        if isinstance(reading, Power):
            p_w = abs(reading.uw) * 1e-6
            if prev is None or prev.p_w is None or failed_for is not None:
                if prev is not None and failed_for is not None:
                    self.events.append(
                        (t, f"{self.name}: no readings for {failed_for:.2f} s; that time is not counted"))
                self._append(_Point(t, e_prev, p_w, after_gap=prev is not None))
            else:
                self._append(_Point(t, e_prev + (prev.p_w + p_w) / 2.0 * (t - prev.t), p_w))
        else:
            raw = float(reading.uj)
            delta_uj = 0.0
            gap = self.last_raw is None and prev is not None
            if self.last_raw is not None:
                if isinstance(reading, Energy):
                    delta_uj = raw - self.last_raw
                    why = "with no wrap range"
                    if delta_uj < 0 and reading.max_range_uj:
                        delta_uj += reading.max_range_uj  # wrapped past max_energy_range_uj
                        # ... unless that would mean an impossible power: then it was reset (a driver reload)
                        # or read wrong, and counting a whole wrap range would add hundreds of kJ
                        dt_s = max(t - prev.t, 1e-3) if prev is not None else 1e-3
                        if delta_uj * 1e-6 / dt_s > _MAX_PLAUSIBLE_W:
                            why = (f"by {self.last_raw - raw:.0f} µJ, too little for a wrap past its range "
                                   f"({reading.max_range_uj:.0f} µJ) in {dt_s:.3f} s: a reset or a bad reading")
                            delta_uj = -1.0
                        elif delta_uj < 0:
                            why = f"by more than its wrap range ({reading.max_range_uj:.0f} µJ): a reset or a bad reading"
                    if delta_uj < 0:
                        self.events.append((t, (
                            f"{self.name}: counter went backwards ({self.last_raw:.0f} -> {raw:.0f} µJ) {why}; "
                            "that interval is not counted")))
                        delta_uj = 0.0
                        gap = True
                    elif self._implausible(t, delta_uj, "counter"):
                        delta_uj, gap = 0.0, True
                else:
                    if prev is not None and failed_for is not None:
                        # on AC meanwhile, most likely: the charger, not the battery, fed the device
                        self.events.append((t, f"{self.name}: no readings for {failed_for:.2f} s; "
                                               "the energy of that time is not known"))
                    delta_uj = self.last_raw - raw
                    if delta_uj < 0:
                        self.events.append(
                            (t, f"{self.name}: stored energy rose (charging); that interval is not counted"))
                        delta_uj = 0.0
                        gap = True
                    elif self._implausible(t, delta_uj, "stored energy"):
                        delta_uj, gap = 0.0, True
            if raw != self.last_raw:
                self.changed_t = t
            self.last_raw = raw
            self._append(_Point(t, e_prev + delta_uj * 1e-6, None, after_gap=gap))
        if failed_for is not None:
            self.failing_since = self.failure = None

    def _implausible(self, t: float, delta_uj: float, what: str) -> bool:
        """A step no device draws (a counter reset upwards, a bad reading): said, and not counted.

        The step is spread over the time since the value last changed: a battery gauge refreshed every
        few seconds shows a refresh's worth of energy in one sample.
        """
        dt_s = max(t - self.changed_t, 1e-3) if self.changed_t is not None else 1e-3
        if delta_uj * 1e-6 / dt_s <= _MAX_DEVICE_W:
            return False
        self.events.append((t, f"{self.name}: {what} moved by {delta_uj * 1e-6:.3g} J in {dt_s:.3f} s, more than "
                               f"{_MAX_DEVICE_W / 1000:.0f} kW; that interval is not counted"))
        return True

    def _append(self, point: _Point) -> None:
        self.points.append(point)
        self.times.append(point.t)

    # --- reading -----------------------------------------------------------------------------

    def energy_at(self, t: float) -> float | None:
        """Cumulative joules at ``t`` (interpolated; extrapolated with the last power past the newest reading)."""
        pts = self.points
        if not pts:
            return None
        if t <= pts[0].t:
            return pts[0].e_j
        i = bisect.bisect_right(self.times, t) - 1
        if i >= len(pts) - 1:
            last = pts[-1]
            if self.kind == "power" and last.p_w is not None and self.failing_since is None:
                return last.e_j + last.p_w * (t - last.t)
            return last.e_j
        a, b = pts[i], pts[i + 1]
        span, tau = b.t - a.t, t - a.t
        if b.after_gap or span <= 0:
            return a.e_j
        if a.p_w is not None and b.p_w is not None:
            return a.e_j + a.p_w * tau + (b.p_w - a.p_w) * tau * tau / (2.0 * span)
        return a.e_j + (b.e_j - a.e_j) * tau / span

    def shortfall(self, t0: float, t1: float) -> str | None:
        """Why part of ``[t0, t1]`` has no energy from this domain; None when every instant is accounted for."""
        if self.failing_since is not None and self.failing_since <= t1:
            # the failure shows at the first bad reading; nothing is known since the last good one
            last_good = max(self.times[-1], t0) if self.times else t0
            return f"unreadable for the last {t1 - last_good:.2f} s ({self.failure})"
        if self.times and self.times[0] > t0:
            return f"no reading for the first {min(self.times[0], t1) - t0:.2f} s"
        lost = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self.lost)
        if lost > 0:
            return f"no readings for {lost:.2f} s"
        return None

    def steps_in(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """``(t, cumulative J)`` of the readings in ``[t0, t1]`` at which the energy rose: a gauge's refreshes (one at
        ``t0`` holds energy from before the window, but marks where a refresh interval inside it starts)."""
        i = bisect.bisect_left(self.times, t0)
        j = bisect.bisect_right(self.times, t1)
        return [(p.t, p.e_j) for k, p in enumerate(self.points[i:j], i) if k > 0 and p.e_j > self.points[k - 1].e_j]

    def gap_in(self, t0: float, t1: float) -> bool:
        """Whether a reading in ``(t0, t1]`` follows an interval whose energy is not known (counted as 0 J)."""
        i, j = bisect.bisect_right(self.times, t0), bisect.bisect_right(self.times, t1)
        return any(p.after_gap for p in self.points[i:j])

    def count_in(self, t0: float, t1: float) -> int:
        return bisect.bisect_right(self.times, t1) - bisect.bisect_left(self.times, t0)

    def covers(self, t0: float, t1: float) -> bool:
        """Whether any reading describes part of ``[t0, t1]``."""
        if self.count_in(t0, t1) > 0:
            return True
        return bool(self.points) and self.failing_since is None and self.times[0] <= t0

    def prune(self, before: float) -> None:
        """Forget readings older than ``before`` (keeping the one just before it, for interpolation)."""
        i = bisect.bisect_right(self.times, before) - 1
        if i > 0:
            del self.points[:i]
            del self.times[:i]
        self.events = [e for e in self.events if e[0] >= before]
        self.lost = [span for span in self.lost if span[1] >= before]


@dataclass
class WindowEnergy:
    t0: float
    t1: float
    domains_j: dict[str, float]
    missing: list[str]
    samples: int
    warnings: list[str] = field(default_factory=list)
    # total domains read for only part of the window, and why: their joules fall short of what was drawn
    incomplete: dict[str, str] = field(default_factory=dict)


class Sampler:
    """Shared sampling of one :class:`PowerSource` for any number of concurrent windows."""

    def __init__(self, source: PowerSource, interval_s: float, *, clock: Callable[[], float] = time.monotonic,
                 linger_s: float = 2.0) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.source = source
        self.interval_s = interval_s
        self._clock = clock
        self._next_id = 0
        self._stopped = False
        self.reads = 0
        # keep sampling this long after the last window closes, so back-to-back requests
        # find a fresh timeline instead of paying for a synchronous (maybe expensive) read
        self._linger_s = linger_s
        self._start_over()
        _SAMPLERS.add(self)

    def _start_over(self) -> None:
        """The sampling state a new sampler starts with; also what a forked child starts over with (see
        ``_start_over_in_child``: the parent's thread, its locks' holders and its timeline are the parent's)."""
        # _read_lock serialises source reads (so readings arrive in time order);
        # _lock guards the tracks and the open windows and is never held during a read
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._tracks: dict[str, DomainTrack] = {}
        self._open: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._last_close_mono = float("-inf")
        self._last_read_mono: float | None = None
        # when the read in progress began (None: no read in progress)
        self._read_started_mono: float | None = None
        # windows whose Measurement was garbage-collected unclosed; appended from GC (no lock there)
        self._abandoned: list[int] = []

    # --- windows -------------------------------------------------------------------------------

    def open(self) -> tuple[int, float]:
        token = None
        if self.source.expensive:
            with self._lock:
                self._check_running()
                # the window starts on the timeline: no read of its own, so no waiting behind one in progress
                # (a vcgencmd call can take seconds while the firmware is busy)
                if self._open or self._timeline_fresh():
                    token = self._add_window(self._clock())
        if token is None:
            token = self._open_with_read()
        if self.source.needs_background:
            self._ensure_thread()
        return token

    def _open_with_read(self) -> tuple[int, float]:
        with self._read_lock:
            with self._lock:
                self._check_running()
                was_idle = not self._open
                stale = not self._timeline_fresh()
                if was_idle and stale:
                    # nothing was sampled for a while: start a fresh timeline
                    self._tracks.clear()
            if (was_idle and stale) or not self.source.expensive:
                t0 = self._sample_locked()
            else:
                t0 = self._clock()
            with self._lock:
                return self._add_window(t0)

    def _check_running(self) -> None:
        """Raise if stopped; forget abandoned windows. Caller holds ``_lock``."""
        if self._stopped:
            raise EnergyError("the energy meter is closed")
        self._drop_abandoned()

    def _timeline_fresh(self) -> bool:
        """The tracks describe the recent past, so a window can start on them. Caller holds ``_lock``."""
        last, limit = self._last_read_mono, 2 * self.interval_s
        if last is None:
            return False
        if time.monotonic() - last <= limit:
            return True
        # a read in progress that began on a fresh timeline extends it: a slow read does not make it stale
        started = self._read_started_mono
        return started is not None and started - last <= limit

    def _add_window(self, t0: float) -> tuple[int, float]:
        """Register a window opened at ``t0``. Caller holds ``_lock``."""
        if not self._open:
            self._wake.notify_all()  # the sampler thread sleeps while no window is open
        wid = self._next_id
        self._next_id += 1
        self._open[wid] = t0
        return wid, t0

    def close(self, token: tuple[int, float]) -> WindowEnergy:
        wid, t0 = token
        if not self.source.expensive:
            with self._read_lock:
                t1 = self._sample_locked()
        else:
            t1 = self._clock()
        with self._lock:
            result = self._window(t0, t1)
            self._open.pop(wid, None)
            self._drop_abandoned()
            if not self._open:
                self._last_close_mono = time.monotonic()
            oldest = min(self._open.values()) if self._open else t1
            for track in self._tracks.values():
                track.prune(oldest)
        return result

    def abandon(self, wid: int) -> None:
        """Forget a window nobody will close. Safe from a GC callback: no lock, one atomic append."""
        self._abandoned.append(wid)

    @property
    def open_windows(self) -> int:
        with self._lock:
            self._drop_abandoned()
            return len(self._open)

    def _drop_abandoned(self) -> None:
        while self._abandoned:
            self._open.pop(self._abandoned.pop(), None)

    def poll(self) -> float:
        """Read the source now (the background thread does this every ``interval_s``)."""
        with self._read_lock:
            return self._sample_locked()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, 2 * self.interval_s))

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- internals -----------------------------------------------------------------------------

    def _sample_locked(self) -> float:
        """Read once and feed the tracks; caller holds ``_read_lock``."""
        with self._lock:
            self._read_started_mono = time.monotonic()
        t_a = self._clock()
        try:
            readings = dict(self.source.read())
        except Exception as err:  # a backend bug must not kill a generation; treat as unreadable
            log.debug("%s: read failed", self.source.label, exc_info=True)
            names = list(self._tracks) or list(self.source.total_domains())
            readings = {name: Unreadable(f"read failed: {err}") for name in names}
        t = (t_a + self._clock()) / 2.0
        with self._lock:
            self.reads += 1
            self._last_read_mono = time.monotonic()
            self._read_started_mono = None
            for name, reading in readings.items():
                track = self._tracks.get(name)
                if track is None:
                    track = self._tracks[name] = DomainTrack(name)
                try:
                    track.add(t, reading)
                except Exception as err:  # a reading this code did not foresee must not end the sampler thread
                    log.debug("%s: cannot use %r", name, reading, exc_info=True)
                    track.add(t, Unreadable(f"unusable reading: {type(err).__name__}"))
        return t

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name=f"edge-runtime-power-sampler[{self.source.label}]",
                                            daemon=True)
            self._thread.start()

    def _busy(self) -> bool:
        """Sampling is due: a window is open, or one closed less than ``linger_s`` ago. Caller holds ``_lock``."""
        self._drop_abandoned()
        return bool(self._open) or time.monotonic() - self._last_close_mono < self._linger_s

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._busy():
                    self._wake.wait()
                if self._stopped:
                    return
                self._wake.wait(timeout=self.interval_s)
                if self._stopped:
                    return
                if not self._busy():
                    continue
            with self._read_lock:
                with self._lock:
                    if not self._busy():
                        continue
                self._sample_locked()

    def _gauge_window(self, track: DomainTrack, t0: float, t1: float, domains_j: dict[str, float],
                      incomplete: dict[str, str], warnings: list[str]) -> None:
        """A battery gauge's energy for ``[t0, t1]``, or why it has none.

        The gauge is refreshed every few seconds, and each step holds the energy of the whole time since the step
        before, which may have begun long before the window: a short window saw no step (read as a measured 0 J)
        or one step (all of it, 30 J in 0.3 s). What it does measure is the average power between two steps the
        window holds; that power over the window is the figure, and a window with fewer steps has none.
        """
        name, label = track.name, self.source.label
        steps = track.steps_in(t0, t1)
        if len(steps) >= 2 and steps[-1][0] <= steps[0][0]:  # readings clamped to one instant (a clock step back)
            steps = steps[:1]
        if len(steps) < 2:
            domains_j[name] = 0.0  # what it showed is not this window's: none of it is counted
            incomplete.setdefault(name, f"the battery gauge stepped {len(steps)} time(s) in this {t1 - t0:.2f} s "
                                        "window; it is refreshed every few seconds and each step holds energy from "
                                        "before it, so a window needs two steps to be measured")
            return
        (ta, ea), (tb, eb) = steps[0], steps[-1]
        if track.gap_in(ta, tb):
            # a rise (charging meanwhile) or an impossible step between them was counted as 0 J over its time
            domains_j[name] = 0.0
            incomplete.setdefault(name, "the battery gauge rose or jumped between its steps in this window: the "
                                        "energy of that interval is not known")
            return
        watts = (eb - ea) / (tb - ta)
        domains_j[name] = watts * (t1 - t0)
        warnings.append(f"{label}: {name} is a battery gauge: {watts:.2f} W on average over its {len(steps) - 1} "
                        f"refresh interval(s) within the window ({tb - ta:.1f} s), times the window")

    def _window(self, t0: float, t1: float) -> WindowEnergy:
        label = self.source.label
        totals = set(self.source.total_domains())
        domains_j: dict[str, float] = {}
        incomplete: dict[str, str] = {}
        warnings: list[str] = []
        counts: list[int] = []
        power_counts: list[int] = []
        still: dict[str, float] = {}  # energy counters of the total that held one value long enough to see it: for how long
        for name, track in self._tracks.items():
            if not track.covers(t0, t1):
                continue
            e0, e1 = track.energy_at(t0), track.energy_at(t1)
            if e0 is None or e1 is None:
                continue
            joules = max(0.0, e1 - e0)
            domains_j[name] = joules
            warnings.extend(f"{label}: {msg}" for t, msg in track.events if t0 <= t <= t1)
            if track.failing_since is not None and track.failing_since <= t1:
                warnings.append(f"{label}: {name} unreadable at the end of the window ({track.failure}); "
                                "energy after its last good reading is missing")
            if name in totals:
                why = track.shortfall(t0, t1)
                if why is not None:
                    incomplete[name] = why
                counts.append(track.count_in(t0, t1))
                if track.kind == "power":
                    power_counts.append(counts[-1])
                    if joules == 0.0 and t1 > t0:
                        warnings.append(f"{label}: {name} read 0 W throughout the window")
                # a window too short to tell is judged by how long the counter has held its value (a stuck one
                # gave every request under 0.25 s a "measured" 0 J)
                held_s = max(t1 - t0, t1 - track.changed_t if track.changed_t is not None else 0.0)
                if track.kind == "energy" and joules == 0.0 and held_s >= STUCK_COUNTER_S:
                    still[name] = held_s
                if track.kind == "remaining":
                    self._gauge_window(track, t0, t1, domains_j, incomplete, warnings)
        moved = {n for n in totals if n in domains_j and n not in still}
        for name, held_s in still.items():
            beside = self.source.may_stay_still(name)
            if beside is not None and beside in moved:
                # a part that can truly draw nothing (a DRAM zone some servers list but do not count) beside the
                # part it belongs with, which moved: the total is still measured
                warnings.append(f"{label}: {name} did not move in {held_s:.2f} s; counted as 0 J")
            else:
                # a device draws watts; any other counter of the total that did not move measured nothing (some VMs
                # and firmwares expose one that stays at one value), even beside one that moved (a DRAM zone, a
                # second package or socket): not a measured 0 J, and never passed off as the whole
                incomplete.setdefault(name, f"did not move in {held_s:.2f} s (a stuck counter measures nothing)")
        missing = sorted(n for n in totals if n not in domains_j)
        for name in missing:
            track = self._tracks.get(name)
            why = f" ({track.failure})" if track is not None and track.failure else ""
            warnings.append(f"{label}: no readings of {name} during the window{why}")
        samples = min(counts) if counts else 0
        if power_counts and min(power_counts) < 2:
            warnings.append(
                f"{label}: only {min(power_counts)} power reading(s) inside this {1000 * (t1 - t0):.0f} ms window "
                f"(sampling every {1000 * self.interval_s:.0f} ms): energy is power × time from the nearest reading")
        return WindowEnergy(t0=t0, t1=t1, domains_j=domains_j, missing=missing, samples=samples,
                            warnings=list(dict.fromkeys(warnings)), incomplete=incomplete)


# every live sampler, for the fork hook below (weak: a closed meter's sampler is not kept alive by it)
_SAMPLERS: weakref.WeakSet[Sampler] = weakref.WeakSet()


def _start_over_in_child() -> None:
    """After ``fork()`` only the forking thread lives on (gunicorn's --preload workers, multiprocessing). A sampler's
    thread is gone but its object said it ran, so windows got no samples between their ends; a lock or a read a
    parent's thread was inside stays taken forever (the next window hung, or extrapolated the parent's last reading
    for good). Each sampler starts over as a new one would."""
    for sampler in list(_SAMPLERS):
        sampler._start_over()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start_over_in_child)
