"""Decode-step benchmark: this engine's graph against onnxruntime-genai's, in one process, and the engine's loop.

The throughput benchmark compares whole runtimes, each in its own process with
its own loop around the model. This one takes them apart, to say where a gap
in decode speed comes from:

* ``engine graph``: one decode step of the engine's bundle through its KV
  cache (IO binding, the cache bound in place), with only an argmax between
  steps;
* ``genai graph``: one decode step of the model onnxruntime-genai's builder
  made, run by this process's onnxruntime with the engine's session options
  and the same in-place KV buffers (past and present share one buffer, as
  genai runs it);
* ``engine loop``: :meth:`Engine.run` decoding the same prompt, which adds
  the per-token Python work (sampling, the logprob/entropy/margin signals over
  the whole vocabulary, detokenization, stop matching).
* ``engine graph, no rescoring``: the bare step of the same model built with
  ``--rescore-top-k 0`` (``<cache>/bundles/<model>-int4-norescore``, when it
  exists, or ``--no-rescore-bundle DIR``), whose output projection is left in
  4 bits: what the default bundle's top-k rescoring costs per step.
* ``graph LABEL`` (``--compare LABEL=DIR``, repeatable): the bare step of
  another build of the same model, e.g. one with ``--mlp-block-size 32``;
  the summary gives its speed relative to the engine's graph, also paired
  round by round.

All three run alternately in one process for several rounds (the order
rotates), each round ``--steps`` greedy steps after the same prompt; reported
are the mean milliseconds per step of each round and their median over rounds.
``loop_overhead_ms`` is engine loop minus engine graph (medians);
``loop_overhead_paired_ms`` the median of the rounds' own differences, which
the host's drift between rounds disturbs less. The engine graph's
greedy tokens must equal the engine loop's (``tokens_match``).

    python benchmarks/decode_step.py [--rounds 6] [--steps 128] [--threads N] [--genai-model DIR|none]
                                     [--no-rescore-bundle DIR|none] [--compare LABEL=DIR ...]

Writes ``benchmarks/results/decode-step-<host>.json`` and prints a summary.
The genai model is the one the throughput benchmark builds under
``<cache>/peers``; without it the genai rows are skipped and say why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.throughput import MODEL, host_info, make_prompts
from edge_runtime._files import write_text_whole

__all__ = ["GenaiStepper", "run_benchmark", "main"]

SCHEMA_VERSION = 1
SHORT_PROMPT_TOKENS = 20


class EngineStepper:
    """Bare decode steps of the engine's own graph, through its KV cache."""

    def __init__(self, engine: Any, capacity: int) -> None:
        self.engine = engine
        self.capacity = capacity

    def run(self, ids: list[int], steps: int) -> tuple[list[float], list[int]]:
        cache = self.engine.model.new_cache(self.capacity)
        token = int(np.argmax(cache.prefill(ids)[-1]))
        times_s, tokens = [], [token]
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            logits = cache.step(token)
            times_s.append(time.perf_counter() - t0)
            token = int(np.argmax(logits))
            tokens.append(token)
        return times_s, tokens


