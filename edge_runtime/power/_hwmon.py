"""hwmon energy and power sensors from ``/sys/class/hwmon/hwmon*/``.

Unit conventions (Documentation/hwmon/sysfs-interface.rst): ``energyN_input`` is a
cumulative µJ counter, ``powerN_input`` / ``powerN_average`` are µW, ``inN_input``
is mV and ``currN_input`` mA; ``*_label`` names the channel and ``name`` the chip.

One chip is one source (``hwmon:amd_energy``, ``hwmon:ina3221``): summing across
chips would mix unrelated sensors. Within a chip the total avoids double counting:

* energy counters: the ``socket`` channels when there are any (``amd_energy``
  has one per core *and* one per socket), otherwise all of them; a core counter
  is inside its socket's (as RAPL's core zone is inside the package), so it never
  stands in for an unreadable socket: with no socket readable the chip is not usable;
* power rails: a channel labelled as the board input (``VDD_IN`` on NVIDIA
  Jetson INA3221 monitors, ``total``...) when there is one, otherwise all rails.

A channel that belongs in the total but cannot be read at detection (permission
denied, garbage) is left out of it and named in the source's ``problem``, as RAPL
does for an unreadable package zone: the source is still chosen with what it can
read, and every measurement warns that part of the device is left out.

The INA3221 driver exposes no ``power*`` files: its power is bus voltage × current
of the same channel (``inN_input`` × ``currN_input``, N = 1..3).
GPU chips (amdgpu, nouveau, radeon, i915, xe) are listed but never chosen: they
measure the GPU, not the CPU that runs inference.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._source import DomainInfo, Energy, Power, PowerSource, Reading, SourceInfo, Unreadable
from ._sysfs import PERMISSION_DENIED, cat, try_read_int, under_root

__all__ = ["HwmonSource", "detect_hwmon"]

_CHANNEL = re.compile(r"^(energy|power|in|curr)(\d+)_(input|average|label)$")
_GPU_CHIPS = frozenset({"amdgpu", "nouveau", "radeon", "i915", "xe"})
_INPUT_RAIL_LABELS = frozenset({"vdd_in", "total", "input", "system", "sys_total"})


@dataclass
class _Channel:
    domain: str
    kind: str  # "energy" | "power" | "vi" (voltage × current)
    paths: tuple[Path, ...]


class HwmonSource(PowerSource):
    kind = "hwmon"

    def __init__(self, info: SourceInfo, channels: list[_Channel]) -> None:
        super().__init__(info)
        self._channels = channels

    def read(self) -> Mapping[str, Reading]:
        out: dict[str, Reading] = {}
        for ch in self._channels:
            values = []
            for path in ch.paths:
                value, problem = try_read_int(path)
                if value is None:
                    out[ch.domain] = Unreadable(f"{path.name}: {problem}")
                    break
                values.append(value)
            else:
                if ch.kind == "energy":
                    out[ch.domain] = (Energy(uj=values[0]) if values[0] >= 0
                                      else Unreadable(f"negative energy {values[0]}"))
                elif ch.kind == "power":
                    out[ch.domain] = Power(uw=abs(values[0]))
                else:  # mV × mA = µW
                    out[ch.domain] = Power(uw=abs(values[0] * values[1]))
        return out


def _chip_channels(chip: Path) -> list[_Channel]:
    files: dict[str, Path] = {}
    # old drivers keep the attributes in hwmonN/device/
    for d in (chip / "device", chip):
        try:
            for entry in os.listdir(d):
                if _CHANNEL.match(entry):
                    files[entry] = d / entry
        except OSError:
            continue
    name = cat(chip / "name", fallback="")
    channels: list[_Channel] = []
    used: set[str] = set()

    def domain_for(label_file: str, default: str) -> str:
        label = cat(files[label_file], fallback="") if label_file in files else ""
        domain = label or default
        if domain in used:
            domain = f"{domain}#{default}"
        used.add(domain)
        return domain

    indexes: dict[str, set[int]] = {}
    for m in filter(None, map(_CHANNEL.match, files)):
        indexes.setdefault(m.group(1), set()).add(int(m.group(2)))
    for n in sorted(indexes.get("energy", ())):
        if f"energy{n}_input" in files:
            channels.append(_Channel(domain_for(f"energy{n}_label", f"energy{n}"), "energy",
                                     (files[f"energy{n}_input"],)))
    for n in sorted(indexes.get("power", ())):
        attr = f"power{n}_input" if f"power{n}_input" in files else f"power{n}_average"
        if attr in files:
            channels.append(_Channel(domain_for(f"power{n}_label", f"power{n}"), "power", (files[attr],)))
    if name == "ina3221" and "power" not in indexes:
        for n in (1, 2, 3):
            if f"in{n}_input" in files and f"curr{n}_input" in files:
                channels.append(_Channel(domain_for(f"in{n}_label", f"channel{n}"), "vi",
                                         (files[f"in{n}_input"], files[f"curr{n}_input"])))
    return channels


def _counter_total(channels: list[_Channel], readable: set[str]) -> list[str]:
    energy = [c.domain for c in channels if c.kind == "energy"]
    # socket channels are chosen whether or not they can be read: the cores inside them are not the device
    socket = [d for d in energy if "socket" in d.lower()]
    return [d for d in (socket or energy) if d in readable]


def _rail_total(channels: list[_Channel], readable: set[str]) -> list[str]:
    power = [c.domain for c in channels if c.kind != "energy" and c.domain in readable]
    inputs = [d for d in power if d.lower() in _INPUT_RAIL_LABELS]
    return inputs or power


def _totals(channels: list[_Channel], readable: set[str]) -> set[str]:
    return set(_counter_total(channels, readable) or _rail_total(channels, readable))


def _left_out(channels: list[_Channel], domains: list[DomainInfo]) -> list[DomainInfo]:
    """Unreadable channels that the total would count if they could be read."""
    everything = {d.name for d in domains}
    readable = {d.name for d in domains if d.readable}
    if _rail_total(channels, readable) and not _counter_total(channels, readable):
        # summed from the rails: counters that cannot be read measure the same rails, they leave nothing out
        intended = _rail_total(channels, everything)
    else:
        intended = _counter_total(channels, everything) or _rail_total(channels, everything)
    return [d for d in domains if not d.readable and d.name in intended]


def _problem(domains: list[DomainInfo], left_out: list[DomainInfo], totals: set[str]) -> str | None:
    """What keeps the chip's total from being whole (None: nothing), in the listing's and the warnings' words."""
    unreadable = ", ".join(f"{d.name} ({d.problem})" for d in left_out)
    if not any(d.readable for d in domains):
        return "no readable channel: " + "; ".join(f"{d.name}: {d.problem}" for d in domains)
    if not totals:
        readable = ", ".join(d.name for d in domains if d.readable)
        return f"cannot read {unreadable}, which make its total; {readable} are only part of it"
    if left_out:
        counted = ", ".join(d.name for d in domains if d.in_total)
        return f"unreadable: {unreadable}; the total counts only {counted}"
    return None


