"""Put the measured tables from ``benchmarks/results`` into README.md, between result markers.

    python benchmarks/render_readme.py [--host vm]

Each table in the README sits between ``<!-- results:NAME -->`` and
``<!-- /results -->``; this script regenerates it from the results file a
benchmark run wrote, so no figure in the README is typed in by hand.
``<!-- results:NAME@HOST -->`` takes another host's results than ``--host``'s.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

from edge_runtime._files import write_text_whole

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _estimators(host: str) -> str:
    d = json.loads((RESULTS / f"estimators-{host}.json").read_text())
    rows = ["| estimator | AUROC | ECE | APGR | CPT(50%) | CPT(80%) |", "|---|--:|--:|--:|--:|--:|"]

    def num(x: Any) -> str:
        return "—" if x is None else f"{x:.3f}"

    def pct(x: Any) -> str:
        return "—" if x is None else f"{x:.1%}"

    shown = ("signal:lp_mean", "signal:lp_min", "signal:margin_min", "signal:first_lp", "signal:prompt_nll", "heuristic", "generic",
             "multi", "multi → gain", "span", "selfcheck", "knn", "prompt", "multi+knn", "multi+knn → gain")
    for name in shown:
        if name not in d["estimators"]:
            continue
        o = d["estimators"][name]["overall"]
        rows.append(f"| {name} | {num(o['auroc'])} | {num(o['ece'])} | {num(o['apgr'])} | {pct(o['cpt']['50%'])} | {pct(o['cpt']['80%'])} |")
    o = next(iter(d["estimators"].values()))["overall"]
    rows.append(f"| random routing | 0.500 | — | {num(o['random']['apgr'])} | {pct(o['random']['cpt']['50%'])} | "
                f"{pct(o['random']['cpt']['80%'])} |")
    rows.append("")
    rows.append(f"Local accuracy {o['local_accuracy']:.1%}, cloud accuracy {o['cloud_accuracy']:.1%} on {d['items']} items. "
                "Single signals are raw (AUROC, routing) with a fitted 1-D curve for ECE; `→ gain` rows route by "
                "`p_cloud − p_correct` (routing metrics only).")
    return "\n".join(rows)


def _daemon(host: str) -> str:
    d = json.loads((RESULTS / f"daemon-{host}.json").read_text())
    o = d["overhead"]
    b = d["bundle"]
    rows = [f"Daemon benchmark (`python benchmarks/daemon.py`, {b['name']} {b['precision']}, {d['settings']['max_tokens']} tokens per "
            f"request, {d['settings']['rounds']} rounds, one generation slot; other programs used "
            f"{o['other_programs_cpu_share']:.1%} of the CPUs):", "",
            "| path | p50 ms | p99 ms |", "|---|--:|--:|"]
    for key, label in (("engine", "engine, called directly"), ("runtime", "HybridRuntime, in process"), ("daemon", "daemon over HTTP")):
        rows.append(f"| {label} | {o[key]['p50_ms']:.1f} | {o[key]['p99_ms']:.1f} |")
    rows += ["", f"Daemon overhead over the engine: {o['daemon_overhead']['median_of_paired_differences_ms']:.1f} ms (median of paired "
             f"differences; {o['daemon_overhead']['p50_ms']:.1f} ms comparing p50s; target ≤ 5 ms). The daemon's own account "
             f"of a request, medians measured apart from that difference (they need not add up to it): HTTP, JSON and "
             f"thread hand-off {o['daemon_breakdown']['http_queue_handoff_p50_ms']:.1f} ms, queueing "
             f"{o['daemon_breakdown']['queue_p50_ms']:.1f} ms and routing {o['daemon_breakdown']['routing_p50_ms']:.1f} ms.",
             "", "| clients | req/s | tok/s | p50 ms | p99 ms | 429s |", "|--:|--:|--:|--:|--:|--:|"]
    for t in d["throughput"]:
        rows.append(f"| {t['clients']} | {t['requests_per_s']:.1f} | {t['completion_tokens_per_s']:.0f} | {t['p50_ms']:.0f} | "
                    f"{t['p99_ms']:.0f} | {t['refused_429']} |")
    return "\n".join(rows)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"  # None: every request of that level was lost


def _bridge(host: str) -> str:
    d = json.loads((RESULTS / f"bridge-{host}.json").read_text())
    a = d["added_latency"]
    t = d["throughput"]
    # the command that made these results: the bundle is named as the cache holds it, not this host's path
    bundle = f" --bundle <cache>/bundles/{Path(t['bundle']).name}" if t.get("bundle") else ""
    # every recorded setting that differs from its default, or the command did not make these results (a run with
    # --intra-op-threads 1 read as the default's)
    flags = [(f"--{name.replace('_', '-')}", value) for name, value, default in (
        ("workers", t.get("workers"), 2), ("intra_op_threads", t.get("intra_op_threads"), None),
        ("max_new_tokens", t.get("max_new_tokens"), 32), ("per_client", t.get("per_client"), 8),
        ("requests", a.get("requests"), 2000)) if value is not None and value != default]
    command = f"python benchmarks/bridge.py{bundle}" + "".join(f" {flag} {value}" for flag, value in flags)
    # what was measured, where and when: a later build at the same cache path is another model to the benchmark
    where = ", ".join(x for x in (d.get("cpu_model"), str(d.get("when", ""))[:10]) if x)
    build = t.get("bundle_build") or {}
    if build:
        q, quality = build.get("quantization") or {}, build.get("quality") or {}
        layout = q.get("precision", "?") + (", float offsets" if q.get("int4_offsets") else
                                            ", symmetric" if q.get("int4_symmetric") else "")
        ratio = f", perplexity ratio {quality['ppl_ratio']}" if "ppl_ratio" in quality else ""
        where += f"; bundle build {build['bundle_hash'][:12]} ({layout}{ratio})"
    rows = [f"Bridge benchmark (`{command}`{'; ' + where if where else ''}): a loopback gRPC round trip adds "
            f"{a['added_p50_ms']:.2f} ms at p50 and "
            f"{a['added_p99_ms']:.2f} ms at p99 over an in-process backend call ({a['requests']} calls; target p50 ≤ 2 ms). "
            f"Throughput against the {t['backend']} backend, {t['workers']} worker(s):", "",
            "| clients | sent | answered | lost | req/s | tok/s | p50 ms | p99 ms |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in t["runs"]:
        rows.append(f"| {r['clients']} | {r['sent']} | {r['answered']} | {r['lost']} | {r['requests_per_s']:.2f} | "
                    f"{r['completion_tokens_per_s']:.0f} | {_ms(r['latency_p50_ms'])} | {_ms(r['latency_p99_ms'])} |")
    return "\n".join(rows)


def _throughput(host: str) -> str:
    return (RESULTS / f"throughput-{host}.md").read_text().strip()


def _bundles(host: str) -> str:
    return (RESULTS / f"bundles-{host}.md").read_text().strip()


def _lookup(host: str) -> str:
    return (RESULTS / f"lookup-{host}.md").read_text().strip()


RENDERERS = {"estimators": _estimators, "daemon": _daemon, "bridge": _bridge, "throughput": _throughput, "bundles": _bundles,
             "lookup": _lookup}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the benchmarks name their results after the hostname: so does this, or a laptop's run would be left out and
    # the committed tables rendered again without a word
    ap.add_argument("--host", default=socket.gethostname(),
                    help="results of which host (the <host> in the results file names; default: this machine's name)")
    args = ap.parse_args(argv)
    rendered: list[str] = []
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")

    def replace(m: re.Match[str]) -> str:
        name, host = m.group(1), m.group(2)
        if name not in RENDERERS:  # a typo in a marker was a KeyError traceback
            line = text.count("\n", 0, m.start()) + 1
            print(f"skipping unknown results block {name!r} at README.md line {line} "
                  f"(known: {', '.join(sorted(RENDERERS))})", file=sys.stderr)
            return m.group(0)
        try:
            body = RENDERERS[name](host or args.host)
        except FileNotFoundError as err:
            print(f"skipping {name}: {err}", file=sys.stderr)
            return m.group(0)
        marker = f"{name}@{host}" if host else name
        rendered.append(f"{name} ({host or args.host})")
        return f"<!-- results:{marker} -->\n{body}\n<!-- /results -->"

    new = re.sub(r"<!-- results:(\w+)(?:@([\w.-]+))? -->.*?<!-- /results -->", replace, text, flags=re.S)
    write_text_whole(readme, new)  # an interrupted write would leave half a README
    print(f"rendered into {readme}: {', '.join(rendered) or 'nothing'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
