"""Build a decoder-only ONNX graph with fused onnxruntime kernels.

Why not optimum's exporter: it traces the PyTorch model into hundreds of small
ops per layer and returns a fresh KV cache every step. On a 2-core CPU a loop over
such a graph runs ~50-58 tok/s for SmolLM2-135M int4; the runtime we aim to beat
runs ~80-95. This builder writes the graph directly with onnxruntime's fused
contrib kernels, which is what onnxruntime-genai's model builder does too:

- ``GroupQueryAttention`` with rotary embedding inside, packed QKV and a KV
  cache of fixed capacity shared between ``past`` and ``present`` (the engine
  binds the same buffer to both, so nothing is copied per token);
- ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm in one kernel);
- ``MatMulNBits`` (4- or 8-bit block weights, activations quantized per block
  to int8 at run time: accuracy level 4) or ``MatMul`` (fp32);
- ``GatherBlockQuantized`` for a quantized embedding table that shares its
  bytes with a tied output projection;
- optionally ``TopK`` + ``GatherBlockQuantized`` + ``ScatterElements`` to
  recompute the largest logits from finer rows (``_rescored_logits``).

Inputs: ``input_ids`` [B, S] int64, ``seqlens_k`` [B] int32 (tokens in cache
after this step minus one), ``total_sequence_length`` [] int32,
``logits_index`` [N] int64 (which of the S positions get logits: the last one
while generating, all of them when scoring a text) and
``past_key_values.{i}.key|value`` [B, kv_heads, capacity, head_dim].
Outputs: ``logits`` [B, N, vocab] and ``present.{i}.key|value`` (same buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quant import BlockQuantized, quantize_blocks, quantize_int4_symmetric

__all__ = ["ModelSpec", "LayerWeights", "ModelWeights", "build_graph", "GRAPH_INPUTS", "IO_SCHEMA"]

# version of the graph's input/output contract, recorded in the manifest and checked by the engine
IO_SCHEMA = "edge-runtime-gqa-v1"
GRAPH_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")

MS_DOMAIN = "com.microsoft"
OPSET = 21


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    # rotary tables [context_length, head_dim/2], already multiplied by any attention scaling
    rope_cos: np.ndarray = field(repr=False)
    rope_sin: np.ndarray = field(repr=False)
    rope_theta: float = 10000.0


@dataclass
class LayerWeights:
    """One decoder layer, torch ``Linear`` layout ([out, in])."""

    attn_norm: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    mlp_norm: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None


@dataclass
class ModelWeights:
    embed: np.ndarray  # [vocab, hidden]
    final_norm: np.ndarray
    lm_head: np.ndarray | None  # [vocab, hidden]; None when tied to embed
    layers: Callable[[], Iterator[LayerWeights]]  # yields layers one at a time to bound peak memory


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def init(self, name: str, array: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def init_fp16(self, name: str, array: np.ndarray) -> str:
        """A float32 constant stored as float16 in the file (a Cast that onnxruntime folds at load).

        Scales and offsets are 1/8 of an int4 bundle's bytes in fp32; fp16 keeps
        their error far below the 4-bit step and the bundle within its size budget.
        """
        self.node("Cast", [self.init(f"{name}.fp16", np.asarray(array, np.float16))], [name], name=f"{name}/cast", to=TensorProto.FLOAT)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], *, name: str, domain: str = "", **attrs: object) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs


class _Linear:
    """Emits one projection at the bundle's precision; returns the output name."""

    def __init__(self, g: _Graph, precision: str, block_size: int, accuracy_level: int, *,
                 int4_offsets: bool = False, int4_symmetric: bool = False,
                 importance: Mapping[str, np.ndarray] | None = None) -> None:
        self.g = g
        self.int4_offsets = int4_offsets
        self.int4_symmetric = int4_symmetric
        self.importance = importance or {}
        self.precision = precision
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self._indicators: dict[tuple[int, int], str] = {}

    def __call__(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None, *,
                 block_size: int | None = None) -> str:
        """``block_size``: this projection's, when not the graph's default."""
        if self.precision == "fp32":
            out = f"{name}/out"
            w = self.g.init(f"{name}.weight", weight.T.astype(np.float32))
            self.g.node("MatMul", [x, w], [out if bias is None else f"{name}/mm"], name=name)
            if bias is not None:
                self.g.node("Add", [f"{name}/mm", self.g.init(f"{name}.bias", bias.astype(np.float32))], [out], name=f"{name}/bias")
            return out
        qw = quantize_blocks(weight, self.precision, block_size or self.block_size, offsets=self.int4_offsets,
                             importance=self.importance.get(name), symmetric=self.int4_symmetric)
        return self.quantized(x, qw, name, bias)

    def quantized(self, x: str, qw: BlockQuantized, name: str, bias: np.ndarray | None = None, *,
                  table: _Table | None = None) -> str:
        """``table``: a lookup table holding ``qw`` already (a tied output projection reads its bytes)."""
        g = self.g
        out = f"{name}/out"
        mm_out = out if qw.offsets is None else f"{name}/mm"
        zp = qw.packed_zero_points()
        if table is None:
            weight, scales = g.init(f"{name}.weight_q{qw.bits}", qw.packed), g.init_fp16(f"{name}.scales", qw.scales)
        else:  # the table's [N, n_blocks, 1] scales as MatMulNBits' [N, n_blocks] (folded at load)
            weight, scales = f"{table.prefix}.weight_q", f"{name}.scales"
            g.node("Reshape", [f"{table.prefix}.scales", g.init(f"{name}.scales_shape", np.array(qw.scales.shape, np.int64))],
                   [scales], name=f"{name}/scales")
        inputs = [x, weight, scales, "" if zp is None else g.init(f"{name}.zero_points", zp)]
        if bias is not None:
            inputs += ["", g.init(f"{name}.bias", bias.astype(np.float32))]
        g.node("MatMulNBits", inputs, [mm_out], name=name, domain=MS_DOMAIN,
               K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block_size, accuracy_level=self.accuracy_level)
        if qw.offsets is not None:
            # y += blocksum(x) @ offsets^T: the sum of x over each block of K, times one small [n_blocks, N] matrix
            g.node("MatMul", [x, self._indicator(qw.k, qw.block_size)], [f"{name}/blocksum"], name=f"{name}/blocksum")
            if table is None:
                offsets_t = g.init_fp16(f"{name}.offsets_t", qw.offsets.T)
            else:  # the table's [N, n_blocks, 1] offsets as [n_blocks, N] (folded at load)
                offsets_t = f"{name}.offsets_t"
                g.node("Transpose", [f"{table.prefix}.offsets"], [f"{name}.offsets_t3"], name=f"{name}/offsets_t3", perm=[2, 1, 0])
                g.node("Squeeze", [f"{name}.offsets_t3", g.init(f"{name}.offsets_axis", np.array([0], np.int64))], [offsets_t],
                       name=f"{name}/offsets_t")
            g.node("MatMul", [f"{name}/blocksum", offsets_t], [f"{name}/offset"], name=f"{name}/offset")
            g.node("Add", [mm_out, f"{name}/offset"], [out], name=f"{name}/add_offset")
        return out

    def _indicator(self, k: int, block_size: int) -> str:
        """[K, n_blocks] 0/1 matrix that sums each block of K (shared by projections of equal K)."""
        key = (k, block_size)
        if key not in self._indicators:
            n_blocks = -(-k // block_size)
            m = np.zeros((k, n_blocks), np.float32)
            m[np.arange(k), np.arange(k) // block_size] = 1.0
            self._indicators[key] = self.g.init(f"blocksum_indicator_{k}_{block_size}", m)
        return self._indicators[key]


@dataclass(frozen=True)
class _Table:
    """A block-quantized [rows, K] table in the graph: initializer names plus the numbers behind them."""

    prefix: str
    qw: BlockQuantized

    @classmethod
    def add(cls, g: _Graph, prefix: str, qw: BlockQuantized) -> _Table:
        g.init(f"{prefix}.weight_q", qw.packed)  # [rows, n_blocks, block*bits/8]: the same bytes MatMulNBits reads
        g.init_fp16(f"{prefix}.scales", qw.scales[..., None])
        if qw.zero_points is not None:
            # one 4-bit code per [row, block] (the packed last axis has length 1), low nibble
            g.init(f"{prefix}.zero_points", qw.zero_points[..., None])
        if qw.offsets is not None:
            g.init_fp16(f"{prefix}.offsets", qw.offsets[..., None])
        return cls(prefix, qw)

    def gather(self, g: _Graph, ids: str, out: str) -> str:
        """Rows ``ids`` dequantized, shaped [*ids.shape, n_blocks, block]."""
        p, qw = self.prefix, self.qw
        inputs = [f"{p}.weight_q", ids, f"{p}.scales"] + ([f"{p}.zero_points"] if qw.zero_points is not None else [])
        blocks = out if qw.offsets is None else f"{out}/no_offsets"
        g.node("GatherBlockQuantized", inputs, [blocks], name=out, domain=MS_DOMAIN,
               bits=qw.bits, block_size=qw.block_size, gather_axis=0, quantize_axis=2)
        if qw.offsets is not None:
            g.node("Gather", [f"{p}.offsets", ids], [f"{out}/offsets"], name=f"{out}/offsets", axis=0)
            g.node("Add", [blocks, f"{out}/offsets"], [out], name=f"{out}/add_offsets")
        return out


def _gather_sum(g: _Graph, parts: tuple[_Table, ...], ids: str, out: str) -> str:
    """Rows ``ids`` of the sum of ``parts`` (a 4-bit table and 4-bit codes of its error), [*ids.shape, n_blocks, block]."""
    rows = parts[0].gather(g, ids, f"{out}0")
    for i, part in enumerate(parts[1:], 1):
        g.node("Add", [rows, part.gather(g, ids, f"{out}{i}")], [f"{out}_sum{i}"], name=f"{out}_sum{i}")
        rows = f"{out}_sum{i}"
    return rows


def _refined(g: _Graph, prefix: str, source: np.ndarray, qw: BlockQuantized) -> tuple[_Table, _Table]:
    """A 4-bit table plus a 4-bit code of its error: RMS error ~0.3 of an 8-bit step (SmolLM2's table), in 4 + 4 bits."""
    return _Table.add(g, prefix, qw), _Table.add(g, f"{prefix}.residual", quantize_int4_symmetric(source - qw.dequantize(), qw.block_size))


def _rows(g: _Graph, blocks: str, qw: BlockQuantized, k: int, name: str, rank: int) -> str:
    """[..., n_blocks, block] -> [..., K] (``rank`` axes): merge the block axes, drop the padding of a K that is not a multiple."""
    g.node("Reshape", [blocks, g.init(f"{name}.shape", np.array([0] * (rank - 1) + [-1], np.int64))], [f"{name}/full"], name=f"{name}/reshape")
    if qw.n_blocks * qw.block_size == k:
        return f"{name}/full"
    g.node("Slice", [f"{name}/full", g.init(f"{name}.s0", np.array([0], np.int64)), g.init(f"{name}.s1", np.array([k], np.int64)),
                     g.init(f"{name}.sax", np.array([rank - 1], np.int64))], [f"{name}/out"], name=f"{name}/slice")
    return f"{name}/out"


def _embedding(g: _Graph, weights: np.ndarray, precision: str, block_size: int, hidden: int, *,
               offsets: bool, symmetric: bool, importance: np.ndarray | None,
               refine: bool) -> tuple[str, str | tuple[_Table, ...]]:
    """Emit the token lookup; return its output and what a tied output projection can reuse.

    ``refine``: also store a 4-bit code of the table's error, which the lookup
    adds and a rescoring output projection reads (see ``_rescored_logits``).
    """
    if precision == "fp32":
        table = g.init("embed.weight", weights.astype(np.float32))
        g.node("Gather", [table, "input_ids"], ["embed/out"], name="embed", axis=0)
        return "embed/out", table
    qw = quantize_blocks(weights, precision, block_size, offsets=offsets, importance=importance, symmetric=symmetric)
    parts = _refined(g, "embed", weights, qw) if refine else (_Table.add(g, "embed", qw),)
    return _rows(g, _gather_sum(g, parts, "input_ids", "embed/blocks"), qw, hidden, "embed", rank=3), parts


def _rescored_logits(g: _Graph, hidden_in: str, approx: str, parts: tuple[_Table, ...], k: int, hidden: int) -> str:
    """Logits from a 4-bit projection, with the ``k`` largest recomputed from finer rows.

    Why: the output projection is a fifth of a small model's weights and its
    4-bit error lands directly on the logits (SmolLM2-135M, integer zero
    points: perplexity ratio 1.11 with every matmul in 4 bits, 1.07 with this
    one in 8). Reading it in 8 bits costs ~10% of decode speed; rescoring costs
    a top-k, a gather of k rows and one [k, hidden] product: 3-7% of decode
    speed on SmolLM2-135M, nearly all of it per node, not per row (k = 8 costs
    the same; see the README's throughput section).
    The tokens that matter for greedy decoding, sampling and the confidence
    signals (chosen token, runner-up, top alternatives) get accurate logits; the
    tail keeps its 4-bit values. The rows are the sum of ``parts``: the 4-bit
    table itself plus a 4-bit code of what it misses (see ``build_graph``).
    """
    g.node("TopK", [approx, g.init("lm_head.rescore_k", np.array([k], np.int64))], ["lm_head/top_values", "lm_head/top_ids"],
           name="lm_head/topk", axis=-1, largest=1, sorted=0)
    rows = _gather_sum(g, parts, "lm_head/top_ids", "lm_head/top_blocks")  # [B, N, k, n_blocks, block]
    rows = _rows(g, rows, parts[0].qw, hidden, "lm_head/top_rows", rank=4)
    g.node("Unsqueeze", [hidden_in, g.init("lm_head.col_axis", np.array([-1], np.int64))], ["lm_head/h_col"], name="lm_head/h_col")
    g.node("MatMul", [rows, "lm_head/h_col"], ["lm_head/top_exact_col"], name="lm_head/rescore")  # [B, N, k, 1]
    g.node("Reshape", ["lm_head/top_exact_col", g.init("lm_head.exact_shape", np.array([0, 0, -1], np.int64))],
           ["lm_head/top_exact"], name="lm_head/top_exact")
    g.node("ScatterElements", [approx, "lm_head/top_ids", "lm_head/top_exact"], ["lm_head/rescored"], name="lm_head/scatter", axis=-1)
    return "lm_head/rescored"


def build_graph(
    spec: ModelSpec,
    weights: ModelWeights,
    *,
    precision: str,
    block_size: int = 32,
    mlp_block_size: int | None = None,
    accuracy_level: int = 4,
    int4_offsets: bool = False,
    int4_symmetric: bool = False,
    importance: Mapping[str, np.ndarray] | None = None,
    rescore_top_k: int = 0,
    progress: Callable[[int], None] | None = None,
) -> onnx.ModelProto:
    """Assemble the model. ``progress`` is called with the index of each layer done.

    ``int4_offsets``: int4 blocks with an integer zero point (default) or a
    float offset (see ``quantize.quant``); ``int4_symmetric``: integer zero
    points all 8, the kernels' default, so none is stored. ``importance``: per-input-channel error weights
    for the int4 search, keyed by projection name (``layers.{i}.qkv_proj``,
    ``o_proj``, ``gate_up_proj``, ``down_proj``, ``lm_head``), from
    ``quantize.calibrate.input_importance``.

    ``block_size``: every projection's blocks along K, unless ``mlp_block_size``
    gives the MLP's (gate/up, down) their own: three quarters of a layer's
    weights, where larger blocks mean fewer scales to read and apply.

    ``rescore_top_k`` (int4 only; 0 = off): the output projection runs in 4
    bits over the whole vocabulary, then the ``rescore_top_k`` highest logits
    are recomputed from the 4-bit table plus a 4-bit code of its error (for a
    GGUF's Q8_0 table: close to the 8-bit values); see ``_rescored_logits``.
    """
    if precision not in ("fp32", "int8", "int4"):
        raise ValueError(f"precision must be fp32, int8 or int4, got {precision!r}")
    if rescore_top_k < 0 or (rescore_top_k and precision != "int4"):
        raise ValueError(f"rescore_top_k must be 0, or > 0 with int4, got {rescore_top_k} with {precision}")
    g = _Graph()
    importance = importance or {}
    if int4_offsets and int4_symmetric:
        raise ValueError("int4_offsets and int4_symmetric are two different int4 layouts: choose one")
    linear = _Linear(g, precision, block_size, accuracy_level, int4_offsets=int4_offsets, int4_symmetric=int4_symmetric,
                     importance=importance)
    mlp_bs = mlp_block_size or block_size
    H, V = spec.hidden_size, spec.vocab_size
    q_dim = spec.num_heads * spec.head_dim
    kv_dim = spec.num_kv_heads * spec.head_dim

    # a tied table is also the output projection: weigh its errors by the output projection's inputs
    emb_out, tied = _embedding(g, weights.embed, precision, block_size, H, offsets=int4_offsets, symmetric=int4_symmetric,
                               importance=importance.get("lm_head") if weights.lm_head is None else None,
                               refine=bool(rescore_top_k) and weights.lm_head is None)

    # --- shared attention inputs ---
    cos = g.init("rope.cos", spec.rope_cos.astype(np.float32))
    sin = g.init("rope.sin", spec.rope_sin.astype(np.float32))

    residual: str | None = None
    pending: str = emb_out  # output waiting to be added to the residual stream
    for i, lw in enumerate(weights.layers()):
        p = f"layers.{i}"
        # residual add + RMSNorm before attention
        attn_norm = g.init(f"{p}.attn_norm", lw.attn_norm.astype(np.float32))
        if residual is None:
            g.node("SimplifiedLayerNormalization", [pending, attn_norm], [f"{p}/attn_in"], name=f"{p}/attn_norm",
                   axis=-1, epsilon=spec.rms_norm_eps, stash_type=1)
            residual = pending
        else:
            g.node("SkipSimplifiedLayerNormalization", [pending, residual, attn_norm], [f"{p}/attn_in", "", "", f"{p}/resid_attn"],
                   name=f"{p}/attn_norm", domain=MS_DOMAIN, epsilon=spec.rms_norm_eps)
            residual = f"{p}/resid_attn"
        qkv_w = np.concatenate([lw.q, lw.k, lw.v], axis=0)
        qkv_b = None
        if any(b is not None for b in (lw.q_bias, lw.k_bias, lw.v_bias)):
            qkv_b = np.concatenate([
                lw.q_bias if lw.q_bias is not None else np.zeros(q_dim, np.float32),
                lw.k_bias if lw.k_bias is not None else np.zeros(kv_dim, np.float32),
                lw.v_bias if lw.v_bias is not None else np.zeros(kv_dim, np.float32),
            ])
        qkv = linear(f"{p}/attn_in", qkv_w, f"{p}.qkv_proj", qkv_b)
        g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length", cos, sin],
            [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"],
            name=f"{p}/gqa", domain=MS_DOMAIN,
            num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(1.0 / np.sqrt(spec.head_dim)),
        )
        attn_out = linear(f"{p}/attn", lw.o, f"{p}.o_proj")
        mlp_norm = g.init(f"{p}.mlp_norm", lw.mlp_norm.astype(np.float32))
        g.node("SkipSimplifiedLayerNormalization", [attn_out, residual, mlp_norm], [f"{p}/mlp_in", "", "", f"{p}/resid_mlp"],
               name=f"{p}/mlp_norm", domain=MS_DOMAIN, epsilon=spec.rms_norm_eps)
        residual = f"{p}/resid_mlp"
        gate_up = linear(f"{p}/mlp_in", np.concatenate([lw.gate, lw.up], axis=0), f"{p}.gate_up_proj", block_size=mlp_bs)
        g.node("Split", [gate_up, g.init(f"{p}.split", np.array([spec.intermediate_size] * 2, np.int64))], [f"{p}/gate", f"{p}/up"],
               name=f"{p}/split", axis=-1)
        g.node("Sigmoid", [f"{p}/gate"], [f"{p}/gate_sig"], name=f"{p}/sigmoid")
        g.node("Mul", [f"{p}/gate", f"{p}/gate_sig"], [f"{p}/silu"], name=f"{p}/silu")
        g.node("Mul", [f"{p}/silu", f"{p}/up"], [f"{p}/act"], name=f"{p}/act")
        pending = linear(f"{p}/act", lw.down, f"{p}.down_proj", block_size=mlp_bs)
        if progress is not None:
            progress(i)

    final_norm = g.init("final_norm", weights.final_norm.astype(np.float32))
    g.node("SkipSimplifiedLayerNormalization", [pending, residual, final_norm], ["final/normed"], name="final_norm",
           domain=MS_DOMAIN, epsilon=spec.rms_norm_eps)
    # only the positions asked for go through the (large) output projection
    g.node("Gather", ["final/normed", "logits_index"], ["final/selected"], name="select_positions", axis=1)

    # the quantized tables the output projection reads: the embedding's when tied, its own when rescored
    parts = tied if weights.lm_head is None and isinstance(tied, tuple) else None
    if rescore_top_k and weights.lm_head is not None:
        qw = quantize_blocks(weights.lm_head, precision, block_size, offsets=int4_offsets, importance=importance.get("lm_head"),
                             symmetric=int4_symmetric)
        parts = _refined(g, "lm_head_rows", weights.lm_head, qw)
    if parts is not None:
        g_out = linear.quantized("final/selected", parts[0].qw, "lm_head", table=parts[0])
        if rescore_top_k:
            g_out = _rescored_logits(g, "final/selected", g_out, parts, min(rescore_top_k, V), H)
    elif weights.lm_head is not None:
        g_out = linear("final/selected", weights.lm_head, "lm_head")
    else:
        # tied fp32: Gemm with transB reads the embedding table as is (no transposed copy)
        g.node("Shape", ["final/selected"], ["lm_head/in_shape"], name="lm_head/shape")
        g.node("Reshape", ["final/selected", g.init("lm_head.flat", np.array([-1, H], np.int64))], ["lm_head/flat"], name="lm_head/flatten")
        g.node("Gemm", ["lm_head/flat", tied], ["lm_head/gemm"], name="lm_head", transB=1)
        g.node("Slice", ["lm_head/in_shape", g.init("lm_head.s0", np.array([0], np.int64)), g.init("lm_head.s1", np.array([2], np.int64))],
               ["lm_head/bn"], name="lm_head/bn")
        g.node("Concat", ["lm_head/bn", g.init("lm_head.v", np.array([V], np.int64))], ["lm_head/out_shape"], name="lm_head/out_shape", axis=0)
        g.node("Reshape", ["lm_head/gemm", "lm_head/out_shape"], ["lm_head/out"], name="lm_head/unflatten")
        g_out = "lm_head/out"
    g.node("Identity", [g_out], ["logits"], name="logits")

    kv_shape = ["batch", spec.num_kv_heads, "cache_capacity", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["logit_positions"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "logit_positions", V])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_shape))
    graph = helper.make_graph(g.nodes, f"{spec.architecture}-{precision}", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edge-runtime",
    )
    model.ir_version = 10
    return model
