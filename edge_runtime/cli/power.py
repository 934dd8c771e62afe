"""``edge-runtime power``: which energy source this device has, and what it reads.

    edge-runtime power [--sysfs-root DIR] [--json]             list sources, domains, readability, the chosen one
    edge-runtime power measure --seconds S [--json]            measure one window of S seconds
    edge-runtime power --watch [--interval S] [--count N]      a live reading every S seconds

Source and profile flags (``--source``, ``--profile``, ``--idle-watts``...) are the
``[power]`` settings; ``EDGE_RUNTIME_POWER_*`` environment variables work too.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import TYPE_CHECKING, Any

from ..config import add_settings_arguments, load_settings, settings_overrides_from_args
from ..errors import ConfigError
from ..power._settings import POWER_ENV_PREFIX, POWER_SECTION, PowerSettings

if TYPE_CHECKING:
    from ..power import EnergyMeter, Measurement, SourceInfo

__all__ = ["register"]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of readings, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (leave --count out to watch until Ctrl-C), got {value}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "power",
        help="list energy sources, measure a window, or watch live power",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sources in priority order: rapl > hwmon > rpi-pmic > battery > estimate.",
    )
    parser.add_argument("action", nargs="?", choices=("list", "measure"), default="list",
                        help="list the sources (default) or measure one window")
    parser.add_argument("--seconds", type=_positive_seconds, default=None, help="measure: window length (default 1)")
    parser.add_argument("--watch", action="store_true", help="print a live reading every --interval seconds")
    parser.add_argument("--interval", type=_positive_seconds, default=None, help="--watch: seconds per reading (default 1)")
    parser.add_argument("--count", type=_count, default=None, help="--watch: stop after N readings (default: until Ctrl-C)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (JSON; one line per reading)")
    add_settings_arguments(parser, PowerSettings, env_prefix=POWER_ENV_PREFIX)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..power import EnergyMeter

    # a flag that the chosen mode would not read is an error, not silently dropped
    if args.seconds is not None and (args.action != "measure" or args.watch):
        raise ConfigError("only valid with the measure action, without --watch (edge-runtime power measure "
                          "--seconds S; --watch takes --interval)", field="--seconds")
    for flag, value in (("--interval", args.interval), ("--count", args.count)):
        if value is not None and not args.watch:
            raise ConfigError("only valid with --watch (edge-runtime power --watch --interval S --count N)", field=flag)
    settings = load_settings(PowerSettings, env_prefix=POWER_ENV_PREFIX, section=POWER_SECTION,
                             overrides=settings_overrides_from_args(args))
    with EnergyMeter.from_settings(settings) as meter:
        if args.watch:
            return _watch(meter, args)
        if args.action == "measure":
            with meter.measure() as m:
                time.sleep(args.seconds or 1.0)
            print(json.dumps(m.to_dict(), indent=2) if args.json else _format_measurement(m))
            return 0
        infos = meter.describe()
        if args.json:
            print(json.dumps({
                "sysfs_root": meter.sysfs_root,
                "chosen": meter.source,
                "estimated": meter.estimated,
                "profile": meter.profile.to_dict(),
                "sources": [i.to_dict() for i in infos],
                "notes": meter.notes,
            }, indent=2))
        else:
            print(_format_sources(meter, infos))
    return 0


def _watch(meter: EnergyMeter, args: argparse.Namespace) -> int:
    n = 0
    try:
        while args.count is None or n < args.count:
            with meter.measure() as m:
                time.sleep(args.interval or 1.0)
            n += 1
            if args.json:
                print(json.dumps({"time": time.time(), **m.to_dict()}), flush=True)
            else:
                proc = "" if m.process_joules is None else f"  this process {m.process_joules / m.seconds:7.3f} W"
                kind = "estimated" if m.estimated else "measured"
                print(f"{time.strftime('%H:%M:%S')}  {m.avg_watts:8.3f} W{proc}  [{m.source}, {kind}]", flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def _format_sources(meter: EnergyMeter, infos: list[SourceInfo]) -> str:
    lines = [f"Energy sources under {meter.sysfs_root} (priority order; the first usable one is used):"]
    for info in infos:
        status = "CHOSEN" if info.chosen else "usable" if info.usable else "present, not usable" if info.present \
            else "absent"
        detail = f"  ({info.detail})" if info.detail else ""
        lines.append(f"{'*' if info.chosen else ' '} {info.label:<28} {status}{detail}")
        if info.problem:
            lines.append(f"      {info.problem}")
        if info.fix:
            lines.append(f"      fix: {info.fix}")
        for dom in info.domains:
            state = "readable" if dom.readable else f"NOT readable: {dom.problem}"
            total = ", in total" if dom.in_total and dom.readable else ""
            lines.append(f"      - {dom.name}: {state}{total}  [{dom.path}]")
    kind = "ESTIMATED from CPU time, not a measurement" if meter.estimated else "measured by a hardware counter"
    lines.append(f"Chosen: {meter.source} ({kind})")
    lines.extend(f"note: {n}" for n in meter.notes)
    return "\n".join(lines)


def _format_measurement(m: Measurement) -> str:
    kind = "ESTIMATED, not measured" if m.estimated else "measured"
    lines = [
        f"source          {m.source} ({kind})",
        f"seconds         {m.seconds:.3f}",
        f"joules          {m.joules:.4f}",
        f"avg_watts       {m.avg_watts:.4f}",
    ]
    if m.process_joules is not None and m.process_share is not None:
        lines.append(f"process_joules  {m.process_joules:.4f} ({100 * m.process_share:.1f}% of the device figure, "
                     "by CPU time)")
    else:
        lines.append("process_joules  unavailable")
    lines.append("domains         " + ", ".join(f"{k} {v:.4f} J" for k, v in m.domains.items()))
    lines.append(f"samples         {m.samples}")
    lines.extend(f"warning: {w}" for w in m.warnings)
    return "\n".join(lines)
