"""Throughput benchmark: this engine against llama.cpp and onnxruntime-genai, same machine, same threads.

Measured in one run, each runtime in its own fresh subprocess (its own peak
RSS; no other runtime's threads competing), with a warm-up and several
repetitions whose median is reported (every raw repetition is kept):

* model load time, time to first token, prefill tokens/s on a short (~20
  token) and a long (~500 token) prompt, decode tokens/s over 128 greedy
  tokens, peak RSS, and joules per generated token with the energy source's
  label (``estimate:*`` is a CPU-time estimate, never a measurement);
* for this engine on the int4 and int8 SmolLM2-135M bundles (and the int4
  bundle with float block offsets, ``<cache>/bundles/smollm2-135m-instruct-int4-offsets``,
  and the one with a plain 4-bit output projection,
  ``<cache>/bundles/smollm2-135m-instruct-int4-norescore``, when they exist),
  for onnxruntime-genai on an int4 model made by its own
  builder from the same checkpoint, and for llama.cpp (llama-cpp-python) on
  the original Q4_1 GGUF.
  Peers are set up on first use under ``<cache>/peers`` (see
  ``benchmarks/peers/envs.py``); a peer that cannot be set up is skipped, the
  results say why, and the run exits 1 naming what it did not measure.

Speed alone would flatter a runtime whose quantization loses more: each
runtime also scores a text sample (``quantize/data/quality_sample.txt``, the
sample the bundle builder checks, as one sequence of the GGUF tokenizer's ids,
no special tokens, the same ids for every runtime) in its own runner process,
after its timings. Reported: its perplexity, the ratio to the perplexity of
the project's fp32 bundle (token-identical to transformers on the dequantized
GGUF, scored once per run), and the share of positions where its top-1
prediction equals the fp32 bundle's.

It also measures memory bandwidth (a numpy copy) and reports the engine's
share of the bandwidth ceiling: decode is memory bound, each step streams the
weights once, so tok/s cannot exceed bandwidth / bytes read per step.

    python benchmarks/throughput.py [--threads N] [--repetitions 5] [--peers llamacpp,genai|none]
    edge-runtime bench throughput [same flags]

Writes ``benchmarks/results/throughput-<host>.json`` and ``.md`` (the table
for the README) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._host import cpu_model
from benchmarks.peers import envs
from edge_runtime._files import write_text_whole
from edge_runtime.engine import SUGGESTED_PROMPT_LOOKUP_TOKENS

__all__ = [
    "SCHEMA_VERSION",
    "Target",
    "build_parser",
    "compare_quality",
    "decode_bytes_per_token",
    "engine_targets",
    "main",
    "make_prompts",
    "make_quality_sample",
    "memory_bandwidth",
    "reference_target",
    "render_markdown",
    "run_benchmark",
    "run_from_args",
    "wait_for_idle",
    "write_results",
]

SCHEMA_VERSION = 2  # 2: quality (perplexity, ratio to fp32, top-1 agreement) per runtime
MODEL = "smollm2-135m-instruct"
QUALITY_SAMPLE = ROOT / "quantize" / "data" / "quality_sample.txt"
REFERENCE_PRECISION = "fp32"
# Optional int4 layouts, measured when built (never built here: they are for comparing recipes):
# bundle dir suffix -> (label, the `edge-runtime quantize MODEL --precision int4` flags that build it)
OPTIONAL_VARIANTS = {
    "int4-offsets": ("edge-runtime int4, float block offsets (--int4-offsets)", "--int4-offsets"),
    "int4-norescore": ("edge-runtime int4, 4-bit output projection (--rescore-top-k 0)", "--rescore-top-k 0"),
    "int4-sym": ("edge-runtime int4, symmetric (--int4-symmetric)", "--int4-symmetric"),
}
LOOKUP_LABEL = f"edge-runtime int4, prompt lookup (--prompt-lookup {SUGGESTED_PROMPT_LOOKUP_TOKENS})"  # the default bundle, drafting
PEER_NAMES = ("llamacpp", "genai")
RUNNERS = Path(__file__).resolve().parent / "peers"
DECODE_TARGET = 1.0  # engine int4 decode tok/s / faster peer's
DECODE_STRETCH = 1.2
LOAD_TARGET_MS = 1000.0

# Prompts are raw text (no chat template) so a greedy continuation runs the full
# 128 tokens without an end-of-turn token; every runtime gets the same token ids.
SHORT_TEXT = "Once upon a time, in a small village at the edge of a great forest, there lived a young baker who"
LONG_TEXT = (
    "The lighthouse stood on a rock a mile from the harbour, and for most of the year the only way to reach it "
    "was a small boat that the keeper rowed himself. He had kept the light for twenty-two years. Every evening "
    "he climbed the one hundred and eight steps, trimmed the wick, polished the lens and wound the clockwork "
    "that turned it, and every morning he wrote in the log how the night had gone: the wind, the sea, the ships "
    "that passed and the ones that did not. The town on the shore knew him mostly by his light. Children were "
    "told that as long as it turned, nothing bad could come in from the sea. In the spring of the year this "
    "story begins, the harbour board wrote to say that the light would be replaced by an automatic lamp run from "
    "a battery and a small engine, and that a man would come out in the summer to fit it. The keeper read the "
    "letter twice, folded it and put it in the drawer with the log books. He did not answer it. Instead he began "
    "to write down everything he knew about the rock: where the currents ran at each state of the tide, which "
    "gulls nested on which ledge, how the fog came in from the south-west on still mornings and lifted by noon, "
    "how the big winter storms announced themselves a day ahead with a long, slow swell that made the boat lift "
    "at its mooring even when the air was calm. He wrote about the sounds the tower made, the creak of the "
    "stairs in the cold, the ring of the gallery rail when a gust caught it, the low hum of the lens turning in "
    "its bath of mercury. He wrote about the ships, the fishing boats that came home late and the steamers that "
    "kept well out, and the one night, years ago, when a schooner had come too close and he had fired the "
    "rockets until she turned. By midsummer the notebook was full, and he started another. The engineer arrived "
    "in August with two assistants and a crate of equipment. He was a young man, polite and quick, and he "
    "admired the old clockwork as one admires something in a museum. The work took four days. On the last "
    "evening the new lamp switched itself on at dusk, exactly on time, and turned without a sound. The keeper "
    "watched it from the gallery until the engineer called him down to sign the papers. Then he gave the young "
    "man the two notebooks and asked him to keep them with the light, for whoever came after. The engineer "
    "looked through the pages for a long time. When he left the next morning, he took the notebooks with him, "
    "and years later, when the automatic lamp failed on a winter night, it was one of those pages that told the "
    "crew of the lifeboat where the current would carry a drifting boat."
)


# --------------------------------------------------------------------------------------------------
# host, bandwidth, model size


def host_info(threads: int) -> dict[str, Any]:
    import psutil

    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "threads_used": threads,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        # older OpenBLAS needs these on some CPUs; they do not touch onnxruntime or llama.cpp kernels
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))},
    }


def load_snapshot(sample_s: float = 1.0) -> dict[str, Any]:
    """System load, to say under what conditions the numbers were taken (other programs share the CPUs)."""
    import psutil

    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != os.getpid()]
    for proc in procs:
        try:
            proc.cpu_percent(None)  # the first call only starts the counter
        except psutil.Error:
            pass
    psutil.cpu_percent(None)
    time.sleep(sample_s)
    total = psutil.cpu_percent(None)
    busy = []
    for proc in procs:
        try:
            pct = proc.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 10.0:
            cmd = " ".join(proc.info.get("cmdline") or [proc.info.get("name") or "?"])
            busy.append({"pid": proc.pid, "cpu_percent": round(pct, 1), "cmd": cmd[:160]})
    return {
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpu_percent": total,
        "sample_s": sample_s,
        "busy_processes": busy,
    }


def wait_for_idle(max_wait_s: float, *, busy_percent: float = 10.0, log: Callable[[str], None] = print) -> bool:
    """Wait until the CPUs have been nearly idle for two consecutive seconds (at most ``max_wait_s``)."""
    import psutil

    deadline = time.monotonic() + max_wait_s
    quiet = 0
    while time.monotonic() < deadline:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1.0) < busy_percent else 0
        if quiet >= 2:
            return True
    log(f"  the machine stayed busy for {max_wait_s:.0f} s; measuring anyway")
    return False


def memory_bandwidth(threads: int, size_mb: int = 256, repeats: int = 20) -> dict[str, Any]:
    """Copy bandwidth with numpy, split over ``threads`` threads (numpy drops the GIL while copying).

    Counted as in STREAM's Copy: bytes read plus bytes written per second.
    """
    import numpy as np

    n = size_mb * 2**20 // 8
    src = np.ones(n)
    dst = np.zeros(n)  # zeros, then a first copy: pages are faulted in before timing
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def part(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    def once() -> float:
        t0 = time.perf_counter()
        if threads == 1:
            np.copyto(dst, src)
        else:
            workers = [threading.Thread(target=part, args=b) for b in bounds]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        return time.perf_counter() - t0

    once()
    rates = [2 * src.nbytes / once() / 1e9 for _ in range(repeats)]
    return {
        "method": f"numpy.copyto of {size_mb} MiB float64 arrays over {threads} thread(s); (read + write bytes) / s",
        "threads": threads,
        "gb_per_s": [round(r, 2) for r in rates],
        "median_gb_per_s": round(statistics.median(rates), 2),
        "best_gb_per_s": round(max(rates), 2),
    }


def decode_bytes_per_token(bundle: Path) -> dict[str, Any]:
    """Bytes one decode step reads: every weight a step reads in full, at its width in memory after load.

    From the ONNX graph: initializers consumed by MatMulNBits/MatMul/Gemm and
    the small per-layer norms are read whole every step; tables that a step
    only indexes (the embedding gather, rotary cos/sin caches) contribute a row,
    counted as nothing. Initializers stored in fp16 and cast to fp32 by a Cast
    node are counted at fp32, since onnxruntime folds that Cast once at load.
    Without the ``onnx`` package, the weight file's size stands in.
    """
    model_file = bundle / "model.onnx"
    data_files = sorted(bundle.glob("*.onnx.data")) + sorted(bundle.glob("*.onnx_data"))
    file_bytes = sum(p.stat().st_size for p in data_files) + model_file.stat().st_size
    try:
        import onnx
    except ImportError:
        return {"bytes": file_bytes, "method": "weight file size (onnx not installed)", "file_bytes": file_bytes}
    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    sizes: dict[str, int] = {}
    for init in graph.initializer:
        length = next((int(e.value) for e in init.external_data if e.key == "length"), 0)
        sizes[init.name] = length or len(init.raw_data)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    indexed_only = {"Gather", "GatherBlockQuantized", "GatherElements"}
    elem = {onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.FLOAT: 4}
    read = codes = 0
    for name, size in sizes.items():
        uses = consumers.get(name, [])
        if not uses:
            continue
        if all(n.op_type in indexed_only for n, _ in uses):
            continue
        if all(n.op_type == "GroupQueryAttention" and i >= 7 for n, i in uses):  # cos/sin caches
            continue
        width = size
        casts = [n for n, _ in uses if n.op_type == "Cast"]
        if casts and all(c.op_type in indexed_only for n in casts for c, _ in consumers.get(n.output[0], [])):
            continue  # an fp16 table cast once at load and then only indexed (the scales of a gathered table)
        if casts:
            to = next((a.i for a in casts[0].attribute if a.name == "to"), None)
            src_type = next(t.data_type for t in graph.initializer if t.name == name)
            if to in elem and src_type in elem:
                width = size * elem[to] // elem[src_type]
        read += width
        if any(n.op_type == "MatMulNBits" and i == 1 for n, i in uses):
            codes += size
    return {
        "bytes": read,
        "quantized_weight_codes_bytes": codes,
        "file_bytes": file_bytes,
        "method": "ONNX initializers a decode step reads whole (matmul weights with their scales and offsets, "
                  "norms), fp16 tables cast at load counted at fp32; indexed tables (embedding gather, rotary "
                  "caches) excluded",
    }


# --------------------------------------------------------------------------------------------------
# prompts and targets


def make_prompts(tokenizer_file: Path, bos_token_id: int | None, short_tokens: int, long_tokens: int) -> dict[str, list[int]]:
    """The same prompt token ids for every runtime, exactly ``short_tokens`` and ``long_tokens`` long."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    lead = [bos_token_id] if bos_token_id is not None else []

    def ids(text: str, n: int) -> list[int]:
        body = tok.encode(text, add_special_tokens=False).ids
        while len(lead) + len(body) < n:  # a tokenizer with long tokens: repeat the text
            body += tok.encode(" " + text, add_special_tokens=False).ids
        return (lead + body)[:n]

    return {"short": ids(SHORT_TEXT, short_tokens), "long": ids(LONG_TEXT, long_tokens)}


