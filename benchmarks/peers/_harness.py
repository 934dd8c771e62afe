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
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Runtime", "current_rss_mb", "main", "peak_rss_mb", "run"]


class Runtime(Protocol):
    """What a runner adapts: load a model, stream greedy token ids for given prompt ids."""

    name: str
    # set by generate(): seconds the prompt pass took, and runtime-specific extras for the raw record
    prefill_s: float | None
    extra: dict[str, Any]

    def import_runtime(self) -> dict[str, str]:
        """Import the runtime's package; return the versions worth recording."""
        ...

    def load(self, model: str, threads: int) -> None: ...

    def unload(self) -> None: ...

    def generate(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy generation from scratch (no cached prefix), yielding token ids as they come."""
        ...


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


def main(make_runtime: Callable[[], Runtime], argv: list[str] | None = None) -> int:
    """Entry point of a runner script: ``run_X.py SPEC.json OUT.json``; errors go to OUT.json too."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: run_X.py SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    try:
        result = run(make_runtime(), spec)
    except Exception as err:  # report why, so the benchmark can say it in its results
        out.write_text(json.dumps({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}))
        traceback.print_exc()
        return 1
    out.write_text(json.dumps(result, indent=1))
    return 0
