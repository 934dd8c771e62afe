"""The explorer's outputs: ``report.md``, ``points.csv``, ``frontier.csv`` and PNG plots.

Plots need matplotlib (the ``explore`` extra); without it the report says so
and everything else is still written.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import write_text_whole
from ..confidence import FEW_FAMILY_ITEMS, FEW_ITEMS, half_width_95, wilson_interval
from ..metrics import escalation_curve, oracle_curve, random_curve, routing_metrics
from ._data import Measurements
from ._space import Point

__all__ = ["write_csv", "write_plots", "write_report", "estimator_table", "family_winners", "joules_label"]

log = logging.getLogger(__name__)

_COLUMNS = ("accuracy", "escalation_rate", "cloud_usd_per_1k", "device_j_per_request", "estimated_j_per_request",
            "latency_p50_ms", "latency_p95_ms", "early_exit_rate", "pre_decode_escalation_rate", "forced_local_rate")


def write_csv(path: Path, points: Sequence[Point], families: Sequence[str], *, energy_source: str,
              energy_estimated: bool) -> None:
    """One row per policy and task family; the energy columns say where the joules come from (the CSV is often
    read without the report that says it)."""
    import json

    # the rows go to memory, then to the file whole: a full disk left half a table
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["policy", "family", "task_family", *_COLUMNS, "energy_source", "energy_estimated", "config"])
    for p in points:
        for fam in ["overall", *families]:
            src = p.overall if fam == "overall" else p.by_family[fam]
            # a row is measured only when all of its joules are: an escalation's radio and wait energy never are
            estimated = energy_estimated or src["estimated_j_per_request"] > 0
            w.writerow([p.name, p.family, fam, *(f"{src[c]:.6g}" for c in _COLUMNS), energy_source,
                        "true" if estimated else "false", json.dumps(p.config, sort_keys=True)])
    write_text_whole(path, buf.getvalue())


def joules_label(energy_source: str, energy_estimated: bool) -> str:
    """The device-joules axis, with where the figures come from."""
    how = ("ESTIMATED from CPU time" if energy_estimated
           else f"measured: {energy_source}; escalations' network and wait energy ESTIMATED")
    return f"device joules per request ({how})"


# the plots write_plots draws (an earlier run's are removed when this one draws none)
PLOT_FILES = ("accuracy_vs_escalation.png", "accuracy_vs_usd.png", "accuracy_vs_joules.png")

GAIN_ROW = "expected gain (escalates where p_cloud - p_correct is largest; routing only)"


def estimator_table(m: Measurements, scores: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """AUROC, ECE, APGR and CPT of each confidence score on the explored items."""
    rows = []
    for name, s in scores.items():
        r = routing_metrics(s, m.local_correct, m.cloud_correct).to_dict()
        if name == GAIN_ROW:  # not a probability of the local answer being right: AUROC and ECE do not apply
            r["auroc"] = r["ece"] = None
        rows.append({"estimator": name, **r})
    return rows


def family_winners(points: Sequence[Point], families: Sequence[str]) -> list[dict[str, Any]]:
    """Per task family: always-local and always-cloud accuracy, and the best policy (most accurate, then cheapest)."""
    by_name = {p.name: p for p in points}
    out = []
    for fam in families:
        local, cloud = by_name["always-local"].by_family[fam], by_name["always-cloud"].by_family[fam]
        # a budget's replay spends its cap on the families that come first in the suite: its per-family numbers
        # are an artefact of item order (the goal recommender leaves budgets out for the same reason)
        candidates = [p for p in points if "budget" not in p.family]
        best = min(candidates, key=lambda p: (-round(p.by_family[fam]["accuracy"], 9),
                                              round(p.by_family[fam]["cloud_usd_per_1k"], 9),
                                              p.by_family[fam]["device_j_per_request"]))
        b = best.by_family[fam]
        out.append({"task_family": fam, "n": int(local["n"]), "local_accuracy": local["accuracy"], "cloud_accuracy": cloud["accuracy"],
                    "best_policy": best.name, "best_accuracy": b["accuracy"], "best_escalation_rate": b["escalation_rate"],
                    "best_usd_per_1k": b["cloud_usd_per_1k"], "cloud_usd_per_1k": cloud["cloud_usd_per_1k"]})
    return out


def _cell(text: object) -> str:
    """A user's name (a suite's family) as one Markdown table cell: a "|" or a line break split the row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.3f}"


def _plane_front(points: Sequence[Point], key: str) -> list[Point]:
    """Points no other beats on both accuracy (higher) and ``key`` (lower), by ``key`` ascending: a staircase."""
    out: list[Point] = []
    for p in sorted(points, key=lambda q: (q.overall[key], -q.overall["accuracy"])):
        if not out or p.overall["accuracy"] > out[-1].overall["accuracy"]:
            out.append(p)
    return out


