"""The meter as the engine and the daemon use it: concurrent windows, one lazy sampler, close, settings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from power_fakes import ManualClock, add_hwmon, add_rapl_zone, write

from edge_runtime.config import load_settings, setting
from edge_runtime.engine.types import EnergyReport
from edge_runtime.errors import ConfigError, EnergyError
from edge_runtime.power import ConstantPowerSource, EnergyMeter, PowerSettings

Make = Callable[..., EnergyMeter]


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("edge-runtime-power-sampler")]


def test_constant_test_source_is_exact_and_needs_no_thread(make_meter: Make, clock: ManualClock) -> None:
    source = ConstantPowerSource(5.0)
    meter = make_meter(source=source)
    with meter.measure() as m:
        clock.advance(3)
    assert (m.joules, m.source, m.estimated) == (pytest.approx(15.0), "test:constant", False)
    assert not meter.sampler_running
    assert source.reads == 2  # start and end, nothing in between
    est = make_meter(source=ConstantPowerSource(1.0, label="test:est", estimated=True))
    with est.measure() as m2:
        clock.advance(1)
    assert m2.estimated and m2.source == "test:est"


def test_figures_are_not_available_while_the_window_is_open(make_meter: Make) -> None:
    meter = make_meter(source=ConstantPowerSource(1.0))
    m = meter.measure()
    assert not m.done
    with pytest.raises(EnergyError, match="still open"):
        _ = m.joules
    m.stop()
    assert m.done and m.stop() is m  # idempotent
    assert isinstance(m.to_report(), EnergyReport)


def test_start_stop_api_and_exceptions_inside_the_block(make_meter: Make, clock: ManualClock) -> None:
    meter = make_meter(source=ConstantPowerSource(2.0))
    with pytest.raises(RuntimeError):
        with meter.measure() as m:
            clock.advance(1)
            raise RuntimeError("generation failed")
    assert m.joules == pytest.approx(2.0)  # still closed and measured
    win = meter.start()
    clock.advance(0.5)
    assert win.stop().joules == pytest.approx(1.0)


def test_to_dict_has_the_documented_fields(make_meter: Make, clock: ManualClock) -> None:
    meter = make_meter(source=ConstantPowerSource(2.0))
    with meter.measure() as m:
        clock.advance(1)
    d = m.to_dict()
    assert set(d) == {"joules", "seconds", "avg_watts", "source", "estimated", "domains", "process_joules",
                      "process_share", "samples", "warnings"}
    assert d["avg_watts"] == pytest.approx(2.0) and d["domains"] == {"constant": pytest.approx(2.0)}


def test_concurrent_windows_share_one_lazily_started_sampler(tmp_path: Path) -> None:
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 4_000_000})
    with EnergyMeter(tmp_path, sample_interval_s=0.01) as meter:
        assert not meter.sampler_running and not _sampler_threads()  # lazy: nothing before the first window
        results: list[object] = []
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                for _ in range(5):
                    with meter.measure() as m:
                        time.sleep(0.005 * (1 + i % 3))
                    results.append(m)
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        write(chip / "power1_input", 6_000_000)
        for t in threads:
            t.join()
        assert not errors
        assert len(results) == 40
        assert len(_sampler_threads()) == 1  # one thread for all 40 windows
        for m in results:
            assert m.source == "hwmon:ina226" and m.warnings == []  # type: ignore[attr-defined]
            # between 4 and 6 W whatever the interleaving
            assert 4.0 * m.seconds - 1e-9 <= m.joules <= 6.0 * m.seconds + 1e-9  # type: ignore[attr-defined]
    assert not meter.sampler_running


def test_close_stops_the_sampler_and_refuses_new_windows(tmp_path: Path) -> None:
    add_rapl_zone(tmp_path, "0", "package-0", 0)
    meter = EnergyMeter(tmp_path, sample_interval_s=0.01)
    open_window = meter.measure()
    assert meter.sampler_running
    meter.close()
    assert not meter.sampler_running and meter.closed
    assert open_window.stop().joules >= 0  # an open window can still be closed
    with pytest.raises(EnergyError, match="closed"):
        meter.measure()


def test_sampler_sleeps_when_no_window_is_open(tmp_path: Path) -> None:
    add_rapl_zone(tmp_path, "0", "package-0", 0)
    with EnergyMeter(tmp_path, sample_interval_s=0.01) as meter:
        assert meter._sampler is None
        with meter.measure():
            time.sleep(0.05)
        sampler = meter._sampler
        assert sampler is not None
        sampler._linger_s = 0.0  # no grace period for this test
        time.sleep(0.05)
        reads = sampler.reads
        time.sleep(0.1)
        assert sampler.reads == reads


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        EnergyMeter(sample_interval_s=0)
    with pytest.raises(ConfigError) as err:
        EnergyMeter(source="nvml")
    assert err.value.field == "power.source"
    with pytest.raises(ValueError):
        ConstantPowerSource(-1.0)


def test_settings_drive_the_meter(tmp_path: Path, clock: ManualClock) -> None:
    add_hwmon(tmp_path, 0, "ina226", {"power1_input": 1_000_000})
    settings = load_settings(PowerSettings, env={}, overrides={
        "sysfs_root": str(tmp_path), "source": "estimate", "profile": "raspberry-pi-4",
        "sample_interval_ms": "50", "idle_watts": "1.5"})
    assert settings.sample_interval_ms == 50 and settings.idle_watts == 1.5
    with EnergyMeter.from_settings(settings, clock=clock) as meter:
        assert meter.source == "estimate:custom"  # insisted on, though hwmon is there
        assert meter.sample_interval_s == pytest.approx(0.05)
        assert meter.profile.active_watts_per_core == 0.925 and meter.profile.idle_watts == 1.5
    auto = load_settings(PowerSettings, env={"EDGE_RUNTIME_POWER_SYSFS_ROOT": str(tmp_path)},
                         env_prefix="EDGE_RUNTIME_POWER")
    with EnergyMeter.from_settings(auto) as meter:
        assert meter.source == "hwmon:ina226"


@pytest.mark.parametrize(("overrides", "field"), [
    ({"source": "nvml"}, "power.source"),
    ({"profile": "toaster"}, "power.profile"),
    ({"sample_interval_ms": "0"}, "power.sample_interval_ms"),
    ({"idle_watts": "-3"}, "power.idle_watts"),
    ({"active_watts_per_core": "lots"}, "active_watts_per_core"),
])
def test_bad_settings_name_the_field(overrides: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(PowerSettings, env={}, overrides=overrides)
    assert err.value.field == field


def test_settings_embed_as_a_power_section() -> None:
    from dataclasses import dataclass

    from edge_runtime.config import setting

    @dataclass(frozen=True)
    class Daemon:
        power: PowerSettings = setting(factory=PowerSettings, help="energy measurement")

    s = load_settings(Daemon, env={"EDGE_RUNTIME_POWER_PROFILE": "laptop-x86"}, data={"power": {"idle_watts": 7}})
    assert s.power.profile == "laptop-x86" and s.power.idle_watts == 7.0


def test_a_given_source_is_described_first(make_meter: Make) -> None:
    meter = make_meter(source=ConstantPowerSource(1.0))
    infos = meter.describe()
    assert infos[0].label == "test:constant" and infos[0].chosen
    assert infos[-1].kind == "estimate" and not infos[-1].chosen


def test_a_total_rail_reading_zero_watts_is_flagged(tmp_path: Path, make_meter: Make, clock: ManualClock) -> None:
    add_hwmon(tmp_path, 0, "ina226", {"power1_input": 0})
    meter = make_meter(tmp_path)
    with meter.measure() as m:
        clock.advance(1)
    assert m.joules == 0.0 and m.source == "hwmon:ina226"
    assert any("0 W throughout" in w for w in m.warnings)


def test_power_package_import_does_not_load_the_engine_package() -> None:
    import subprocess
    import sys

    code = ("import sys, edge_runtime.cli.power, edge_runtime.power;"
            "print(','.join(m for m in ('onnxruntime', 'numpy', 'psutil', 'edge_runtime.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_window_dropped_without_stop_does_not_keep_the_sampler_busy(tmp_path: Path, make_meter: Make) -> None:
    import gc

    add_rapl_zone(tmp_path, "0", "package-0", 0)
    meter = make_meter(tmp_path)
    kept = meter.start()
    dropped = meter.start()
    sampler = meter._sampler
    assert sampler is not None and sampler.open_windows == 2
    del dropped
    gc.collect()
    assert sampler.open_windows == 1
    kept.stop()
    assert sampler.open_windows == 0


def test_a_source_the_settings_insist_on_and_the_device_lacks_names_power_source(tmp_path: Path) -> None:
    # the daemon made its meter after listening and logged "cannot load the model" for it
    settings = PowerSettings(sysfs_root=tmp_path, source="rapl")
    for attempt in (EnergyMeter.from_settings, EnergyMeter.check_settings):
        with pytest.raises(ConfigError) as err:
            attempt(settings)
        assert err.value.field == "power.source" and "not present" in str(err.value)
        assert isinstance(err.value.__cause__, EnergyError)
    with pytest.raises(ConfigError) as err:
        EnergyMeter.check_settings(PowerSettings(sysfs_root=tmp_path / "typo"))
    assert err.value.field == "power.sysfs_root"


def test_checking_settings_makes_no_meter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # `serve --check` detects, then the daemon's meter detects again: what it warns about is said once, by the meter
    add_hwmon(tmp_path, 0, "ina3221", {"power1_input": 1_000_000, "power2_input": "garbage"})
    with caplog.at_level("INFO", logger="edge_runtime.power"):
        EnergyMeter.check_settings(PowerSettings(sysfs_root=tmp_path, source="hwmon"))
        EnergyMeter.check_settings(PowerSettings(sysfs_root=tmp_path, source="estimate"))
    assert not caplog.records and not _sampler_threads()
    with caplog.at_level("INFO", logger="edge_runtime.power"), \
            EnergyMeter.from_settings(PowerSettings(sysfs_root=tmp_path, source="hwmon")):
        pass
    assert any("leaves part of the device out" in r.getMessage() for r in caplog.records)  # what check did not say


@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_sysfs_root_is_refused_not_read_as_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty: str) -> None:
    # Path("") is ".": with a ./sys here, its counters were read as this device's
    monkeypatch.chdir(tmp_path)
    add_rapl_zone(tmp_path, "0", "package-0", 1_000_000)
    for env, overrides in (({"EDGE_RUNTIME_POWER_SYSFS_ROOT": empty}, None), ({}, {"sysfs_root": empty})):
        with pytest.raises(ConfigError) as err:
            load_settings(PowerSettings, env=env, env_prefix="EDGE_RUNTIME_POWER", overrides=overrides)
        assert err.value.field == "sysfs_root", (env, overrides)
    with pytest.raises(ConfigError) as err:
        PowerSettings(sysfs_root=empty)  # type: ignore[arg-type]
    assert err.value.field == "power.sysfs_root"
    with pytest.raises(ConfigError) as err:
        EnergyMeter(empty)
    assert err.value.field == "sysfs_root"


@pytest.mark.parametrize("root", [None, 5, b"/"])
def test_a_sysfs_root_that_is_no_path_is_named(root: object) -> None:
    # a bare TypeError from os.fspath, a foreign error an app could not tell from its own bug
    with pytest.raises(ConfigError) as err:
        EnergyMeter(root)  # type: ignore[arg-type]
    assert err.value.field == "sysfs_root"


@dataclass(frozen=True)
class _WithPower:
    """A settings model with a ``[power]`` section, as the daemon's."""

    power: PowerSettings = setting(factory=PowerSettings, help="energy measurement")


