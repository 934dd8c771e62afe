"""The public meter: ``with meter.measure() as m: ...`` then ``m.joules``.

An :class:`EnergyMeter` detects its source once (see ``_detect``) and shares one
background sampler among all windows, so any number of threads can measure at
the same time. Every :class:`Measurement` reports:

* ``joules``: the whole device (or package, for RAPL) during the window;
* ``process_joules``: this process's share by CPU time: for a measured source
  ``joules`` × this process's CPU time / all busy CPU time in the window; for the
  estimate, its CPU time at the profile's active power plus its share of CPU
  capacity times idle power (0 when this process did not run);
* ``source``: where the figure comes from (``rapl:package-0``, ``hwmon:amd_energy``,
  ``battery:BAT0``, ``rpi-pmic``, or ``estimate:<profile>``), and ``estimated``,
  True unless a hardware counter measured it;
* ``warnings``: why the figure may be incomplete, in plain words.

A window the chosen source did not measure whole falls back to the CPU-time
estimate for that window, labelled ``estimate:<profile>`` and warned about: a
source that yields nothing (a sensor that vanished), a total missing one of its
domains (RAPL DRAM without its package), or a domain that stopped reading
partway (a counter that vanished, a battery plugged in). What the source did read
is named in the warning, never passed off as the device's energy for the window:
never a silent 0 J, never a negative figure.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, EnergyError
from ._detect import Detection, detect
from ._estimate import CpuClock, EstimateSource, PsutilCpuClock
from ._profiles import DeviceProfile, custom_profile, get_profile
from ._sampler import Sampler, WindowEnergy
from ._settings import PowerSettings
from ._source import PowerSource, SourceInfo

if TYPE_CHECKING:
    from ..engine.types import EnergyReport

__all__ = ["EnergyMeter", "Measurement"]

log = logging.getLogger("edge_runtime.power")


class Measurement:
    """One window of energy. Use as a context manager (or call :meth:`stop`); the figures exist once it is closed."""

    def __init__(self, meter: EnergyMeter, token: tuple[int, float] | None, t0: float,
                 cpu0: tuple[float, float] | None) -> None:
        self._meter = meter
        self._token = token
        self._t0 = t0
        self._cpu0 = cpu0
        self._lock = threading.Lock()
        self._result: dict[str, Any] | None = None
        self._finalizer: weakref.finalize | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> Measurement:
        """Close the window (idempotent) and return self."""
        with self._lock:
            if self._result is None:
                if self._finalizer is not None:
                    self._finalizer.detach()
                self._result = self._meter._finish(self._token, self._t0, self._cpu0)
        return self

    def __enter__(self) -> Measurement:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def done(self) -> bool:
        return self._result is not None

    def _get(self, name: str) -> Any:
        if self._result is None:
            raise EnergyError("the measurement window is still open: read its figures after the with-block or stop()")
        return self._result[name]

    # --- figures -------------------------------------------------------------------------------

    @property
    def joules(self) -> float:
        """Energy of the whole device (RAPL: the package/platform) during the window, >= 0."""
        return float(self._get("joules"))

    @property
    def seconds(self) -> float:
        return float(self._get("seconds"))

    @property
    def avg_watts(self) -> float:
        seconds = self.seconds
        return self.joules / seconds if seconds > 0 else 0.0

    @property
    def source(self) -> str:
        return str(self._get("source"))

    @property
    def estimated(self) -> bool:
        return bool(self._get("estimated"))

    @property
    def domains(self) -> dict[str, float]:
        """Joules per domain (e.g. ``package-0``, ``package-0/core``); sub-domains may be part of others."""
        return dict(self._get("domains"))

    @property
    def process_joules(self) -> float | None:
        """This process's share of :attr:`joules` by CPU time (None if CPU times were unavailable)."""
        value = self._get("process_joules")
        return None if value is None else float(value)

    @property
    def process_share(self) -> float | None:
        value = self._get("process_share")
        return None if value is None else float(value)

    @property
    def samples(self) -> int:
        """Readings of the source inside the window (0 for the estimate)."""
        return int(self._get("samples"))

    @property
    def warnings(self) -> list[str]:
        return list(self._get("warnings"))

    def to_report(self) -> EnergyReport:
        """The figure as the engine's ``GenerationResult.energy`` carries it."""
        # imported here: edge_runtime.engine may load onnxruntime, which `edge-runtime power` never needs
        from ..engine.types import EnergyReport

        return EnergyReport(joules=self.joules, source=self.source, estimated=self.estimated, seconds=self.seconds,
                            process_joules=self.process_joules)

    def to_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {
            "joules": r(self.joules),
            "seconds": r(self.seconds),
            "avg_watts": r(self.avg_watts),
            "source": self.source,
            "estimated": self.estimated,
            "domains": {k: r(v) for k, v in self.domains.items()},
            "process_joules": r(self.process_joules),
            "process_share": r(self.process_share),
            "samples": self.samples,
            "warnings": self.warnings,
        }

    def __repr__(self) -> str:
        if self._result is None:
            return "<Measurement open>"
        return f"<Measurement {self.joules:.3f} J in {self.seconds:.3f} s from {self.source}>"