def write_plots(out: Path, m: Measurements, points: Sequence[Point], front: Sequence[Point], *,
                joules: str = "device joules per request") -> list[str]:
    """PNG plots; returns the file names written (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'edge-runtime[explore]'): no plots")
        return []
    written = []
    lc, cc = m.local_correct, m.cloud_correct
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, curve, style in (("oracle", oracle_curve(lc, cc), ":"), ("random routing", random_curve(lc, cc), "--"),
                                ("p_correct (multi+knn)", escalation_curve(m.p_correct, lc, cc), "-"),
                                ("pre-route (kNN prior)", escalation_curve(m.pre_route_p, lc, cc), "-."),
                                ("expected gain", escalation_curve(m.p_correct - m.p_cloud, lc, cc), "-")):
        ax.plot(curve.rates, curve.accuracy, style, label=label)
    ax.scatter([p.overall["escalation_rate"] for p in points], [p.overall["accuracy"] for p in points], s=8, c="grey", alpha=0.5,
               label="explored policies")
    ax.scatter([p.overall["escalation_rate"] for p in front], [p.overall["accuracy"] for p in front], s=18, c="red", label="Pareto frontier")
    ax.set_xlabel("escalation rate")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs escalation rate")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_escalation.png", dpi=110)
    plt.close(fig)
    written.append("accuracy_vs_escalation.png")
    for key, label, fname in (("cloud_usd_per_1k", "cloud USD per 1,000 requests", "accuracy_vs_usd.png"),
                              ("device_j_per_request", joules, "accuracy_vs_joules.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ax.scatter([p.overall[key] for p in points], [p.overall["accuracy"] for p in points], s=8, c="grey", alpha=0.5, label="explored policies")
        # the frontier of this plane: the 4-metric frontier joined by x would zig-zag through points that are
        # better only on the metrics not drawn
        fr = _plane_front(points, key)
        ax.plot([p.overall[key] for p in fr], [p.overall["accuracy"] for p in fr], "o-", c="red", ms=3,
                label="frontier in this plane")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
        ax.set_title(f"Accuracy vs {label}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write_report(path: Path, *, m: Measurements, points: Sequence[Point], front: Sequence[Point], families: Sequence[str],
                 estimators: list[dict[str, Any]], winners: list[dict[str, Any]], recommendations: Sequence[dict[str, Any]],
                 plots: list[str], context: dict[str, Any]) -> None:
    by = {p.name: p for p in points}
    lines = [
        "# Hybrid design-space report",
        "",
        f"Edge model `{context['edge']}` (bundle hash `{context['edge_hash'][:16]}`), cloud `{context['cloud']}`"
        + (f" (revision `{context['cloud_revision'][:16]}`)" if context.get("cloud_revision") else "")
        + f" through the bridge at `{context['bridge']}`; "
        f"suite `{context['suite']}` split `{context['split']}`, {len(m.items)} items; {len(points)} policy configurations replayed "
        f"offline over the cached runs. Machine: {context['machine']}. Energy source: {context['energy_source']}"
        + (" (an ESTIMATE from CPU time, not a measurement)" if context["energy_estimated"] else "")
        + "; device J / req adds each escalation's network energy (the cost model) and the device's idle power while "
        "it waits for the cloud (its profile's), both ESTIMATED. "
        f"Answers the scorers could not read (counted wrong): {sum(bool(r.get('parse_error')) for r in m.edge)} on the edge, "
        f"{sum(bool(r.get('parse_error')) for r in m.cloud)} from the cloud.",
        "",
    ]
    n = len(m.items)
    if n < FEW_ITEMS:
        # a team's first suite: the figures below are as uncertain as this says, and the choice among them is optimistic
        lines += [f"**Few items ({n}).** A rate measured on {n} items is uncertain by up to ±{half_width_95(n):.0%} "
                  f"(95%), and each recommendation is the best of {len(points)} configurations on these same items: "
                  "expect less on new traffic. Use this report to compare policies roughly, and a suite of a few "
                  "hundred items before trusting a goal as met.", ""]
    lines += [
        "## Baselines and the recommended hybrid",
        "",
        "| policy | accuracy (95% interval) | escalation | cloud USD / 1k req | device J / req | p50 latency ms | p95 latency ms |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [by["always-local"], by["always-cloud"]]
    for rec in recommendations:  # each goal's policy once; a baseline recommended is already in the table
        point = rec.get("point")
        if point is not None and all(point.name != p.name for p in rows):
            rows.append(point)
    for p in rows:
        o = p.overall
        lo, hi = wilson_interval(o["accuracy"], n)
        lines.append(f"| {p.name} | {_pct(o['accuracy'])} ({_pct(lo)}–{_pct(hi)}) | {_pct(o['escalation_rate'])} | "
                     f"{o['cloud_usd_per_1k']:.4f} | {o['device_j_per_request']:.3f} | {o['latency_p50_ms']:.0f} | "
                     f"{o['latency_p95_ms']:.0f} |")
    lines.append("")
    for rec in recommendations:
        lines += [f"Goal `{rec['goal']}`: " + (f"**{rec['point'].name}**, config in `{rec['config_file']}` "
                  "(load it with `edge-runtime serve --config`)." if rec.get("point") else "**no explored policy meets it**."), ""]
    lines += ["## Task dependence: which policy wins per family", "",
              "Best policy = most accurate, then cheapest in cloud USD, then device joules, chosen on each family's "
              "own items: a family's best is optimistic, the more so the fewer its items.", "",
              "| task family | n | always-local | always-cloud | best policy | its accuracy | its escalation | its USD/1k |",
              "|---|---|---|---|---|---|---|---|"]
    for w in winners:
        lines.append(f"| {_cell(w['task_family'])} | {w['n']} | {_pct(w['local_accuracy'])} | {_pct(w['cloud_accuracy'])} | {w['best_policy']} | "
                     f"{_pct(w['best_accuracy'])} | {_pct(w['best_escalation_rate'])} | {w['best_usd_per_1k']:.4f} |")
    lines.append("")
    # a family of a few items is shown, not judged: its best policy is chosen and scored on the same items
    judged = [w for w in winners if w["n"] >= FEW_FAMILY_ITEMS]
    if len(judged) < len(winners):
        lines.append(f"Families with fewer than {FEW_FAMILY_ITEMS} items are shown but not compared below.")
    local_better = [w for w in judged if w["local_accuracy"] > w["cloud_accuracy"]]
    hybrid_better = [w for w in judged if w["best_accuracy"] > max(w["local_accuracy"], w["cloud_accuracy"]) + 1e-9]
    if local_better:
        lines.append("More cloud is not always better: in " + ", ".join(
            f"{_cell(w['task_family'])} (local {_pct(w['local_accuracy'])} vs cloud {_pct(w['cloud_accuracy'])})" for w in local_better)
            + " the edge model alone beats always-cloud.")
    if hybrid_better:
        lines.append("A hybrid beats both ends in " + ", ".join(
            f"{_cell(w['task_family'])} ({_pct(w['best_accuracy'])} with {w['best_policy']})" for w in hybrid_better) + ".")
    lines += ["", "## Confidence estimators on these items", "",
              "| estimator | AUROC | ECE | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|---|---|"]
    for e in estimators:
        lines.append(f"| {e['estimator']} | {_num(e['auroc'])} | {_num(e['ece'])} | {_num(e['apgr'])} | {_pct(e['cpt']['50%'])} | "
                     f"{_pct(e['cpt']['80%'])} |")
    if estimators:
        r = estimators[0]["random"]
        lines.append(f"| random routing | 0.500 | — | {_num(r['apgr'])} | {_pct(r['cpt']['50%'])} | {_pct(r['cpt']['80%'])} |")
        if estimators[0]["apgr"] is None:
            lines.append("\nRouting metrics are undefined here: local and cloud accuracy are equal, so there is no gap to recover.")
    lines += ["", f"## Pareto frontier ({len(front)} of {len(points)} points)", "",
              "Non-dominated on accuracy ↑, cloud USD ↓, device J ↓, p50 latency ↓ (all points in `points.csv`, the frontier in `frontier.csv`).", "",
              "| policy | accuracy | escalation | USD/1k | J/req | p50 ms |", "|---|---|---|---|---|---|"]
    for p in sorted(front, key=lambda p: p.overall["accuracy"]):
        o = p.overall
        lines.append(f"| {p.name} | {_pct(o['accuracy'])} | {_pct(o['escalation_rate'])} | {o['cloud_usd_per_1k']:.4f} | "
                     f"{o['device_j_per_request']:.3f} | {o['latency_p50_ms']:.0f} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots] or ["matplotlib is not installed (`pip install 'edge-runtime[explore]'`): no plots."]
    if context.get("validation"):
        v = context["validation"]
        lines += ["", "## Online check", "", v["summary"]]
    lines += ["", "## How these numbers were made", "",
              f"`{context['command']}`; cost model: {context['cost_note']}. Runs are cached under `{context['cache']}`: re-running with other "
              "policies or goals costs nothing."]
    write_text_whole(path, "\n".join(lines) + "\n")
