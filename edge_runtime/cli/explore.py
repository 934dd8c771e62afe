"""``edge-runtime explore``: measure the hybrid design space and recommend a policy for a goal."""

from __future__ import annotations

import argparse
import sys

from ..config import THREADS_HELP
from ._flags import naming_flags

# explore()'s arguments, by the flags that set them: an error names what the user typed
_FLAGS = {"out": "--out", "limit": "--limit", "split": "--split", "cloud": "--cloud", "goal": "--goal",
          "intra_op_threads": "--threads"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explore", help="measure accuracy / cloud USD / device energy / latency of every policy and recommend one")
    p.add_argument("--edge", required=True, help="edge bundle (directory or cached name)")
    p.add_argument("--cloud", required=True,
                   help="a bundle to serve on a loopback bridge started for the run, or (with a [cloud] address in --config "
                        "or --bridge) the model alias at that bridge")
    p.add_argument("--suite", default="default", help="task suite name or JSONL file (default: default)")
    p.add_argument("--split", default="test", help="split to explore (default: test; the estimator is fitted on dev)")
    p.add_argument("--limit", type=int, help="N items of each split, each task family in turn (a fair sample of every family)")
    p.add_argument("--out", required=True, help="directory for report.md, points.csv, frontier.csv, plots and recommended.toml")
    p.add_argument("--goal", action="append", default=[],
                   help='goal(s), e.g. "accuracy>=0.95*cloud" (default), "max-accuracy usd<=0.50/1k", "max-accuracy joules<=2"')
    p.add_argument("--config", help="the daemon's TOML config: its [cloud] section names an external bridge, [cost] the cost "
                                    "model, [engine] prompt_lookup the edge model's decoding, [power] how its energy is measured")
    p.add_argument("--bridge", help="external bridge address host:port (overrides [cloud] address)")
    p.add_argument("--validate", action="store_true",
                   help="hold back a quarter of the items and run the recommended policy live through `edge-runtime serve` and the bridge")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.set_defaults(func=_run)


@naming_flags(_FLAGS)
def _run(args: argparse.Namespace) -> int:
    from ..explore import explore
    from ..settings import load_runtime_settings

    settings = load_runtime_settings(args.config, overrides={"cloud": {"address": args.bridge}} if args.bridge else None)
    result = explore(
        edge=args.edge, cloud=args.cloud, out=args.out, suite=args.suite, split=args.split, limit=args.limit,
        goals=args.goal or ["accuracy>=0.95*cloud"], cloud_settings=settings.cloud if settings.cloud.address else None,
        cost=settings.cost, validate=args.validate, threads=args.threads, prompt_lookup=settings.engine.prompt_lookup,
        power=settings.power,
    )
    print_summary(result, sys.stdout)
    return 0


def print_summary(result, out) -> None:  # type: ignore[no-untyped-def]
    """The short table `make demo` ends with: always-local, always-cloud and the recommended hybrid."""
    w = out.write
    rows = [result.point("always-local"), result.point("always-cloud")]
    for rec in result.recommendations:
        if rec["point"] is not None and rec["point"] not in rows:
            rows.append(rec["point"])
    width = max(44, *(len(p.name) for p in rows))  # the whole name: a cut one lost its closing parenthesis
    w(f"{'policy':<{width}} {'accuracy':>8} {'escalated':>9} {'USD/1k':>9} {'J/req':>7} {'p50 ms':>7}\n")
    for p in rows:
        o = p.overall
        w(f"{p.name:<{width}} {o['accuracy']:>8.1%} {o['escalation_rate']:>9.1%} {o['cloud_usd_per_1k']:>9.4f} "
          f"{o['device_j_per_request']:>7.3f} {o['latency_p50_ms']:>7.0f}\n")
    sources = sorted({str(e.get("energy_source")) for e in result.measurements.edge if e.get("energy_estimated")})
    if sources:  # an estimate is labelled where the figure is shown, not only in the report
        w(f"J/req is ESTIMATED ({', '.join(sources)}: CPU time x a device profile's power, plus per escalation "
          f"the cost model's network energy and the profile's idle power while waiting), not measured\n")
    else:  # measured on the device; the radio's share never is
        measured = sorted({str(e.get("energy_source")) for e in result.measurements.edge})
        w(f"J/req: the device's energy measured ({', '.join(measured)}), plus the network energy of each escalation "
          f"and the device's idle power while it waits, ESTIMATED (cost model, device profile)\n")
    for rec in result.recommendations:
        if rec["point"] is None:
            w(f"goal {rec['goal']!r}: no explored policy meets it ({'; '.join(rec['constraints'])})\n")
        else:
            w(f"goal {rec['goal']!r} -> {rec['point'].name} (config: {result.out / rec['config_file']})\n")
    if result.validation:
        v = result.validation
        w(f"live check on {v['n']} held-back items: accuracy {v['accuracy']:.1%} (predicted {v['predicted_accuracy']:.1%}, "
          f"±{v['accuracy_margin']:.1%}), escalation {v['escalation_rate']:.1%} (predicted "
          f"{v['predicted_escalation_rate']:.1%}, ±{v['escalation_margin']:.1%}): {v['verdict']}\n")
    # without matplotlib there are none (a warning said so above; "plots and CSVs in" then promised them)
    drawn = "plots and CSVs" if any(f.endswith(".png") for f in result.files) else "CSVs (no plots)"
    w(f"report: {result.out / 'report.md'}; {drawn} in {result.out}\n")
