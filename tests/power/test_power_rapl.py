"""RAPL: detection, totals without double counting, wraps (one and several), permission, garbage."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from power_fakes import (
    RAPL_MAX_RANGE_UJ,
    FakeCpuClock,
    ManualClock,
    add_hwmon,
    add_rapl_zone,
    call_unprivileged,
    make_unreadable,
    write,
)

from edge_runtime.errors import EnergyError
from edge_runtime.power import EnergyMeter, describe_sources

Make = Callable[..., EnergyMeter]


def _laptop(root: Path) -> dict[str, Path]:
    return {
        "package-0": add_rapl_zone(root, "0", "package-0", 10_000_000),
        "core": add_rapl_zone(root, "0:0", "core", 4_000_000),
        "uncore": add_rapl_zone(root, "0:1", "uncore", 1_000_000),
    }


def test_detects_zones_and_labels_the_package(tmp_path: Path) -> None:
    _laptop(tmp_path)
    infos = describe_sources(tmp_path)
    rapl = infos[0]
    assert rapl.kind == "rapl" and rapl.present and rapl.usable and rapl.chosen
    assert rapl.label == "rapl:package-0"
    totals = {d.name: d.in_total for d in rapl.domains}
    # core and uncore are inside the package: reported, never added
    assert totals == {"package-0": True, "package-0/core": False, "package-0/uncore": False}
    assert [i.kind for i in infos] == ["rapl", "hwmon", "rpi-pmic", "battery", "estimate"]
    assert not infos[-1].chosen


def test_window_reads_package_and_domains(tmp_path: Path, make_meter: Make, clock: ManualClock,
                                          cpu: FakeCpuClock) -> None:
    files = _laptop(tmp_path)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(2.0)
        cpu.run(process_s=0.5, others_s=1.5)
        write(files["package-0"], 10_000_000 + 30_000_000)  # +30 J
        write(files["core"], 4_000_000 + 20_000_000)
        write(files["uncore"], 1_000_000 + 2_500_000)
    assert m.source == "rapl:package-0" and m.estimated is False
    assert m.joules == pytest.approx(30.0)
    assert m.seconds == pytest.approx(2.0)
    assert m.avg_watts == pytest.approx(15.0)
    assert m.domains == pytest.approx({"package-0": 30.0, "package-0/core": 20.0, "package-0/uncore": 2.5})
    # a quarter of the busy CPU time was ours
    assert m.process_joules == pytest.approx(7.5)
    assert m.warnings == []
    report = m.to_report()
    assert (report.joules, report.source, report.estimated) == (m.joules, "rapl:package-0", False)
    assert report.seconds == m.seconds
    assert report.process_joules == pytest.approx(7.5)


def test_one_wrap_is_corrected_with_max_energy_range(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", RAPL_MAX_RANGE_UJ - 5_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1.0)
        write(pkg, 7_000_000)  # 5 J to the top, then 7 J after the wrap
    assert m.joules == pytest.approx(12.0)


def test_several_wraps_in_one_window_are_all_counted(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    step_uj = 200_000_000_000  # 200 kJ between readings (1 kW for 200 s): more than 3/4 of the range each time
    value = 150_000_000_000
    pkg = add_rapl_zone(tmp_path, "0", "package-0", value)
    meter = make_meter(tmp_path)
    wraps = 0
    with meter.measure() as m:
        for _ in range(5):
            clock.advance(200.0)
            wraps += (value + step_uj) >= RAPL_MAX_RANGE_UJ
            value = (value + step_uj) % RAPL_MAX_RANGE_UJ
            write(pkg, value)
            meter.poll()  # what the background thread does every interval
    assert wraps >= 3
    assert m.joules == pytest.approx(5 * 200_000.0)
    # one correction on the start/end pair alone would be far off: the test can tell the difference
    naive_j = ((value - 150_000_000_000) % RAPL_MAX_RANGE_UJ) / 1e6
    assert abs(naive_j - m.joules) > 100_000


def _wait_for_background_reads(meter: EnergyMeter, n: int) -> None:
    import time

    sampler = meter._sampler
    assert sampler is not None
    target = sampler.reads + n
    deadline = time.monotonic() + 5
    while sampler.reads < target:
        assert time.monotonic() < deadline, "the background sampler did not read the counter"
        time.sleep(0.005)


def test_background_thread_tracks_wraps_without_polls(tmp_path: Path, make_meter: Make) -> None:
    import time

    pkg = add_rapl_zone(tmp_path, "0", "package-0", RAPL_MAX_RANGE_UJ - 1_000_000)
    meter = make_meter(tmp_path, sample_interval_s=0.01, clock=time.monotonic)
    with meter.measure() as m:
        assert meter.sampler_running
        write(pkg, RAPL_MAX_RANGE_UJ - 500_000)  # +0.5 J
        _wait_for_background_reads(meter, 2)
        write(pkg, 250_000)  # +0.75 J across the wrap
        _wait_for_background_reads(meter, 2)
        write(pkg, 1_250_000)  # +1 J, read at the close
    assert m.samples >= 4
    assert m.joules == pytest.approx(2.25)


def test_psys_covers_everything_when_readable(tmp_path: Path) -> None:
    _laptop(tmp_path)
    add_rapl_zone(tmp_path, "1", "psys", 50_000_000)
    rapl = describe_sources(tmp_path)[0]
    assert rapl.label == "rapl:psys"
    assert [d.name for d in rapl.domains if d.in_total] == ["psys"]


def test_an_unreadable_zone_inside_psys_leaves_nothing_out(tmp_path: Path) -> None:
    # QA: with psys as the total, a dram zone reading garbage added "rapl:psys leaves part of the device out" to
    # every measurement's warnings and the log, though psys holds the packages and their DRAM
    add_rapl_zone(tmp_path, "0", "package-0", 1000)
    add_rapl_zone(tmp_path, "0:2", "dram", "garbage")
    add_rapl_zone(tmp_path, "1", "psys", 5000)
    meter = EnergyMeter(tmp_path)
    try:
        assert meter.source == "rapl:psys" and meter.notes == []
    finally:
        meter.close()
    assert describe_sources(tmp_path)[0].problem is None


def test_dram_is_added_to_the_package(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 0)
    dram = add_rapl_zone(tmp_path, "0:0", "dram", 0)
    meter = make_meter(tmp_path)
    assert meter.source == "rapl:package-0+package-0/dram"
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, 9_000_000)
        write(dram, 1_500_000)
    assert m.joules == pytest.approx(10.5)


def _estimate_j(meter: EnergyMeter, seconds: float) -> float:
    """The generic profile's figure for a window in which no CPU was busy (the fake CPU clock stands still)."""
    return meter.profile.idle_watts * seconds


