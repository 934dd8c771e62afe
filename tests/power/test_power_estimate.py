"""The CPU-time estimate: exact formula, a real CPU burn loop, and this machine's default path."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from power_fakes import FakeCpuClock, ManualClock

from edge_runtime.errors import ConfigError
from edge_runtime.power import (
    PROFILES,
    DeviceProfile,
    EnergyMeter,
    PsutilCpuClock,
    custom_profile,
    default_meter,
    describe_sources,
    get_profile,
    reset_default_meter,
)
from edge_runtime.power._detect import detect

Make = Callable[..., EnergyMeter]


def _burn(cpu_s: float) -> None:
    start = time.process_time()
    x = 0
    while time.process_time() - start < cpu_s:
        x += 1


def test_formula_with_a_known_profile(tmp_path: Path, make_meter: Make, clock: ManualClock, cpu: FakeCpuClock) -> None:
    meter = make_meter(tmp_path, profile="raspberry-pi-4")  # 0.925 W per busy CPU, 2.7 W idle, 4 CPUs
    with meter.measure() as m:
        clock.advance(2.0)
        cpu.run(process_s=1.0, others_s=0.5)
    assert m.source == "estimate:raspberry-pi-4" and m.estimated
    assert m.domains == pytest.approx({"active": 1.5 * 0.925, "idle": 2 * 2.7})
    assert m.joules == pytest.approx(1.5 * 0.925 + 2 * 2.7)
    # own CPU time at active power + idle energy × its share of CPU capacity (1 of the 8 CPU-seconds offered)
    assert m.process_joules == pytest.approx(1.0 * 0.925 + 2.7 * 1.0 / 4)
    assert m.process_joules is not None and m.process_joules <= m.joules
    assert any("ESTIMATED" in w and "not a measurement" in w for w in m.warnings)


def test_estimate_grows_with_cpu_time_and_is_near_zero_when_idle(tmp_path: Path, make_meter: Make) -> None:
    meter = make_meter(tmp_path, clock=time.monotonic, cpu_clock=PsutilCpuClock())
    with meter.measure() as idle:
        time.sleep(0.2)
    with meter.measure() as small:
        _burn(0.15)
    with meter.measure() as big:
        _burn(0.45)
    for m in (idle, small, big):
        assert m.estimated and m.source == "estimate:generic"
        assert m.joules >= 4.0 * m.seconds * 0.99  # never below the idle power of the device
        assert m.process_joules is not None and 0 <= m.process_joules <= m.joules + 1e-9
    assert idle.process_joules is not None and small.process_joules is not None and big.process_joules is not None
    assert idle.process_joules < 0.1
    assert small.process_joules >= 0.15 * 2.0 * 0.9
    assert big.process_joules > 2.0 * small.process_joules
    assert big.process_joules > 10 * idle.process_joules


def test_empty_tree_picks_the_estimate_and_says_so(tmp_path: Path) -> None:
    infos = describe_sources(tmp_path)
    assert [i.present for i in infos[:-1]] == [False, False, False, False]
    assert infos[-1].chosen and infos[-1].estimated and infos[-1].label == "estimate:generic"


def test_this_machine_has_no_counters_so_the_default_path_is_the_estimate() -> None:
    if any(c.usable for c in detect("/").candidates):
        pytest.skip("this machine has a readable power counter")
    meter = default_meter()
    assert meter is default_meter()  # cached for the process
    assert meter.source == "estimate:generic" and meter.estimated
    with meter.measure() as m:
        time.sleep(0.01)
    assert m.estimated and m.source == "estimate:generic" and m.joules > 0
    assert any("ESTIMATED from CPU time" in w for w in m.warnings)
    reset_default_meter()
    assert meter.closed
    assert default_meter() is not meter  # the cache can be reset


def test_default_meter_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_RUNTIME_POWER_SYSFS_ROOT", str(tmp_path))
    monkeypatch.setenv("EDGE_RUNTIME_POWER_PROFILE", "raspberry-pi-5")
    monkeypatch.setenv("EDGE_RUNTIME_POWER_IDLE_WATTS", "2.5")
    meter = default_meter()
    assert meter.sysfs_root == str(tmp_path)
    assert meter.source == "estimate:custom"
    assert meter.profile.idle_watts == 2.5
    assert meter.profile.active_watts_per_core == PROFILES["raspberry-pi-5"].active_watts_per_core


def test_profiles_are_complete_and_positive() -> None:
    assert set(PROFILES) == {"raspberry-pi-4", "raspberry-pi-5", "laptop-x86", "desktop-x86", "generic"}
    for name, prof in PROFILES.items():
        assert prof.name == name and prof.active_watts_per_core > 0 and prof.idle_watts > 0
    # a desktop spends more per busy CPU than a Pi, whatever the exact figures
    assert PROFILES["desktop-x86"].active_watts_per_core > PROFILES["raspberry-pi-4"].active_watts_per_core


def test_custom_profiles() -> None:
    assert custom_profile("laptop-x86") is PROFILES["laptop-x86"]
    c = custom_profile("laptop-x86", active_watts_per_core=1.0)
    assert (c.name, c.active_watts_per_core, c.idle_watts) == ("custom", 1.0, PROFILES["laptop-x86"].idle_watts)
    with pytest.raises(ConfigError) as err:
        get_profile("toaster")
    assert err.value.field == "power.profile"
    with pytest.raises(ConfigError):
        DeviceProfile("bad", active_watts_per_core=-1.0, idle_watts=1.0)


def test_a_custom_profile_object_labels_the_estimate(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    meter = make_meter(tmp_path, profile=DeviceProfile("my-board", active_watts_per_core=1.0, idle_watts=0.5))
    with meter.measure() as m:
        clock.advance(4)
    assert m.source == "estimate:my-board"
    assert m.joules == pytest.approx(2.0)


def test_profiles_and_sources_given_in_python_are_checked_naming_the_setting() -> None:
    """QA UU: an infinite profile was taken (infinite joules), and None for a source or profile was a bare
    TypeError or AttributeError."""
    import math

    from edge_runtime.power import EnergyMeter

    for kwargs in ({"active_watts_per_core": math.inf}, {"idle_watts": math.inf}, {"idle_watts": math.nan}):
        with pytest.raises(ConfigError) as info:
            custom_profile("generic", **kwargs)
        assert info.value.field == f"power.{next(iter(kwargs))}"
    for kwargs, field in (({"source": None}, "power.source"), ({"profile": None}, "power.profile")):
        with pytest.raises(ConfigError) as info:
            EnergyMeter(**kwargs)
        assert info.value.field == field