def make_quality_sample(tokenizer_file: Path, max_tokens: int, sample: Path = QUALITY_SAMPLE) -> dict[str, Any]:
    """The quality sample as token ids: no special tokens, one sequence, cut to ``max_tokens`` (the context)."""
    from tokenizers import Tokenizer

    text = sample.read_text(encoding="utf-8")
    full = Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids
    return {"source": str(sample.relative_to(ROOT)) if sample.is_relative_to(ROOT) else str(sample),
            "text": text, "token_ids": full[:max_tokens], "full_token_ids": full}


@dataclass
class Target:
    """One runtime + model to measure: a runner script run by a given Python."""

    label: str
    runtime: str
    python: Path | None
    runner: Path | None
    model: Path | None
    kind: str  # "engine", "peer", or "reference" (scored only, for quality)
    precision: str | None = None
    reason: str | None = None  # set when the target was skipped
    details: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # the engine's keyword arguments (engine targets)


def engine_targets(bundles: dict[str, Path] | None = None, *, build: bool = True, log: Callable[[str], None] = print) -> list[Target]:
    """This engine on the given bundles (label -> directory).

    By default the int4 and int8 SmolLM2 bundles (built when missing), and each
    of ``OPTIONAL_VARIANTS`` that has been built (never built here:
    ``edge-runtime quantize smollm2-135m-instruct --precision int4 FLAGS
    --out <cache>/bundles/smollm2-135m-instruct-SUFFIX``).
    """
    from edge_runtime.models import default_bundle_dir

    if bundles is None:
        bundles = {f"edge-runtime {p}": default_bundle_dir(MODEL, p) for p in ("int4", "int8")}
        for suffix, (label, _flags) in OPTIONAL_VARIANTS.items():
            path = default_bundle_dir(MODEL, suffix)
            if (path / "manifest.json").is_file():
                bundles[label] = path
    targets = [_bundle_target(label, path, "engine", build=build, log=log) for label, path in bundles.items()]
    int4 = next((t for t in targets if t.label == "edge-runtime int4"), None)
    if int4 is not None:  # the default bundle with prompt-lookup drafts (off by default): what they add to this prompt
        on = {"prompt_lookup": SUGGESTED_PROMPT_LOOKUP_TOKENS}
        targets.insert(targets.index(int4) + 1, dataclasses.replace(
            int4, label=LOOKUP_LABEL, options=on, details={**int4.details, "engine_options": on}))
    return targets


