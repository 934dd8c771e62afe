"""``edge-runtime demo``: the main job on this machine (what `make demo` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .bench import _int_at_least

    p = sub.add_parser("demo", help="build the default bundles, start the bridge, explore the design space and recommend a policy")
    p.add_argument("--out", type=_out, default="demo-out",
                   help="directory for the report, plots and recommended config (default: demo-out)")
    # checked here: the demo builds bundles and starts its bridge before the explorer would see the number
    p.add_argument("--limit", type=_int_at_least(1), help="first N items per split of the demo suite (default: all 70)")
    p.set_defaults(func=_run)


def _out(text: str) -> str:
    # Path("") is ".": an unset $OUT wrote the report into the working directory, replacing a recommended.toml
    # there (the explorer refuses an empty --out; the demo handed it "." instead)
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (name a directory for the report, CSVs and configs)")
    return text


def _run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(Path(args.out), limit=args.limit)