def test_an_empty_sysfs_root_in_a_config_file_is_refused(tmp_path: Path) -> None:
    # a relative root follows the file; an empty one skipped that rule and became the working directory
    config = tmp_path / "edge.toml"
    config.write_text('[power]\nsysfs_root = ""\n')
    with pytest.raises(ConfigError) as err:
        load_settings(_WithPower, config_file=config, env={})
    assert err.value.field == "power.sysfs_root"
    config.write_text('[power]\nsysfs_root = "tree"\n')
    assert load_settings(_WithPower, config_file=config, env={}).power.sysfs_root == tmp_path / "tree"


def test_an_optional_fields_error_names_it_once_and_cuts_a_long_value() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_WithPower, env={}, data={"power": {"idle_watts": "abc"}})
    assert str(err.value) == "power.idle_watts: expected a number, got 'abc'"
    for huge in (10**400, "9" * 400):
        with pytest.raises(ConfigError) as err:
            load_settings(_WithPower, env={}, data={"power": {"idle_watts": huge}})
        message = str(err.value)
        assert message.count("power.idle_watts") == 1 and len(message) < 120, message
    # read on its own (`edge-runtime power`), the section's fields are named as a config file writes them
    with pytest.raises(ConfigError) as err:
        load_settings(PowerSettings, env={}, overrides={"active_watts_per_core": "lots"}, section="power")
    assert err.value.field == "power.active_watts_per_core"


