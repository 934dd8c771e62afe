"""What edge_runtime.power exports, and the types its public calls return."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import edge_runtime.power as power
from edge_runtime.engine.types import EnergyReport

EXPECTED = {
    "EnergyMeter", "Measurement", "PowerSettings", "default_meter", "set_default_meter", "reset_default_meter",
    "describe_sources", "SOURCE_PRIORITY", "SourceInfo", "DomainInfo", "DeviceProfile", "PROFILES", "get_profile",
    "custom_profile", "PowerSource", "ConstantPowerSource", "EstimateSource", "Reading", "Energy", "Power",
    "Remaining", "Unreadable", "CpuClock", "PsutilCpuClock", "parse_pmic_output", "PmicRail", "RAPL_PERMISSION_FIX",
}


def test_exported_names() -> None:
    assert set(power.__all__) == EXPECTED
    for name in power.__all__:
        assert hasattr(power, name), name
    private = [m for m in dir(power) if m.startswith("_") and not m.startswith("__")]
    assert all(inspect.ismodule(getattr(power, m)) for m in private)  # only the private modules themselves


def test_private_modules_declare_all() -> None:
    for path in sorted(Path(power.__file__).parent.glob("_*.py")):
        if path.name == "__init__.py":
            continue
        module = getattr(power, path.stem)
        assert isinstance(module.__all__, list) and module.__all__, path.name
        for name in module.__all__:
            assert hasattr(module, name), f"{path.name}: {name}"


def test_public_return_types(tmp_path: Path) -> None:
    infos = power.describe_sources(tmp_path)
    assert isinstance(infos, list) and all(isinstance(i, power.SourceInfo) for i in infos)
    assert [i.kind for i in infos] == list(power.SOURCE_PRIORITY)
    assert all(isinstance(d, power.DomainInfo) for i in infos for d in i.domains)
    with power.EnergyMeter(tmp_path) as meter:
        with meter.measure() as m:
            pass
    assert isinstance(m, power.Measurement)
    assert isinstance(m.joules, float) and isinstance(m.seconds, float) and isinstance(m.avg_watts, float)
    assert isinstance(m.source, str) and isinstance(m.estimated, bool) and isinstance(m.warnings, list)
    assert isinstance(m.domains, dict) and all(isinstance(v, float) for v in m.domains.values())
    assert m.process_joules is None or isinstance(m.process_joules, float)
    assert isinstance(m.to_report(), EnergyReport)
    assert dataclasses.is_dataclass(power.PowerSettings)
    assert power.PowerSettings.__dataclass_params__.frozen  # type: ignore[attr-defined]
