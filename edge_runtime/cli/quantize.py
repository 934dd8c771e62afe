"""``edge-runtime quantize SOURCE --out DIR --precision {fp32,int8,int4}``."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="build a verified ONNX bundle from a GGUF file, a Hugging Face directory or a known model")
    p.add_argument("source", help="known model name, GGUF file or Hugging Face model directory")
    p.add_argument("--out", help="bundle directory to create (default for known models: <cache>/bundles/NAME-PRECISION, "
                                 "with -offsets, -sym, -norescore, -rescoreK, -bsN or -mlpN for those variants)")
    p.add_argument("--precision", choices=("fp32", "int8", "int4"), default="int4", help="weight precision (default int4)")
    # default None, not 32: fp32 refuses the flag whatever its value, so the build must see whether it was given
    p.add_argument("--block-size", type=int, default=None,
                   help="int8/int4: quantization block size along the input dimension: a power of two from 16 to 256 "
                        "(default 32)")
    p.add_argument("--mlp-block-size", type=int, default=None, metavar="N",
                   help="int4: block size of the MLP projections (gate/up, down), default --block-size; 64 decodes "
                        "faster at some loss of quality (the README's Block sizes)")
    p.add_argument("--max-ppl-ratio", type=float, default=1.25,
                   help="fail (and keep nothing) if quantized perplexity / fp32 perplexity exceeds this (default 1.25)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--int4-offsets", action="store_true",
                        help="int4 with a float offset per block instead of integer zero points: reproduces a GGUF "
                             "Q4_1 source exactly, at a cost in decode speed (the README's throughput table)")
    layout.add_argument("--int4-symmetric", action="store_true",
                        help="int4 with every zero point 8 (none stored), the scale chosen with calibration activations: "
                             "a few percent faster, more where the kernels pay for zero points, but it answered "
                             "fewer task questions (the README's Symmetric int4)")
    layout.add_argument("--int4-zero-points", action="store_true",
                        help="int4 with integer zero points chosen with calibration activations (the default)")
    p.add_argument("--rescore-top-k", type=int, default=None, metavar="K",
                   help="int4: recompute the output projection's K largest logits from its table plus a 4-bit code of "
                        "the table's error (default 32, or the known model's recipe; 0 = off)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--name", help="model name recorded in the manifest")
    p.add_argument("--json", action="store_true", help="print the manifest's quality report and sizes as JSON")
    p.set_defaults(func=_run)


class _Progress:
    """tqdm bars per build step, on a terminal only (tqdm comes with the export extra)."""

    def __init__(self) -> None:
        self.bar = None
        self.step = None

    def __call__(self, step: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if step != self.step:
            self.close()
            self.step = step
            self.bar = tqdm(total=total, desc=step, unit="layer" if step == "graph" else "step", file=sys.stderr, leave=False, disable=None)
        assert self.bar is not None
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run(args: argparse.Namespace) -> int:
    from ..errors import BuildError
    from ..cache import cache_dir
    from ..models import KNOWN_MODELS, default_bundle_dir, exists_as_named

    try:
        from quantize import build_bundle
    except ImportError as err:
        raise BuildError(f"building bundles needs the export extra (pip install 'edge-runtime[export]'): {err}") from err
    if args.int4_zero_points and args.precision != "int4":  # as --int4-offsets is: a layout of int4 only
        raise BuildError(f"--int4-zero-points is an int4 layout; --precision is {args.precision}")
    out = args.out
    if out is None:
        if args.source not in KNOWN_MODELS:
            raise BuildError("--out is required unless SOURCE is a known model name")
        if exists_as_named(args.source):
            # the build would read the directory but write the known model's cached bundle, which every later
            # `generate NAME` and daemon then loads
            raise BuildError(f"./{args.source} is in the working directory and {args.source} is also a known model: "
                             f"give --out to build the directory, or run from another directory to build the known model")
        out = default_bundle_dir(args.source, args.precision)
        # a variant's default home is its own, not the default bundle's (which --force would replace)
        if args.int4_offsets or args.int4_symmetric:
            out = out.with_name(out.name + ("-offsets" if args.int4_offsets else "-sym"))
        if args.rescore_top_k is not None and args.precision == "int4":  # with --int4-offsets too
            out = out.with_name(out.name + ("-norescore" if args.rescore_top_k == 0 else f"-rescore{args.rescore_top_k}"))
        if args.block_size not in (None, 32) and args.precision != "fp32":
            out = out.with_name(out.name + f"-bs{args.block_size}")
        if args.mlp_block_size is not None and args.precision == "int4":
            out = out.with_name(out.name + f"-mlp{args.mlp_block_size}")
        # the cache's own error when it cannot be made: the fault is EDGE_RUNTIME_CACHE's, not --out's (not given)
        cache_dir("bundles")
    progress = _Progress()
    try:  # SIGTERM unwinds through here too (see cli.main): the staging directory is removed on the way out
        report = build_bundle(args.source, out, precision=args.precision, block_size=args.block_size,
                              mlp_block_size=args.mlp_block_size,
                              max_ppl_ratio=args.max_ppl_ratio, force=args.force, name=args.name,
                              int4_offsets=args.int4_offsets, int4_symmetric=args.int4_symmetric,
                              rescore_top_k=args.rescore_top_k, progress=progress)
    finally:
        progress.close()
    q = report.quality
    if args.json:
        print(json.dumps({"bundle": str(report.out), "size_bytes": report.size_bytes, "quality": q}, indent=2))
    else:
        print(f"bundle: {report.out}")
        print(f"size: {report.size_bytes / 1e6:.1f} MB")
        print(f"quality on {q['sample']} ({q['sample_tokens']} tokens): perplexity fp32 {q['ppl_fp32']:.3f}, "
              f"{q['precision']} {q['ppl_bundle']:.3f} (ratio {q['ppl_ratio']:.3f}, limit {q['max_ppl_ratio']}), "
              f"top-1 agreement {q['top1_agreement']:.1%}")
    return 0