def reference_target(bundle: Path | None = None, *, build: bool = True, log: Callable[[str], None] = print) -> Target:
    """The fp32 bundle that every runtime's quality is compared with (scored, never timed)."""
    from edge_runtime.models import default_bundle_dir

    path = bundle or default_bundle_dir(MODEL, REFERENCE_PRECISION)
    return _bundle_target(f"edge-runtime {REFERENCE_PRECISION} (quality reference)", path, "reference",
                          build=build, log=log)


def _bundle_target(label: str, path: Path, kind: str, *, build: bool, log: Callable[[str], None]) -> Target:
    """A bundle to run with this engine; a missing default bundle is built when ``build`` allows it."""
    from edge_runtime.bundle import verify_bundle
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.models import default_bundle_dir

    target = Target(label, "edge-runtime", Path(sys.executable), RUNNERS / "run_engine.py", path, kind)
    try:
        manifest = verify_bundle(path, "fast")
    except EdgeRuntimeError as err:
        manifest = None
        precision = next((p for p in ("int4", "int8", "fp32") if path == default_bundle_dir(MODEL, p)), None)
        if build and precision is not None:
            log(f"building the {precision} bundle of {MODEL} into {path} (about a minute)")
            try:
                from quantize import build_bundle

                build_bundle(MODEL, path, precision=precision, force=True)
                manifest = verify_bundle(path, "fast")
            except Exception as build_err:  # the export extra may be missing on a device
                target.reason = f"bundle {path} missing and could not be built: {build_err}"
        else:
            target.reason = f"bundle {path} is not usable: {err}"
    if manifest is not None:
        target.precision = manifest.precision
        quantization = json.loads((path / "manifest.json").read_text()).get("quantization") or {}
        target.details = {"bundle": str(path), "bundle_hash": manifest.bundle_hash, "quantization": quantization}
    return target


def peer_targets(names: Sequence[str], *, build: bool = True, log: Callable[[str], None] = print) -> list[Target]:
    targets = []
    for name in names:
        peer = envs.setup_peer(name, build=build, log=log)
        label = {"llamacpp": "llama.cpp Q4_1", "genai": "onnxruntime-genai int4"}.get(name, name)
        runtime = {"llamacpp": "llama-cpp-python", "genai": "onnxruntime-genai"}.get(name, name)
        targets.append(Target(label, runtime, peer.python, peer.runner, peer.model, "peer",
                              precision="q4_1" if name == "llamacpp" else "int4",
                              reason=peer.reason, details={"peer": name, "version": peer.version, **peer.details}))
    return targets


# --------------------------------------------------------------------------------------------------
# running


def _cpu_busy_s() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine, and the time stolen by the hypervisor."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)


