"""The estimate used when no counter is readable, and the CPU clocks behind attribution.

Estimated device energy over a window of ``s`` seconds in which all processes
together kept CPUs busy for ``busy`` CPU-seconds::

    joules = idle_watts * s + active_watts_per_core * busy

This process's share is its own CPU-seconds at the active power plus the part
of idle power matching the share of the machine's CPU capacity it occupied::

    process_joules = process_cpu * active_watts_per_core + idle_watts * process_cpu / n_cpus

so a process that did nothing costs (almost) nothing, and one that kept every
CPU busy carries all of the idle power. (Measured sources cannot split idle from
active power, so there the share is ``process_cpu / busy``.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from ._profiles import DeviceProfile
from ._source import DomainInfo, SourceInfo

if TYPE_CHECKING:
    import psutil

__all__ = ["CpuClock", "PsutilCpuClock", "EstimateSource"]


class CpuClock(Protocol):
    """CPU-seconds consumed so far: by this process, and by the whole machine (busy, not idle)."""

    def process_cpu_s(self) -> float: ...

    def system_busy_cpu_s(self) -> float: ...

    def cpu_count(self) -> int: ...


class PsutilCpuClock:
    """The real clock: ``psutil.Process().cpu_times()`` and ``psutil.cpu_times()``."""

    def __init__(self) -> None:
        self._process: psutil.Process | None = None
        self._pid = -1

    def process_cpu_s(self) -> float:
        import psutil

        if self._process is None or self._pid != os.getpid():  # re-create after fork
            self._pid = os.getpid()
            self._process = psutil.Process(self._pid)
        t = self._process.cpu_times()
        return float(t.user + t.system)

    def system_busy_cpu_s(self) -> float:
        import psutil

        t: Any = psutil.cpu_times()
        # Linux counts guest time inside user/nice already; steal is another VM's time, not ours
        busy = t.user + t.nice + t.system if hasattr(t, "nice") else t.user + t.system
        return float(busy + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))

    def cpu_count(self) -> int:
        import psutil

        return int(psutil.cpu_count(logical=True) or 1)


class EstimateSource:
    """CPU time × a device profile. Never presented as a measurement: ``estimated`` is always True."""

    kind = "estimate"
    estimated = True

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        self.info = SourceInfo(
            kind="estimate", label=f"estimate:{profile.name}", present=True, usable=True, estimated=True,
            domains=(DomainInfo("active", "psutil.cpu_times()", readable=True),
                     DomainInfo("idle", "wall clock", readable=True)),
            detail=(f"{profile.active_watts_per_core:g} W per busy CPU + {profile.idle_watts:g} W idle"
                    + (f"; {profile.description}" if profile.description else "")),
        )

    @property
    def label(self) -> str:
        return self.info.label

    def energy_j(self, seconds: float, busy_cpu_s: float) -> dict[str, float]:
        """Estimated device joules per domain: ``active`` (busy CPU time) and ``idle`` (wall time)."""
        return {
            "active": max(busy_cpu_s, 0.0) * self.profile.active_watts_per_core,
            "idle": max(seconds, 0.0) * self.profile.idle_watts,
        }

    def process_j(self, seconds: float, process_cpu_s: float, n_cpus: int) -> float:
        """This process's estimated joules (see the module docstring)."""
        n = max(int(n_cpus), 1)
        cpu = min(max(process_cpu_s, 0.0), n * max(seconds, 0.0))
        return cpu * self.profile.active_watts_per_core + self.profile.idle_watts * cpu / n