class GenaiStepper:
    """Bare decode steps of a model made by onnxruntime-genai's builder, run by this onnxruntime."""

    def __init__(self, model_dir: Path, threads: int, capacity: int) -> None:
        import onnxruntime as ort

        from edge_runtime.engine._session import session_options

        config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.layers = int(config["num_hidden_layers"])
        self.kv_heads = int(config["num_key_value_heads"])
        self.head_size = int(config["head_size"])
        self.names = config["inputs"], config["outputs"]
        self.capacity = capacity
        self._ort = ort
        self.session = ort.InferenceSession(str(model_dir / config["filename"]), session_options(threads),
                                            providers=["CPUExecutionProvider"])

    def _binding(self) -> Any:
        inputs, outputs = self.names
        binding = self.session.io_binding()
        for layer in range(self.layers):
            for past, present in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names")):
                buf = np.zeros((1, self.kv_heads, self.capacity, self.head_size), np.float32)
                value = self._ort.OrtValue.ortvalue_from_numpy(buf)
                binding.bind_ortvalue_input(inputs[past] % layer, value)
                binding.bind_ortvalue_output(outputs[present] % layer, value)
        return binding

    def run(self, ids: list[int], steps: int) -> tuple[list[float], list[int]]:
        inputs, outputs = self.names
        binding = self._binding()
        binding.bind_cpu_input(inputs["input_ids"], np.asarray([ids], np.int64))
        binding.bind_cpu_input(inputs["attention_mask"], np.ones((1, len(ids)), np.int64))
        vocab = self.session.get_outputs()[0].shape[-1]
        prompt_logits = np.zeros((1, len(ids), vocab), np.float32)
        binding.bind_ortvalue_output(outputs["logits"], self._ort.OrtValue.ortvalue_from_numpy(prompt_logits))
        self.session.run_with_iobinding(binding)
        token = int(np.argmax(prompt_logits[0, -1]))
        step_ids = np.zeros((1, 1), np.int64)
        logits = np.zeros((1, 1, vocab), np.float32)
        binding.bind_cpu_input(inputs["input_ids"], step_ids)
        binding.bind_ortvalue_output(outputs["logits"], self._ort.OrtValue.ortvalue_from_numpy(logits))
        times_s, tokens = [], [token]
        for i in range(steps - 1):
            step_ids[0, 0] = token
            # genai's graph reads the positions and the total length from the mask's width
            binding.bind_cpu_input(inputs["attention_mask"], np.ones((1, len(ids) + i + 1), np.int64))
            t0 = time.perf_counter()
            self.session.run_with_iobinding(binding)
            times_s.append(time.perf_counter() - t0)
            token = int(np.argmax(logits[0, 0]))
            tokens.append(token)
        return times_s, tokens


def _engine_loop(engine: Any, capacity: int) -> Callable[[list[int], int], tuple[list[float], list[int]]]:
    from edge_runtime.engine import SamplingParams

    def run(ids: list[int], steps: int) -> tuple[list[float], list[int]]:
        cache = engine.model.new_cache(capacity)
        result = None
        for chunk in engine.run(cache, ids, SamplingParams(max_new_tokens=steps, temperature=0.0), lambda: False):
            result = chunk.result or result
        assert result is not None
        n = len(result.token_ids)
        # one mean per-step time: decode_ms spans first to last token, as the throughput benchmark's
        per_step_s = result.timings.decode_ms / 1000.0 / max(1, n - 1)
        return [per_step_s] * max(1, n - 1), list(result.token_ids)

    return run


NO_RESCORE = "engine graph, no rescoring"


