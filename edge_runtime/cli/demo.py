"""``edge-runtime demo``: the main job on this machine (what `make demo` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the default bundles, start the bridge, explore the design space and recommend a policy")
    p.add_argument("--out", default="demo-out", help="directory for the report, plots and recommended config (default: demo-out)")
    p.add_argument("--limit", type=int, help="first N items per split of the demo suite (default: all 70)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(Path(args.out), limit=args.limit)
