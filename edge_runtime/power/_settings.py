"""``[power]`` settings: which source, which device profile, how often to sample.

Embedded as the ``power`` section of the daemon's settings; on its own it is
loaded with ``env_prefix="EDGE_RUNTIME_POWER"`` so the environment variables are
the same either way (``EDGE_RUNTIME_POWER_PROFILE=raspberry-pi-4``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from ..config import documented, setting
from ..errors import ConfigError
from ._profiles import PROFILES

__all__ = ["PowerSettings", "SourceName", "POWER_ENV_PREFIX", "POWER_SECTION"]

# the [power] section's variables wherever its settings are read on their own (EDGE_RUNTIME_POWER_PROFILE)
POWER_ENV_PREFIX = "EDGE_RUNTIME_POWER"
# ... and the name its fields have in errors then (power.sysfs_root), as in the daemon's settings
POWER_SECTION = "power"

SourceName = Literal["auto", "rapl", "hwmon", "rpi-pmic", "battery", "estimate"]
_KINDS = get_args(SourceName)


@documented
@dataclass(frozen=True)
class PowerSettings:
    """How the device's energy is measured (``[power]``; ``EDGE_RUNTIME_POWER_*``)."""

    # a kind, or one source's label (`edge-runtime power` lists them): with two hwmon chips, say which
    source: str = setting(
        "auto", help="energy source: auto (rapl > hwmon > rpi-pmic > battery > estimate), one of them, "
                     "or a label from `edge-runtime power` such as hwmon:ina3221")
    profile: str = setting(
        "generic", help=f"device profile for the CPU-time estimate: {', '.join(PROFILES)}")
    sample_interval_ms: int = setting(
        200, help="how often power sensors are read while a measurement is open, in ms")
    active_watts_per_core: float | None = setting(
        None, help="override the profile: watts drawn per busy CPU on top of idle")
    idle_watts: float | None = setting(
        None, help="override the profile: watts the whole device draws at idle")
    sysfs_root: Path = setting(
        Path("/"), help="filesystem root to read /sys from (a test tree, or / for the real device)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        kind, _, label = str(self.source).partition(":")
        if not isinstance(self.source, str) or kind not in _KINDS or (":" in self.source and (not label or kind == "auto")):
            raise ConfigError(f"must be {', '.join(_KINDS)}, or a source's label such as hwmon:ina3221 "
                              f"(`edge-runtime power` lists them), got {self.source!r}", field="power.source")
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown device profile {self.profile!r} (known: {', '.join(PROFILES)})",
                              field="power.profile")
        if isinstance(self.sample_interval_ms, bool) or not isinstance(self.sample_interval_ms, int) \
                or not 10 <= self.sample_interval_ms <= 60_000:
            raise ConfigError(f"must be an integer between 10 and 60000, got {self.sample_interval_ms!r}",
                              field="power.sample_interval_ms")
        if not str(self.sysfs_root).strip():  # else the working directory, read as this device's /sys
            raise ConfigError("must name a directory (/ for this device)", field="power.sysfs_root")
        for name in ("active_watts_per_core", "idle_watts"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < 10_000):
                raise ConfigError(f"must be a number of watts >= 0, got {value!r}", field=f"power.{name}")
