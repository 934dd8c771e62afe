"""The measurement loop every runner shares, so all runtimes are timed the same way.

A runner is a script run by the Python of the runtime's own environment (the
project's venv for this engine, ``<cache>/peers/*-venv`` for the peers), in a
fresh process per runtime, so its peak RSS is its own and its threads never
compete with another runtime's. This module uses the standard library only
(plus ``edge_runtime.power`` and psutil for energy, when importable), because
the peers' environments do not have this project installed.

Protocol: ``python run_X.py SPEC.json OUT.json``. The spec carries the model
path, thread count, the prompts as token ids (every runtime gets the same ids,
so tokenization is outside every timing), token counts and repetitions; the
runner writes one JSON document with every raw repetition.

What is timed, identically for each runtime (``time.perf_counter``):

* ``import_ms``: importing the runtime's Python package (not part of load).
* ``load_ms``: creating the model object (weights, session, tokenizer), once
  in the measured process, then ``load_repetitions - 1`` more times after the
  generation runs (so the reloads cannot raise the peak RSS figure).
* ``ttft_ms``: from the call until the first generated token id is in the
  caller's hands (prefill plus the first sampling).
* ``prefill_ms``: the runtime's prompt pass alone, timed by the runner around
  the call that processes the prompt.
* ``decode_tokens_per_s``: (n - 1) / (time of the n-th token - time of the
  first), n generated tokens; the first token comes out of prefill.
* ``joules``: an ``edge_runtime.power`` window around the whole generation;
  ``process_joules`` is this process's share (the figure that other programs'
  load on the machine does not inflate).
* ``peak_rss_mb``: the process's peak resident set (``VmHWM``) after load
  and all generations (file-backed pages of memory-mapped weights included).

Quality, when the spec has a ``quality`` entry (token ids of a text sample):
after every timing, and after the peak RSS is read, the runtime scores the
sample as one sequence with a model instance of its own (llama.cpp needs one
that keeps the logits of every position) and reports, for every position, the
log-probability of the actual next token and its own top-1 prediction, plus
how its own tokenizer splits the text. The perplexity comes from these; the
benchmark compares the predictions with the fp32 reference's. A spec with
``"mode": "quality"`` runs only this part (the fp32 reference bundle).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Runtime", "current_rss_mb", "main", "next_token_stats", "peak_rss_mb", "run", "run_quality"]


class Runtime(Protocol):
    """What a runner adapts: load a model, stream greedy token ids for given prompt ids."""

    name: str
    # set by generate(): seconds the prompt pass took, and runtime-specific extras for the raw record
    prefill_s: float | None
    extra: dict[str, Any]
    # the target's options (``options`` in the spec), set before load(); only this engine's runner has any
    options: dict[str, Any]

    def import_runtime(self) -> dict[str, str]:
        """Import the runtime's package; return the versions worth recording."""
        ...

    def load(self, model: str, threads: int) -> None: ...

    def unload(self) -> None: ...

    def generate(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy generation from scratch (no cached prefix), yielding token ids as they come."""
        ...

    def score(self, model: str, threads: int, ids: list[int], text: str) -> tuple[Sequence[float], Sequence[int], list[int] | None]:
        """Score ``ids`` as one sequence with a model instance of its own, freed before returning.

        Returns the log-probability of ``ids[i + 1]`` after ``ids[: i + 1]`` and
        the runtime's top-1 prediction at position ``i``, for i = 0 .. n - 2, and
        the runtime's own tokenization of ``text`` (no special tokens), or None.
        """
        ...


def next_token_stats(logits: Any, ids: Sequence[int], rows: int = 128) -> tuple[list[float], list[int]]:
    """From logits whose row ``i`` predicts token ``i + 1``: the actual next token's logprob, and the argmax.

    In float64 and in slices of ``rows`` positions, so a full [n, vocab]
    matrix never needs a second full-size copy.
    """
    import numpy as np

    targets = np.asarray(ids[1:], dtype=np.int64)
    logprobs: list[float] = []
    top1: list[int] = []
    for lo in range(0, len(targets), rows):
        x = np.asarray(logits[lo:lo + rows], dtype=np.float64)[: len(targets) - lo]
        peak = x.max(axis=-1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
        logprobs += (x[np.arange(len(x)), targets[lo:lo + len(x)]] - log_z).tolist()
        top1 += x.argmax(axis=-1).tolist()
    return logprobs, top1


def peak_rss_mb() -> float:
    """This process's peak resident set, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's
    own address space. ``ru_maxrss`` would be wrong here: the kernel carries it
    over fork and exec, so a runner started by a parent that once held 600 MB
    would report 600 MB whatever it used itself.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    # macOS reports ru_maxrss in bytes, other systems in KiB
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _energy_meter(repo_root: str | None) -> tuple[Any, str | None]:
    """The project's default meter when it can be imported here, else (None, why not)."""
    if repo_root and repo_root not in sys.path:
        sys.path.append(repo_root)
    try:
        from edge_runtime.power import default_meter

        return default_meter(), None
    except Exception as err:  # a peer venv without psutil, or no readable source at all
        return None, f"{type(err).__name__}: {err}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _timed_generation(runtime: Runtime, ids: list[int], max_new_tokens: int, meter: Any) -> dict[str, Any]:
    runtime.prefill_s = None
    runtime.extra = {}
    window = meter.measure() if meter is not None else None
    tokens: list[int] = []
    stamps: list[float] = []
    t0 = time.perf_counter()
    for token in runtime.generate(ids, max_new_tokens):
        stamps.append(time.perf_counter())
        tokens.append(int(token))
    t_end = time.perf_counter()
    record: dict[str, Any] = {
        "prompt_tokens": len(ids),
        "generated_tokens": len(tokens),
        "wall_ms": (t_end - t0) * 1000.0,
        "ttft_ms": (stamps[0] - t0) * 1000.0 if stamps else None,
        "prefill_ms": runtime.prefill_s * 1000.0 if runtime.prefill_s is not None else None,
        "decode_ms": (stamps[-1] - stamps[0]) * 1000.0 if len(stamps) > 1 else None,
        "first_tokens": tokens[:16],
    }
    record["prefill_tokens_per_s"] = (
        len(ids) / (record["prefill_ms"] / 1000.0) if record["prefill_ms"] else None
    )
    record["decode_tokens_per_s"] = (
        (len(tokens) - 1) / (record["decode_ms"] / 1000.0) if record["decode_ms"] else None
    )
    if window is not None:
        window.stop()
        record["energy"] = {
            "joules": window.joules,
            "process_joules": window.process_joules,
            "seconds": window.seconds,
            "source": window.source,
            "estimated": window.estimated,
        }
    if runtime.extra:
        record["extra"] = runtime.extra
    return record


def run(runtime: Runtime, spec: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up, measure; return the result document (raw repetitions and medians)."""
    threads = int(spec["threads"])
    prompts: dict[str, list[int]] = spec["prompts"]
    decode_tokens = int(spec["decode_tokens"])
    # the long prompt measures prefill; one generated token is enough for its TTFT
    plan = [("short", prompts["short"], decode_tokens), ("long", prompts["long"], 1)]

    t0 = time.perf_counter()
    versions = runtime.import_runtime()
    import_ms = (time.perf_counter() - t0) * 1000.0
    meter, meter_error = _energy_meter(spec.get("repo_root"))
    if meter is not None:
        # detect the energy source before any timing (the first window would pay for it)
        with meter.measure():
            pass

    runtime.options = dict(spec.get("options") or {})
    rss_before_load = current_rss_mb()
    t0 = time.perf_counter()
    runtime.load(spec["model"], threads)
    load_ms = [(time.perf_counter() - t0) * 1000.0]
    load_info = [getattr(runtime, "load_info", None)]
    rss_after_load = current_rss_mb()

    for _ in range(int(spec.get("warmup", 1))):
        for _name, ids, n in plan:
            for _token in runtime.generate(ids, n):
                pass

    reps: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
    for _ in range(int(spec["repetitions"])):
        for name, ids, n in plan:
            reps[name].append(_timed_generation(runtime, ids, n, meter))
    peak_rss = peak_rss_mb()
    rss_after_generation = current_rss_mb()

    for _ in range(int(spec.get("load_repetitions", 1)) - 1):
        runtime.unload()
        gc.collect()
        t0 = time.perf_counter()
        runtime.load(spec["model"], threads)
        load_ms.append((time.perf_counter() - t0) * 1000.0)
        load_info.append(getattr(runtime, "load_info", None))
    runtime.unload()

    quality = _quality(runtime, spec) if spec.get("quality") else None

    short, long = reps["short"], reps["long"]

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        return _median([r[key] for r in rows if r.get(key) is not None])

    joules_per_token = [
        r["energy"]["joules"] / r["generated_tokens"] for r in short if r.get("energy") and r["generated_tokens"]
    ]
    process_joules_per_token = [
        r["energy"]["process_joules"] / r["generated_tokens"]
        for r in short
        if r.get("energy") and r["energy"]["process_joules"] is not None and r["generated_tokens"]
    ]
    energy_sources = sorted({r["energy"]["source"] for r in short if r.get("energy")})
    return {
        "runtime": runtime.name,
        "label": spec["label"],
        "model": spec["model"],
        "threads": threads,
        "versions": {"python": platform.python_version(), **versions},
        "pid": os.getpid(),
        "import_ms": import_ms,
        "load_ms": load_ms,
        "load_info": load_info if any(load_info) else None,
        "rss_mb": {
            "before_load": rss_before_load,
            "after_load": rss_after_load,
            "after_generation": rss_after_generation,
        },
        "peak_rss_mb": peak_rss,
        "repetitions": reps,
        "quality": quality,
        "energy_error": meter_error,
        "median": {
            "load_ms": _median(load_ms),
            "ttft_short_ms": med(short, "ttft_ms"),
            "ttft_long_ms": med(long, "ttft_ms"),
            "prefill_short_tokens_per_s": med(short, "prefill_tokens_per_s"),
            "prefill_long_tokens_per_s": med(long, "prefill_tokens_per_s"),
            "decode_tokens_per_s": med(short, "decode_tokens_per_s"),
            "generated_tokens": med(short, "generated_tokens"),
            "joules_per_token": _median(joules_per_token),
            "process_joules_per_token": _median(process_joules_per_token),
            "energy_source": ", ".join(energy_sources) if energy_sources else None,
            "energy_estimated": any(r["energy"]["estimated"] for r in short if r.get("energy")) if energy_sources else None,
        },
    }


def _quality(runtime: Runtime, spec: dict[str, Any]) -> dict[str, Any]:
    sample = spec["quality"]
    ids = [int(i) for i in sample["token_ids"]]
    gc.collect()
    t0 = time.perf_counter()
    logprobs, top1, own_ids = runtime.score(spec["model"], int(spec["threads"]), ids, sample["text"])
    score_ms = (time.perf_counter() - t0) * 1000.0
    logprobs = [float(x) for x in logprobs]
    top1 = [int(x) for x in top1]
    if len(logprobs) != len(ids) - 1 or len(top1) != len(ids) - 1:
        raise RuntimeError(f"score returned {len(logprobs)} logprobs and {len(top1)} predictions for {len(ids)} tokens")
    nll = -sum(logprobs) / len(logprobs)
    tokenizer: dict[str, Any] | None = None
    if own_ids is not None:
        # informative: every runtime is fed the same ids whatever its own tokenizer makes of the text
        full = sample.get("full_token_ids") or ids
        mismatch = next((i for i, (a, b) in enumerate(zip(own_ids, full)) if a != b), None)
        if mismatch is None and len(own_ids) != len(full):
            mismatch = min(len(own_ids), len(full))
        tokenizer = {"own_tokens": len(own_ids), "matches": mismatch is None, "first_mismatch": mismatch,
                     "own_head": [int(x) for x in own_ids[:8]]}
    return {
        "tokens": len(ids),
        "scored_positions": len(logprobs),
        "nll": nll,
        "perplexity": math.exp(nll),
        "score_ms": score_ms,
        "tokenizer": tokenizer,
        "logprobs": [round(x, 5) for x in logprobs],
        "top1": top1,
    }


def run_quality(runtime: Runtime, spec: dict[str, Any]) -> dict[str, Any]:
    """Quality only (no timing): the reference bundle's run."""
    versions = runtime.import_runtime()
    return {
        "runtime": runtime.name,
        "label": spec["label"],
        "model": spec["model"],
        "threads": int(spec["threads"]),
        "versions": {"python": platform.python_version(), **versions},
        "pid": os.getpid(),
        "quality": _quality(runtime, spec),
    }


def main(make_runtime: Callable[[], Runtime], argv: list[str] | None = None) -> int:
    """Entry point of a runner script: ``run_X.py SPEC.json OUT.json``; errors go to OUT.json too."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: run_X.py SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    try:
        measure = run_quality if spec.get("mode") == "quality" else run
        result = measure(make_runtime(), spec)
    except Exception as err:  # report why, so the benchmark can say it in its results
        out.write_text(json.dumps({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}))
        traceback.print_exc()
        return 1
    out.write_text(json.dumps(result, indent=1))
    return 0
