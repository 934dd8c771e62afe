"""Raspberry Pi 5 PMIC rails from ``vcgencmd pmic_read_adc``.

The firmware prints one line per ADC channel, currents first, then voltages::

     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.06012345A
      VDD_CORE_A current(7)=1.23456700A
     ...
      VDD_CORE_V volt(15)=0.72345670V
         EXT5V_V volt(24)=5.10123400V

A rail's power is its voltage × its current (``VDD_CORE_V`` × ``VDD_CORE_A``);
the source's figure is the sum over rails that have both. ``EXT5V_V`` (the
USB-C input) and ``BATT_V`` (the RTC cell) have no current and are skipped.
The rails cover the SoC, memory and on-board supplies but not what USB devices,
HATs or an NVMe drive draw from 5 V, nor the PMIC's conversion losses, so the
figure is below what a USB-C meter shows: it is a measurement of the rails, not
of the wall.

Each reading spawns a process (tens of ms of CPU on the Pi), so the source is
marked expensive: windows use the background sampler's readings instead of
reading at their boundaries.

``vcgencmd`` is looked for under the root directory (``<root>/usr/bin``,
``<root>/opt/vc/bin``) and, when the root is ``/``, on ``PATH``, so a test tree
can ship a script that prints a recorded output.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._source import DomainInfo, Power, PowerSource, Reading, SourceInfo, Unreadable
from ._sysfs import cat, under_root

__all__ = ["RpiPmicSource", "detect_rpi_pmic", "parse_pmic_output", "PmicRail"]

_LINE = re.compile(
    r"^\s*(?P<rail>\S+?)_(?P<unit>[AV])\s+(?:current|volt)\((?P<channel>\d+)\)=(?P<value>[-+0-9.eE]+)(?P=unit)\s*$"
)
_PI5_MODELS = ("Raspberry Pi 5", "Raspberry Pi 500", "Compute Module 5")
_TIMEOUT_S = 5.0
_VCGENCMD_FIX = ("vcgencmd needs access to /dev/vcio: add the user to the video group "
                 "(`sudo usermod -aG video $USER`, then log in again)")


@dataclass(frozen=True)
class PmicRail:
    volts: float | None = None
    amps: float | None = None

    @property
    def watts(self) -> float | None:
        if self.volts is None or self.amps is None:
            return None
        return abs(self.volts * self.amps)


def parse_pmic_output(text: str) -> dict[str, PmicRail]:
    """Rails of a ``vcgencmd pmic_read_adc`` output, by name (``VDD_CORE``). Unparsable lines are skipped."""
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        if not math.isfinite(value):  # "1e999" parses as infinity: as unparsable as garbage
            continue
        (amps if m.group("unit") == "A" else volts)[m.group("rail")] = value
    names = list(dict.fromkeys([*amps, *volts]))
    return {n: PmicRail(volts=volts.get(n), amps=amps.get(n)) for n in names}


def _run(exe: str) -> tuple[str | None, str | None]:
    try:
        proc = subprocess.run([exe, "pmic_read_adc"], capture_output=True, text=True, errors="replace",
                              timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{exe} pmic_read_adc: {err}"
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"{exe} pmic_read_adc exited {proc.returncode}" + (f": {detail[-1]}" if detail else "")
    return proc.stdout, None


class RpiPmicSource(PowerSource):
    kind = "rpi-pmic"
    expensive = True

    def __init__(self, info: SourceInfo, exe: str) -> None:
        super().__init__(info)
        self._exe = exe
        self._rails = [d.name for d in info.domains if d.readable]

    def read(self) -> Mapping[str, Reading]:
        text, problem = _run(self._exe)
        if text is None:
            return {rail: Unreadable(problem or "no output") for rail in self._rails}
        rails = parse_pmic_output(text)
        out: dict[str, Reading] = {}
        for name in self._rails:
            watts = rails[name].watts if name in rails else None
            out[name] = Unreadable("rail missing from pmic_read_adc output") if watts is None else Power(uw=watts * 1e6)
        return out


def _find_vcgencmd(root: str | os.PathLike[str]) -> str | None:
    for rel in ("/usr/bin/vcgencmd", "/opt/vc/bin/vcgencmd"):
        path = under_root(root, rel)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    if Path(root).resolve() == Path("/").resolve():
        return shutil.which("vcgencmd")
    return None


def detect_rpi_pmic(root: str | os.PathLike[str]) -> list[RpiPmicSource]:
    model = (cat(under_root(root, "/sys/firmware/devicetree/base/model"), fallback="")
             or cat(under_root(root, "/proc/device-tree/model"), fallback=""))
    is_pi5 = any(m in model for m in _PI5_MODELS)
    exe = _find_vcgencmd(root)
    if exe is None:
        if not is_pi5:
            return []
        info = SourceInfo(kind="rpi-pmic", label="rpi-pmic", present=True, usable=False, detail=model,
                          problem="vcgencmd not found",
                          fix="install vcgencmd (Raspberry Pi OS ships it in raspi-utils)")
        return [RpiPmicSource(info, "")]
    text, problem = _run(exe)
    rails = parse_pmic_output(text) if text is not None else {}
    domains = tuple(
        DomainInfo(name=name, path=f"{exe} pmic_read_adc", readable=rail.watts is not None,
                   problem=None if rail.watts is not None else "voltage only (no current channel)",
                   in_total=rail.watts is not None)
        for name, rail in rails.items()
    )
    usable = any(d.readable for d in domains)
    fix = None
    if text is None:
        if problem and ("vcio" in problem or "VCHI" in problem or "ermission" in problem):
            fix = _VCGENCMD_FIX
    elif not usable:
        problem = "pmic_read_adc printed no rail currents (only Raspberry Pi 5-family boards have the PMIC ADC)"
    info = SourceInfo(kind="rpi-pmic", label="rpi-pmic", present=True, usable=usable, domains=domains,
                      problem=problem, fix=fix, detail=model or None)
    return [RpiPmicSource(info, exe)]
