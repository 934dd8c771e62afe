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

from ..config import refuse_abbreviations, stdout_closed, stdout_reader_gone
from ..errors import EdgeRuntimeError

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
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (kill, systemd stop, a timeout) unwinds like Ctrl-C: the finally blocks stop a benchmark's runner, the
    # demo's bridge and the explorer's daemon, and remove a build's staging directory (Python's default for it is to
    # die at once, leaving all of them). `serve` installs its own handler, which drains.
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return int(args.func(args) or 0)
    except EdgeRuntimeError as err:
        # one clear line, never a traceback as the only explanation
        print(f"edge-runtime {args.command}: error: {err}", file=sys.stderr)
        if args.verbose >= 2:
            raise
        return 1
    except BrokenPipeError as err:
        if stdout_reader_gone():
            return stdout_closed()
        print(f"edge-runtime {args.command}: error: {err.strerror or err}", file=sys.stderr)
        return 1
    except OSError as err:
        # a file the user named that cannot be read or written (a directory, a missing parent, no permission);
        # the commands translate the ones they expect, this is the boundary for the rest
        where = f": {err.filename}" if err.filename else ""
        print(f"edge-runtime {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        if args.verbose >= 2:
            raise
        return 1
    except KeyboardInterrupt:
        print(f"edge-runtime {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
