"""hwmon: energy counters (amd_energy), power rails integrated by trapezoid, INA3221, vanishing sensors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from power_fakes import ManualClock, add_hwmon, call_unprivileged, make_unreadable, write

from edge_runtime.power import EnergyMeter, describe_sources
from edge_runtime.power._hwmon import detect_hwmon
from edge_runtime.power._sampler import Sampler

Make = Callable[..., EnergyMeter]


def _amd_energy(root: Path) -> Path:
    # amd_energy: one counter per core (Ecore000...) and one per socket, all µJ
    attrs: dict[str, object] = {}
    for core in range(2):
        attrs[f"energy{core + 1}_input"] = 1_000_000 * (core + 1)
        attrs[f"energy{core + 1}_label"] = f"Ecore{core:03d}"
    attrs["energy3_input"] = 40_000_000
    attrs["energy3_label"] = "Esocket0"
    add_hwmon(root, 0, "k10temp", {"temp1_input": 45000, "temp1_label": "Tctl"}, device="pci0000:00/0000:00:18.3")
    return add_hwmon(root, 1, "amd_energy", attrs, device="platform/amd_energy.0")


def test_amd_energy_counts_the_socket_not_the_cores_again(tmp_path: Path, make_meter: Make,
                                                          clock: ManualClock) -> None:
    chip = _amd_energy(tmp_path)
    infos = describe_sources(tmp_path)
    hw = [i for i in infos if i.kind == "hwmon"]
    assert [i.label for i in hw] == ["hwmon:amd_energy"]  # k10temp has no energy or power sensor
    assert {d.name: d.in_total for d in hw[0].domains} == {"Ecore000": False, "Ecore001": False, "Esocket0": True}
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(4)
        write(chip / "energy1_input", 1_000_000 + 6_000_000)
        write(chip / "energy2_input", 2_000_000 + 5_000_000)
        write(chip / "energy3_input", 40_000_000 + 20_000_000)
    assert m.source == "hwmon:amd_energy" and not m.estimated
    assert m.joules == pytest.approx(20.0)
    assert m.domains == pytest.approx({"Ecore000": 6.0, "Ecore001": 5.0, "Esocket0": 20.0})


def test_power_rail_is_integrated_with_the_trapezoid_rule(tmp_path: Path, make_meter: Make,
                                                           clock: ManualClock) -> None:
    # ina2xx-style power monitor: power1_input in µW
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 2_000_000, "in1_input": 5000, "curr1_input": 400})
    meter = make_meter(tmp_path)
    assert meter.source == "hwmon:ina226"
    with meter.measure() as m:
        clock.advance(1)
        write(chip / "power1_input", 4_000_000)
        meter.poll()
        clock.advance(1)
    # (2 W + 4 W) / 2 × 1 s + 4 W × 1 s
    assert m.joules == pytest.approx(7.0)
    assert m.samples == 3
    assert m.warnings == []


def test_power_average_is_used_when_there_is_no_input(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    add_hwmon(tmp_path, 0, "some_pmbus", {"power1_average": 3_000_000, "power1_label": "pin"})
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(2)
    assert m.joules == pytest.approx(6.0)
    assert m.domains == pytest.approx({"pin": 6.0})


def test_jetson_ina3221_uses_the_input_rail(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    # ina3221: bus voltage in mV, current in mA, no power files; VDD_IN is the module input
    chip = add_hwmon(tmp_path, 1, "ina3221", {
        "in1_label": "VDD_IN", "in1_input": 5000, "curr1_input": 1200,
        "in2_label": "VDD_CPU_GPU_CV", "in2_input": 5000, "curr2_input": 400,
        "in3_label": "VDD_SOC", "in3_input": 5000, "curr3_input": 300,
    }, device="platform/bus@0/c240000.i2c/i2c-1/1-0040")
    info = [i for i in describe_sources(tmp_path) if i.kind == "hwmon"][0]
    assert info.label == "hwmon:ina3221"
    assert [d.name for d in info.domains if d.in_total] == ["VDD_IN"]
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(chip / "curr1_input", 1600)
        meter.poll()
        clock.advance(1)
    # VDD_IN: 6 W then 8 W -> 7 J + 8 J
    assert m.joules == pytest.approx(15.0)
    assert m.domains["VDD_CPU_GPU_CV"] == pytest.approx(4.0)


def test_gpu_hwmon_is_listed_but_not_chosen(tmp_path: Path) -> None:
    add_hwmon(tmp_path, 0, "amdgpu", {"power1_average": 15_000_000, "power1_label": "PPT"}, device="pci0000:00/gpu")
    infos = describe_sources(tmp_path)
    gpu = [i for i in infos if i.kind == "hwmon"][0]
    assert gpu.present and not gpu.usable and "GPU" in (gpu.problem or "")
    assert infos[-1].chosen and infos[-1].kind == "estimate"


def test_counter_going_backwards_without_range_is_dropped(tmp_path: Path, make_meter: Make,
                                                          clock: ManualClock) -> None:
    chip = add_hwmon(tmp_path, 0, "amd_energy", {"energy1_input": 9_000_000, "energy1_label": "Esocket0"})
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        write(chip / "energy1_input", 1_000_000)  # driver reloaded: counter reset
        meter.poll()
        clock.advance(1)
        write(chip / "energy1_input", 3_500_000)
    assert m.joules == pytest.approx(2.5)
    assert any("went backwards" in w for w in m.warnings)


def test_sensor_that_disappears_mid_window(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 5_000_000})
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        meter.poll()
        clock.advance(1)
        shutil.rmtree(chip.resolve())  # the device was unbound
        meter.poll()
        clock.advance(1)
    # 5 J is the first of three seconds: reported as the window's it would be a third of the truth
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert m.joules == pytest.approx(meter.profile.idle_watts * 3)
    assert any("unreadable" in w for w in m.warnings)
    assert any("measured only part of this window (power1 unreadable for the last 2.00 s" in w and "5.000 J" in w
               for w in m.warnings)
    assert m.to_report().estimated


def test_sensor_gone_for_the_whole_window_falls_back_to_the_estimate(tmp_path: Path, make_meter: Make,
                                                                      clock: ManualClock) -> None:
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 5_000_000})
    meter = make_meter(tmp_path)
    shutil.rmtree(chip.resolve())
    with meter.measure() as m:
        clock.advance(2)
    assert m.source == "estimate:generic" and m.estimated
    assert m.joules > 0
    assert any("gave no usable readings" in w for w in m.warnings)


@pytest.mark.parametrize(("bad", "warned"), [("N/A", ("garbage", "not counted")),
                                             (10**18, ("implausible power",))])  # a terawatt
def test_an_unusable_power_value_is_a_gap(tmp_path: Path, make_meter: Make, clock: ManualClock, bad: object,
                                          warned: tuple[str, ...]) -> None:
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 1_000_000})
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
        meter.poll()
        write(chip / "power1_input", bad)
        clock.advance(1)
        meter.poll()
        write(chip / "power1_input", 1_000_000)
        clock.advance(1)
        meter.poll()
        clock.advance(1)
    # seconds 0-1 and 3-4 are measured; 1-3 is a gap that is reported, not guessed, and not passed off as whole
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert any("power1 no readings for 2.00 s" in w and "its 2.000 J fall short" in w for w in m.warnings)
    for text in warned:
        assert any(text in w for w in m.warnings)


def test_the_sampler_integrates_around_a_gap_and_flags_it(tmp_path: Path, clock: ManualClock) -> None:
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 1_000_000})
    sampler = Sampler(detect_hwmon(tmp_path)[0], 3600.0, clock=clock)
    token = sampler.open()
    clock.advance(1)
    sampler.poll()
    write(chip / "power1_input", "N/A")
    clock.advance(1)
    sampler.poll()
    write(chip / "power1_input", 1_000_000)
    clock.advance(1)
    sampler.poll()
    clock.advance(1)
    window = sampler.close(token)
    sampler.stop()
    assert window.domains_j == {"power1": pytest.approx(2.0)}
    assert window.incomplete == {"power1": "no readings for 2.00 s"}


def test_a_rail_unreadable_when_the_window_opens_is_not_the_whole_window(tmp_path: Path, make_meter: Make,
                                                                         clock: ManualClock) -> None:
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 3_000_000})
    meter = make_meter(tmp_path)
    write(chip / "power1_input", "N/A")
    with meter.measure() as m:
        clock.advance(1)
        write(chip / "power1_input", 3_000_000)
        meter.poll()
        clock.advance(1)
    assert (m.source, m.estimated) == ("estimate:generic", True)
    assert any("power1 no reading for the first 1.00 s" in w for w in m.warnings)


def test_two_chips_of_one_kind_can_each_be_chosen(tmp_path: Path) -> None:
    for index, address in ((1, "1-0040"), (2, "1-0041")):  # a Jetson AGX Orin has two ina3221
        add_hwmon(tmp_path, index, "ina3221", {"in1_label": "VDD_IN", "in1_input": 5000, "curr1_input": 1000},
                  device=f"platform/bus@0/c240000.i2c/i2c-1/{address}")
    labels = [i.label for i in describe_sources(tmp_path) if i.kind == "hwmon"]
    assert labels == ["hwmon:ina3221", "hwmon:ina3221@hwmon2"]
    assert EnergyMeter(source="hwmon:ina3221@hwmon2", sysfs_root=tmp_path).source == "hwmon:ina3221@hwmon2"


# --- a channel of the total unreadable at detection ------------------------------------------------

def _three_rails(root: Path) -> Path:
    # an ina3221 with no input rail: the total is the sum of its three rails, 5 V × 0.4 A = 2 W each
    return add_hwmon(root, 0, "ina3221", {f"{a}{n}_{b}": v for n in (1, 2, 3)
                                           for a, b, v in (("in", "label", f"rail{n}"), ("in", "input", 5000),
                                                           ("curr", "input", 400))})


def _measure_unprivileged(make_meter: Make, root: Path, clock: ManualClock) -> tuple[EnergyMeter, object]:
    def run() -> tuple[EnergyMeter, object]:
        meter = make_meter(root)
        with meter.measure() as m:
            clock.advance(1)
        return meter, m

    return call_unprivileged(run)


def test_an_unreadable_rail_of_the_sum_is_named_with_every_measurement(tmp_path: Path, make_meter: Make,
                                                                      clock: ManualClock) -> None:
    chip = _three_rails(tmp_path)
    make_unreadable(chip / "curr2_input")
    meter, m = _measure_unprivileged(make_meter, tmp_path, clock)
    # as RAPL with a denied zone: chosen with what it can read, and never silent about the rest
    info = [i for i in meter.describe() if i.kind == "hwmon"][0]
    assert info.chosen and info.usable
    assert info.problem == ("unreadable: rail2 (curr2_input: permission denied); "
                            "the total counts only rail1, rail3")
    assert info.fix and "chmod a+r" in info.fix and "curr2_input" in info.fix
    assert m.source == "hwmon:ina3221" and m.joules == pytest.approx(4.0)  # type: ignore[attr-defined]
    assert any("hwmon:ina3221 leaves part of the device out" in w and "rail2" in w
               for w in m.warnings)  # type: ignore[attr-defined]


def test_an_unreadable_input_rail_is_named_though_the_other_rails_are_summed(tmp_path: Path) -> None:
    chip = add_hwmon(tmp_path, 1, "ina3221", {
        "in1_label": "VDD_IN", "in1_input": 5000, "curr1_input": 1200,
        "in2_label": "VDD_CPU_GPU_CV", "in2_input": 5000, "curr2_input": 400,
        "in3_label": "VDD_SOC", "in3_input": 5000, "curr3_input": 300,
    })
    write(chip / "curr1_input", "garbage")
    info = [i for i in describe_sources(tmp_path) if i.kind == "hwmon"][0]
    assert info.usable and [d.name for d in info.domains if d.in_total] == ["VDD_CPU_GPU_CV", "VDD_SOC"]
    assert info.problem is not None and info.problem.startswith("unreadable: VDD_IN (curr1_input: garbage")
    assert info.fix is None  # nothing a chmod would mend


def test_an_unreadable_socket_counter_is_named(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    add_hwmon(tmp_path, 0, "amd_energy", {"energy1_input": 1_000_000, "energy1_label": "Ecore000",
                                          "energy2_input": 5_000_000, "energy2_label": "Esocket0",
                                          "energy3_input": 7_000_000, "energy3_label": "Esocket1"})
    make_unreadable(tmp_path / "sys/class/hwmon/hwmon0/energy3_input")
    meter, m = _measure_unprivileged(make_meter, tmp_path, clock)
    info = [i for i in meter.describe() if i.kind == "hwmon"][0]
    assert info.chosen and info.problem is not None and "Esocket1 (energy3_input: permission denied)" in info.problem
    assert any("leaves part of the device out" in w and "Esocket1" in w for w in m.warnings)  # type: ignore[attr-defined]


def test_core_counters_never_stand_in_for_unreadable_sockets(tmp_path: Path, make_meter: Make,
                                                             clock: ManualClock) -> None:
    chip = _amd_energy(tmp_path)
    make_unreadable(chip / "energy3_input")  # Esocket0
    meter, m = _measure_unprivileged(make_meter, tmp_path, clock)
    # as RAPL's core zone without its package: the cores are part of the socket, not the device
    info = [i for i in meter.describe() if i.kind == "hwmon"][0]
    assert not info.usable and not any(d.in_total for d in info.domains)
    assert info.problem is not None and info.problem.startswith("cannot read Esocket0")
    assert m.source == "estimate:generic" and m.estimated  # type: ignore[attr-defined]
    assert any("hwmon:amd_energy: cannot read Esocket0" in w for w in m.warnings)  # type: ignore[attr-defined]
    assert info.detail is not None and info.detail.endswith("(energy counters)")  # it has no power rails


def test_an_unreadable_core_counter_leaves_nothing_out(tmp_path: Path) -> None:
    chip = _amd_energy(tmp_path)
    write(chip / "energy1_input", "garbage")  # Ecore000: inside the socket, never part of the total
    info = [i for i in describe_sources(tmp_path) if i.kind == "hwmon"][0]
    assert info.usable and info.problem is None


def test_unreadable_counters_leave_nothing_out_when_the_rails_are_summed(tmp_path: Path) -> None:
    # a chip that measures its rail both ways: with the counter unreadable, the power rail is the total
    add_hwmon(tmp_path, 0, "some_pmbus", {"energy1_input": "garbage", "power1_input": 3_000_000,
                                          "power1_label": "pin"})
    info = [i for i in describe_sources(tmp_path) if i.kind == "hwmon"][0]
    assert info.usable and [d.name for d in info.domains if d.in_total] == ["pin"]
    assert info.problem is None


def test_a_stuck_socket_counter_beside_a_moving_one_is_not_a_measurement(tmp_path: Path, make_meter: Make,
                                                                          clock: ManualClock) -> None:
    # two sockets, the first one's counter stuck: the second socket's joules were reported as the device's
    chip = add_hwmon(tmp_path, 0, "amd_energy", {"energy1_input": 5_000_000, "energy1_label": "Esocket0",
                                                 "energy2_input": 5_000_000, "energy2_label": "Esocket1"})
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1.0)
        write(chip / "energy2_input", 25_000_000)
    assert m.estimated and m.source.startswith("estimate:")  # type: ignore[attr-defined]
    assert any("Esocket0 did not move in 1.00 s" in w for w in m.warnings)  # type: ignore[attr-defined]