def _settings_profile(settings: PowerSettings) -> DeviceProfile:
    """The estimate's profile of ``[power]`` settings, once their root is known to be a directory."""
    if not os.path.isdir(settings.sysfs_root):  # a typo would find no counter and fall back to the estimate unsaid
        raise ConfigError(f"{settings.sysfs_root} is not a directory", field="power.sysfs_root")
    return custom_profile(settings.profile, active_watts_per_core=settings.active_watts_per_core,
                          idle_watts=settings.idle_watts)


class EnergyMeter:
    """Measures energy per window from the best source under ``sysfs_root``.

    ``source``: ``"auto"`` (priority rapl > hwmon > rpi-pmic > battery > estimate),
    a kind or label to insist on one (``EnergyError`` if it is not usable), or a
    :class:`PowerSource` object (tests: :class:`ConstantPowerSource`).
    ``profile``: the device profile for the estimate (a name or a :class:`DeviceProfile`).
    """

    def __init__(
        self,
        sysfs_root: str | os.PathLike[str] = "/",
        source: str | PowerSource = "auto",
        profile: str | DeviceProfile = "generic",
        sample_interval_s: float = 0.2,
        *,
        cpu_clock: CpuClock | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(sample_interval_s, bool) or not isinstance(sample_interval_s, (int, float)) \
                or not math.isfinite(sample_interval_s) or not 0.001 <= sample_interval_s <= 3600:
            raise ConfigError(f"must be between 0.001 and 3600 seconds, got {sample_interval_s!r}",
                              field="sample_interval_s")
        try:
            self.sysfs_root = os.fspath(sysfs_root)
        except TypeError as err:  # None, a number: a bare TypeError from os
            raise ConfigError(f"must be a path, got {type(sysfs_root).__name__}", field="sysfs_root") from err
        if not isinstance(self.sysfs_root, str):  # bytes
            raise ConfigError("must be a path given as text", field="sysfs_root")
        if not self.sysfs_root.strip():  # else the working directory: a tree with no counter, and the estimate unsaid
            raise ConfigError("must name a directory (/ for this device)", field="sysfs_root")
        # None was a bare TypeError or AttributeError (QA UU)
        if not isinstance(profile, (str, DeviceProfile)):
            raise ConfigError(f"must be a profile name or a DeviceProfile, got {type(profile).__name__}",
                              field="power.profile")
        if not isinstance(source, (str, PowerSource)):
            raise ConfigError(f"must be a source name or a PowerSource, got {type(source).__name__}",
                              field="power.source")
        prof = get_profile(profile) if isinstance(profile, str) else profile
        if isinstance(source, PowerSource):
            estimate = EstimateSource(prof)
            self._detection = Detection(root=self.sysfs_root, candidates=[source], absent=[], estimate=estimate,
                                        chosen=source)
        else:
            self._detection = detect(self.sysfs_root, source, prof)
        self._estimate = self._detection.estimate
        self._chosen = self._detection.chosen
        self.sample_interval_s = float(sample_interval_s)
        self._cpu_clock: CpuClock = cpu_clock or PsutilCpuClock()
        self._clock = clock
        self._lock = threading.Lock()
        self._sampler: Sampler | None = None
        self._closed = False
        self.notes: list[str] = list(self._detection.notes)
        # one log line per problem (RAPL permission denied, battery on AC), when the meter is made
        for problem in self._detection.problems:
            log.warning("energy: %s", problem)
        if self._detection.estimate_note:
            log.info("energy: %s", self._detection.estimate_note)

    @classmethod
    def from_settings(cls, settings: PowerSettings, **kwargs: Any) -> EnergyMeter:
        """A meter configured by the ``[power]`` settings section.

        A source these settings insist on that this device lacks is a ``ConfigError`` naming ``power.source``
        (``EnergyError`` when a meter is made by hand): the settings are what would have to change.
        """
        profile = _settings_profile(settings)
        try:
            return cls(sysfs_root=settings.sysfs_root, source=settings.source, profile=profile,
                       sample_interval_s=settings.sample_interval_ms / 1000.0, **kwargs)
        except EnergyError as err:
            raise ConfigError(str(err), field="power.source") from err

    @staticmethod
    def check_settings(settings: PowerSettings) -> None:
        """Raise the ``ConfigError`` :meth:`from_settings` would, without making a meter.

        Detection only: no sampler thread, no log lines (the meter made later logs its own), so ``serve`` refuses a
        source this device does not have before it listens rather than after.
        """
        profile = _settings_profile(settings)
        try:
            detect(settings.sysfs_root, settings.source, profile)
        except EnergyError as err:
            raise ConfigError(str(err), field="power.source") from err

    # --- what it measures ------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The chosen source's label, e.g. ``rapl:package-0`` or ``estimate:generic``."""
        return self._chosen.label

    @property
    def estimated(self) -> bool:
        return self._chosen is self._estimate or bool(getattr(self._chosen, "estimated", False))

    @property
    def estimate_source(self) -> str:
        """The CPU-time estimate's label (``estimate:<profile>``): what a window the chosen source missed reports."""
        return self._estimate.label

    @property
    def identity(self) -> str:
        """What makes two meters measure alike: the chosen source, and the profile's watts its estimate uses."""
        p = self._estimate.profile
        return f"{self.source}; {p.name} {p.active_watts_per_core:g} W/core + {p.idle_watts:g} W idle"

    @property
    def profile(self) -> DeviceProfile:
        return self._estimate.profile

    def describe(self) -> list[SourceInfo]:
        """Every source kind in priority order, as found when this meter was created."""
        return self._detection.infos()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- measuring -------------------------------------------------------------------------

    def measure(self) -> Measurement:
        """Open a window: ``with meter.measure() as m: ...``."""
        return self.start()

    def start(self) -> Measurement:
        """Open a window and return it; call ``stop()`` on it (for code that cannot use ``with``)."""
        if self._closed:
            raise EnergyError("the energy meter is closed")
        cpu0 = self._cpu_times()
        sampler = self._get_sampler()
        if sampler is not None:
            token = sampler.open()
            m = Measurement(self, token, token[1], cpu0)
            # a window that is dropped without stop() must not keep the sampler busy forever
            m._finalizer = weakref.finalize(m, sampler.abandon, token[0])
            m._finalizer.atexit = False
            return m
        return Measurement(self, None, self._clock(), cpu0)

    def poll(self) -> None:
        """Read the source now, as the background thread does every ``sample_interval_s``."""
        sampler = self._get_sampler()
        if sampler is not None:
            sampler.poll()

    def close(self) -> None:
        """Stop the background sampler. Open windows can still be stopped; new ones raise ``EnergyError``."""
        with self._lock:
            self._closed = True
            sampler = self._sampler
        if sampler is not None:
            sampler.stop()

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EnergyMeter {self.source} root={self.sysfs_root!r}>"

    # --- internals -------------------------------------------------------------------------

    @property
    def sampler_running(self) -> bool:
        return self._sampler is not None and self._sampler.thread_alive

    def _get_sampler(self) -> Sampler | None:
        if not isinstance(self._chosen, PowerSource):
            return None
        with self._lock:
            if self._sampler is None:
                self._sampler = Sampler(self._chosen, self.sample_interval_s, clock=self._clock)
            return self._sampler

    def _cpu_count(self) -> int:
        try:
            return max(1, int(self._cpu_clock.cpu_count()))
        except Exception:
            return os.cpu_count() or 1

    def _cpu_times(self) -> tuple[float, float] | None:
        try:
            return self._cpu_clock.process_cpu_s(), self._cpu_clock.system_busy_cpu_s()
        except Exception:  # psutil.Error, OSError: attribution is a bonus, the energy figure still stands
            log.debug("cannot read CPU times", exc_info=True)
            return None

    def _shortfall(self, source: PowerSource, window: WindowEnergy) -> str | None:
        """Why ``window`` is not a measurement of the device for the whole window (None when it is)."""
        totals = source.total_domains()
        got = [n for n in totals if n in window.domains_j]
        instead = f"reported the CPU-time estimate ({self._estimate.label}) for the whole window instead"
        if not got:
            return f"{source.label} gave no usable readings in this window; {instead}"
        part_j = sum(window.domains_j[n] for n in got)
        missing = [n for n in totals if n not in window.domains_j]
        if missing:
            # the rest of a total is not the device: DRAM alone is not the package plus DRAM
            return (f"{source.label}: no readings of {', '.join(missing)} in this window, so the {part_j:.3f} J "
                    f"of {', '.join(got)} are not the device's energy; {instead}")
        partial = [f"{n} {window.incomplete[n]}" for n in totals if n in window.incomplete]
        if partial:
            # what was read covers part of the window only: less than was drawn, so not the window's figure
            return (f"{source.label} measured only part of this window ({'; '.join(partial)}): its {part_j:.3f} J "
                    f"fall short of what was drawn; {instead}")
        return None

    def _finish(self, token: tuple[int, float] | None, t0: float, cpu0: tuple[float, float] | None) -> dict[str, Any]:
        window = None
        if token is not None and self._sampler is not None:
            window = self._sampler.close(token)
            t1 = window.t1
        else:
            t1 = self._clock()
        cpu1 = self._cpu_times()
        seconds = max(0.0, t1 - t0)
        warnings = list(self.notes)
        proc_s = busy_s = None
        if cpu0 is not None and cpu1 is not None:
            proc_s = max(0.0, cpu1[0] - cpu0[0])
            # tick granularity can make this process's time exceed the system's: clamp
            busy_s = max(proc_s, cpu1[1] - cpu0[1], 0.0)
        else:
            warnings.append("CPU times unavailable: no per-process share" +
                            (" and the estimate counts idle power only" if window is None else ""))

        source, estimated, domains, samples, joules = self._estimate.label, True, None, 0, 0.0
        chosen = self._chosen
        if window is not None and isinstance(chosen, PowerSource):
            warnings.extend(window.warnings)
            shortfall = self._shortfall(chosen, window)
            if shortfall is None:
                source, estimated, samples = chosen.label, chosen.estimated, window.samples
                domains = window.domains_j
                joules = sum(window.domains_j[n] for n in chosen.total_domains())
            else:
                warnings.append(shortfall)
        process_joules = share = None
        if domains is None:
            domains = self._estimate.energy_j(seconds, busy_s or 0.0)
            joules = sum(domains.values())
            if proc_s is not None:
                process_joules = self._estimate.process_j(seconds, proc_s, self._cpu_count())
                share = process_joules / joules if joules > 0 else 0.0
        elif proc_s is not None and busy_s is not None:
            # measured: the counter cannot tell idle from active power, so split by CPU time
            share = proc_s / busy_s if busy_s > 0 else 0.0
            process_joules = max(0.0, joules) * share
        return {
            "joules": max(0.0, joules),
            "seconds": seconds,
            "source": source,
            "estimated": estimated,
            "domains": {k: max(0.0, v) for k, v in domains.items()},
            "process_joules": process_joules,
            "process_share": share,
            "samples": samples,
            "warnings": list(dict.fromkeys(warnings)),
        }
