"""Device profiles for the CPU-time estimate (used only when no counter is readable).

A profile has two figures:

* ``active_watts_per_core``: extra power while one logical CPU is busy, so that
  one CPU-second costs that many joules on top of idle;
* ``idle_watts``: the whole device's power with nothing running.

They are rough by nature (frequency, temperature, peripherals and the power
supply all move them by tens of percent), which is why every figure computed
from them is labelled ``estimate:<profile>`` and ``estimated=True``. Measure
your own board once with a real counter or a USB meter and set
``[power] active_watts_per_core`` / ``idle_watts``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["DeviceProfile", "PROFILES", "get_profile", "custom_profile"]


@dataclass(frozen=True)
class DeviceProfile:
    """What the estimate assumes of a device: watts per busy core and idle watts (finite, >= 0)."""

    name: str
    active_watts_per_core: float
    idle_watts: float
    description: str = ""

    def __post_init__(self) -> None:
        for field_name in ("active_watts_per_core", "idle_watts"):
            value = getattr(self, field_name)
            # finite too: an infinite profile gave infinite joules (QA UU)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ConfigError(f"must be a finite number >= 0, got {value!r}", field=f"power.{field_name}")

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "active_watts_per_core": self.active_watts_per_core,
                "idle_watts": self.idle_watts, "description": self.description}


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        # Raspberry Pi 4 Model B, 4 × Cortex-A72.
        # idle 2.7 W: pidramble.com "Power Consumption Benchmarks" (Jeff Geerling), Pi 4 B idle 540 mA at 5 V.
        # active: same page, `stress --cpu 4` draws 1280 mA (6.4 W), so (6.4 - 2.7) / 4 = 0.925 W per busy core.
        # Cross-check: Raspberry Pi documentation, "Power supply" table, Pi 4 B typical bare-board active
        # current 600 mA (3.0 W), i.e. light load sits just above our idle figure.
        DeviceProfile("raspberry-pi-4", active_watts_per_core=0.925, idle_watts=2.7,
                      description="Raspberry Pi 4 Model B (4x Cortex-A72)"),
        # Raspberry Pi 5, 4 × Cortex-A76 at 2.4 GHz.
        # idle 3.0 W: u-labs.de "So verbraucht der Raspberry Pi 5 ausgeschaltet bis zu 180x weniger Strom"
        # (Raspberry Pi OS 12): "im Leerlauf etwa 3W".
        # Raspberry Pi documentation, "Power supply" table: typical bare-board active current 800 mA (4.0 W).
        # active 1.2 W per busy core: ASSUMPTION, not a cited measurement: 4 busy cores then give 7.8 W,
        # about 1.3x the Pi 4's per-core figure for a faster core on a smaller process. Pi 5 boards have a
        # real counter (source rpi-pmic), so prefer it; use this profile only without vcgencmd.
        DeviceProfile("raspberry-pi-5", active_watts_per_core=1.2, idle_watts=3.0,
                      description="Raspberry Pi 5 (4x Cortex-A76)"),
        # A thin-and-light x86 laptop, e.g. Intel Core i7-1165G7 (4 cores / 8 threads).
        # active 3.5 W per busy logical CPU: Intel ARK gives a configurable TDP of 12-28 W for that part;
        # 28 W / 8 threads = 3.5 W.
        # idle 5 W: ASSUMPTION for a 13-14" laptop at idle with the screen on (typically 3-8 W).
        DeviceProfile("laptop-x86", active_watts_per_core=3.5, idle_watts=5.0,
                      description="x86 laptop (15-28 W class CPU)"),
        # A desktop, e.g. AMD Ryzen 5 5600X (6 cores / 12 threads).
        # active 5.4 W per busy logical CPU: AMD's specification gives a 65 W TDP; 65 W / 12 threads = 5.4 W.
        # idle 40 W: ASSUMPTION for a whole desktop without a discrete GPU under load, measured at the wall.
        DeviceProfile("desktop-x86", active_watts_per_core=5.4, idle_watts=40.0,
                      description="x86 desktop (65 W class CPU)"),
        # Unknown device: ASSUMPTION, a round value between the Raspberry Pi and laptop profiles so that
        # neither a Pi nor a laptop is off by more than about 2x. Pick a real profile when you can.
        DeviceProfile("generic", active_watts_per_core=2.0, idle_watts=4.0,
                      description="unknown device (round middle values)"),
    )
}


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown device profile {name!r} (known: {', '.join(PROFILES)})",
                          field="power.profile") from None


def custom_profile(base: str | DeviceProfile, *, active_watts_per_core: float | None = None,
                   idle_watts: float | None = None) -> DeviceProfile:
    """``base`` with user overrides; named ``custom`` when anything was overridden."""
    profile = get_profile(base) if isinstance(base, str) else base
    if active_watts_per_core is None and idle_watts is None:
        return profile
    return DeviceProfile(
        "custom",
        active_watts_per_core=profile.active_watts_per_core if active_watts_per_core is None else active_watts_per_core,
        idle_watts=profile.idle_watts if idle_watts is None else idle_watts,
        description=f"{profile.name} with user overrides",
    )
