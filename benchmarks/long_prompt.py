"""What a long prompt costs in memory, and what the process keeps after it.

    python benchmarks/long_prompt.py [--bundle DIR] [--tokens 1000 3000 6000] [--out FILE]

For each prompt length, a fresh process (so that each peak is its own) loads the
bundle (the cached SmolLM2-135M-Instruct int4 bundle unless ``--bundle``), answers
a raw prompt of that many tokens (repeated README text) with 4 greedy tokens,
then a short prompt. It reports the resident set size (MiB, from ``/proc``)
after loading, the peak while the long prompt ran, after it, and after the short
request; and the pooled KV cache's capacity after each. The KV cache takes
``2 × layers × kv_heads × head_dim × 4`` bytes per place; a request grows its
cache to its prompt plus ``max_new_tokens`` and the pool gives it back to
``cache_tokens`` places when the request ends.

Writes benchmarks/results/long-prompt-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._host import cpu_model  # noqa: E402
from benchmarks._entry import run_main  # noqa: E402
from edge_runtime._files import write_text_whole  # noqa: E402
from edge_runtime.cli.bench import _int_at_least, _out_file, check_bundle_given  # noqa: E402


def measure(bundle: str, tokens: int, threads: int | None, cache_tokens: int) -> dict[str, Any]:
    """One length, in this process (the parent runs each in a fresh one)."""
    from benchmarks.peers._harness import current_rss_mb, peak_rss_mb
    from edge_runtime.engine import Engine

    engine = Engine(bundle, intra_op_threads=threads, energy_meter=None, cache_tokens=cache_tokens)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = readme
    while len(ids := engine.encode(text)) < tokens:
        text += "\n" + readme
    ids = ids[: min(tokens, engine.context_length - 4)]
    per_place = 2 * engine.model.num_layers * engine.model.num_kv_heads * engine.model.head_dim * 4
    loaded = current_rss_mb()
    result = [c.result for c in engine.stream_tokens(ids, _params(4)) if c.result is not None][0]
    peak = peak_rss_mb()
    after = current_rss_mb()
    capacity_after = max(c.capacity for c in engine._pool)
    engine.generate("Hello", max_new_tokens=4)
    return {"prompt_tokens": len(ids), "completion_tokens": result.usage.completion_tokens,
            "kv_bytes_per_token": per_place,
            "rss_mib": {"after_load": round(loaded, 1), "peak": round(peak, 1), "after_long": round(after, 1),
                        "after_short": round(current_rss_mb(), 1)},
            "kv_capacity_after": capacity_after}


def _params(n: int) -> Any:
    from edge_runtime.engine import SamplingParams

    return SamplingParams(max_new_tokens=n)


def _default_bundle() -> str:
    from edge_runtime.models import resolve_bundle

    return str(resolve_bundle("smollm2-135m-instruct"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="bundle directory (default: the cached SmolLM2-135M-Instruct int4 bundle)")
    # checked as the flags are read: a 0 or a negative length failed in the child with a traceback (-5 sliced the
    # sample from its end), and a directory as --out only after every length was measured
    parser.add_argument("--tokens", type=_int_at_least(1), nargs="+", default=[1000, 3000, 6000], help="prompt lengths")
    parser.add_argument("--threads", type=_int_at_least(1), help="intra-op threads (default: the engine's)")
    parser.add_argument("--cache-tokens", type=_int_at_least(1), default=1024, help="[engine] cache_tokens (default 1024)")
    parser.add_argument("--out", type=_out_file,
                        default=ROOT / "benchmarks" / "results" / f"long-prompt-{socket.gethostname()}.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure this length, print JSON
    args = parser.parse_args(argv)
    bundle = args.bundle or _default_bundle()
    check_bundle_given(parser, Path(bundle), "int4")
    if args.one is not None:
        print(json.dumps(measure(bundle, args.one, args.threads, args.cache_tokens)))
        return 0
    runs = []
    for n in args.tokens:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--bundle", bundle, "--one", str(n),
               "--cache-tokens", str(args.cache_tokens)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{r['prompt_tokens']:>6} tokens: RSS after load {r['rss_mib']['after_load']} MiB, peak {r['rss_mib']['peak']}, "
              f"after {r['rss_mib']['after_long']}, after a short request {r['rss_mib']['after_short']} "
              f"(KV cache back to {r['kv_capacity_after']} places)")
    doc = {"benchmark": "long_prompt", "bundle": bundle, "cache_tokens": args.cache_tokens, "runs": runs,
           "host": {"hostname": socket.gethostname(), "cpu_model": cpu_model(), "machine": platform.machine(),
                    "logical_cpus": os.cpu_count()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # SIGTERM through the finally blocks: subprocess.run then stops its measuring child
    raise SystemExit(run_main(main, "long_prompt.py"))