def test_garbage_in_the_counter_mid_window_is_not_passed_off_as_the_window(tmp_path: Path, make_meter: Make,
                                                                           clock: ManualClock) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 1_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, 4_000_000)
        meter.poll()
        clock.advance(1)
        write(pkg, "\x00garbage\xff")
    # 3 J in the first second, nothing known of the second: 3 J is not what the window drew
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert m.joules == pytest.approx(_estimate_j(meter, 2.0))
    assert any("garbage" in w for w in m.warnings)
    assert any("energy after its last good reading is missing" in w for w in m.warnings)
    assert any("measured only part of this window" in w and "3.000 J" in w for w in m.warnings)


def test_counter_without_range_going_backwards_is_dropped_not_negative(tmp_path: Path, make_meter: Make,
                                                                         clock: ManualClock) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 50_000_000, max_range_uj=None)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, 52_000_000)  # +2 J
        meter.poll()
        clock.advance(1)
        write(pkg, 10_000_000)  # backwards, no range to explain it
        meter.poll()
        clock.advance(1)
        write(pkg, 11_000_000)  # +1 J
    assert m.joules == pytest.approx(3.0)
    assert any("went backwards" in w for w in m.warnings)


def test_a_counter_past_its_wrap_range_is_not_called_rangeless(tmp_path: Path, make_meter: Make,
                                                                clock: ManualClock) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 50_000_000, max_range_uj=10_000_000)  # above its own range
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, 1_000_000)  # down by 49 J: one wrap of 10 J cannot explain it
        meter.poll()
        clock.advance(1)
        write(pkg, 2_000_000)  # +1 J
    assert m.joules == pytest.approx(1.0)
    assert any("by more than its wrap range" in w for w in m.warnings) and not any("no wrap range" in w for w in m.warnings)


def test_a_counter_that_steps_back_is_not_taken_for_a_wrap(tmp_path: Path, make_meter: Make,
                                                            clock: ManualClock) -> None:
    # a known wrap range turns any drop into a wrap: read that way, 0.1 J back in 0.05 s would be 262 kJ (5 MW)
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 5_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(0.05)
        write(pkg, 4_900_000)  # a bad reading, or the driver reloaded
        meter.poll()
        clock.advance(1)
        write(pkg, 6_900_000)  # +2 J
    assert m.joules == pytest.approx(2.0) and not m.estimated
    assert any("too little for a wrap" in w for w in m.warnings)


