"""Raspberry Pi 5 PMIC: parsing ``vcgencmd pmic_read_adc`` and sampling it through a stand-in vcgencmd.

``data/pmic_read_adc.txt`` is written in the exact layout the firmware prints
(right-aligned ``<RAIL>_A current(<ch>)=<amps>A`` lines, then ``<RAIL>_V
volt(<ch>)=<volts>V`` lines, then EXT5V_V and BATT_V with no current), as in
published recordings of the command on a Pi 5; the values are those of an idle
board.
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from power_fakes import DATA, ManualClock, add_pi5, scale_pmic_currents

from edge_runtime.power import EnergyMeter, describe_sources, parse_pmic_output

Make = Callable[..., EnergyMeter]

SAMPLE = (DATA / "pmic_read_adc.txt").read_text()
# Σ V × I over the 12 rails of the sample, worked out by hand from the file
SAMPLE_WATTS = 1.5407325725


def test_parse_recorded_output() -> None:
    rails = parse_pmic_output(SAMPLE)
    assert len(rails) == 14
    core = rails["VDD_CORE"]
    assert core.amps == pytest.approx(0.7421875) and core.volts == pytest.approx(0.7226563)
    assert core.watts == pytest.approx(0.7421875 * 0.7226563)
    # input and RTC-cell voltages have no current: no power
    assert rails["EXT5V"].watts is None and rails["EXT5V"].amps is None
    assert rails["BATT"].watts is None
    assert sum(r.watts for r in rails.values() if r.watts is not None) == pytest.approx(SAMPLE_WATTS)


def test_parse_skips_noise() -> None:
    text = "error=1 error_msg=\"oops\"\n" + SAMPLE.replace("HDMI_A current(22)=0.01611328A", "HDMI_A current(22)=zzzA")
    rails = parse_pmic_output(text)
    assert rails["HDMI"].amps is None and rails["HDMI"].volts is not None
    assert parse_pmic_output("") == {}


def test_detected_on_a_pi5_tree(tmp_path: Path) -> None:
    add_pi5(tmp_path, SAMPLE)
    infos = describe_sources(tmp_path)
    pmic = [i for i in infos if i.kind == "rpi-pmic"][0]
    assert pmic.chosen and pmic.usable and pmic.label == "rpi-pmic"
    assert "Raspberry Pi 5" in (pmic.detail or "")
    readable = [d.name for d in pmic.domains if d.in_total]
    assert len(readable) == 12 and "VDD_CORE" in readable and "EXT5V" not in readable


def test_sampled_window_is_integrated(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    sample_file = add_pi5(tmp_path, SAMPLE)
    meter = make_meter(tmp_path)
    assert meter.source == "rpi-pmic" and not meter.estimated
    with meter.measure() as m:
        clock.advance(1)
        sample_file.write_text(scale_pmic_currents(SAMPLE, 3.0))
        meter.poll()
        clock.advance(1)
        meter.poll()
    p0, p1 = SAMPLE_WATTS, 3 * SAMPLE_WATTS
    assert m.joules == pytest.approx((p0 + p1) / 2 + p1, rel=1e-6)
    assert m.samples == 3
    assert not any("power × time" in w for w in m.warnings)


def test_window_shorter_than_two_samples_is_power_times_time_and_says_so(tmp_path: Path, make_meter: Make,
                                                                           clock: ManualClock) -> None:
    add_pi5(tmp_path, SAMPLE)
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(0.05)
    assert m.joules == pytest.approx(SAMPLE_WATTS * 0.05, rel=1e-6)
    assert any("power × time" in w for w in m.warnings)


def test_pi4_with_vcgencmd_but_no_pmic_is_not_usable(tmp_path: Path) -> None:
    add_pi5(tmp_path, "")
    (tmp_path / "sys/firmware/devicetree/base/model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    pmic = [i for i in describe_sources(tmp_path) if i.kind == "rpi-pmic"][0]
    assert pmic.present and not pmic.usable and "no rail currents" in (pmic.problem or "")


def test_pi5_without_vcgencmd_says_what_to_install(tmp_path: Path) -> None:
    add_pi5(tmp_path, SAMPLE)
    (tmp_path / "usr/bin/vcgencmd").unlink()
    pmic = [i for i in describe_sources(tmp_path) if i.kind == "rpi-pmic"][0]
    assert pmic.present and not pmic.usable and pmic.problem == "vcgencmd not found"
    assert pmic.fix and "vcgencmd" in pmic.fix


def test_a_rail_reading_that_overflows_to_infinity_is_skipped() -> None:
    rails = parse_pmic_output("   VDD_CORE_A current(7)=1e999A\n   VDD_CORE_V volt(15)=0.80000000V\n")
    assert rails["VDD_CORE"].amps is None and rails["VDD_CORE"].volts == 0.8


# vcgencmd that blocks while <root>/hold exists (the firmware mailbox is busy), saying so in <root>/entered
_SLOW_VCGENCMD = """#!/bin/sh
root="$(dirname "$0")/../.."
if [ -e "$root/hold" ]; then
    touch "$root/entered"
    while [ -e "$root/hold" ]; do sleep 0.01; done
fi
exec cat "$root/pmic_read_adc.txt"
"""


def test_opening_a_window_does_not_wait_for_a_slow_read_in_progress(tmp_path: Path) -> None:
    add_pi5(tmp_path, SAMPLE)
    exe = tmp_path / "usr/bin/vcgencmd"
    exe.write_text(_SLOW_VCGENCMD)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    with EnergyMeter(tmp_path, sample_interval_s=0.02) as meter:
        with meter.measure():  # the first window reads; the sampler keeps the timeline fresh afterwards
            time.sleep(0.05)
        (tmp_path / "hold").touch()
        deadline = time.monotonic() + 5
        while not (tmp_path / "entered").exists():
            assert time.monotonic() < deadline, "the background sampler did not start a read"
            time.sleep(0.005)
        opened: list[object] = []
        opener = threading.Thread(target=lambda: opened.append(meter.measure()))
        try:
            opener.start()
            opener.join(1.0)
            assert opened, "opening a window waited for the vcgencmd read in progress"
        finally:
            (tmp_path / "hold").unlink()
            opener.join()
        m = opened[0].stop()  # type: ignore[attr-defined]
    assert m.source == "rpi-pmic" and not m.estimated
    assert m.joules == pytest.approx(SAMPLE_WATTS * m.seconds, rel=1e-6)