def _in_forked_child(body: Callable[[], object], timeout_s: float = 10.0) -> object:
    """Run ``body`` in a forked child (as gunicorn's --preload workers run) and return what it returned; a child
    that hangs is killed after ``timeout_s`` and fails the test."""
    import os
    import pickle
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            signal.alarm(int(timeout_s))
            os.write(w, pickle.dumps(body()))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as out:
        data = out.read()
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), f"the forked child was killed by signal {os.WTERMSIG(status)} (it hung)"
    return pickle.loads(data)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_a_forked_child_samples_its_own_windows(tmp_path: Path) -> None:
    # QA: the sampler thread does not survive fork() but the child's sampler still said it ran: a window read the
    # rail at its two ends only, 1.0 J for a 50 W burst that makes ~40 J, labelled measured with no warning
    chip = add_hwmon(tmp_path, 0, "ina226", {"power1_input": 1_000_000})
    rail = (chip / "power1_input").resolve()
    meter = EnergyMeter(tmp_path, sample_interval_s=0.02)

    def burst() -> tuple[float, int, bool]:
        write(rail, 1_000_000)
        with meter.measure() as m:
            time.sleep(0.05)
            write(rail, 50_000_000)
            time.sleep(0.4)
            write(rail, 1_000_000)
            time.sleep(0.05)
        return m.joules, m.samples, m.estimated

    try:
        assert burst()[0] > 15  # the parent's thread samples the burst
        joules, samples, estimated = _in_forked_child(burst)
    finally:
        meter.close()
    assert samples > 5 and joules > 15 and not estimated


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_a_fork_during_a_slow_read_does_not_hang_the_child(tmp_path: Path) -> None:
    # QA: forked while the sampler thread was inside a slow read, the child found the read lock taken for good
    # and its first window never returned
    from edge_runtime.power import DomainInfo, Power, PowerSource, SourceInfo

    class Slow(PowerSource):
        kind = "usb"

        def __init__(self) -> None:
            super().__init__(SourceInfo(kind="usb", label="usb:slow", present=True, usable=True,
                                        domains=(DomainInfo("bus", "/dev/null", True),)))

        def read(self):
            time.sleep(0.3)
            return {"bus": Power(uw=5e6)}

    meter = EnergyMeter(source=Slow(), sample_interval_s=0.05)
    try:
        with meter.measure():
            time.sleep(0.1)
        time.sleep(0.1)  # the lingering thread is inside read(), holding the read lock

        def one() -> str:
            with meter.measure() as m:
                pass
            return m.source

        assert _in_forked_child(one) == "usb:slow"
    finally:
        meter.close()
