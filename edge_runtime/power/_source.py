"""The power-source seam: what a backend returns and what detection reports.

A backend (RAPL, hwmon, battery, Raspberry Pi PMIC) is a :class:`PowerSource`.
Its :meth:`~PowerSource.read` returns one raw reading per domain, in the unit
the kernel uses (µJ, µW); the sampler turns them into joules. Failures are
values (:class:`Unreadable`), not exceptions, so one bad domain never hides the
others.

:class:`ConstantPowerSource` is the test implementation that ships with the
library: other parts (engine, daemon) get deterministic joules in their tests
without a fake sysfs tree.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Energy",
    "Power",
    "Remaining",
    "Unreadable",
    "Reading",
    "DomainInfo",
    "SourceInfo",
    "PowerSource",
    "ConstantPowerSource",
]


@dataclass(frozen=True)
class Energy:
    """A cumulative energy counter in µJ; ``max_range_uj`` is where it wraps to 0 (None: no known range)."""

    uj: float
    max_range_uj: float | None = None


@dataclass(frozen=True)
class Power:
    """Instantaneous power in µW."""

    uw: float


@dataclass(frozen=True)
class Remaining:
    """Energy left in a store (a battery) in µJ: it goes down as the device spends energy."""

    uj: float


@dataclass(frozen=True)
class Unreadable:
    """The domain could not be read this time; ``reason`` says why (missing, permission denied, garbage)."""

    reason: str


Reading = Energy | Power | Remaining | Unreadable


@dataclass(frozen=True)
class DomainInfo:
    """One domain of a source as detection saw it."""

    name: str
    path: str
    readable: bool
    problem: str | None = None
    # counted in the source's total (False for sub-domains already inside another, e.g. RAPL core in package)
    in_total: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SourceInfo:
    """What detection found for one source: present? usable? which domains? why not?"""

    kind: str
    label: str
    present: bool
    usable: bool
    domains: tuple[DomainInfo, ...] = ()
    problem: str | None = None
    fix: str | None = None
    estimated: bool = False
    chosen: bool = False
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["domains"] = [dom.to_dict() for dom in self.domains]
        return d


class PowerSource(abc.ABC):
    """One measured source. Subclasses set ``kind`` and build ``info`` at detection time."""

    kind: str = "source"
    # reads spawn a process (vcgencmd): window boundaries then use the sampler's readings
    # instead of reading afresh
    expensive: bool = False
    # sampled by the background thread while a window is open (power readings, wrap tracking)
    needs_background: bool = True
    estimated: bool = False

    def __init__(self, info: SourceInfo) -> None:
        self.info = info

    @property
    def label(self) -> str:
        return self.info.label

    @property
    def usable(self) -> bool:
        return self.info.usable

    def total_domains(self) -> tuple[str, ...]:
        """Domains whose joules add up to the source's figure (no double counting)."""
        return tuple(d.name for d in self.info.domains if d.readable and d.in_total)

    def may_stay_still(self, domain: str) -> str | None:
        """The total domain beside which ``domain`` may truly read 0 J (a DRAM zone's package), or None.

        A counter of the total that did not move measured nothing (a stuck one) unless a part that can really
        draw nothing sits beside one that moved: only the source knows which parts those are.
        """
        return None

    @abc.abstractmethod
    def read(self) -> Mapping[str, Reading]:
        """One raw reading per domain. Must not raise for I/O problems: return :class:`Unreadable`."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


class ConstantPowerSource(PowerSource):
    """A source that always draws ``watts``: for tests of code that reports energy.

    Windows of ``s`` seconds measure ``watts * s`` joules exactly (two readings of a
    constant power integrate exactly), so no background thread is needed.
    """

    kind = "constant"
    needs_background = False

    def __init__(self, watts: float, *, label: str = "test:constant", estimated: bool = False) -> None:
        if watts < 0:
            raise ValueError("watts must be >= 0")
        super().__init__(SourceInfo(
            kind=self.kind, label=label, present=True, usable=True, estimated=estimated,
            domains=(DomainInfo(name="constant", path="", readable=True),),
        ))
        self.watts = watts
        self.estimated = estimated
        self.reads: int = 0
        self._readings: dict[str, Reading] = {"constant": Power(uw=watts * 1e6)}

    def read(self) -> Mapping[str, Reading]:
        self.reads += 1
        return self._readings

