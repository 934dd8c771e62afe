"""Battery: discharging (power_now, current × voltage, energy_now fall), charging / on AC, plugged in mid-window."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from power_fakes import ManualClock, add_ac, add_battery, add_power_supply, add_rapl_zone, write

from edge_runtime.power import EnergyMeter, describe_sources

Make = Callable[..., EnergyMeter]


def test_discharging_power_now(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    add_ac(tmp_path, online=False)
    bat = add_battery(tmp_path, power_now=8_500_000, voltage_now=11_400_000, energy_now=40_000_000)
    meter = make_meter(tmp_path)
    assert meter.source == "battery:BAT0" and not meter.estimated
    with meter.measure() as m:
        clock.advance(1)
        write(bat / "power_now", 9_500_000)
        meter.poll()
        clock.advance(1)
    # (8.5 + 9.5) / 2 + 9.5
    assert m.joules == pytest.approx(18.5)
    assert m.estimated is False and m.warnings == []


def test_current_times_voltage_and_negative_current(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    # some drivers report the discharge current as negative µA
    add_battery(tmp_path, current_now=-1_000_000, voltage_now=11_400_000, charge_now=3_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(2)
    assert m.joules == pytest.approx(22.8)


def test_energy_now_fall_when_there_is_no_power_reading(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    bat = add_battery(tmp_path, energy_now=40_000_000)  # µWh
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        for step in (1, 2):  # the gauge refreshes every 5 s: 25 mWh = 90 J each time, 18 W
            clock.advance(5)
            write(bat / "energy_now", 40_000_000 - 25_000 * step)
            meter.poll()
        clock.advance(5)
    assert (m.source, m.estimated) == ("battery:BAT0", False)
    assert m.joules == pytest.approx(18.0 * 15)  # the power between the steps, over the whole window


def test_charge_now_fall_times_voltage(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    bat = add_battery(tmp_path, charge_now=3_000_000, voltage_now=10_000_000)  # µAh, µV
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        for step in (1, 2, 3):
            clock.advance(10)
            write(bat / "charge_now", 3_000_000 - 1_000 * step)  # 1 mAh at 10 V = 10 mWh = 36 J per 10 s: 3.6 W
            meter.poll()
    assert m.joules == pytest.approx(3.6 * 30)


def test_a_gauge_window_too_short_to_measure_is_an_estimate_not_0_j_or_a_whole_step(
        tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    # the gauge refreshes every few seconds: a request of a fraction of a second saw no step (read as a measured
    # 0 J) or one step holding seconds of energy from before it (30 J in 0.3 s, "measured")
    bat = add_battery(tmp_path, energy_now=40_000_000)
    meter = make_meter(tmp_path)
    meter.poll()
    clock.advance(4.8)  # the last refresh was long before the request
    meter.poll()
    with meter.measure() as still:
        clock.advance(0.2)
    with meter.measure() as stepped:
        clock.advance(0.1)
        write(bat / "energy_now", 40_000_000 - 8_333)  # 30 J: five seconds of 6 W
        meter.poll()
        clock.advance(0.2)
    for m in (still, stepped):
        assert (m.source, m.estimated) == ("estimate:generic", True)
        assert any("the battery gauge stepped" in w and "needs two steps" in w for w in m.warnings)


def test_charging_battery_is_not_a_measurement_and_is_skipped(tmp_path: Path, make_meter: Make,
                                                             clock: ManualClock) -> None:
    add_ac(tmp_path, online=True)
    add_battery(tmp_path, status="Charging", power_now=25_000_000, energy_now=30_000_000)
    infos = describe_sources(tmp_path)
    bat = [i for i in infos if i.kind == "battery"][0]
    assert bat.present and not bat.usable
    assert "on AC power" in (bat.problem or "") and "not a measurement" in (bat.problem or "")
    meter = make_meter(tmp_path)
    assert meter.source == "estimate:generic"
    with meter.measure() as m:
        clock.advance(1)
    assert m.estimated
    assert any("battery:BAT0: on AC power (status: Charging)" in w for w in m.warnings)


def test_full_battery_on_ac_falls_through_to_the_next_source(tmp_path: Path, make_meter: Make) -> None:
    add_ac(tmp_path, online=True)
    add_battery(tmp_path, status="Full", power_now=0, energy_now=50_000_000)
    add_rapl_zone(tmp_path, "0", "package-0", 0)
    meter = make_meter(tmp_path)
    # rapl ranks first anyway; the battery on AC is described, not used
    assert meter.source == "rapl:package-0"
    assert not [i for i in meter.describe() if i.kind == "battery"][0].usable


def test_plugged_in_during_the_window(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    ac = add_ac(tmp_path, online=False)
    bat = add_battery(tmp_path, power_now=10_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        meter.poll()
        write(ac / "online", 1)
        write(bat / "status", "Charging")
        clock.advance(1)
        meter.poll()
        clock.advance(1)
    # 10 J is the discharging second only: after that the charger fed the device, and nothing measured it
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert m.joules == pytest.approx(meter.profile.idle_watts * 3)
    assert any("on AC power" in w for w in m.warnings)
    assert any("measured only part of this window (BAT0 unreadable for the last 2.00 s" in w and "10.000 J" in w
               for w in m.warnings)
    assert m.to_report().estimated


def test_on_ac_for_a_moment_inside_the_window_is_not_a_whole_measurement(tmp_path: Path, make_meter: Make,
                                                                          clock: ManualClock) -> None:
    bat = add_battery(tmp_path, energy_now=40_000_000)  # µWh
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(bat / "status", "Charging")
        meter.poll()
        clock.advance(1)
        write(bat / "status", "Discharging")  # unplugged again: the gauge says nothing of the time on AC
        write(bat / "energy_now", 40_000_000 - 1_000)
        meter.poll()
        clock.advance(1)
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert any("BAT0 no readings for 2.00 s" in w for w in m.warnings)


def test_peripheral_batteries_are_ignored(tmp_path: Path) -> None:
    add_power_supply(tmp_path, "hidpp_battery_0", {"type": "Battery", "scope": "Device", "status": "Discharging",
                                                    "capacity": 80})
    infos = describe_sources(tmp_path)
    bat = [i for i in infos if i.kind == "battery"][0]
    assert not bat.present


def test_two_discharging_batteries_are_summed(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    add_battery(tmp_path, "BAT0", power_now=4_000_000)
    add_battery(tmp_path, "BAT1", power_now=3_000_000)
    meter = make_meter(tmp_path)
    assert meter.source == "battery:BAT0+BAT1"
    with meter.measure() as m:
        clock.advance(1)
    assert m.joules == pytest.approx(7.0)
    assert m.domains == pytest.approx({"BAT0": 4.0, "BAT1": 3.0})


def test_a_second_battery_that_runs_down_supplies_nothing_and_the_other_still_measures_the_device(
        tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    # batteries in parallel are separate supplies: the idle one was read as a missing part of a total, and every
    # window fell back to the estimate, saying it was "on AC power"
    add_battery(tmp_path, "BAT0", power_now=8_000_000)
    bat1 = add_battery(tmp_path, "BAT1", power_now=3_000_000)
    meter = make_meter(tmp_path)
    assert meter.source == "battery:BAT0+BAT1"
    write(bat1 / "status", "Unknown")  # run down
    with meter.measure() as m:
        clock.advance(2)
    assert (m.source, m.estimated, m.joules) == ("battery:BAT0+BAT1", False, pytest.approx(16.0))


def test_a_laptop_that_switches_batteries_goes_on_measuring(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    # QA: only the battery discharging when the meter was made was read; after the laptop switched to the other
    # one, every window fell back to the estimate, saying the first was "on AC power" with no AC adapter online
    bat0 = add_battery(tmp_path, "BAT0", status="Not charging", power_now=0)
    bat1 = add_battery(tmp_path, "BAT1", power_now=8_000_000)
    add_ac(tmp_path, online=False)
    meter = make_meter(tmp_path)
    assert meter.source == "battery:BAT0+BAT1"
    with meter.measure() as m:
        clock.advance(1)
    assert (m.joules, m.estimated) == (pytest.approx(8.0), False)
    write(bat1 / "status", "Not charging")
    write(bat1 / "power_now", 0)
    write(bat0 / "status", "Discharging")
    write(bat0 / "power_now", 6_000_000)
    with meter.measure() as m:
        clock.advance(1)
    assert (m.source, m.estimated, m.joules) == ("battery:BAT0+BAT1", False, pytest.approx(6.0))
    assert m.domains == pytest.approx({"BAT0": 6.0, "BAT1": 0.0})


def test_a_coarse_gauge_refreshed_every_30_s_is_counted_whole(tmp_path: Path, make_meter: Make,
                                                               clock: ManualClock) -> None:
    # the gauge shows 30 s of a 75 W load (2250 J) at once, between two 0.2 s samples: read as 11 kW over one
    # sample, but it is spread over the time since the value last changed, and counted
    bat = add_battery(tmp_path, energy_now=400_000_000)  # µWh
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        step_uwh = 20_833  # a second of 75 W, in µWh
        level = 400_000_000
        for _ in range(4):
            for _ in range(150):  # 30 s of 0.2 s samples with no change
                clock.advance(0.2)
                meter.poll()
            level -= 30 * step_uwh
            write(bat / "energy_now", level)
            clock.advance(0.2)
            meter.poll()
    assert m.joules == pytest.approx(4 * 30 * step_uwh * 3.6e-3, rel=1e-6)
    assert not any("not counted" in w for w in m.warnings)


def test_a_gauge_window_anchored_on_a_step_at_its_start_and_with_a_rise_between_steps(
        tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    bat = add_battery(tmp_path, energy_now=40_000_000)
    meter = make_meter(tmp_path)
    meter.poll()
    clock.advance(5)
    write(bat / "energy_now", 40_000_000 - 10_000)  # a step just as the window opens (its energy is from before)
    with meter.measure() as m:
        clock.advance(5)
        write(bat / "energy_now", 40_000_000 - 20_000)  # 10 mWh = 36 J in 5 s: 7.2 W
        meter.poll()
    assert (m.source, m.estimated) == ("battery:BAT0", False) and m.joules == pytest.approx(36.0)
    # charging for a moment between two steps: that interval's energy is unknown, not 0 J of a measurement
    with meter.measure() as m:
        clock.advance(5)
        write(bat / "energy_now", 40_000_000 - 30_000)
        meter.poll()
        clock.advance(5)
        write(bat / "energy_now", 40_000_000 - 25_000)  # rose
        meter.poll()
        clock.advance(5)
        write(bat / "energy_now", 40_000_000 - 35_000)
        meter.poll()
    assert m.estimated and any("rose or jumped between its steps" in w for w in m.warnings)


def test_gauge_steps_read_at_one_instant_are_one_step_not_a_division_by_zero() -> None:
    from edge_runtime.power._sampler import DomainTrack
    from edge_runtime.power._source import Remaining

    track = DomainTrack("BAT0")
    for t, uwh in ((0.0, 1000.0), (1.0, 999.0), (0.5, 998.0)):  # the last reading's time is clamped to 1.0
        track.add(t, Remaining(uj=uwh * 3600.0))
    steps = track.steps_in(0.5, 2.0)
    assert len(steps) == 2 and steps[0][0] == steps[1][0] == 1.0
    from types import SimpleNamespace

    from edge_runtime.power._sampler import Sampler

    domains: dict = {}
    incomplete: dict = {}
    Sampler._gauge_window(SimpleNamespace(source=SimpleNamespace(label="battery:BAT0")), track, 0.5, 2.0,
                          domains, incomplete, [])
    assert "BAT0" in incomplete and domains == {"BAT0": 0.0}  # one step: not measured (it divided by zero)
