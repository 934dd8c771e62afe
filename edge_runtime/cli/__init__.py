"""The ``edge-runtime`` command line.

Each subcommand lives in its own module under ``edge_runtime.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed namespace and returning an exit code. Modules are imported
lazily by name so that ``edge-runtime power`` never pays for onnxruntime or
the export tool chain.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .. import __version__
from .._logging import configure_logging
from ..config import refuse_abbreviations, run_command

__all__ = ["main", "COMMAND_MODULES"]

# name of the module under edge_runtime.cli for each subcommand, in help order
COMMAND_MODULES: tuple[str, ...] = (
    "models",
    "quantize",
    "generate",
    "calibrate",
    "power",
    "bench",
    "explore",
    "serve",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-runtime",
        description="Hybrid edge runtime: quantized ONNX SLMs on the device, escalation to a cloud bridge, measured energy.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub)
    return refuse_abbreviations(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    # a server's log lines carry the time, as the bridge's do (its billing lines are matched against them); a
    # command's lines go to a terminal, where the time is noise
    configure_logging(level, stamped=args.command == "serve")
    # SIGTERM (kill, systemd stop, a timeout) unwinds like Ctrl-C: the finally blocks stop a benchmark's runner, the
    # demo's bridge and the explorer's daemon, and remove a build's staging directory (Python's default for it is to
    # die at once, leaving all of them). `serve` installs its own handler, which drains; a SIGTERM before that (while
    # it reads its settings and binds) stops a server that has taken no request yet, which is a clean stop (0, as
    # after a drain): 143 would leave a systemd unit restarted in its first second "failed".
    # (not `serve --check`: an interrupted check is no pass). `power --watch` runs until stopped, as Ctrl-C stops it (0)
    stops_cleanly = ((args.command == "serve" and not getattr(args, "check", False))
                     or (args.command == "power" and getattr(args, "watch", False)))
    handler = _stop_cleanly if stops_cleanly else _terminate
    previous = signal.signal(signal.SIGTERM, handler) if threading.current_thread() is threading.main_thread() else None
    try:
        return run_command("edge-runtime", args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop_cleanly(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