def _run_target(target: Target, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one runner in a fresh process; its result document, or {"error": ...}.

    The document gains ``conditions``: how much CPU other programs used while
    it ran (machine busy time minus the runner's own), the sign of a noisy run.
    """
    import resource

    import psutil

    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps({**spec, "label": target.label, "model": str(target.model), "options": target.options}))
        cmd = [str(target.python), str(target.runner), str(spec_file), str(out_file)]
        busy0, steal0 = _cpu_busy_s()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        wall = time.perf_counter() - t0
        busy1, steal1 = _cpu_busy_s()
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out_file.is_file():
            result = json.loads(out_file.read_text())
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-10:]
            result = {"error": f"runner {_exit_words(proc.returncode)} without a result: " + " | ".join(tail)}
        if proc.returncode != 0 and "error" not in result:
            result["error"] = f"runner {_exit_words(proc.returncode)}"
        own = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
        other = max(0.0, (busy1 - busy0) - own)
        capacity = wall * (psutil.cpu_count() or 1)
        result["conditions"] = {
            "wall_s": round(wall, 2),
            "runner_cpu_s": round(own, 2),
            "other_cpu_s": round(other, 2),
            "other_cpu_share": round(other / capacity, 3) if capacity else None,
            "steal_s": round(steal1 - steal0, 2),
        }
        return result


def _exit_words(returncode: int) -> str:
    """'exited 1', or the signal that killed the runner ('was killed by SIGILL (illegal instruction)')."""
    if returncode >= 0:
        return f"exited {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"was killed by signal {-returncode}"
    hint = {"SIGILL": " (illegal instruction: the build uses CPU instructions this machine does not run)",
            "SIGKILL": " (out of memory, or killed)", "SIGSEGV": " (segmentation fault)"}.get(name, "")
    return f"was killed by {name}{hint}"


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over every repetition of every round (each round is a fresh process)."""
    short = [r for doc in rounds for r in doc["repetitions"]["short"]]
    long = [r for doc in rounds for r in doc["repetitions"]["long"]]
    loads = [x for doc in rounds for x in doc["load_ms"]]
    energy = [r["energy"] for r in short if r.get("energy")]
    per_token = [(r["energy"], r["generated_tokens"]) for r in short if r.get("energy") and r["generated_tokens"]]
    return {
        "load_ms": _median(loads),
        "first_load_ms": _median([doc["load_ms"][0] for doc in rounds]),
        "import_ms": _median([doc["import_ms"] for doc in rounds]),
        "ttft_short_ms": _median([r["ttft_ms"] for r in short]),
        "ttft_long_ms": _median([r["ttft_ms"] for r in long]),
        "prefill_short_tokens_per_s": _median([r["prefill_tokens_per_s"] for r in short]),
        "prefill_long_tokens_per_s": _median([r["prefill_tokens_per_s"] for r in long]),
        "decode_tokens_per_s": _median([r["decode_tokens_per_s"] for r in short]),
        "generated_tokens": min((r["generated_tokens"] for r in short), default=0),
        # this engine's prompt-lookup drafts per generation (None for the peers)
        "draft_tokens": _median([r.get("extra", {}).get("draft_tokens") for r in short]),
        "accepted_draft_tokens": _median([r.get("extra", {}).get("accepted_draft_tokens") for r in short]),
        "peak_rss_mb": max(doc["peak_rss_mb"] for doc in rounds),
        "joules_per_token": _median([e["joules"] / n for e, n in per_token]),
        "process_joules_per_token": _median(
            [e["process_joules"] / n for e, n in per_token if e.get("process_joules") is not None]
        ),
        "energy_source": ", ".join(sorted({e["source"] for e in energy})) or None,
        "energy_estimated": any(e["estimated"] for e in energy) if energy else None,
        "repetitions": len(short),
        "other_cpu_share": max((doc.get("conditions", {}).get("other_cpu_share") or 0.0) for doc in rounds),
    }


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def compare_quality(quality: dict[str, Any] | None, reference: dict[str, Any] | None) -> dict[str, Any] | None:
    """A runtime's quality figures, with its perplexity ratio and top-1 agreement against the reference's."""
    if not quality:
        return None
    out: dict[str, Any] = {
        "tokens": quality["tokens"],
        "perplexity": round(quality["perplexity"], 4),
        "nll": round(quality["nll"], 5),
        "ppl_ratio_vs_reference": None,
        "top1_agreement_vs_reference": None,
        "own_tokenizer_matches": (quality.get("tokenizer") or {}).get("matches"),
        "own_tokenizer_tokens": (quality.get("tokenizer") or {}).get("own_tokens"),
        "score_ms": round(quality["score_ms"], 1),
    }
    if reference and reference["top1"] and len(reference["top1"]) == len(quality["top1"]):
        same = sum(a == b for a, b in zip(quality["top1"], reference["top1"]))
        out["ppl_ratio_vs_reference"] = round(quality["perplexity"] / reference["perplexity"], 4)
        out["top1_agreement_vs_reference"] = round(same / len(reference["top1"]), 4)
    return out


def summarize(results: list[dict[str, Any]], bandwidth: dict[str, Any], bytes_per_token: dict[str, Any] | None) -> dict[str, Any]:
    """Ratios of the engine's int4 figures to the peers', targets, and the share of the bandwidth ceiling."""
    ok = [r for r in results if r["status"] == "ok"]
    # the reference is the engine as shipped: an int4 row without engine options (not the row with drafts)
    engine = next((r for r in ok if r["kind"] == "engine" and r.get("precision") == "int4"
                   and not (r.get("details") or {}).get("engine_options")), None)
    peers = [r for r in ok if r["kind"] == "peer"]
    summary: dict[str, Any] = {"reference": engine["label"] if engine else None}
    # every measured row's decode speed against each peer's, next to what its quantization costs in quality
    summary["speed_and_quality"] = [
        {
            "label": r["label"],
            "kind": r["kind"],
            "decode_tokens_per_s": r["median"]["decode_tokens_per_s"],
            "decode_ratio_vs": {p["label"]: _ratio(r["median"]["decode_tokens_per_s"], p["median"]["decode_tokens_per_s"])
                                for p in peers if p is not r},
            "ppl_ratio_vs_reference": (r.get("quality") or {}).get("ppl_ratio_vs_reference"),
            "top1_agreement_vs_reference": (r.get("quality") or {}).get("top1_agreement_vs_reference"),
        }
        for r in ok
    ]
    if engine is None:
        summary["note"] = "no int4 engine result: no ratios"
        return summary
    em = engine["median"]
    decode = em["decode_tokens_per_s"]
    summary["decode_ratio_vs"] = {p["label"]: _ratio(decode, p["median"]["decode_tokens_per_s"]) for p in peers}
    summary["prefill_long_ratio_vs"] = {
        p["label"]: _ratio(em["prefill_long_tokens_per_s"], p["median"]["prefill_long_tokens_per_s"]) for p in peers
    }
    summary["ttft_short_ratio_vs"] = {  # < 1: the engine answers sooner
        p["label"]: _ratio(em["ttft_short_ms"], p["median"]["ttft_short_ms"]) for p in peers
    }
    if peers:
        fastest = max(peers, key=lambda p: p["median"]["decode_tokens_per_s"] or 0.0)
        ratio = _ratio(decode, fastest["median"]["decode_tokens_per_s"])
        summary["faster_peer"] = fastest["label"]
        summary["decode_ratio_vs_faster_peer"] = ratio
        summary["decode_target"] = {"target": DECODE_TARGET, "stretch": DECODE_STRETCH,
                                    "met": ratio is not None and ratio >= DECODE_TARGET,
                                    "stretch_met": ratio is not None and ratio >= DECODE_STRETCH}
        peer_rss = [p["median"]["peak_rss_mb"] for p in peers]
        summary["peak_rss"] = {"engine_mb": round(em["peak_rss_mb"], 1),
                               "peers_mb": {p["label"]: round(p["median"]["peak_rss_mb"], 1) for p in peers},
                               "target": "no higher than the peers'",
                               "met": em["peak_rss_mb"] <= min(peer_rss)}
    drafting = next((r for r in ok if r["label"] == LOOKUP_LABEL), None)
    if drafting is not None:
        dm = drafting["median"]
        summary["prompt_lookup"] = {
            "label": LOOKUP_LABEL, "draft_tokens": dm.get("draft_tokens"), "accepted_draft_tokens": dm.get("accepted_draft_tokens"),
            "generated_tokens": dm["generated_tokens"], "decode_tokens_per_s": dm["decode_tokens_per_s"],
            "speedup": _ratio(dm["decode_tokens_per_s"], decode),
            "ratio_vs_faster_peer": _ratio(dm["decode_tokens_per_s"], fastest["median"]["decode_tokens_per_s"]) if peers else None,
        }
    first = engine.get("first_tokens") or []
    # informational: greedy paths of differently quantized models part at the first close call
    summary["greedy_agreement_with_reference"] = {
        r["label"]: _common_prefix(first, r.get("first_tokens") or []) for r in ok if r is not engine
    }
    load = em["load_ms"]
    summary["load"] = {"engine_ms": load, "target_ms": LOAD_TARGET_MS,
                       "met": load is not None and load < LOAD_TARGET_MS}
    if bytes_per_token and bytes_per_token.get("bytes"):
        best = bandwidth["best_gb_per_s"] * 1e9
        ceiling = best / bytes_per_token["bytes"]
        summary["bandwidth_ceiling"] = {
            "bandwidth_gb_per_s": bandwidth["best_gb_per_s"],
            "bytes_per_token": bytes_per_token["bytes"],
            "ceiling_tokens_per_s": round(ceiling, 1),
            "engine_share": round(decode / ceiling, 3) if decode else None,
            "codes_only_ceiling_tokens_per_s": round(best / bytes_per_token["quantized_weight_codes_bytes"], 1)
            if bytes_per_token.get("quantized_weight_codes_bytes") else None,
            "file_size_ceiling_tokens_per_s": round(best / bytes_per_token["file_bytes"], 1),
        }
    return summary


def _one_model(engines: Sequence[Target], peers: Sequence[str]) -> str | None:
    """The model the usable engine bundles hold; ConfigError for a mix, or for peers of another model.

    The peers and the default quality reference run SmolLM2: a bundle of another model was reported as
    "37x the faster peer", and its perplexity divided by SmolLM2's.
    """
    from edge_runtime.errors import ConfigError

    names = {t.label: json.loads((t.model / "manifest.json").read_text()).get("name")
             for t in engines if t.reason is None and t.model is not None}
    if len(set(names.values())) > 1:
        raise ConfigError("the bundles are of different models (" + ", ".join(f"{k}: {v}" for k, v in names.items())
                          + "): a run compares one model's runtimes", field="--bundle")
    model = next(iter(names.values()), None)
    if model != MODEL and any(p in PEER_NAMES for p in peers):  # (an unknown name is only a skipped row)
        raise ConfigError(f"the peers run {MODEL} and these bundles are {model}: their speeds are not comparable "
                          "(pass --peers none)", field="--bundle")
    return model


def run_benchmark(
    *,
    threads: int | None = None,
    repetitions: int = 5,
    warmup: int = 1,
    load_repetitions: int = 5,
    rounds: int = 1,
    decode_tokens: int = 128,
    short_tokens: int = 20,
    long_tokens: int = 500,
    bundles: dict[str, Path] | None = None,
    peers: Sequence[str] = PEER_NAMES,
    setup_peers: bool = True,
    build_bundles: bool = True,
    bandwidth_mb: int = 256,
    load_sample_s: float = 1.0,
    max_other_cpu: float | None = None,
    noisy_retries: int = 2,
    idle_wait_s: float = 120.0,
    timeout_s: float = 900.0,
    quality: bool = True,
    reference_bundle: Path | None = None,
    quality_tokens: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every target; return the results document (see ``write_results``).

    With ``quality``, every runtime also scores the quality sample (at most
    ``quality_tokens`` tokens, and never beyond the reference model's context)
    in its first round, and the fp32 ``reference_bundle`` (default: the
    SmolLM2 fp32 bundle) scores it once, before any timing.

    With ``max_other_cpu`` set, a runtime's run during which other programs
    used more than that share of the CPUs is discarded (kept in the results as
    ``rejected_rounds``) and run again once the machine is idle, at most
    ``noisy_retries`` times; the last attempt is kept whatever its conditions.
    """
    from edge_runtime.engine._session import default_threads

    threads = threads or default_threads()
    started = dt.datetime.now(dt.UTC)
    log(f"load before: {os.getloadavg()}")
    before = load_snapshot(load_sample_s)
    engines = engine_targets(bundles, build=build_bundles, log=log)
    reference = next((t for t in engines if t.reason is None), None)
    if reference is None:  # before the peers are set up: that takes minutes the first time
        from edge_runtime.errors import BundleError

        raise BundleError("no usable engine bundle to benchmark: " + "; ".join(f"{t.label}: {t.reason}" for t in engines))
    manifest = json.loads((reference.model / "manifest.json").read_text())
    model = _one_model(engines, peers)
    if quality and reference_bundle is None and model != MODEL:  # the default reference is SmolLM2's fp32
        log(f"no fp32 reference for {model}: quality is not compared")
        quality = False
    targets = engines + peer_targets(peers, build=setup_peers, log=log)
    tokenizer_file = reference.model / manifest.get("tokenizer_file", "tokenizer.json")
    prompts = make_prompts(tokenizer_file, manifest.get("tokens", {}).get("bos_token_id"), short_tokens, long_tokens)
    log(f"measuring memory bandwidth ({threads} threads)")
    bandwidth = memory_bandwidth(threads, bandwidth_mb)
    if threads > 1:
        bandwidth["single_thread"] = memory_bandwidth(1, bandwidth_mb)
    int4 = next((t for t in targets if t.kind == "engine" and t.precision == "int4" and t.reason is None), None)
    bytes_per_token = decode_bytes_per_token(int4.model) if int4 else None

    spec = {
        "threads": threads, "prompts": prompts, "decode_tokens": decode_tokens, "repetitions": repetitions,
        "warmup": warmup, "load_repetitions": load_repetitions, "repo_root": str(ROOT),
    }
    sample: dict[str, Any] | None = None
    quality_ref: dict[str, Any] | None = None
    if quality:
        context = int(manifest.get("model", {}).get("context_length") or 2048)
        sample = make_quality_sample(tokenizer_file, min(context, quality_tokens or context))
        quality_ref = _reference_quality(reference_target(reference_bundle, build=build_bundles, log=log),
                                         {**spec, "mode": "quality", "quality": sample}, timeout_s, log)

    runs: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
    rejected: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
    errors: dict[str, str] = {}
    runnable = [t for t in targets if t.reason is None]
    for rnd in range(rounds):
        order = runnable if rnd % 2 == 0 else list(reversed(runnable))  # alternate, so drift hits all alike
        for target in order:
            if target.label in errors:
                continue
            log(f"round {rnd + 1}/{rounds}: {target.label}")
            # quality does not change from one round to the next: scored in the first kept round only
            scored = any(d.get("quality") for d in runs[target.label])
            target_spec = {**spec, "quality": sample} if sample and not scored else spec
            for attempt in range(noisy_retries + 1):
                doc = _run_target(target, target_spec, timeout_s)
                share = doc.get("conditions", {}).get("other_cpu_share") or 0.0
                if "error" in doc or max_other_cpu is None or share <= max_other_cpu or attempt == noisy_retries:
                    break
                # another program took CPU time while this runtime was measured: its figures would be low
                log(f"  other programs used {share:.0%} of the CPUs: discarded; waiting for an idle machine")
                rejected[target.label].append(doc)
                wait_for_idle(idle_wait_s, log=log)
            if "error" in doc:
                errors[target.label] = doc["error"]
                log(f"  failed: {doc['error']}")
                continue
            runs[target.label].append(doc)

    results = []
    for t in targets:
        entry: dict[str, Any] = {"label": t.label, "runtime": t.runtime, "kind": t.kind, "precision": t.precision,
                                 "model": str(t.model) if t.model else None, "details": t.details}
        if t.reason is not None:
            entry.update(status="skipped", reason=t.reason)
        elif t.label in errors:
            entry.update(status="failed", reason=errors[t.label], rounds=runs[t.label])
        else:
            docs = runs[t.label]
            scored = next((d["quality"] for d in docs if d.get("quality")), None)
            entry.update(status="ok", versions=docs[0]["versions"], median=_aggregate(docs),
                         quality=compare_quality(scored, (quality_ref or {}).get("quality")),
                         first_tokens=docs[0]["repetitions"]["short"][0]["first_tokens"], rounds=docs,
                         rejected_rounds=rejected[t.label])
        results.append(entry)
    after = load_snapshot(load_sample_s)
    return {
        "benchmark": "throughput",
        "schema_version": SCHEMA_VERSION,
        "created_at": started.isoformat(timespec="seconds"),
        "duration_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "host": host_info(threads),
        "load": {"before": before, "after": after},
        "settings": {
            "threads": threads, "repetitions": repetitions, "rounds": rounds, "warmup": warmup,
            "load_repetitions": load_repetitions, "decode_tokens": decode_tokens,
            "max_other_cpu": max_other_cpu, "noisy_retries": noisy_retries, "quality": quality,
            "prompt_tokens": {k: len(v) for k, v in prompts.items()}, "sampling": "greedy",
        },
        "versions": {r["label"]: r.get("versions") for r in results if r["status"] == "ok"},
        "prompts": prompts,
        "memory_bandwidth": bandwidth,
        "decode_bytes_per_token": bytes_per_token,
        "quality": _quality_section(sample, quality_ref),
        "results": results,
        "summary": summarize(results, bandwidth, bytes_per_token),
        "definitions": {
            "load_ms": "creating the model object in a process that has already imported the runtime",
            "ttft_ms": "call to first generated token id in the caller's hands (prefill + first sampling)",
            "prefill_tokens_per_s": "prompt tokens / time of the runtime's prompt pass",
            "decode_tokens_per_s": "(n - 1) / (time of token n - time of token 1), n = decode_tokens greedy",
            "peak_rss_mb": "peak resident set (VmHWM) of the runtime's own process after load and all generations, "
                           "in MiB (2**20 bytes), the largest over the rounds",
            "joules_per_token": "energy window around the short-prompt generation / generated tokens; "
                                "'process' = this process's share by CPU time",
            "perplexity": "exp(mean negative log-likelihood of each sample token given all tokens before it), the "
                          "sample scored as one sequence by the runtime itself, after its timings",
            "ppl_ratio_vs_reference": "perplexity / the fp32 reference bundle's perplexity on the same ids",
            "top1_agreement_vs_reference": "share of positions where the runtime's most likely next token is the "
                                           "fp32 reference's",
        },
    }


def _reference_quality(target: Target, spec: dict[str, Any], timeout_s: float,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """The fp32 reference's score of the sample (its runner in quality mode), or why there is none."""
    entry: dict[str, Any] = {"label": target.label, "model": str(target.model) if target.model else None,
                             "details": target.details}
    if target.reason is not None:
        log(f"  no quality reference: {target.reason}")
        return {**entry, "error": target.reason}
    log(f"quality reference: {target.label}")
    doc = _run_target(target, spec, timeout_s)
    if "error" in doc:
        log(f"  failed: {doc['error']}")
        return {**entry, "error": doc["error"]}
    return {**entry, "versions": doc["versions"], "quality": doc["quality"], "conditions": doc.get("conditions")}


def _quality_section(sample: dict[str, Any] | None, reference: dict[str, Any] | None) -> dict[str, Any] | None:
    if sample is None:
        return None
    section: dict[str, Any] = {
        "sample": sample["source"],
        "tokens": len(sample["token_ids"]),
        "sample_tokens": len(sample["full_token_ids"]),
        "token_ids": sample["token_ids"],
        "tokenization": "the GGUF's tokenizer (the bundles' tokenizer.json), no special tokens; every runtime is "
                        "fed these ids; its own tokenizer's ids are only compared (own_tokenizer_matches)",
        "reference": None,
    }
    if reference is not None:
        ref = {k: v for k, v in reference.items() if k != "quality"}
        scored = reference.get("quality")
        if scored:
            ref.update(perplexity=round(scored["perplexity"], 4), nll=round(scored["nll"], 5),
                       score_ms=round(scored["score_ms"], 1), logprobs=scored["logprobs"], top1=scored["top1"])
        section["reference"] = ref
    return section


# --------------------------------------------------------------------------------------------------
# output


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{share * 100:.1f}%"


def _model_cell(result: dict[str, Any]) -> str:
    if result["kind"] != "engine":
        return result["details"].get("model_format", "")
    quant = result["details"].get("quantization") or {}
    variant = {True: ", float block offsets", False: ", integer zero points"}.get(quant.get("int4_offsets"), "")
    if quant.get("int4_symmetric"):
        variant = ", symmetric (zero point 8)"
    if quant.get("rescore_top_k"):
        variant += f", top {quant['rescore_top_k']} logits rescored"
    elif result["precision"] == "int4":
        variant += ", 4-bit output projection"
    mlp, attn = quant.get("mlp_block_size"), quant.get("block_size")
    if mlp and attn and mlp != attn:
        variant += f", blocks of {mlp} in the MLP"
    kernel = "MatMul" if result["precision"] == "fp32" else "MatMulNBits"  # an fp32 graph has no quantized matmuls
    return f"edge bundle {result['precision']}{variant} ({kernel})"


def _speed_quality_lines(doc: dict[str, Any]) -> list[str]:
    """Decode speed relative to each peer, next to the quality the quantization keeps."""
    rows = doc["summary"].get("speed_and_quality") or []
    peers = [r["label"] for r in doc["results"] if r["status"] == "ok" and r["kind"] == "peer"]
    quality = doc.get("quality") or {}
    ref = quality.get("reference") or {}
    if not rows or not peers:
        # no peer to compare with; a missing reference still says why the ratios are missing
        return [f"- Quality: no fp32 reference ({ref.get('error', 'not run')}): no ratios."] \
            if quality and ref.get("perplexity") is None else []
    lines = [
        ("Decode speed relative to each peer, next to quality (× > 1: faster than that peer; ppl ÷ fp32 > 1: the "
         "quantization loses more of the fp32 model):"),
        "",
        "| runtime | decode tok/s | " + " | ".join(f"× {p}" for p in peers) + " | ppl ÷ fp32 | top-1 = fp32 |",
        "|---|--:|" + "--:|" * len(peers) + "--:|--:|",
    ]
    for row in rows:
        ratios = " | ".join("1.00" if p == row["label"] else _fmt(row["decode_ratio_vs"].get(p), 2) for p in peers)
        lines.append(f"| {row['label']} | {_fmt(row['decode_tokens_per_s'], 1)} | {ratios} | "
                     f"{_fmt(row['ppl_ratio_vs_reference'], 3)} | {_pct(row['top1_agreement_vs_reference'])} |")
    lines.append("")
    if ref.get("perplexity") is not None:
        lines.append(
            f"- Quality: `{quality['sample']}`, {quality['tokens']} tokens (the GGUF tokenizer's ids, no special "
            f"tokens, one sequence, the same ids for every runtime), scored by each runtime in its own process "
            f"after its timings. fp32 reference: this engine on the fp32 bundle `{Path(ref['model']).name}` "
            f"(scored once, never timed), perplexity {ref['perplexity']:.2f}; top-1 = fp32 is the share of the {quality['tokens'] - 1} positions where "
            "the runtime's most likely next token is the reference's."
        )
    elif quality:
        lines.append(f"- Quality: no fp32 reference ({ref.get('error', 'not run')}): no ratios.")
    mismatched = [f"{r['label']} ({_fmt(r['quality'].get('own_tokenizer_tokens'))} ids)" for r in doc["results"]
                  if r["status"] == "ok" and (r.get("quality") or {}).get("own_tokenizer_matches") is False]
    if mismatched:
        lines.append(f"- Own tokenizer does not give the GGUF's {quality['sample_tokens']} ids for the sample (fed "
                     f"the GGUF's ids anyway): {', '.join(mismatched)}.")
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    """The README table: one row per runtime, then the ratios and the conditions of the run."""
    s = doc["settings"]
    host = doc["host"]
    pt = s["prompt_tokens"]
    lines = [
        (
            f"Throughput on `{host['hostname']}` ({host['cpu_model']}, {host['physical_cores']} cores, "
            f"{s['threads']} threads), {doc['created_at']}; median of {s['repetitions'] * s['rounds']} runs after "
            f"{s['warmup']} warm-up, each runtime in its own process."
        ),
        "",
        (
            f"| runtime | model | load ms | TTFT ms ({pt['short']} tok) | prefill tok/s ({pt['short']}) | "
            f"prefill tok/s ({pt['long']}) | decode tok/s ({s['decode_tokens']}) | peak RSS MiB | mJ/token (process) | "
            "ppl | ppl ÷ fp32 | top-1 = fp32 |"
        ),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    sources = set()
    for r in doc["results"]:
        if r["status"] != "ok":
            continue
        m = r["median"]
        model = _model_cell(r)
        q = r.get("quality") or {}
        mj = m["process_joules_per_token"]
        if m.get("energy_source"):
            sources.add(m["energy_source"] + (" (estimate)" if m.get("energy_estimated") else ""))
        lines.append(
            f"| {r['label']} | {model} | {_fmt(m['load_ms'])} | {_fmt(m['ttft_short_ms'], 1)} | "
            f"{_fmt(m['prefill_short_tokens_per_s'])} | {_fmt(m['prefill_long_tokens_per_s'])} | "
            f"{_fmt(m['decode_tokens_per_s'], 1)} | {_fmt(m['peak_rss_mb'])} | "
            f"{_fmt(mj * 1000 if mj is not None else None, 1)} | {_fmt(q.get('perplexity'), 2)} | "
            f"{_fmt(q.get('ppl_ratio_vs_reference'), 3)} | {_pct(q.get('top1_agreement_vs_reference'))} |"
        )
    lines.append("")
    for r in doc["results"]:
        if r["status"] != "ok":
            lines.append(f"- {r['label']}: {r['status']}: {r['reason']}")
    summ = doc["summary"]
    speed_quality = _speed_quality_lines(doc)
    if speed_quality and lines[-1] != "":
        lines.append("")  # a paragraph right after a list would join its last item
    lines += speed_quality
    if summ.get("decode_ratio_vs"):
        ratios = ", ".join(f"{k} {_fmt(v, 2)}×" for k, v in summ["decode_ratio_vs"].items())
        tgt = summ["decode_target"]
        lines.append(
            f"- Decode, {summ['reference']} / peer: {ratios}; vs the faster peer ({summ['faster_peer']}) "
            f"{_fmt(summ['decode_ratio_vs_faster_peer'], 2)}× (target ≥ {tgt['target']}: "
            f"{'met' if tgt['met'] else 'not met'}; stretch {tgt['stretch']}: {'met' if tgt['stretch_met'] else 'not met'})."
        )
    pl = summ.get("prompt_lookup")
    if pl:
        line = (f"- Prompt lookup ({pl['label']}): over the {pl['generated_tokens']}-token answer it drafted "
                f"{_fmt(pl['draft_tokens'])} tokens and the model agreed with {_fmt(pl['accepted_draft_tokens'])} of them "
                f"(medians); it decodes at {_fmt(pl['decode_tokens_per_s'], 1)} tok/s, {_fmt(pl['speedup'], 2)}× the "
                f"default's speed without drafts")
        line += (f" and {_fmt(pl['ratio_vs_faster_peer'], 2)}× the faster peer." if pl.get("ratio_vs_faster_peer") is not None
                 else ".")
        lines.append(line)
    bc = summ.get("bandwidth_ceiling")
    if bc:
        lines.append(
            f"- Bandwidth ceiling: {bc['bandwidth_gb_per_s']} GB/s (numpy copy, {s['threads']} threads, best of "
            f"{len(doc['memory_bandwidth']['gb_per_s'])}) / {bc['bytes_per_token'] / 1e6:.1f} MB that one decode step "
            f"reads = {bc['ceiling_tokens_per_s']:.0f} tok/s; the engine's int4 decode reaches "
            f"{_fmt(None if bc['engine_share'] is None else bc['engine_share'] * 100, 0)}% of it. The bytes are the int4 bundle's matmul weights as "
            "held in memory after load (4-bit codes, block scales, zero points or block offsets, the fp16 ones cast to "
            "fp32 by onnxruntime); the 4-bit codes alone would allow "
            f"{_fmt(bc['codes_only_ceiling_tokens_per_s'])} tok/s."
        )
    if "load" in summ:
        ld = summ["load"]
        lines.append(f"- Load: {_fmt(ld['engine_ms'])} ms (target < {ld['target_ms']:.0f} ms: "
                     f"{'met' if ld['met'] else 'not met'}).")
    if "peak_rss" in summ:
        pr = summ["peak_rss"]
        # *_mb keys hold MiB (2**20 bytes, as /proc reports kibibytes); the labels say so
        peers = ", ".join(f"{k} {_fmt(v)} MiB" for k, v in pr["peers_mb"].items())
        lines.append(f"- Peak RSS: engine {_fmt(pr['engine_mb'])} MiB vs {peers} "
                     f"({'no higher than the peers' if pr['met'] else 'higher than a peer'}).")
    if sources:
        label = ", ".join(sorted(sources))
        what = (f"the process's share of the energy of a {pt['short']}-token prompt + {s['decode_tokens']}-token "
                "generation, per generated token")
        if any("estimate" in x for x in sources):
            lines.append(f"- Energy: {label}: CPU time × a device profile's power, an estimate, not a measurement; "
                         f"mJ/token is {what}.")
        else:
            lines.append(f"- Energy: {label}; mJ/token is {what}.")
    la = doc["load"]["before"]["loadavg_1_5_15"]
    other = max((r["median"].get("other_cpu_share") or 0.0) for r in doc["results"] if r["status"] == "ok") \
        if any(r["status"] == "ok" for r in doc["results"]) else 0.0
    lines.append(f"- Conditions: load average {la[0]}, {la[1]}, {la[2]} when the run started; other programs used "
                 f"at most {other * 100:.0f}% of the CPUs while a runtime was being measured"
                 + (" (numbers may be low: the machine was shared)." if other > 0.05 else "."))
    return "\n".join(lines) + "\n"


def write_results(doc: dict[str, Any], out_dir: Path, host: str | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    host = host or doc["host"]["hostname"]
    json_path = out_dir / f"throughput-{host}.json"
    md_path = out_dir / f"throughput-{host}.md"
    # whole or not at all: an interrupted write left half a results file where the committed one was
    write_text_whole(json_path, json.dumps(doc, indent=1) + "\n")
    write_text_whole(md_path, render_markdown(doc))
    return json_path, md_path


# --------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from edge_runtime.cli.bench import add_throughput_arguments

    from edge_runtime.config import refuse_abbreviations

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_throughput_arguments(parser)
    return refuse_abbreviations(parser)  # `--rep 3` must not become --repetitions and overwrite the committed results


def _bundles_by_label(pairs: Sequence[tuple[str, Path]] | None) -> dict[str, Path] | None:
    """--bundle LABEL=DIR, each label once: a repeated one would silently replace the earlier bundle."""
    if not pairs:
        return None
    out: dict[str, Path] = {}
    for label, path in pairs:
        if label in out:
            from edge_runtime.errors import ConfigError

            raise ConfigError(f"label {label!r} is given twice ({out[label]} and {path})", field="--bundle")
        out[label] = path
    return out


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed flags (``edge-runtime bench throughput`` lands here too); print the table."""
    peers = [] if args.peers.strip().lower() == "none" else list(dict.fromkeys(p.strip() for p in args.peers.split(",") if p.strip()))
    unknown = sorted(set(peers) - set(PEER_NAMES))
    if unknown:
        from edge_runtime.errors import ConfigError

        raise ConfigError(f"unknown peer(s): {', '.join(unknown)} (known: {', '.join(PEER_NAMES)}, or none)", field="peers")
    log: Callable[[str], None] = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    doc = run_benchmark(
        threads=args.threads, repetitions=args.repetitions, warmup=args.warmup,
        load_repetitions=args.load_repetitions, rounds=args.rounds, decode_tokens=args.decode_tokens,
        short_tokens=args.short_tokens, long_tokens=args.long_tokens,
        bundles=_bundles_by_label(args.bundle), peers=peers,
        setup_peers=not args.no_peer_setup, max_other_cpu=args.max_other_cpu, noisy_retries=args.noisy_retries,
        idle_wait_s=args.idle_wait, log=log,
    )
    json_path, md_path = write_results(doc, args.out_dir or ROOT / "benchmarks" / "results", args.host)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print()
        print(render_markdown(doc))
        print(f"wrote {json_path} and {md_path}")
    # a runtime that failed or was skipped leaves its row out: the run is written, but it did not succeed
    missing = [r["label"] for r in doc["results"] if r["status"] != "ok"]
    if missing:
        print(f"not measured: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    from benchmarks._entry import run_main

    sys.exit(run_main(main, "throughput.py"))
