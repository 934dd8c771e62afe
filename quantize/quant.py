"""Block-wise weight quantization in numpy, in the layouts onnxruntime's kernels read.

Both ``MatMulNBits`` (projections) and ``GatherBlockQuantized`` (embedding
lookup) read the same bytes: a [N, K] weight is cut into blocks of
``block_size`` along K, each block stored as ``bits``-bit codes with one float
scale. Activations are quantized per block at run time by the kernel
(accuracy level 4), which keeps a single huge activation ("massive
activations" of small LMs) from flattening the rest of its row.

- int8: symmetric, zero point 128 (the kernels' default, so none is stored).
- int4 (the bundles' default): integer zero points (``w = scale*(q - zp)``),
  the layout the kernels run fastest. Each block's scale and zero point are
  chosen by a search that minimizes the weight error weighted by how large
  each input channel's activations are (measured on a calibration text, see
  ``quantize.calibrate``): ratio 1.11 on SmolLM2-135M with every matrix in 4
  bits (1.08 with the output projection rescored, see ``quantize.graph``),
  where a plain min/max fit measured 1.36 and broke simple chat answers.
- symmetric int4 (``symmetric=True``, opt-in): the same weighted search over
  the scale alone, every zero point the kernels' default 8, so none is stored
  and the kernels skip applying them; a coarser grid for blocks whose values
  are not centred on zero (see the README's *Symmetric int4* for what it
  costs and buys).
- int4 with a float per-block offset (``w = scale*(q-8) + offset``, opt-in).
  An integer zero point cannot reproduce a grid whose minimum is an arbitrary
  float; GGUF Q4_1 weights are exactly such grids, and offsets reproduce them,
  at the cost of three small extra nodes per projection (22% of the decode
  speed in the committed throughput run).
- symmetric int4 round-to-nearest for the 4-bit code of another table's error
  (rescoring rows).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["BlockQuantized", "quantize_blocks", "quantize_int4", "quantize_int4_symmetric", "quantize_int8", "pack_nibbles"]

@dataclass(frozen=True)
class BlockQuantized:
    """A [N, K] weight quantized in blocks along K.

    ``packed``: uint8 [N, n_blocks, block_size * bits / 8] (MatMulNBits ``B``)
    ``scales``: float32 [N, n_blocks]
    ``zero_points``: uint8 [N, n_blocks] (one code per entry, unpacked), or None for the kernels'
    default 2^(bits-1)
    ``offsets``: float32 [N, n_blocks] added to every weight of the block, or None
    """

    packed: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    bits: int
    k: int
    block_size: int
    zero_points: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.packed.shape[1])

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points in MatMulNBits' layout: [N, ceil(n_blocks * bits / 8)], low nibble first."""
        if self.zero_points is None:
            return None
        return pack_nibbles(self.zero_points) if self.bits == 4 else self.zero_points.astype(np.uint8)

    def codes(self) -> np.ndarray:
        """The integer codes, [N, n_blocks, block_size]."""
        return _unpack_nibbles(self.packed) if self.bits == 4 else self.packed

    def dequantize(self) -> np.ndarray:
        """Back to float32 [N, K]."""
        q = self.codes().astype(np.float32)
        zp = np.float32(1 << (self.bits - 1)) if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        w = (q - zp) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(self.n, -1)[:, : self.k]


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values along the last axis, low nibble first (pads an odd length with 0)."""
    v = values.astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    n_blocks = -(-k // block_size)
    pad = n_blocks * block_size - k
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1)
    return w.reshape(n, n_blocks, block_size), k


def quantize_int8(weight: np.ndarray, block_size: int = 32) -> BlockQuantized:
    """Symmetric 8-bit blocks (zero point 128, the kernel default)."""
    blocks, k = _blocks(weight, block_size)
    amax = np.abs(blocks).max(axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    return BlockQuantized(packed=q, scales=scale, offsets=None, bits=8, k=k, block_size=block_size)


def quantize_int4_symmetric(weight: np.ndarray, block_size: int = 32) -> BlockQuantized:
    """Round-to-nearest 4-bit blocks on the kernels' default grid ``w = scale*(q - 8)``, q in [0, 15].

    Used for the 4-bit code of another 4-bit table's error. The scale fits the
    block's larger side exactly. On SmolLM2's table this leaves an RMS error of
    0.30 of an 8-bit step; the zero-point search would reach 0.25 at several
    times the build time, and even exact 8-bit rows gain little over this code
    (perplexity ratio 1.074 against 1.077 with rescored logits).
    """
    blocks, k = _blocks(weight, block_size)
    scale = np.maximum(np.maximum(blocks.max(axis=-1), 0.0) / 7.0, np.maximum(-blocks.min(axis=-1), 0.0) / 8.0)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = (np.clip(np.rint(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
    return BlockQuantized(packed=pack_nibbles(q), scales=scale, offsets=None, bits=4, k=k, block_size=block_size)


def _fit_affine(blocks: np.ndarray, scale: np.ndarray, base: np.ndarray, steps: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Refine ``w ≈ scale*q + base`` per block by least squares on the chosen codes (as llama.cpp's k-quants do)."""
    def codes(s: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((blocks - b[..., None]) / s[..., None]), 0, 15)

    def sq_error(s: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((blocks - (codes(s, b) * s[..., None] + b[..., None])) ** 2).sum(axis=-1)

    for _ in range(steps):
        q = codes(scale, base)
        qm, wm = q.mean(axis=-1), blocks.mean(axis=-1)
        var_q = ((q - qm[..., None]) ** 2).mean(axis=-1)
        cov = ((q - qm[..., None]) * (blocks - wm[..., None])).mean(axis=-1)
        ok = (var_q > 1e-12) & (cov > 0)
        a = np.where(ok, cov / np.where(ok, var_q, 1.0), scale)
        b = np.where(ok, wm - a * qm, base)
        better = sq_error(a, b) < sq_error(scale, base)  # keep a refinement only where it lowers the block's error
        scale = np.where(better, a, scale)
        base = np.where(better, b, base)
    return scale, base


def quantize_int4(weight: np.ndarray, block_size: int = 32, *, offsets: bool = True,
                  importance: np.ndarray | None = None, symmetric: bool = False) -> BlockQuantized:
    """Asymmetric 4-bit blocks.

    ``offsets=False``: a 4-bit integer zero point per block, scale and zero point
    found by a search that minimizes the squared error weighted by ``importance``
    (one non-negative value per input channel, the mean squared activation;
    None weighs every channel equally).

    ``symmetric=True`` (with ``offsets=False``): the same weighted search over
    the scale alone, on the kernels' default zero point 8, so none is stored.

    Default: a float offset per block, ``w = scale*(q-8) + offset``.
    For a GGUF Q4_1 source with the same block alignment the least-squares fit
    recovers the original grid almost exactly; for other sources it is an
    ordinary min/max asymmetric quantizer without the zero-in-range constraint
    of an integer zero point.
    """
    if symmetric and offsets:
        raise ValueError("symmetric int4 blocks have no offsets: pass offsets=False")
    blocks, k = _blocks(weight, block_size)
    if not offsets:
        return _int4_zero_point(blocks, k, block_size, _block_weights(importance, blocks.shape[1:], k), symmetric)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    scale, base = _fit_affine(blocks, np.where(hi > lo, (hi - lo) / 15.0, 1.0), lo)
    q = np.clip(np.rint((blocks - base[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    scale = scale.astype(np.float32)
    # w = scale*q + base = scale*(q - 8) + (base + 8*scale): the kernel's default zero point 8, plus an offset
    offset = base + 8.0 * scale
    # a constant block (its scale the placeholder 1): code 8 and the value itself as the offset; c + 8 stored in fp16
    # lost the value (-0.001 came back as 0, 0.01 as 0.0078)
    constant = hi == lo
    q[constant] = 8
    offset = np.where(constant, lo, offset)
    return BlockQuantized(packed=pack_nibbles(q), scales=scale, offsets=offset.astype(np.float32), bits=4, k=k, block_size=block_size)


def _block_weights(importance: np.ndarray | None, shape: tuple[int, int], k: int) -> np.ndarray:
    """Per-channel error weights laid out like one row of blocks, [n_blocks, block_size], mean 1."""
    if importance is None:
        return np.ones(shape, np.float32)
    h = np.asarray(importance, np.float64).reshape(-1)
    if h.shape[0] != k or not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError(f"importance must be {k} finite non-negative values, got shape {h.shape}")
    h = h / h.mean() if h.mean() > 0 else np.ones_like(h)
    # a small floor: a channel never seen active in the calibration text still should not be ignored
    h = np.concatenate([h + 0.01, np.zeros(shape[0] * shape[1] - k)])
    return h.reshape(shape).astype(np.float32)


# candidate scales, as fractions of the block's (zero-including) range / 15, and zero-point nudges around the min/max choice
_SCALE_FRACTIONS = np.linspace(0.5, 1.2, 29)
_ZERO_NUDGES = (-1, 0, 1)
_ROWS_PER_CHUNK = 2048  # bounds the search's temporaries for large output projections


def _int4_zero_point(blocks: np.ndarray, k: int, block_size: int, weights: np.ndarray, symmetric: bool) -> BlockQuantized:
    """The grid s*(q - z), z an integer in [0, 15] (8 if ``symmetric``), that minimizes the weighted error of each block."""
    n, n_blocks, _ = blocks.shape
    scales = np.empty((n, n_blocks), np.float32)
    zps = np.empty((n, n_blocks), np.float32)
    # rows are independent: chunks run on threads (numpy releases the GIL), the result does not depend on how
    workers = max(1, min(os.cpu_count() or 1, 8))
    rows = max(64, min(_ROWS_PER_CHUNK, -(-n // workers)))

    def search(r0: int) -> None:
        scales[r0:r0 + rows], zps[r0:r0 + rows] = _search_grid(blocks[r0:r0 + rows], weights, symmetric)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(search, range(0, n, rows)))
    q = _codes(blocks, scales, zps).astype(np.uint8)
    return BlockQuantized(packed=pack_nibbles(q), scales=scales, offsets=None, bits=4, k=k, block_size=block_size,
                          zero_points=None if symmetric else zps.astype(np.uint8))


def _codes(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(blocks / scale[..., None] + zp[..., None]), 0, 15)


def _search_grid(blocks: np.ndarray, weights: np.ndarray, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    def error(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        return ((((_codes(blocks, s, z) - z[..., None]) * s[..., None] - blocks) ** 2) * weights).sum(axis=-1)

    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    # the scale that just fits the block: its range / 15, or on the fixed zero point 8 the larger of 7 steps up, 8 down
    span = np.maximum(hi / 7.0, -lo / 8.0) * 15.0 if symmetric else hi - lo
    span = np.where(span > 0, span, 1.0)
    best_s, best_z = (span / 15.0).astype(np.float32), np.full(lo.shape, 8.0 if symmetric else 0.0, np.float32)
    best_err = np.full(lo.shape, np.inf, np.float32)
    for fraction in _SCALE_FRACTIONS:
        s = (fraction * span / 15.0).astype(np.float32)
        # symmetric: the zero point stays 8 (best_z); else the min/max choice for this scale, nudged
        zero_points = [best_z] if symmetric else [np.clip(np.rint(-lo / s) + nudge, 0, 15).astype(np.float32)
                                                  for nudge in _ZERO_NUDGES]
        for z in zero_points:
            err = error(s, z)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
    # with the codes fixed, the weighted least-squares scale; kept only where it lowers the error
    for _ in range(2):
        d = _codes(blocks, best_s, best_z) - best_z[..., None]
        den = (weights * d * d).sum(axis=-1)
        ok = den > 0
        s = np.where(ok, (weights * d * blocks).sum(axis=-1) / np.where(ok, den, 1.0), best_s).astype(np.float32)
        s = np.where(s > 0, s, best_s)
        err = error(s, best_z)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
    return best_s, best_z


def quantize_blocks(weight: np.ndarray, precision: str, block_size: int = 32, *, offsets: bool = True,
                    importance: np.ndarray | None = None, symmetric: bool = False) -> BlockQuantized:
    if precision == "int8":
        return quantize_int8(weight, block_size)
    if precision == "int4":
        return quantize_int4(weight, block_size, offsets=offsets, importance=importance, symmetric=symmetric)
    raise ValueError(f"no block quantization for precision {precision!r}")
