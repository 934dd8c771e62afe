"""How many CPUs this process may really use: the default for onnxruntime's intra-op threads.

``psutil.cpu_count(logical=False)`` counts the machine's cores. A process pinned to
fewer CPUs (``taskset``, a systemd ``CPUAffinity=``) or held to a CPU quota (a
container's ``--cpus``, systemd's ``CPUQuota=``, Kubernetes limits) that starts one
thread per core has more threads than CPUs: onnxruntime's workers then wait for
each other at every operator, and a decode step takes several times as long.

The cgroup files are read under ``root`` (``/`` for the real ones), so tests
point :func:`cpu_limits` at fake trees in ``tmp_path``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .power._sysfs import cat, read_int, under_root

__all__ = ["CpuLimits", "cpu_limits"]


@dataclass(frozen=True)
class CpuLimits:
    physical: int  # the machine's cores (a count, as the other fields)
    logical: int  # the machine's hardware threads
    affinity_cpus: int | None  # CPUs this process may run on, None when the platform does not say
    quota_cpus: float | None  # CPUs' worth of time the cgroup allows, None when unlimited

    @property
    def pinned(self) -> bool:
        """Whether the affinity mask allows fewer hardware threads than the machine has."""
        return self.affinity_cpus is not None and self.affinity_cpus < self.logical

    @property
    def usable(self) -> int:
        """Physical cores, fewer when the affinity mask or the cgroup quota allows fewer CPUs (at least 1)."""
        cores = self.physical
        if self.pinned:
            # the cores behind the allowed hardware threads, assuming they are spread like the machine's
            cores = min(cores, math.ceil(self.affinity_cpus * self.physical / self.logical))  # type: ignore[operator]
        if self.quota_cpus is not None:
            cores = min(cores, math.ceil(self.quota_cpus))
        return max(1, cores)

    def held_by(self) -> list[str]:
        """The limits in force, in words (for the log line that explains a smaller default)."""
        held = [f"CPU affinity {self.affinity_cpus} of {self.logical}"] if self.pinned else []
        return held + ([f"cgroup CPU quota {self.quota_cpus:g}"] if self.quota_cpus is not None else [])


def _cgroup_paths(root: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and its v1 ``cpu`` controller path, from ``/proc/self/cgroup``."""
    v2 = v1 = None
    text = cat(under_root(root, "/proc/self/cgroup"), fallback="")
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _upwards(base: Path, path: str) -> Iterator[Path]:
    """``base/path``, then each parent up to ``base``: a quota set on an ancestor limits this cgroup too.

    Inside a container the path names the host's hierarchy while its own cgroup is mounted
    at ``base``; the walk then ends at ``base``, which is the container's cgroup."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    for n in range(len(parts), -1, -1):
        yield base.joinpath(*parts[:n])


def _quota_v2(root: str | os.PathLike[str], path: str) -> float | None:
    quotas = []
    for d in _upwards(under_root(root, "/sys/fs/cgroup"), path):
        fields = cat(d / "cpu.max", fallback="").split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                quotas.append(quota / period)
    return min(quotas, default=None)


def _quota_v1(root: str | os.PathLike[str], path: str) -> float | None:
    quotas = []
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for d in _upwards(under_root(root, f"/sys/fs/cgroup/{mount}"), path):
            # -1 (no quota), missing or garbage: no limit here
            quota, period = read_int(d / "cpu.cfs_quota_us", fallback=-1), read_int(d / "cpu.cfs_period_us", fallback=-1)
            if quota > 0 and period > 0:
                quotas.append(quota / period)
        if quotas:
            break
    return min(quotas, default=None)


def cpu_limits(root: str | os.PathLike[str] = "/", *, affinity: int | None = None) -> CpuLimits:
    """The machine's cores and threads, and what this process is held to.

    ``affinity`` overrides ``len(os.sched_getaffinity(0))`` (tests); the cgroup quota is read under ``root``."""
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    try:
        physical = psutil.cpu_count(logical=False) or logical
    except Exception:  # psutil may not know on exotic platforms
        physical = logical
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
    v2, v1 = _cgroup_paths(root)
    quota = _quota_v2(root, v2) if v2 is not None else None
    if quota is None and v1 is not None:
        quota = _quota_v1(root, v1)
    return CpuLimits(physical=physical, logical=logical, affinity_cpus=affinity, quota_cpus=quota)

