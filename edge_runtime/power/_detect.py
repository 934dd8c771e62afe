"""Which source measures this device: detection in a fixed priority order.

``rapl`` > ``hwmon`` > ``rpi-pmic`` > ``battery`` > ``estimate``: exact on-chip
counters first, then board sensors, then the battery gauge (coarse, and only
while discharging), and the CPU-time estimate only when nothing is readable.
Present-but-unusable sources ahead of the chosen one (RAPL denied to non-root,
a battery on AC) become notes that every measurement carries in its warnings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from ..errors import ConfigError, EnergyError
from ._battery import detect_battery
from ._estimate import EstimateSource
from ._hwmon import detect_hwmon
from ._profiles import DeviceProfile, get_profile
from ._rapl import detect_rapl
from ._rpi_pmic import detect_rpi_pmic
from ._source import PowerSource, SourceInfo

__all__ = ["SOURCE_PRIORITY", "Detection", "detect", "describe_sources"]

SOURCE_PRIORITY: tuple[str, ...] = ("rapl", "hwmon", "rpi-pmic", "battery", "estimate")

_DETECTORS: dict[str, Callable[[str | os.PathLike[str]], Sequence[PowerSource]]] = {
    "rapl": detect_rapl,
    "hwmon": detect_hwmon,
    "rpi-pmic": detect_rpi_pmic,
    "battery": detect_battery,
}
_ABSENT = {
    "rapl": "no /sys/class/powercap/intel-rapl:* zones",
    "hwmon": "no /sys/class/hwmon chip with energy or power sensors",
    "rpi-pmic": "not a Raspberry Pi 5 (no vcgencmd)",
    "battery": "no system battery in /sys/class/power_supply",
}


@dataclass
class Detection:
    root: str
    candidates: list[PowerSource]
    absent: list[SourceInfo]
    estimate: EstimateSource
    chosen: PowerSource | EstimateSource
    # present-but-unusable sources ranked above the chosen one (permission denied, on AC...)
    problems: list[str] = field(default_factory=list)
    # set when the estimate is used: says so, with the profile's figures
    estimate_note: str | None = None

    @property
    def notes(self) -> list[str]:
        return self.problems + ([self.estimate_note] if self.estimate_note else [])

    def infos(self) -> list[SourceInfo]:
        """Every source kind in priority order (absent ones included), the chosen one flagged."""
        by_kind: dict[str, list[SourceInfo]] = {k: [] for k in SOURCE_PRIORITY}
        given: list[SourceInfo] = []  # a source object handed to the meter (tests) comes first
        for src in self.candidates:
            info = replace(src.info, chosen=src is self.chosen)
            if src.kind in by_kind:
                by_kind[src.kind].append(info)
            else:
                given.append(info)
        for info in self.absent:
            by_kind[info.kind].append(info)
        by_kind["estimate"].append(replace(self.estimate.info, chosen=self.chosen is self.estimate))
        return given + [info for kind in SOURCE_PRIORITY for info in by_kind[kind]]


def _describe_problem(info: SourceInfo) -> str:
    text = f"{info.label}: {info.problem or 'not usable'}"
    return f"{text}. Fix: {info.fix}" if info.fix else text


def detect(root: str | os.PathLike[str] = "/", source: str = "auto",
           profile: str | DeviceProfile = "generic") -> Detection:
    """Find every source under ``root`` and choose one (``source='auto'``, a kind, or a label)."""
    prof = get_profile(profile) if isinstance(profile, str) else profile
    estimate = EstimateSource(prof)
    known = set(SOURCE_PRIORITY)
    if source != "auto" and source not in known and ":" not in source:
        raise ConfigError(f"unknown power source {source!r} (known: auto, {', '.join(SOURCE_PRIORITY)}, "
                          "or a label such as hwmon:amd_energy)", field="power.source")
    candidates: list[PowerSource] = []
    absent: list[SourceInfo] = []
    for kind, detector in _DETECTORS.items():
        found = list(detector(root))
        if found:
            candidates.extend(found)
        else:
            absent.append(SourceInfo(kind=kind, label=kind, present=False, usable=False, problem=_ABSENT[kind]))

    chosen: PowerSource | EstimateSource | None = None
    problems: list[str] = []
    if source == "auto":
        for cand in candidates:
            if cand.usable:
                chosen = cand
                break
            problems.append(_describe_problem(cand.info))
        if chosen is None:
            chosen = estimate
    elif source == "estimate" or source == estimate.label:
        chosen = estimate
    else:
        wanted = [c for c in candidates if source in (c.kind, c.label)]
        usable = [c for c in wanted if c.usable]
        if not usable:
            if wanted:
                raise EnergyError(f"power source {source!r} is not usable here: {_describe_problem(wanted[0].info)}")
            why = _ABSENT.get(source, "not found")
            raise EnergyError(f"power source {source!r} is not present under {os.fspath(root)!r}: {why}")
        chosen = usable[0]

    estimate_note = None
    if chosen is estimate:
        estimate_note = (
            f"no readable power counter, so energy is ESTIMATED from CPU time with device profile "
            f"{prof.name!r} ({prof.active_watts_per_core:g} W per busy CPU + {prof.idle_watts:g} W idle); "
            "it is not a measurement"
            + ("" if candidates else f" (looked for: {', '.join(k for k in _DETECTORS)})")
        )
    else:
        problems = [f"{n}; using {chosen.label}" for n in problems]
        if chosen.info.problem:  # usable, but part of the device is not counted: say so with every measurement
            problems.append(f"{chosen.label} leaves part of the device out: {_describe_problem(chosen.info)}")
    return Detection(root=os.fspath(root), candidates=candidates, absent=absent, estimate=estimate,
                     chosen=chosen, problems=problems, estimate_note=estimate_note)


def describe_sources(sysfs_root: str | os.PathLike[str] = "/", source: str = "auto",
                     profile: str | DeviceProfile = "generic") -> list[SourceInfo]:
    """Every source kind, in priority order: present?, domains, readability, problem, fix, and which is chosen."""
    return detect(sysfs_root, source, profile).infos()
