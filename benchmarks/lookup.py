"""What prompt lookup adds to greedy decoding, by workload: the same engine with and without drafts.

    python benchmarks/lookup.py [--bundle DIR] [--rounds 3] [--tasks 60] [--idle-wait 120]

One process, one bundle (the cached SmolLM2-135M-Instruct int4 bundle unless
``--bundle``), two engines on it: ``prompt_lookup=0`` (the default) and
``prompt_lookup=3`` (``SUGGESTED_PROMPT_LOOKUP_TOKENS``). Every
round answers every prompt with both, in alternating order, so a change in the
machine's speed hits both alike. The workloads:

- ``story``: the throughput benchmark's short prompt (raw text, 128 tokens);
- ``chat``: ten requests written for this benchmark (chat template, 128 tokens);
- ``tasks``: a fixed sample of the task suite's dev split (chat template, the
  evaluation's own 64 tokens), the answers ``calibrate`` and ``eval`` produce.

For each: decode tokens/s (generated tokens after the first / decode time,
summed over the workload's requests), with and without drafts, their ratio
(the median of the rounds' ratios), drafted and accepted tokens, and how many
answers are token-identical to the answer without drafts (int4/int8 kernels
compute a row of a multi-row step slightly differently from a one-row step, so
a near-tie may go the other way). Last, what a decode step costs with 1 to 4
rows (the next token plus up to 3 drafts), which is what a rejected draft wastes.

Writes benchmarks/results/lookup-<host>.json and .md (the README's table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._host import cpu_model  # noqa: E402
from edge_runtime._files import write_text_whole  # noqa: E402
from edge_runtime.cli.bench import _int_at_least  # noqa: E402

DEFAULT_TASKS = 60  # task-suite items in the tasks workload

CHAT = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "Write a Python function that checks if a number is prime.",
    "List three fruits and their colors.",
    "Summarize the plot of Romeo and Juliet.",
    "Write an email to a colleague asking for a meeting next week.",
    "What are the benefits of regular exercise?",
    "Describe how to bake bread, step by step.",
    "Write a JavaScript function that reverses an array.",
    "Explain the difference between TCP and UDP.",
]


def workloads(engine: Any, tasks: int) -> dict[str, list[tuple[list[int], int]]]:
    """Prompt ids and max_new_tokens per workload."""
    from benchmarks.throughput import make_prompts
    from edge_runtime.runs import RUN_SETTINGS
    from edge_runtime.tasks import load_suite

    story = make_prompts(engine.manifest.tokenizer_file, engine.bos_token_id, 20, 20)["short"]
    items = sorted(load_suite("default", "dev"), key=lambda it: it.id)
    step = max(1, len(items) // tasks) if tasks else 1
    sample = items[::step][:tasks]
    return {
        "story": [(story, 128)],
        "chat": [(engine.encode(messages=[{"role": "user", "content": q}]), 128) for q in CHAT],
        "tasks": [(engine.encode(messages=list(it.messages)), RUN_SETTINGS.max_new_tokens) for it in sample],
    }


def _answer(engine: Any, ids: list[int], max_new_tokens: int) -> Any:
    from edge_runtime.engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    return [c.result for c in engine.stream_tokens(ids, params) if c.result is not None][0]


def step_costs(engine: Any, *, rounds: int, steps: int = 100, max_rows: int = 4) -> dict[str, Any]:
    """Milliseconds of a decode step feeding 1..max_rows tokens (the next one plus drafts), alternating row counts.

    Each step runs on a cache holding the story's prompt plus ~100 tokens and is then
    truncated back, so every row count sees the same cache length.
    """
    from benchmarks.throughput import make_prompts

    cache = engine.new_cache()
    cache.prefill(make_prompts(engine.manifest.tokenizer_file, engine.bos_token_id, 120, 120)["short"])
    base = cache.length
    per_rows: dict[int, list[float]] = {n: [] for n in range(1, max_rows + 1)}
    for r in range(rounds):
        for n in (list(per_rows) if r % 2 == 0 else list(per_rows)[::-1]):
            t0 = time.perf_counter()
            for i in range(steps):
                cache.step_many([100 + (i + j) % 50 for j in range(n)])
                cache.truncate(base)
            per_rows[n].append((time.perf_counter() - t0) * 1000.0 / steps)
    one = statistics.median(per_rows[1])
    return {"ms": {str(n): round(statistics.median(v), 4) for n, v in per_rows.items()},
            "relative_to_one_row": {str(n): round(statistics.median(v) / one, 3) for n, v in per_rows.items()}}


def run_benchmark(bundle: Path, *, rounds: int, tasks: int, threads: int | None = None) -> dict[str, Any]:
    from edge_runtime.engine import SUGGESTED_PROMPT_LOOKUP_TOKENS, Engine

    engines = {0: Engine(bundle, intra_op_threads=threads, energy_meter=None, prompt_lookup=0),
               SUGGESTED_PROMPT_LOOKUP_TOKENS: Engine(bundle, intra_op_threads=threads, energy_meter=None,
                                                      prompt_lookup=SUGGESTED_PROMPT_LOOKUP_TOKENS)}
    loads = workloads(engines[0], tasks)
    stats: dict[str, dict[str, Any]] = {}
    for name, prompts in loads.items():
        per_round: dict[int, list[tuple[int, float]]] = {n: [] for n in engines}
        first: dict[int, list[Any]] = {}
        for r in range(rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for n in order:
                results = [_answer(engines[n], ids, max_new) for ids, max_new in prompts]
                steps = sum(max(x.usage.completion_tokens - 1, 0) for x in results)
                per_round[n].append((steps, sum(x.timings.decode_ms for x in results)))
                first.setdefault(n, results)
        off, on = first[0], first[SUGGESTED_PROMPT_LOOKUP_TOKENS]

        def rate(n: int, i: int) -> float:
            steps, ms = per_round[n][i]
            return steps / (ms / 1000.0) if ms else 0.0

        ratios = [rate(SUGGESTED_PROMPT_LOOKUP_TOKENS, i) / rate(0, i) for i in range(rounds) if rate(0, i)]
        stats[name] = {
            "requests": len(prompts),
            "generated_tokens": {"without": sum(x.usage.completion_tokens for x in off),
                                 "with": sum(x.usage.completion_tokens for x in on)},
            # none when the workload decoded nothing (--tasks 0): 0.0 read as a measured speed
            "decode_tokens_per_s": {"without": statistics.median(rate(0, i) for i in range(rounds)) if prompts else None,
                                    "with": statistics.median(rate(SUGGESTED_PROMPT_LOOKUP_TOKENS, i)
                                                              for i in range(rounds)) if prompts else None},
            "speedup_per_round": [round(x, 3) for x in ratios],
            "speedup": round(statistics.median(ratios), 3) if ratios else None,
            "draft_tokens": sum(x.usage.draft_tokens for x in on),
            "accepted_draft_tokens": sum(x.usage.accepted_draft_tokens for x in on),
            "identical_answers": sum(a.token_ids == b.token_ids for a, b in zip(off, on)),
        }
    costs = step_costs(engines[0], rounds=rounds)
    for e in engines.values():
        e.close()
    return {
        "benchmark": "prompt lookup",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"hostname": socket.gethostname(), "cpu_model": cpu_model(), "machine": platform.machine(),
                 "logical_cpus": os.cpu_count()},
        "bundle": {"path": str(bundle), "name": engines[0].model_name, "precision": engines[0].precision},
        "settings": {"rounds": rounds, "tasks": tasks, "threads": engines[0].model.threads,
                     "prompt_lookup": SUGGESTED_PROMPT_LOOKUP_TOKENS},
        "workloads": stats,
        "step_costs": costs,
    }


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"  # a workload with no requests (--tasks 0) has no speedup


def render_markdown(doc: dict[str, Any]) -> str:
    s, b = doc["settings"], doc["bundle"]
    # the command that makes this table: --tasks only when it was not the default
    tasks = f" --tasks {s['tasks']}" if s.get("tasks", DEFAULT_TASKS) != DEFAULT_TASKS else ""
    rows = [f"Prompt lookup (`python benchmarks/lookup.py --rounds {s['rounds']}{tasks}`, {b['name']} {b['precision']}, "
            f"{s['threads']} threads, one process; `prompt_lookup={s['prompt_lookup']}` against 0; speedup: the median "
            "of the rounds' own ratios, so it can differ from the quotient of the two tok/s medians):", "",
            "| workload | requests | tok/s without | tok/s with | speedup | drafted | accepted | same answer |",
            "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name, w in doc["workloads"].items():
        rate = w["decode_tokens_per_s"]
        rows.append(f"| {name} | {w['requests']} | {_rate(rate['without'])} | {_rate(rate['with'])} | {_times(w['speedup'])} | "
                    f"{w['draft_tokens']} | {w['accepted_draft_tokens']} | {w['identical_answers']}/{w['requests']} |")
    rel = doc["step_costs"]["relative_to_one_row"]
    rows += ["", "A decode step feeding " + ", ".join(f"{n} rows costs {x:.2f}×" for n, x in rel.items() if n != "1")
             + f" a 1-row step ({doc['step_costs']['ms']['1']:.2f} ms; the next token plus 1, 2 or 3 drafts)."]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    from edge_runtime.cli.bench import _out_file, check_bundle_given
    from edge_runtime.models import default_bundle_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle directory (default: the cached smollm2-135m-instruct int4 bundle)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every workload with and without drafts")
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS, help="task-suite items in the tasks workload")
    parser.add_argument("--threads", type=_int_at_least(1), default=None, help="intra-op threads (default: physical cores)")
    parser.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for idle CPUs first (0: don't)")
    parser.add_argument("--out", type=_out_file, default=ROOT / "benchmarks" / "results" / f"lookup-{socket.gethostname()}.json",
                        help="results file (its directory is checked before measuring)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tasks < 0:
        parser.error("--rounds must be >= 1 and --tasks >= 0")
    if args.out.suffix != ".json":  # the table goes beside it as .md: "x.md" was written as JSON, then overwritten
        parser.error(f"--out: the results file must end in .json (the table is written beside it as .md), got {args.out}")
    bundle = args.bundle or default_bundle_dir("smollm2-135m-instruct", "int4")
    check_bundle_given(parser, bundle, "int4")
    if args.idle_wait > 0:
        from benchmarks.throughput import wait_for_idle

        wait_for_idle(args.idle_wait)
    doc = run_benchmark(bundle, rounds=args.rounds, tasks=args.tasks, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(args.out, json.dumps(doc, indent=1) + "\n")
    table = render_markdown(doc)
    write_text_whole(args.out.with_suffix(".md"), table)
    print(table, end="")
    print(f"wrote {args.out} and {args.out.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    from benchmarks._entry import run_main

    sys.exit(run_main(main, "lookup.py"))