def test_zone_that_disappears_mid_window_reports_the_estimate_for_the_whole_window(
        tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 0)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, 6_000_000)
        meter.poll()
        clock.advance(1)
        pkg.resolve().unlink()
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert m.joules == pytest.approx(_estimate_j(meter, 2.0))
    assert m.domains.keys() == {"active", "idle"} and m.samples == 0
    assert any("package-0 unreadable for the last 1.00 s (energy_uj: missing)" in w and "6.000 J" in w
               and "estimate (estimate:generic) for the whole window" in w for w in m.warnings)
    # what the engine and the daemon carry: the warnings are not in it, so the figure itself must be honest
    report = m.to_report()
    assert (report.source, report.estimated, report.joules) == ("estimate:generic", True, m.joules)


def test_a_counter_unreadable_for_a_moment_still_measures_the_whole_window(
        tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    # a cumulative counter keeps counting while it cannot be read: the next reading's delta covers the outage
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 0)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, "garbage")
        meter.poll()
        clock.advance(1)
        write(pkg, 8_000_000)
    assert (m.source, m.estimated, m.joules) == ("rapl:package-0", False, pytest.approx(8.0))
    assert any("garbage" in w for w in m.warnings)


@pytest.mark.parametrize("gone", ["package-0", "package-0/dram"])
def test_a_total_missing_one_of_its_zones_in_a_window_is_the_estimate(
        tmp_path: Path, make_meter: Make, clock: ManualClock, gone: str) -> None:
    files = {"package-0": add_rapl_zone(tmp_path, "0", "package-0", 0),
             "package-0/dram": add_rapl_zone(tmp_path, "0:0", "dram", 0)}
    meter = make_meter(tmp_path)
    assert meter.source == "rapl:package-0+package-0/dram"
    files[gone].resolve().unlink()  # the driver went away, or the zone was made root-only, after detection
    with meter.measure() as m:
        clock.advance(1)
        for name, path in files.items():
            if name != gone:
                write(path, 2_000_000)
    # DRAM alone (or the package without its DRAM) is not the device that the label names
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert m.joules == pytest.approx(_estimate_j(meter, 1.0))
    kept = "package-0/dram" if gone == "package-0" else "package-0"
    assert any(f"no readings of {gone} in this window, so the 2.000 J of {kept} are not the device's energy" in w
               for w in m.warnings)
    report = m.to_report()
    assert (report.source, report.estimated) == ("estimate:generic", True)


def _one_window_unprivileged(make_meter: Make, root: Path, clock: ManualClock, seconds: float = 1.0,
                             moving: Path | None = None) -> object:
    """A meter made and one window measured as an unprivileged user (root reads any file, mode or not);
    ``moving``: a counter that goes up 1 J during the window."""
    def run() -> object:
        meter = make_meter(root)
        with meter.measure() as m:
            clock.advance(seconds)
            if moving is not None:
                write(moving, int(moving.read_text()) + 1_000_000)
        return m

    return call_unprivileged(run)


def _denied_tree(root: Path) -> None:
    for path in _laptop(root).values():
        make_unreadable(path)


def test_a_fully_denied_rapl_counts_every_file_it_cannot_read(tmp_path: Path) -> None:
    _denied_tree(tmp_path)  # package-0 and its core and uncore zones
    info = call_unprivileged(lambda: [i for i in describe_sources(tmp_path) if i.kind == "rapl"][0])
    # it said 1 (the package, the only zone of the total) beside a listing of 3 unreadable zones
    assert not info.usable and info.problem == "permission denied on 3 energy_uj file(s)"