def run_benchmark(
    bundle: Path,
    genai_model: Path | None,
    *,
    no_rescore_bundle: Path | None = None,
    compare: Sequence[tuple[str, Path]] = (),
    threads: int,
    rounds: int = 6,
    steps: int = 128,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Alternate the three measurements for ``rounds`` rounds; return the results document."""
    import onnxruntime

    from edge_runtime.engine import Engine

    engine = Engine(bundle, intra_op_threads=threads, energy_meter=None)
    ids = make_prompts(engine.manifest.tokenizer_file, engine.bos_token_id, SHORT_PROMPT_TOKENS,
                       SHORT_PROMPT_TOKENS)["short"]
    capacity = len(ids) + steps + 1
    runners: dict[str, Callable[[list[int], int], tuple[list[float], list[int]]]] = {
        "engine graph": EngineStepper(engine, capacity).run,
        "engine loop": _engine_loop(engine, capacity),
    }
    skipped: dict[str, str] = {}
    if genai_model is None:
        skipped["genai graph"] = "not asked for (--genai-model none)"
    elif not (genai_model / "genai_config.json").is_file():
        skipped["genai graph"] = f"no genai model in {genai_model} (the throughput benchmark builds it)"
    else:
        runners["genai graph"] = GenaiStepper(genai_model, threads, capacity).run
    if no_rescore_bundle is None:
        skipped[NO_RESCORE] = "no bundle built with --rescore-top-k 0"
    elif not (no_rescore_bundle / "manifest.json").is_file():
        skipped[NO_RESCORE] = f"no bundle in {no_rescore_bundle}"
    else:
        plain = Engine(no_rescore_bundle, intra_op_threads=threads, energy_meter=None)
        if plain.manifest.raw.get("quantization", {}).get("rescore_top_k"):
            raise SystemExit(f"{no_rescore_bundle} rescores its logits: build it with --rescore-top-k 0")
        runners[NO_RESCORE] = EngineStepper(plain, capacity).run
    others = {}
    for label, path in compare:
        other = Engine(path, intra_op_threads=threads, energy_meter=None)
        if other.manifest.name != engine.manifest.name:
            raise SystemExit(f"--compare {label}: {path} is {other.manifest.name}, not {engine.manifest.name}")
        others[label] = {"bundle": str(path), "bundle_hash": other.bundle_hash,
                         "quantization": {k: other.manifest.raw["quantization"].get(k)
                                          for k in ("block_size", "mlp_block_size", "rescore_top_k", "int4_offsets",
                                                    "int4_symmetric")}}
        runners[f"graph {label}"] = EngineStepper(other, capacity).run
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")

    names = list(runners)
    for name in names:  # warm-up: first runs allocate and page the weights in
        runners[name](ids, min(steps, 8))
    per_round: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times_s, toks = runners[name](ids, steps)
            per_round[name].append(1000.0 * statistics.fmean(times_s))
            tokens[name] = toks
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.3f} ms" for n in names))

    median = {name: statistics.median(values) for name, values in per_round.items()}
    summary: dict[str, Any] = {
        "engine_graph_ms": median["engine graph"],
        "engine_loop_ms": median["engine loop"],
        "loop_overhead_ms": median["engine loop"] - median["engine graph"],
        "loop_overhead_share": (median["engine loop"] - median["engine graph"]) / median["engine loop"],
        "loop_overhead_paired_ms": statistics.median(
            a - b for a, b in zip(per_round["engine loop"], per_round["engine graph"])),
        "tokens_match": tokens["engine graph"] == tokens["engine loop"][:len(tokens["engine graph"])],
        "engine_loop_tokens": len(tokens["engine loop"]),
        "first_tokens": {name: toks[:16] for name, toks in tokens.items()},
    }
    if NO_RESCORE in median:
        # what the default bundle's top-k rescoring of the logits costs per step
        summary["no_rescore_graph_ms"] = median[NO_RESCORE]
        summary["rescoring_ms"] = median["engine graph"] - median[NO_RESCORE]
        summary["rescoring_paired_ms"] = statistics.median(
            a - b for a, b in zip(per_round["engine graph"], per_round[NO_RESCORE]))
    if others:
        # > 1: the engine's graph steps faster than the compared build's
        summary["compare"] = {label: {
            **info, "graph_ms": median[f"graph {label}"],
            "engine_speed_ratio": median[f"graph {label}"] / median["engine graph"],
            "engine_speed_ratio_paired": statistics.median(
                b / a for a, b in zip(per_round["engine graph"], per_round[f"graph {label}"])),
        } for label, info in others.items()}
    if "genai graph" in median:
        summary["genai_graph_ms"] = median["genai graph"]
        # > 1: the engine's graph steps faster than genai's
        summary["graph_speed_ratio_vs_genai"] = median["genai graph"] / median["engine graph"]
        summary["engine_loop_speed_ratio_vs_genai_graph"] = median["genai graph"] / median["engine loop"]
    return {
        "benchmark": "decode-step",
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(threads),
        "settings": {"bundle": str(bundle), "bundle_hash": engine.bundle_hash, "genai_model": str(genai_model),
                     "no_rescore_bundle": str(no_rescore_bundle),
                     "threads": threads, "rounds": rounds, "steps": steps, "prompt_tokens": len(ids)},
        "versions": {"onnxruntime": onnxruntime.__version__},
        "skipped": skipped,
        "per_round_ms": per_round,
        "median_ms": median,
        "summary": summary,
    }


def build_parser() -> argparse.ArgumentParser:
    from edge_runtime.cli.bench import _int_at_least, _out_dir, host_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help=f"engine bundle (default: the int4 {MODEL} bundle)")
    parser.add_argument("--genai-model", default=None,
                        help="onnxruntime-genai model directory, or 'none' (default: the throughput benchmark's)")
    parser.add_argument("--no-rescore-bundle", default=None,
                        help=f"the same model built with --rescore-top-k 0, or 'none' (default: "
                             f"<cache>/bundles/{MODEL}-int4-norescore when it exists)")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR",
                        help="also step another build of the same model (repeatable), e.g. one built with "
                             "--mlp-block-size 32")
    parser.add_argument("--threads", type=_int_at_least(1), default=None,
                        help="intra-op threads (default: physical cores)")
    parser.add_argument("--rounds", type=_int_at_least(1), default=6)
    parser.add_argument("--steps", type=_int_at_least(2), default=128, help="greedy tokens per measurement")
    # checked (and made) before measuring: a bad one would lose the run at its end
    parser.add_argument("--out-dir", type=_out_dir, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--host", type=host_name, default=socket.gethostname(),
                        help="results file name: decode-step-<host>.json (default: the hostname)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from edge_runtime.engine._session import default_threads
    from edge_runtime.models import default_bundle_dir

    from benchmarks.peers.envs import peers_dir

    from edge_runtime.cli.bench import check_bundle_given

    parser = build_parser()
    args = parser.parse_args(argv)
    bundle = args.bundle or default_bundle_dir(MODEL, "int4")
    check_bundle_given(parser, Path(bundle), "int4")
    if args.genai_model is None:
        genai = peers_dir() / f"genai-{MODEL}-int4"
    else:
        genai = None if args.genai_model.strip().lower() == "none" else Path(args.genai_model)
    if args.no_rescore_bundle is None:
        plain = default_bundle_dir(MODEL, "int4-norescore")
    else:
        plain = None if args.no_rescore_bundle.strip().lower() == "none" else Path(args.no_rescore_bundle)
    compare = []
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--compare takes LABEL=DIR, got {item!r}")
        if any(label == seen for seen, _ in compare):  # the later one would silently replace the earlier
            raise SystemExit(f"--compare: the label {label!r} is given twice")
        compare.append((label, Path(path).expanduser()))
    doc = run_benchmark(bundle, genai, no_rescore_bundle=plain, compare=compare, threads=args.threads or default_threads(),
                        rounds=args.rounds, steps=args.steps)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"decode-step-{args.host}.json"
    write_text_whole(path, json.dumps(doc, indent=1) + "\n")  # never half a results file
    s = doc["summary"]
    print(f"engine graph {s['engine_graph_ms']:.3f} ms/step, engine loop {s['engine_loop_ms']:.3f} ms/token "
          f"(Python work {s['loop_overhead_ms']:.3f} ms, {100 * s['loop_overhead_share']:.1f}%; "
          f"paired by round: {s['loop_overhead_paired_ms']:.3f} ms), "
          f"tokens match: {s['tokens_match']}")
    if "genai_graph_ms" in s:
        print(f"genai graph {s['genai_graph_ms']:.3f} ms/step: the engine's graph steps at "
              f"{s['graph_speed_ratio_vs_genai']:.3f}x genai's, its whole loop at "
              f"{s['engine_loop_speed_ratio_vs_genai_graph']:.3f}x genai's bare graph")
    if "rescoring_ms" in s:
        print(f"without rescoring {s['no_rescore_graph_ms']:.3f} ms/step: the top-k rescoring costs "
              f"{s['rescoring_ms']:.3f} ms per step (paired by round: {s['rescoring_paired_ms']:.3f} ms)")
    for label, c in s.get("compare", {}).items():
        print(f"{label} {c['graph_ms']:.3f} ms/step: the engine's graph steps at {c['engine_speed_ratio']:.3f}x its speed "
              f"(paired by round: {c['engine_speed_ratio_paired']:.3f}x)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from benchmarks._entry import run_main

    sys.exit(run_main(main, "decode_step.py"))
