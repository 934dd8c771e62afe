"""RAPL energy counters from ``/sys/class/powercap`` (Intel, and AMD Zen on recent kernels).

Layout (each zone is a symlink into ``/sys/devices/virtual/powercap/intel-rapl/``)::

    /sys/class/powercap/intel-rapl:0/name                  package-0
    /sys/class/powercap/intel-rapl:0/energy_uj             cumulative µJ, wraps at ...
    /sys/class/powercap/intel-rapl:0/max_energy_range_uj   ... this value
    /sys/class/powercap/intel-rapl:0:0/name                core    (inside package-0)
    /sys/class/powercap/intel-rapl:0:1/name                uncore  (inside package-0)
    /sys/class/powercap/intel-rapl:0:2/name                dram    (NOT inside package-0)
    /sys/class/powercap/intel-rapl:1/name                  psys    (whole SoC platform)

The figure is ``psys`` when readable (it covers package and DRAM), otherwise every
``package-N`` plus every ``dram`` zone; ``core``/``uncore`` are reported as domains
but never added (they are part of the package). ``intel-rapl-mmio`` zones repeat
the package counter and are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ._source import DomainInfo, Energy, PowerSource, Reading, SourceInfo, Unreadable
from ._sysfs import PERMISSION_DENIED, cat, try_read_int, under_root

__all__ = ["RaplSource", "detect_rapl", "RAPL_PERMISSION_FIX"]

# Since Linux 5.10 energy_uj is root-only (CVE-2020-8694, the PLATYPUS power side channel).
RAPL_PERMISSION_FIX = (
    "RAPL energy_uj is root-only on this kernel (since 5.10, CVE-2020-8694). To let edge-runtime read it: "
    "`sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj` (until reboot) or a udev rule in "
    "/etc/udev/rules.d/90-rapl.rules: "
    "SUBSYSTEM==\"powercap\", ACTION==\"add\", RUN+=\"/bin/chmod a+r /sys%p/energy_uj\" "
    "(this exposes the power side channel to local users; prefer a group with chgrp + chmod g+r)"
)


class _Zone:
    __slots__ = ("domain", "energy_path", "max_range_uj", "in_total")

    def __init__(self, domain: str, energy_path: Path, max_range_uj: float | None, in_total: bool) -> None:
        self.domain = domain
        self.energy_path = energy_path
        self.max_range_uj = max_range_uj
        self.in_total = in_total


class RaplSource(PowerSource):
    kind = "rapl"

    def __init__(self, info: SourceInfo, zones: list[_Zone]) -> None:
        super().__init__(info)
        self._zones = [z for z in zones if any(d.name == z.domain and d.readable for d in info.domains)]
        # a DRAM zone of the total and its package: some servers list a DRAM zone that counts only with a BIOS
        # option, so it may stay still while its package moves; a still package (or psys) is stuck
        self._dram_package = {d.name: d.name.split("/")[0] for d in info.domains
                              if d.in_total and "/" in d.name and _zone_kind(d.name) == "dram"}

    def may_stay_still(self, domain: str) -> str | None:
        return self._dram_package.get(domain)

    def read(self) -> Mapping[str, Reading]:
        out: dict[str, Reading] = {}
        for zone in self._zones:
            value, problem = try_read_int(zone.energy_path)
            if value is None or value < 0:
                out[zone.domain] = Unreadable(f"energy_uj: {problem or f'negative value {value}'}")
            else:
                out[zone.domain] = Energy(uj=value, max_range_uj=zone.max_range_uj)
        return out


def _zone_kind(domain: str) -> str:
    """What a zone is, from its domain name: "package-0/dram@intel-rapl:0:2" -> "dram"."""
    return domain.split("/")[-1].split("@")[0]


def _zone_id(name: str) -> tuple[int, ...] | None:
    # "intel-rapl:0" -> (0,), "intel-rapl:0:2" -> (0, 2)
    prefix, _, rest = name.partition(":")
    if prefix != "intel-rapl" or not rest:
        return None
    try:
        return tuple(int(p) for p in rest.split(":"))
    except ValueError:
        return None


def detect_rapl(root: str | os.PathLike[str]) -> list[RaplSource]:
    base = under_root(root, "/sys/class/powercap")
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        entries = []
    zones_by_id: dict[tuple[int, ...], Path] = {}
    for entry in entries:
        zid = _zone_id(entry)
        if zid is not None and 1 <= len(zid) <= 2:
            zones_by_id[zid] = base / entry
    if not zones_by_id:
        return []

    names: dict[tuple[int, ...], str] = {}
    for zid, path in zones_by_id.items():
        names[zid] = cat(path / "name", fallback="") or f"zone-{':'.join(map(str, zid))}"

    # two zones under one name (firmware that names both packages package-0) would be one domain counted twice
    seen: set[str] = set()
    for zid in sorted(names):
        if len(zid) == 1:
            if names[zid] in seen:
                names[zid] = f"{names[zid]}@intel-rapl:{zid[0]}"
            seen.add(names[zid])

    domains: list[DomainInfo] = []
    zones: list[_Zone] = []
    for zid in sorted(zones_by_id):
        path = zones_by_id[zid]
        name = names[zid]
        if len(zid) == 1:
            domain = name
        else:
            domain = f"{names.get(zid[:1], f'zone-{zid[0]}')}/{name}"
            if domain in seen:
                domain = f"{domain}@intel-rapl:{':'.join(map(str, zid))}"
            seen.add(domain)
        value, problem = try_read_int(path / "energy_uj")
        max_range, _ = try_read_int(path / "max_energy_range_uj")
        readable = value is not None
        zones.append(_Zone(domain, path / "energy_uj", float(max_range) if max_range else None, False))
        domains.append(DomainInfo(name=domain, path=str(path / "energy_uj"), readable=readable, problem=problem,
                                  in_total=False))

    # choose what adds up: psys alone, else packages + dram zones
    readable = {d.name for d in domains if d.readable}
    psys = [d.name for d in domains if _zone_kind(d.name) == "psys" and d.name in readable]
    if psys:
        total = set(psys)
    else:
        # a dram zone counts with its package, never alone: DRAM energy is not the device's
        packages = {d.name for d in domains if d.name in readable and "/" not in d.name and d.name.startswith("package")}
        total = packages | {d.name for d in domains if d.name in readable and _zone_kind(d.name) == "dram"
                            and d.name.split("/")[0] in packages}
    domains = [DomainInfo(d.name, d.path, d.readable, d.problem, in_total=d.name in total) for d in domains]
    for z in zones:
        z.in_total = z.domain in total

    # only zones that would count matter: an unreadable core or uncore zone (inside its package) leaves nothing out,
    # nor, when psys is the total, an unreadable package or dram zone (psys holds them)
    counted = ([d for d in domains if _zone_kind(d.name) == "psys"] if psys else
               [d for d in domains if "/" not in d.name or _zone_kind(d.name) == "dram"])
    denied = [d for d in counted if d.problem == PERMISSION_DENIED]
    others = [d for d in counted if not d.readable and d.problem != PERMISSION_DENIED]
    ordered_total = [d.name for d in domains if d.in_total]
    usable = bool(ordered_total)
    problem = fix = None
    if not usable:
        if denied:
            # every denied zone: the listing below shows each, and "3" beside six unreadable ones read as a miscount
            problem = f"{PERMISSION_DENIED} on {sum(d.problem == PERMISSION_DENIED for d in domains)} energy_uj file(s)"
            fix = RAPL_PERMISSION_FIX
        else:
            problem = "no package or psys zone readable" + (f" ({others[0].problem})" if others else "")
    elif denied:
        # usable with what we can read, but say what is left out
        problem = f"{PERMISSION_DENIED} on {', '.join(d.name for d in denied)}"
        fix = RAPL_PERMISSION_FIX
    elif others:
        problem = "unreadable: " + ", ".join(f"{d.name} ({d.problem})" for d in others)
    label = "rapl:" + "+".join(ordered_total) if ordered_total else "rapl"
    info = SourceInfo(kind="rapl", label=label, present=True, usable=usable, domains=tuple(domains),
                      problem=problem, fix=fix)
    return [RaplSource(info, zones)]
