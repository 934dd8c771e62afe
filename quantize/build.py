"""From a GGUF file, a Hugging Face directory or a known model name to a verified bundle.

Steps: resolve the source (fetching a known model), load it with transformers,
build the fused ONNX graph at the requested precision, write the bundle into a
staging directory, measure quality against the fp32 PyTorch model on the text
sample shipped in ``quantize/data``, verify, and only then rename the staging
directory to the output. A quality ratio above ``max_ppl_ratio`` fails the
build and keeps nothing.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import SCHEMA_VERSION, sha256_file, verify_bundle
from edge_runtime.errors import BuildError, QualityGateError
from edge_runtime.models import KNOWN_MODELS, exists_as_named, fetch_model

from .calibrate import CALIBRATION_TEXT, input_importance
from .graph import IO_SCHEMA, build_graph
from .source import LoadedSource, load_source
from .writer import (
    check_free_space,
    check_replaceable,
    check_writable,
    hash_files,
    save_model_external,
    save_tokenizer,
    staging_dir,
    write_manifest,
)

__all__ = ["build_bundle", "BuildReport", "PRECISIONS", "QUALITY_SAMPLE", "Progress", "RESCORE_TOP_K"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "int4")
QUALITY_SAMPLE = Path(__file__).with_name("data") / "quality_sample.txt"
# an fp32 bundle's top-1 agreement with its source: float rounding flips a near-tie now and then, never more
FP32_MIN_TOP1_AGREEMENT = 0.95
_BYTES_PER_PARAM = {"fp32": 4.0, "int8": 1.2, "int4": 0.75}
# Default number of rescored logits: more than OpenAI's 20 top_logprobs, so every alternative a caller
# can ask for is rescored. SmolLM2-135M (zero points, rows from an exact 8-bit table, simulated):
# perplexity ratio 1.077 / 1.077 / 1.073 with 8 / 32 / 64, 1.105 without.
RESCORE_TOP_K = 32
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256
DEFAULT_BLOCK_SIZE = 32
MAX_RESCORE_TOP_K = 1024

# progress(step, done, total): step names the phase, done/total count its units
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BuildReport:
    out: Path
    manifest: dict[str, Any]

    @property
    def quality(self) -> dict[str, Any]:
        return dict(self.manifest["quality"])

    @property
    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"].values())


def _tool_versions() -> dict[str, str]:
    out = {}
    for dist in ("edge-runtime", "onnx", "onnxruntime", "torch", "transformers", "gguf", "numpy", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _resolve(source: str | os.PathLike[str], progress: Progress) -> tuple[Path, str | None]:
    text = str(source)
    # an existing path wins over a known name, as in resolve_bundle: what the user points at is what is built
    if text in KNOWN_MODELS and not exists_as_named(text):
        path = fetch_model(text, progress=lambda msg: progress(f"fetch: {msg}", 0, 1))
        return path, text
    return Path(text).expanduser(), None


def _reference_logits(src: LoadedSource, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return src.model(torch.tensor([ids])).logits[0].float().numpy()


def _quality(bundle_dir: Path, src: LoadedSource, precision: str, max_ppl_ratio: float) -> dict[str, Any]:
    """Perplexity of fp32 (PyTorch) and of the built bundle on the shipped sample, and top-1 agreement."""
    from edge_runtime.engine import Engine
    from edge_runtime.engine._sampling import log_softmax

    text = QUALITY_SAMPLE.read_text(encoding="utf-8")
    ids = src.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[: min(len(ids), src.spec.context_length)]
    ref = _reference_logits(src, ids)
    lp = log_softmax(ref[:-1])
    ref_nll = float(-lp[np.arange(len(ids) - 1), ids[1:]].mean())
    engine = Engine(bundle_dir, verify="none", energy_meter=None)
    try:
        scored = engine.score(token_ids=ids)
    finally:
        engine.close()
    ppl_fp32 = float(np.exp(ref_nll))
    ppl_q = scored.perplexity
    agreement = float((scored.top1 == ref[:-1].argmax(-1)).mean())
    return {
        "sample": QUALITY_SAMPLE.name,
        "sample_tokens": len(ids),
        "ppl_fp32": round(ppl_fp32, 4),
        "ppl_bundle": round(ppl_q, 4),
        "ppl_ratio": round(ppl_q / ppl_fp32, 4),
        "top1_agreement": round(agreement, 4),
        "max_ppl_ratio": max_ppl_ratio,
        "precision": precision,
    }


def build_bundle(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    precision: str = "int4",
    block_size: int | None = None,
    mlp_block_size: int | None = None,
    max_ppl_ratio: float = 1.25,
    force: bool = False,
    accuracy_level: int = 4,
    int4_offsets: bool = False,
    int4_symmetric: bool = False,
    rescore_top_k: int | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> BuildReport:
    """Build and verify a bundle at ``out``; raise BuildError (nothing left at ``out``) on any failure.

    int4 blocks get integer zero points, chosen with per-channel activation
    weights measured on ``quantize/data/calibration.txt`` (the layout
    onnxruntime decodes fastest); ``int4_offsets=True`` gives each block a
    float offset instead, which reproduces a GGUF Q4_1 source exactly at about
    70% of the decode speed (see ``quantize.quant``); ``int4_symmetric=True``
    fixes every zero point at the kernels' default 8 (none stored; the same
    calibrated search over the scale alone): a few percent faster, more on
    a CPU whose kernels pay for zero points, at a loss of quality and task
    accuracy (the README's *Symmetric int4*).

    ``rescore_top_k`` (int4): the output projection's ``rescore_top_k`` largest
    logits are recomputed from the 4-bit table plus a 4-bit code of its error
    (see ``quantize.graph``); 0 keeps only the 4-bit table. None: a known
    model's recipe, else ``RESCORE_TOP_K``.

    ``block_size`` (int8/int4; None: ``DEFAULT_BLOCK_SIZE``, 32): blocks along K of every projection, unless
    ``mlp_block_size`` (int4; None: ``block_size``) gives the MLP's (gate/up
    and down) their own: larger blocks there decode faster at some loss of
    quality (the README's *Block sizes*).
    """
    if precision not in PRECISIONS:
        raise BuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for flag, size in (("--block-size", block_size), ("--mlp-block-size", mlp_block_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)
                                 or not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE or size & (size - 1)):
            # past a few hundred, padding each row to a whole block multiplies the file (65536: 0.1 MB -> 88 MB)
            raise BuildError(f"{flag} must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, got {size!r}")
    if not math.isfinite(max_ppl_ratio) or max_ppl_ratio < 1.0:  # NaN would pass every bundle
        raise BuildError(f"--max-ppl-ratio must be a number >= 1.0, got {max_ppl_ratio}")
    if rescore_top_k is not None and not 0 <= rescore_top_k <= MAX_RESCORE_TOP_K:
        raise BuildError(f"--rescore-top-k must be between 0 and {MAX_RESCORE_TOP_K}, got {rescore_top_k}")
    if int4_offsets and int4_symmetric:
        raise BuildError("--int4-offsets and --int4-symmetric are two different int4 layouts: choose one")
    # fp32 has no blocks: the flag did nothing, and said so nowhere. Any size given counts, 32 too (None: not given):
    # `--block-size 32 --precision fp32` was built silently while 64 was refused
    if precision == "fp32" and block_size is not None:
        raise BuildError(f"--block-size applies to int8 and int4 bundles only, not --precision {precision}")
    if precision != "int4" and (int4_offsets or int4_symmetric or rescore_top_k or mlp_block_size is not None):
        flag = ("--int4-offsets" if int4_offsets else "--int4-symmetric" if int4_symmetric
                else "--rescore-top-k" if rescore_top_k else "--mlp-block-size")
        raise BuildError(f"{flag} applies to int4 bundles only, not --precision {precision}")
    out_path = Path(out).expanduser().absolute()
    check_replaceable(out_path, force=force)
    check_writable(out_path)
    say: Progress = progress or (lambda step, done, total: None)

    path, known = _resolve(source, say)
    if rescore_top_k is None:
        recipe = KNOWN_MODELS[known].rescore_top_k if known else None
        rescore_top_k = RESCORE_TOP_K if recipe is None else recipe
    rescore_top_k = rescore_top_k if precision == "int4" else 0
    # int(): a numpy integer would not go into the manifest's JSON
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    mlp_block_size = block_size if mlp_block_size is None else int(mlp_block_size)
    say("load", 0, 1)
    src = load_source(path)  # which checks the source first
    say("load", 1, 1)
    spec = src.spec
    # the graph rescores min(k, vocabulary) logits: the manifest records what it does
    rescore_top_k = min(rescore_top_k, spec.vocab_size)
    n_params = sum(p.numel() for p in src.model.parameters())
    check_free_space(out_path.parent, int(n_params * _BYTES_PER_PARAM[precision] * 1.1) + (64 << 20))

    with staging_dir(out_path, force=force) as tmp:
        importance, calibration = None, None
        if precision == "int4" and not int4_offsets:
            say("calibrate", 0, 1)
            importance, n_tokens = input_importance(src.model, src.tokenizer, CALIBRATION_TEXT.read_text(encoding="utf-8"))
            calibration = {"file": CALIBRATION_TEXT.name, "sha256": sha256_file(CALIBRATION_TEXT), "tokens": n_tokens}
            say("calibrate", 1, 1)
        say("graph", 0, spec.num_layers)
        model = build_graph(spec, src.weights, precision=precision, block_size=block_size, mlp_block_size=mlp_block_size,
                            accuracy_level=accuracy_level,
                            int4_offsets=int4_offsets, int4_symmetric=int4_symmetric, importance=importance,
                            rescore_top_k=rescore_top_k,
                            progress=lambda i: say("graph", i + 1, spec.num_layers))
        say("write", 0, 1)
        files = save_model_external(model, tmp)
        del model
        save_tokenizer(src.tokenizer, tmp / "tokenizer.json", add_bos_token=src.add_bos_token)
        files.append("tokenizer.json")
        tok = src.tokenizer
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": name or known or src.name,
            "architecture": spec.architecture,
            "io_schema": IO_SCHEMA,
            "model_file": "model.onnx",
            "tokenizer_file": "tokenizer.json",
            "model": {
                "num_layers": spec.num_layers,
                "hidden_size": spec.hidden_size,
                "intermediate_size": spec.intermediate_size,
                "num_heads": spec.num_heads,
                "num_kv_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim,
                "vocab_size": spec.vocab_size,
                "context_length": spec.context_length,
                "rms_norm_eps": spec.rms_norm_eps,
                "rope_theta": spec.rope_theta,
                "tie_word_embeddings": spec.tie_word_embeddings,
                "parameters": int(n_params),
            },
            "tokens": {
                "bos_token_id": src.bos_token_id,
                "bos_token": tok.convert_ids_to_tokens(src.bos_token_id) if src.bos_token_id is not None else None,
                "eos_token_ids": src.eos_token_ids,
                "eos_token": tok.convert_ids_to_tokens(src.eos_token_ids[0]) if src.eos_token_ids else None,
                "pad_token_id": src.pad_token_id,
                "add_bos_token": src.add_bos_token,
            },
            "chat_template": src.chat_template,
            "quantization": {
                "precision": precision,
                "block_size": block_size if precision != "fp32" else None,
                # the MLP projections' (gate/up, down); block_size is every other projection's
                "mlp_block_size": mlp_block_size if precision != "fp32" else None,
                "accuracy_level": accuracy_level if precision != "fp32" else None,
                "int4_offsets": int4_offsets if precision == "int4" else None,
                "int4_symmetric": int4_symmetric if precision == "int4" else None,
                "calibration": calibration,
                "rescore_top_k": rescore_top_k if precision == "int4" else None,
                "method": {
                    "fp32": "none",
                    "int8": "8-bit symmetric weight blocks along K; activations quantized per block at run time (MatMulNBits)",
                    "int4": ("4-bit weight blocks along K with a float offset per block (w = scale*(q-8) + offset)" if int4_offsets else
                             "4-bit symmetric weight blocks along K (w = scale*(q-8)), the scale per block minimizing the "
                             "error weighted by calibration activations" if int4_symmetric else
                             "4-bit asymmetric weight blocks along K with integer zero points, scale and zero point per block "
                             "minimizing the error weighted by calibration activations")
                            + (f"; blocks of {mlp_block_size} in the MLP projections, {block_size} in the others"
                               if mlp_block_size != block_size else "")
                            + "; activations quantized per block at run time (MatMulNBits)"
                            + (f"; the output projection's {rescore_top_k} largest logits recomputed from its table plus a "
                               "4-bit code of the table's error" if rescore_top_k else ""),
                }[precision],
            },
            "source": {"kind": src.kind, "file": Path(os.path.abspath(path)).name, "sha256": src.source_sha256, "known_model": known},
            "tools": _tool_versions(),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": hash_files(tmp, files),
        }
        write_manifest(tmp, manifest)
        say("write", 1, 1)
        say("quality", 0, 1)
        manifest["quality"] = quality = _quality(tmp, src, precision, max_ppl_ratio)
        say("quality", 1, 1)
        if not math.isfinite(quality["ppl_ratio"]):
            raise QualityGateError(
                f"the perplexity of the bundle ({quality['ppl_bundle']}) or of the fp32 model ({quality['ppl_fp32']}) "
                "is not a number: a weight is NaN or infinite, or a scale overflows fp16; nothing was kept")
        if quality["ppl_ratio"] > max_ppl_ratio:
            raise QualityGateError(
                f"quantized perplexity {quality['ppl_bundle']:.3f} is {quality['ppl_ratio']:.3f}x the fp32 {quality['ppl_fp32']:.3f}, "
                f"above --max-ppl-ratio {max_ppl_ratio}: nothing was kept"
            )
        if precision == "fp32" and quality["top1_agreement"] < FP32_MIN_TOP1_AGREEMENT:
            # the same weights in the same precision: only a graph that computes another model disagrees (a
            # perplexity ratio alone passed one at 0.94 with 4% agreement)
            raise QualityGateError(
                f"the fp32 bundle's most likely next token is the source model's at only {quality['top1_agreement']:.1%} "
                f"of the sample's positions (at least {FP32_MIN_TOP1_AGREEMENT:.0%} expected): the graph does not "
                "compute what the model does (a setting of its config this builder ignores?); nothing was kept")
        write_manifest(tmp, manifest)
        say("verify", 0, 1)
        verify_bundle(tmp, "full")
        say("verify", 1, 1)
    return BuildReport(out=out_path, manifest=manifest)
