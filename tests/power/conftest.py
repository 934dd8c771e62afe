from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from power_fakes import FakeCpuClock, ManualClock

from edge_runtime.power import EnergyMeter, reset_default_meter


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("edge-runtime-power-sampler")]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Every test leaves no default meter behind and no sampler thread running."""
    reset_default_meter()
    yield
    reset_default_meter()
    deadline = time.monotonic() + 5
    while _sampler_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _sampler_threads(), "a test left an EnergyMeter open (sampler thread still running)"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def cpu() -> FakeCpuClock:
    return FakeCpuClock()


@pytest.fixture
def make_meter(clock: ManualClock, cpu: FakeCpuClock) -> Iterator[Callable[..., EnergyMeter]]:
    """Meters on the manual clocks, with a sampling interval so long that only ``poll()`` samples."""
    meters: list[EnergyMeter] = []

    def make(root: Any = "/", **kwargs: Any) -> EnergyMeter:
        kwargs.setdefault("sample_interval_s", 3600.0)
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("cpu_clock", cpu)
        meter = EnergyMeter(root, **kwargs)
        meters.append(meter)
        return meter

    yield make
    for meter in meters:
        meter.close()
