"""Fake device trees for the power tests: the kernel's real layouts and units, built in tmp_path.

Class directories are symlinks into /sys/devices, as on a real system, so the
readers are exercised through the same indirection.
"""

from __future__ import annotations

import ctypes
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

# max_energy_range_uj of the package zone on Intel client CPUs (2^32 * 61 µJ, about 262 kJ)
RAPL_MAX_RANGE_UJ = 262143328850

DATA = Path(__file__).parent / "data"


def write(path: Path, value: object) -> Path:
    """Replace the file's content atomically: a sysfs read never sees a half-written value, nor may ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)
    return path


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


# --- RAPL -------------------------------------------------------------------------------------

def add_rapl_zone(root: Path, zone: str, name: str, energy_uj: int,
                  max_range_uj: int | None = RAPL_MAX_RANGE_UJ) -> Path:
    """``zone`` is ``"0"`` (a package) or ``"0:1"`` (a subzone); returns the ``energy_uj`` path."""
    base = root / "sys/devices/virtual/powercap/intel-rapl"
    ids = zone.split(":")
    device = base / f"intel-rapl:{ids[0]}"
    if len(ids) == 2:
        device = device / f"intel-rapl:{zone}"
    write(device / "name", name)
    write(device / "enabled", 1)
    if max_range_uj is not None:
        write(device / "max_energy_range_uj", max_range_uj)
    write(device / "energy_uj", energy_uj)
    link = root / f"sys/class/powercap/intel-rapl:{zone}"
    if not link.exists():
        _link(link, device)
    control = root / "sys/class/powercap/intel-rapl"
    if not control.exists():  # the control type entry, not a zone
        write(base / "enabled", 1)
        _link(control, base)
    return link / "energy_uj"


# --- hwmon ------------------------------------------------------------------------------------

def add_hwmon(root: Path, index: int, name: str, attrs: dict[str, object], device: str = "platform/sensor.0") -> Path:
    chip = root / "sys/devices" / device / "hwmon" / f"hwmon{index}"
    write(chip / "name", name)
    for attr, value in attrs.items():
        write(chip / attr, value)
    link = root / f"sys/class/hwmon/hwmon{index}"
    _link(link, chip)
    return link


# --- power_supply ---------------------------------------------------------------------------

def add_power_supply(root: Path, name: str, attrs: dict[str, object]) -> Path:
    dev = root / "sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0C0A:00/power_supply" / name
    for attr, value in attrs.items():
        write(dev / attr, value)
    link = root / f"sys/class/power_supply/{name}"
    _link(link, dev)
    return link


def add_battery(root: Path, name: str = "BAT0", status: str = "Discharging", **attrs: object) -> Path:
    return add_power_supply(root, name, {"type": "Battery", "status": status, "present": 1,
                                         "technology": "Li-ion", **attrs})


def add_ac(root: Path, online: bool) -> Path:
    return add_power_supply(root, "AC", {"type": "Mains", "online": int(online)})


# --- Raspberry Pi 5 ---------------------------------------------------------------------------

VCGENCMD = """#!/bin/sh
# stand-in for the firmware tool: prints the recorded output next to the tree root
if [ "$1" != "pmic_read_adc" ]; then
    echo 'error=2 error_msg="Command not registered"' >&2
    exit 2
fi
exec cat "$(dirname "$0")/../../pmic_read_adc.txt"
"""


def add_pi5(root: Path, output: str) -> Path:
    """A Pi 5 tree with a vcgencmd that prints ``output``; returns the file to rewrite for new readings."""
    (root / "sys/firmware/devicetree/base").mkdir(parents=True, exist_ok=True)
    (root / "sys/firmware/devicetree/base/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    exe = root / "usr/bin/vcgencmd"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(VCGENCMD)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    sample = root / "pmic_read_adc.txt"
    sample.write_text(output)
    return sample


def scale_pmic_currents(text: str, factor: float) -> str:
    """The same output with every current multiplied by ``factor`` (a heavier load)."""
    out = []
    for line in text.splitlines():
        head, sep, tail = line.partition("=")
        if sep and tail.endswith("A"):
            line = f"{head}={float(tail[:-1]) * factor:.8f}A"
        out.append(line)
    return "\n".join(out) + "\n"


# --- clocks -----------------------------------------------------------------------------------

class ManualClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeCpuClock:
    """CPU-seconds set by the test: ``process`` for this process, ``system`` for all busy CPUs."""

    def __init__(self, cpus: int = 4) -> None:
        self.process = 0.0
        self.system = 0.0
        self.cpus = cpus

    def process_cpu_s(self) -> float:
        return self.process

    def system_busy_cpu_s(self) -> float:
        return self.system

    def cpu_count(self) -> int:
        return self.cpus

    def run(self, process_s: float, others_s: float = 0.0) -> None:
        self.process += process_s
        self.system += process_s + others_s


# --- permissions ----------------------------------------------------------------------------

_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_dac_capabilities() -> None:
    """Make the calling thread (and threads it starts) obey file modes, as a non-root user does.

    Linux capabilities are per thread, so the test process keeps its own.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    mask = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= mask
    data[0].permitted &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def call_unprivileged(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` where a file with mode 000 really is unreadable, and return its result.

    As a normal user that is everywhere; as root (this CI VM) it is a thread
    without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH.
    """
    if os.geteuid() != 0:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            _drop_dac_capabilities()
        except (OSError, AttributeError) as err:
            box["skip"] = f"cannot drop capabilities to test permission errors: {err}"
            return
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as err:  # re-raised in the test thread
            box["error"] = err

    thread = threading.Thread(target=target, name="unprivileged")
    thread.start()
    thread.join()
    if "skip" in box:
        pytest.skip(box["skip"])
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def make_unreadable(path: Path) -> None:
    path.chmod(0)
