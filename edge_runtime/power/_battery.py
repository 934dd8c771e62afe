"""Laptop/handheld batteries from ``/sys/class/power_supply/*`` (type ``Battery``).

Units (Documentation/ABI/testing/sysfs-class-power): ``power_now`` µW,
``current_now`` µA, ``voltage_now`` µV, ``energy_now`` µWh, ``charge_now`` µAh.
Some drivers report discharge current/power as negative numbers, so magnitudes
are used.

Readings, best first: ``power_now``; ``current_now`` × ``voltage_now``; the fall
of ``energy_now`` (or ``charge_now`` × ``voltage_now``) between readings. The
gauge behind all of them is typically refreshed by the embedded controller every
few seconds, so this is the coarsest measured source.

Only a *discharging* battery measures the device's draw. On AC (status
``Charging``, ``Full``, ``Not charging``) the numbers describe charging or
nothing at all, so the battery is reported as present but not usable and
detection falls through to the next source; if the machine is plugged in
during a window, nothing measures the rest of it, so that window reports the
CPU-time estimate with a warning (see ``_meter``).
On battery power every system battery with a figure is read: one not
discharging reads 0 W while another does, and may take over later (a laptop
switching packs). Batteries with ``scope`` ``Device`` (a mouse, a headset) are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ._source import DomainInfo, Power, PowerSource, Reading, Remaining, SourceInfo, Unreadable
from ._sysfs import cat, try_read_int, under_root

__all__ = ["BatterySource", "detect_battery"]

# µWh -> µJ
_UJ_PER_UWH = 3600.0
# µAh × µV = 1e-12 Wh = 3.6e-9 J = 3.6e-3 µJ
_UJ_PER_UAH_UV = 3.6e-3


def _on_ac_problem(status: str) -> str:
    return f"on AC power (status: {status}): the battery figure is not a measurement of the device's draw"


class BatterySource(PowerSource):
    kind = "battery"

    def __init__(self, info: SourceInfo, batteries: list[Path]) -> None:
        super().__init__(info)
        self._batteries = batteries

    def read(self) -> Mapping[str, Reading]:
        statuses = {bat: cat(bat / "status", fallback="Unknown") for bat in self._batteries}
        # batteries in parallel are separate supplies: while one discharges, one that does not (run down, idle)
        # supplies nothing, and the discharging ones measure the whole draw; with none discharging, it is on AC
        any_discharging = "Discharging" in statuses.values()
        return {bat.name: _read_battery(bat, status, any_discharging) for bat, status in statuses.items()}


def _read_battery(bat: Path, status: str, any_discharging: bool) -> Reading:
    if status != "Discharging":
        return Power(uw=0) if any_discharging else Unreadable(_on_ac_problem(status))
    reading, _ = _measure(bat)
    return reading


def _measure(bat: Path) -> tuple[Reading, str]:
    """The best available reading and the file(s) it came from."""
    power, _ = try_read_int(bat / "power_now")
    if power is not None:
        return Power(uw=abs(power)), "power_now"
    current, _ = try_read_int(bat / "current_now")
    voltage, vproblem = try_read_int(bat / "voltage_now")
    if current is not None and voltage is not None:
        # µA × µV = pW
        return Power(uw=abs(current) * abs(voltage) / 1e6), "current_now × voltage_now"
    energy, eproblem = try_read_int(bat / "energy_now")
    if energy is not None:
        return Remaining(uj=abs(energy) * _UJ_PER_UWH), "energy_now"
    charge, _ = try_read_int(bat / "charge_now")
    if charge is not None and voltage is not None:
        return Remaining(uj=abs(charge) * abs(voltage) * _UJ_PER_UAH_UV), "charge_now × voltage_now"
    return Unreadable(f"no readable power_now, current_now/voltage_now, energy_now or charge_now "
                      f"({eproblem or vproblem})"), ""


def detect_battery(root: str | os.PathLike[str]) -> list[BatterySource]:
    base = under_root(root, "/sys/class/power_supply")
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    batteries: list[Path] = []
    ac_online = False
    for entry in entries:
        supply = base / entry
        kind = cat(supply / "type", fallback="")
        if kind == "Battery":
            if cat(supply / "scope", fallback="System") == "Device":
                continue
            if cat(supply / "present", fallback="1") == "0":
                continue
            batteries.append(supply)
        elif kind and cat(supply / "online", fallback="0") == "1":
            ac_online = True
    if not batteries:
        return []

    found = [(bat, cat(bat / "status", fallback="Unknown"), *_measure(bat)) for bat in batteries]
    # on battery power, every battery with a figure is measured: one idle now (run down, or the one the laptop is not
    # drawing from) reads 0 W while another discharges, and may be the one discharging later (a hot-swap, a
    # dual-battery laptop switching packs). Left out, a switch ended measuring for the meter's life
    on_battery = any(status == "Discharging" and not isinstance(reading, Unreadable) for _, status, reading, _ in found)
    domains: list[DomainInfo] = []
    usable_batteries: list[Path] = []
    for bat, status, reading, how in found:
        if isinstance(reading, Unreadable):
            domains.append(DomainInfo(bat.name, str(bat), readable=False, problem=reading.reason))
        elif not on_battery:
            domains.append(DomainInfo(bat.name, str(bat / how.split(" ")[0]), readable=False,
                                      problem=_on_ac_problem(status)))
        else:
            domains.append(DomainInfo(bat.name, str(bat / how.split(" ")[0]), readable=True))
            usable_batteries.append(bat)
    usable = bool(usable_batteries)
    problem = None
    if not usable:
        on_ac = [d for d in domains if d.problem and d.problem.startswith("on AC")]
        problem = on_ac[0].problem if on_ac else "; ".join(f"{d.name}: {d.problem}" for d in domains)
    names = [b.name for b in (usable_batteries or batteries)]
    info = SourceInfo(kind="battery", label="battery:" + "+".join(names), present=True, usable=usable,
                      domains=tuple(domains), problem=problem,
                      detail="AC adapter online" if ac_online else "no AC adapter online")
    return [BatterySource(info, usable_batteries)]
