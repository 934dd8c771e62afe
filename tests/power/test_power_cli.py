"""``edge-runtime power``: listing, measuring and watching, against fake trees and this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from power_fakes import add_battery, add_rapl_zone, call_unprivileged, make_unreadable

from edge_runtime.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["power", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_on_a_rapl_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_rapl_zone(tmp_path, "0", "package-0", 1)
    add_rapl_zone(tmp_path, "0:0", "core", 1)
    code, out, _ = _run(capsys, "--sysfs-root", str(tmp_path), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["chosen"] == "rapl:package-0" and data["estimated"] is False
    assert data["sysfs_root"] == str(tmp_path)
    kinds = [s["kind"] for s in data["sources"]]
    assert kinds == ["rapl", "hwmon", "rpi-pmic", "battery", "estimate"]
    rapl = data["sources"][0]
    assert rapl["chosen"] and [d["name"] for d in rapl["domains"]] == ["package-0", "package-0/core"]
    assert all(d["readable"] for d in rapl["domains"])


def test_list_text_shows_the_permission_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_unreadable(add_rapl_zone(tmp_path, "0", "package-0", 1))
    code = call_unprivileged(main, ["power", "--sysfs-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "rapl" in out and "permission denied" in out and "chmod a+r" in out
    assert "Chosen: estimate:generic (ESTIMATED" in out


def test_measure_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_battery(tmp_path, power_now=7_000_000)
    code, out, _ = _run(capsys, "measure", "--seconds", "0.1", "--sysfs-root", str(tmp_path), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["source"] == "battery:BAT0" and data["estimated"] is False
    assert data["joules"] == pytest.approx(7.0 * data["seconds"], rel=1e-3)
    assert data["avg_watts"] == pytest.approx(7.0, rel=1e-3)
    assert {"domains", "process_joules", "warnings", "seconds"} <= set(data)


def test_measure_text_and_profile_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "measure", "--seconds", "0.05", "--sysfs-root", str(tmp_path),
                        "--profile", "raspberry-pi-4")
    assert code == 0
    assert "estimate:raspberry-pi-4 (ESTIMATED, not measured)" in out
    assert "joules" in out and "warning: no readable power counter" in out


def test_watch_prints_one_line_per_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_battery(tmp_path, power_now=3_000_000)
    code, out, _ = _run(capsys, "--watch", "--interval", "0.02", "--count", "3", "--sysfs-root", str(tmp_path),
                        "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3
    assert all(r["avg_watts"] == pytest.approx(3.0, rel=1e-3) and r["source"] == "battery:BAT0" for r in lines)
    code, out, _ = _run(capsys, "--watch", "--interval", "0.02", "--count", "1", "--sysfs-root", str(tmp_path))
    assert "3.000 W" in out and "[battery:BAT0, measured]" in out


def test_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--seconds", "1")
    assert code == 1 and "--seconds" in err and "measure" in err
    code, _, err = _run(capsys, "--sysfs-root", str(tmp_path), "--source", "rapl")
    assert code == 1 and "not present" in err
    with pytest.raises(SystemExit):
        main(["power", "measure", "--seconds", "-1"])
    with pytest.raises(SystemExit):
        main(["power", "measure", "--seconds", "nan"])
    # flags the chosen mode would not read are refused, not dropped
    for argv, flag in ((["measure", "--interval", "3"], "--interval"), (["measure", "--count", "9"], "--count"),
                       (["--watch", "--seconds", "5"], "--seconds")):
        code, _, err = _run(capsys, *argv, "--sysfs-root", str(tmp_path))
        assert code == 1 and flag in err, argv
    with pytest.raises(SystemExit):
        main(["power", "--watch", "--count", "-1"])  # it used to watch forever


def test_a_source_can_be_chosen_by_its_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_battery(tmp_path, power_now=7_000_000)
    code, out, _ = _run(capsys, "--sysfs-root", str(tmp_path), "--source", "battery:BAT0", "--json")
    assert code == 0 and json.loads(out)["chosen"] == "battery:BAT0"
    code, _, err = _run(capsys, "--sysfs-root", str(tmp_path), "--source", "hwmon:ina3221")
    assert code == 1 and "not present" in err
    for bad in ("nonsense", "auto:x", "hwmon:"):
        code, _, err = _run(capsys, "--sysfs-root", str(tmp_path), "--source", bad)
        assert code == 1 and "power.source" in err and "hwmon:ina3221" in err, bad


def test_console_entry_point_on_this_machine() -> None:
    # the real process, the real root: on this VM there are no counters
    out = subprocess.run([sys.executable, "-c", "import sys; from edge_runtime.cli import main; "
                          "sys.exit(main(['power', '--json']))"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["sources"][-1]["kind"] == "estimate"
    if not any(s["usable"] for s in data["sources"][:-1]):
        assert data["chosen"] == "estimate:generic" and data["estimated"] is True
        assert any("ESTIMATED" in n for n in data["notes"])


def test_a_sysfs_root_that_does_not_exist_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--sysfs-root", str(tmp_path / "typo"))
    assert code == 1 and "power.sysfs_root" in err and "not a directory" in err


def test_an_empty_sysfs_root_is_an_error_not_the_working_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    add_rapl_zone(tmp_path, "0", "package-0", 1)  # ./sys here: an empty root read it as this device's counters
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "--sysfs-root", "", "--json")
    assert code == 1 and "power.sysfs_root" in err and not out, err
    monkeypatch.setenv("EDGE_RUNTIME_POWER_SYSFS_ROOT", "")
    code, out, err = _run(capsys, "--json")
    assert code == 1 and "power.sysfs_root" in err and not out, err


def test_a_flag_with_a_bad_value_names_the_power_field_once(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--idle-watts", "abc")
    assert code == 1 and err.strip().endswith("error: power.idle_watts: expected a number, got 'abc'"), err
