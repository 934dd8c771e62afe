"""On-device energy per request, read from OS counters, with an honest label.

::

    from edge_runtime.power import default_meter

    with default_meter().measure() as m:
        run_generation()
    m.joules, m.source, m.estimated, m.process_joules, m.warnings

Sources, tried in this order when ``source="auto"`` (the first usable one wins):

1. ``rapl`` - ``/sys/class/powercap/intel-rapl:*`` ``energy_uj`` counters (Intel;
   AMD Zen on recent kernels): package, core, uncore, dram, psys. Cumulative µJ;
   wraps at ``max_energy_range_uj`` are counted by the sampler, however many
   happen in a window. Root-only since Linux 5.10: a permission error gives one
   warning naming the fix (``chmod a+r`` or a udev rule) and the next source.
   Label ``rapl:package-0`` (the summed zones).
2. ``hwmon`` - ``/sys/class/hwmon/hwmon*/`` ``energy*_input`` (µJ) or
   ``power*_input`` (µW), e.g. ``amd_energy``, INA3221 rails on NVIDIA Jetson.
   Label ``hwmon:<chip>``.
3. ``rpi-pmic`` - Raspberry Pi 5 PMIC rails from ``vcgencmd pmic_read_adc``:
   Σ volts × amps, sampled (rails only: USB/HAT loads and PMIC losses excluded).
4. ``battery`` - ``/sys/class/power_supply/*`` of type Battery, only while
   discharging: ``power_now``, ``current_now`` × ``voltage_now``, or the fall of
   ``energy_now`` / ``charge_now``. On AC the battery says nothing about the
   draw, so it is skipped with a warning. Label ``battery:BAT0``.
5. ``estimate`` - no counter readable: this machine's busy CPU time × the
   device profile's watts per busy CPU, plus its idle watts × time (profiles
   ``raspberry-pi-4``, ``raspberry-pi-5``, ``laptop-x86``, ``desktop-x86``,
   ``generic``; overridable in ``[power]``). Label ``estimate:<profile>``,
   ``estimated=True``: never presented as a measurement.

Power-only sources are read by one shared background thread every
``sample_interval_ms`` while a window is open and integrated with the trapezoid
rule; a window that saw fewer than two readings is power × time and says so.
Each measurement gives the whole-device (RAPL: package) ``joules`` and this
process's share by CPU time, ``process_joules``. Broken counters (garbage,
going backwards without a wrap range) cost a warning and the affected interval,
never a crash or a negative figure. A window the source did not measure whole (a
domain of its total missing, a counter that vanished or a battery plugged in
partway) reports the estimate for the whole window, ``estimated=True``, and says
in its warnings what was read and why it was not used.

Every reader takes the filesystem root as a parameter (``sysfs_root``, default
``/``) so tests run against fake trees.
"""

from __future__ import annotations

from ._default import default_meter, reset_default_meter, set_default_meter
from ._detect import SOURCE_PRIORITY, describe_sources
from ._estimate import CpuClock, EstimateSource, PsutilCpuClock
from ._meter import EnergyMeter, Measurement
from ._profiles import PROFILES, DeviceProfile, custom_profile, get_profile
from ._rapl import RAPL_PERMISSION_FIX
from ._rpi_pmic import PmicRail, parse_pmic_output
from ._settings import PowerSettings
from ._source import (
    ConstantPowerSource,
    DomainInfo,
    Energy,
    Power,
    PowerSource,
    Reading,
    Remaining,
    SourceInfo,
    Unreadable,
)

__all__ = [
    "EnergyMeter",
    "Measurement",
    "PowerSettings",
    "default_meter",
    "set_default_meter",
    "reset_default_meter",
    "describe_sources",
    "SOURCE_PRIORITY",
    "SourceInfo",
    "DomainInfo",
    "DeviceProfile",
    "PROFILES",
    "get_profile",
    "custom_profile",
    "PowerSource",
    "ConstantPowerSource",
    "EstimateSource",
    "Reading",
    "Energy",
    "Power",
    "Remaining",
    "Unreadable",
    "CpuClock",
    "PsutilCpuClock",
    "parse_pmic_output",
    "PmicRail",
    "RAPL_PERMISSION_FIX",
]
