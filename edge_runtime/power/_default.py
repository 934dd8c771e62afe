"""The process-wide meter: built once from ``[power]`` settings, replaceable and resettable.

Caches must never outlive what they depend on without a way out, or tests end up
measuring a meter built for another tree; hence :func:`reset_default_meter`.
"""

from __future__ import annotations

import threading

from ..config import load_settings
from ._meter import EnergyMeter
from ._settings import POWER_ENV_PREFIX, POWER_SECTION, PowerSettings

__all__ = ["default_meter", "set_default_meter", "reset_default_meter"]

_lock = threading.Lock()
_meter: EnergyMeter | None = None


def default_meter() -> EnergyMeter:
    """The shared meter of this process, created on first use.

    Unless :func:`set_default_meter` installed one (the daemon does, from its
    ``[power]`` section), it is built from ``PowerSettings`` defaults and the
    ``EDGE_RUNTIME_POWER_*`` environment variables.
    """
    global _meter
    with _lock:
        if _meter is None or _meter.closed:
            settings = load_settings(PowerSettings, env_prefix=POWER_ENV_PREFIX, section=POWER_SECTION)
            _meter = EnergyMeter.from_settings(settings)
        return _meter


def set_default_meter(meter: EnergyMeter | None) -> EnergyMeter | None:
    """Install ``meter`` as the process meter; returns the previous one (not closed: the caller decides)."""
    global _meter
    with _lock:
        previous, _meter = _meter, meter
        return previous


def reset_default_meter() -> None:
    """Close and forget the process meter; the next :func:`default_meter` detects again."""
    previous = set_default_meter(None)
    if previous is not None:
        previous.close()
