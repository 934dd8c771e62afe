"""Record the size and quality of the default models' bundles against the issue's targets.

    python benchmarks/bundles.py [--build]

Reads the manifests of the cached bundles (``edge-runtime quantize NAME
--precision P`` builds them; ``--build`` builds the missing ones) and writes
``benchmarks/results/bundles-<host>.json`` and ``.md``: file sizes, the source
GGUF size, the perplexity ratio and top-1 agreement measured at build time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime._files import write_text_whole  # noqa: E402
from edge_runtime.bundle import load_manifest  # noqa: E402
from edge_runtime.cli.bench import _out_dir, host_name  # noqa: E402
from edge_runtime.errors import BundleError  # noqa: E402
from edge_runtime.models import KNOWN_MODELS, default_bundle_dir  # noqa: E402

# (model, precision) -> size target in bytes (issue: model bundles)
TARGETS = {
    ("smollm2-135m-instruct", "int4"): 110e6,
    ("qwen2.5-coder-0.5b-instruct", "int4"): 450e6,
}
VARIANTS = [
    ("smollm2-135m-instruct", "fp32", ""), ("smollm2-135m-instruct", "int8", ""), ("smollm2-135m-instruct", "int4", ""),
    ("smollm2-135m-instruct", "int4", "-offsets"), ("smollm2-135m-instruct", "int4", "-mlp64"),
    ("qwen2.5-coder-0.5b-instruct", "int4", ""),
    ("qwen2.5-coder-0.5b-instruct", "int4", "-offsets"),
]


def collect(build: bool = False) -> list[dict[str, Any]]:
    rows = []
    for name, precision, suffix in VARIANTS:
        path = Path(str(default_bundle_dir(name, precision)) + suffix)
        try:
            manifest = load_manifest(path)
        except BundleError:
            if not build or suffix:
                rows.append({"model": name, "precision": precision + suffix, "bundle": str(path), "missing": True})
                continue
            from quantize import build_bundle

            build_bundle(name, path, precision=precision, force=True)
            manifest = load_manifest(path)
        raw = manifest.raw
        size = sum(int(f["size"]) for f in raw["files"].values())
        target = TARGETS.get((name, precision)) if not suffix else None
        q = raw.get("quality", {})
        rows.append({
            "model": name, "precision": precision + suffix, "bundle": str(path), "size_bytes": size,
            "source_gguf_bytes": KNOWN_MODELS[name].size, "target_bytes": target,
            "meets_target": None if target is None else size <= target,
            "ppl_fp32": q.get("ppl_fp32"), "ppl_bundle": q.get("ppl_bundle"), "ppl_ratio": q.get("ppl_ratio"),
            "top1_agreement": q.get("top1_agreement"), "int4_offsets": raw["quantization"].get("int4_offsets"),
            "int4_symmetric": raw["quantization"].get("int4_symmetric"),
            "rescore_top_k": raw["quantization"].get("rescore_top_k"),
            "block_size": raw["quantization"].get("block_size"), "mlp_block_size": raw["quantization"].get("mlp_block_size"),
            "built_with": raw.get("tools", {}),
        })
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | precision | bundle MB | GGUF MB | target MB | ppl ratio vs fp32 | top-1 agreement |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['model']} | {r['precision']} | not built | | | | |")
            continue
        target = "" if r["target_bytes"] is None else f"≤ {r['target_bytes'] / 1e6:.0f} ({'met' if r['meets_target'] else 'NOT met'})"
        lines.append(f"| {r['model']} | {r['precision']} | {r['size_bytes'] / 1e6:.1f} | {r['source_gguf_bytes'] / 1e6:.1f} | {target} | "
                     f"{r['ppl_ratio']:.3f} | {r['top1_agreement']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="build missing default bundles first")
    # checked as the flags are read (a file as --out was a traceback), and named as the other benchmarks' results
    ap.add_argument("--out", type=_out_dir, default=Path(__file__).resolve().parent / "results",
                    help="results directory (default: benchmarks/results, where the committed results are)")
    ap.add_argument("--host", type=host_name, default=platform.node() or "host",
                    help="name for this machine in the results file names (default: its hostname)")
    args = ap.parse_args(argv)
    rows = collect(args.build)
    host = args.host
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_whole(out / f"bundles-{host}.json", json.dumps({"host": host, "bundles": rows}, indent=2) + "\n")
    table = render(rows)
    write_text_whole(out / f"bundles-{host}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    from benchmarks._entry import run_main

    sys.exit(run_main(main, "bundles.py"))