def _permission_fix(denied: list[Path]) -> str | None:
    if not denied:
        return None
    files = " ".join(str(p) for p in denied)
    return f"`sudo chmod a+r {files}` (until reboot), or a udev rule that does so when the device appears"


def detect_hwmon(root: str | os.PathLike[str]) -> list[HwmonSource]:
    base = under_root(root, "/sys/class/hwmon")
    try:
        entries = sorted(os.listdir(base), key=lambda e: (len(e), e))
    except OSError:
        return []
    found: list[HwmonSource] = []
    labels: set[str] = set()
    for entry in entries:
        chip = base / entry
        channels = _chip_channels(chip)
        if not channels:
            continue
        name = cat(chip / "name", fallback="") or entry
        # two chips of one kind (a Jetson AGX Orin's ina3221 at 0x40 and 0x41): the second is told by its entry,
        # or --source could never choose it
        label = f"hwmon:{name}" if f"hwmon:{name}" not in labels else f"hwmon:{name}@{entry}"
        labels.add(label)
        domains = []
        denied: list[Path] = []
        for ch in channels:
            problem = None
            for path in ch.paths:
                value, problem = try_read_int(path)
                if value is None:
                    if problem == PERMISSION_DENIED:
                        denied.append(path)
                    problem = f"{path.name}: {problem}"
                    break
            domains.append(DomainInfo(name=ch.domain, path=str(ch.paths[0]), readable=problem is None, problem=problem))
        readable = {d.name for d in domains if d.readable}
        totals = _totals(channels, readable)
        left_out = _left_out(channels, domains)
        domains = [DomainInfo(d.name, d.path, d.readable, d.problem, in_total=d.name in totals) for d in domains]
        usable = bool(totals)
        problem = fix = None
        if name in _GPU_CHIPS:
            usable, problem = False, "measures a GPU only; not used for the device figure"
        else:
            problem = _problem(domains, left_out, totals)
            fix = _permission_fix(denied) if problem else None
        # what the chip offers, read or not: a chip of energy counters whose socket counter is unreadable has no rails
        has_energy = any(c.kind == "energy" for c in channels if not totals or c.domain in totals)
        info = SourceInfo(kind="hwmon", label=label, present=True, usable=usable, domains=tuple(domains),
                          problem=problem, fix=fix,
                          detail=f"{entry} ({'energy counters' if has_energy else 'power rails'})")
        found.append(HwmonSource(info, channels))
    # exact counters before sampled power rails
    found.sort(key=lambda s: 0 if "energy counters" in (s.info.detail or "") else 1)
    return found