def test_permission_denied_warns_once_with_the_fix_and_uses_the_next_source(
        tmp_path: Path, make_meter: Make, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    _denied_tree(tmp_path)
    add_hwmon(tmp_path, 0, "amd_energy", {"energy1_input": 1_000_000, "energy1_label": "Esocket0"})
    caplog.set_level(logging.WARNING, logger="edge_runtime.power")

    def run() -> list[EnergyMeter | object]:
        meter = make_meter(tmp_path)
        out: list[object] = [meter]
        for _ in range(2):
            with meter.measure() as m:
                clock.advance(1)
            out.append(m)
        return out

    meter, m1, m2 = call_unprivileged(run)
    assert isinstance(meter, EnergyMeter)
    assert meter.source == "hwmon:amd_energy"
    rapl = meter.describe()[0]
    assert rapl.present and not rapl.usable and "permission denied" in (rapl.problem or "")
    assert rapl.fix and "chmod a+r" in rapl.fix and "udev" in rapl.fix
    for m in (m1, m2):
        assert any("chmod a+r" in w and "using hwmon:amd_energy" in w for w in m.warnings)  # type: ignore[attr-defined]
    logged = [r for r in caplog.records if "chmod a+r" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING


def test_permission_denied_with_nothing_else_is_an_estimate_never_zero(
        tmp_path: Path, make_meter: Make, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    _denied_tree(tmp_path)
    caplog.set_level(logging.INFO, logger="edge_runtime.power")
    m = _one_window_unprivileged(make_meter, tmp_path, clock, seconds=2)
    assert m.source == "estimate:generic" and m.estimated  # type: ignore[attr-defined]
    assert m.joules > 0  # type: ignore[attr-defined]
    assert any("chmod a+r" in w for w in m.warnings)  # type: ignore[attr-defined]
    assert [r.levelno for r in caplog.records if "chmod a+r" in r.getMessage()] == [logging.WARNING]
    assert [r.levelno for r in caplog.records if "ESTIMATED" in r.getMessage()] == [logging.INFO]


def test_dram_alone_is_never_the_device_figure(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    make_unreadable(add_rapl_zone(tmp_path, "0", "package-0", 0))
    add_rapl_zone(tmp_path, "0:0", "dram", 0)
    m = _one_window_unprivileged(make_meter, tmp_path, clock)
    # the package is denied: the readable DRAM zone must not pass for the whole device, "measured"
    assert m.source == "estimate:generic" and m.estimated  # type: ignore[attr-defined]
    assert any("chmod a+r" in w for w in m.warnings)  # type: ignore[attr-defined]


def test_a_partial_rapl_total_says_what_it_leaves_out_with_every_measurement(
        tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    zones = _laptop(tmp_path)
    make_unreadable(add_rapl_zone(tmp_path, "1", "psys", 0))
    m = _one_window_unprivileged(make_meter, tmp_path, clock, moving=zones["package-0"])
    assert m.source == "rapl:package-0" and not m.estimated  # type: ignore[attr-defined]
    assert any("leaves part of the device out" in w and "psys" in w for w in m.warnings)  # type: ignore[attr-defined]


def test_insisting_on_denied_rapl_raises_with_the_fix(tmp_path: Path, make_meter: Make) -> None:
    _denied_tree(tmp_path)
    with pytest.raises(EnergyError, match="chmod a\\+r"):
        call_unprivileged(make_meter, tmp_path, source="rapl")


def test_insisting_on_absent_rapl_raises(tmp_path: Path, make_meter: Make) -> None:
    with pytest.raises(EnergyError, match="not present"):
        make_meter(tmp_path, source="rapl")


def test_a_counter_that_jumps_forward_impossibly_is_not_counted(tmp_path: Path, make_meter: Make,
                                                                clock: ManualClock) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 5_000_000, max_range_uj=None)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, 7_000_000)  # +2 J
        meter.poll()
        clock.advance(1)
        write(pkg, 7_000_000 + 10**12)  # a million joules in a second: not a CPU
        meter.poll()
        clock.advance(1)
        write(pkg, 8_000_000 + 10**12)  # +1 J
    assert m.joules == pytest.approx(3.0) and m.estimated is False
    assert any("more than 100 kW" in w for w in m.warnings)


@pytest.mark.parametrize("where", ["energy_uj", "max_energy_range_uj"])
def test_a_number_too_large_for_any_counter_is_garbage_not_a_crash(tmp_path: Path, make_meter: Make,
                                                                   clock: ManualClock, where: str) -> None:
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 1_000_000)
    if where == "max_energy_range_uj":
        write(pkg.parent / where, "9" * 400)
    meter = make_meter(tmp_path)  # detection reads the range: it must not crash either
    with meter.measure() as m:
        clock.advance(1)
        write(pkg, 3_000_000)
        meter.poll()
        clock.advance(1)
        if where == "energy_uj":
            write(pkg, "9" * 400)
            meter.poll()
    if where == "energy_uj":  # garbage to the end: the last second is unknown, so the window is the estimate
        assert m.estimated and any("its 2.000 J fall short" in w for w in m.warnings)
    else:
        assert m.joules == pytest.approx(2.0) and not m.estimated


def test_two_packages_under_one_name_are_two_domains_counted_once_each(tmp_path: Path, make_meter: Make,
                                                                         clock: ManualClock) -> None:
    first = add_rapl_zone(tmp_path, "0", "package-0", 1_000_000)
    second = add_rapl_zone(tmp_path, "1", "package-0", 1_000_000)  # firmware that names both alike
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(first, 11_000_000)  # +10 J
        write(second, 21_000_000)  # +20 J
    assert m.joules == pytest.approx(30.0)
    assert sorted(m.domains) == ["package-0", "package-0@intel-rapl:1"]


def test_an_unreadable_core_zone_leaves_nothing_out(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    files = _laptop(tmp_path)
    write(files["core"], "garbage")  # inside the package: never part of the total
    rapl = describe_sources(tmp_path)[0]
    assert rapl.usable and rapl.problem is None


def test_a_counter_that_never_moves_is_not_a_measured_zero(tmp_path: Path, make_meter: Make,
                                                            clock: ManualClock) -> None:
    # some VMs and firmwares expose a RAPL zone whose energy_uj stays at one value: every answer read
    # "0.0 J, measured" with no warning
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 0)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1.0)
    assert m.estimated and m.source.startswith("estimate:") and m.joules > 0  # type: ignore[attr-defined]
    assert any("package-0 did not move in 1.00 s" in w for w in m.warnings)  # type: ignore[attr-defined]
    # QA FFF: a window too short to see it by itself (a one-token answer) read "0.0 J, measured": the readings
    # before it tell
    with meter.measure() as short:
        clock.advance(0.1)
    assert short.estimated and short.joules > 0  # type: ignore[attr-defined]
    with meter.measure() as moved:  # the same counter, moving: measured
        clock.advance(1.0)
        write(pkg, 2_000_000)
    assert moved.source == "rapl:package-0" and moved.joules == pytest.approx(2.0)  # type: ignore[attr-defined]


def test_a_still_dram_zone_beside_a_moving_package_is_measured_with_a_warning(tmp_path: Path, make_meter: Make,
                                                                              clock: ManualClock) -> None:
    # some servers list a DRAM zone that only counts with a BIOS option: the package still measures the window
    pkg = add_rapl_zone(tmp_path, "0", "package-0", 0)
    add_rapl_zone(tmp_path, "0:0", "dram", 5_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1.0)
        write(pkg, 20_000_000)
    assert m.source == "rapl:package-0+package-0/dram" and not m.estimated  # type: ignore[attr-defined]
    assert m.joules == pytest.approx(20.0)  # type: ignore[attr-defined]
    assert any("package-0/dram did not move in 1.00 s; counted as 0 J" in w for w in m.warnings)  # type: ignore[attr-defined]


def test_a_stuck_package_beside_a_moving_dram_zone_is_not_a_measurement(tmp_path: Path, make_meter: Make,
                                                                         clock: ManualClock) -> None:
    # the DRAM zone alone moved: its 1 J was reported as the device's, measured
    add_rapl_zone(tmp_path, "0", "package-0", 5_000_000)
    dram = add_rapl_zone(tmp_path, "0:1", "dram", 1_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        for i in range(5):
            clock.advance(0.2)
            write(dram, 1_000_000 + (i + 1) * 200_000)
            meter.poll()
    assert m.estimated and m.source == "estimate:generic"  # type: ignore[attr-defined]
    assert any("package-0 did not move in 1.00 s" in w and "1.000 J fall short" in w
               for w in m.warnings)  # type: ignore[attr-defined]


def test_a_stuck_package_beside_a_moving_package_is_not_a_measurement(tmp_path: Path, make_meter: Make,
                                                                       clock: ManualClock) -> None:
    # a two-socket server whose first package counter is stuck: the second one's joules are half the device at most
    add_rapl_zone(tmp_path, "0", "package-0", 5_000_000)
    second = add_rapl_zone(tmp_path, "1", "package-1", 5_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1.0)
        write(second, 15_000_000)
    assert m.estimated and m.source == "estimate:generic"  # type: ignore[attr-defined]
    assert any("package-0 did not move in 1.00 s" in w for w in m.warnings)  # type: ignore[attr-defined]


def test_a_still_dram_zone_is_forgiven_only_beside_its_own_package(tmp_path: Path, make_meter: Make,
                                                                    clock: ManualClock) -> None:
    # package-1 moving says nothing of package-0's DRAM, and package-0 is stuck besides
    add_rapl_zone(tmp_path, "0", "package-0", 5_000_000)
    add_rapl_zone(tmp_path, "0:2", "dram", 1_000_000)
    second = add_rapl_zone(tmp_path, "1", "package-1", 5_000_000)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1.0)
        write(second, 15_000_000)
    assert m.estimated  # type: ignore[attr-defined]
    assert not any("counted as 0 J" in w for w in m.warnings)  # type: ignore[attr-defined]
