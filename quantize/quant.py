"""Block-wise weight quantization in numpy, in the layouts onnxruntime's kernels read.

Both ``MatMulNBits`` (projections) and ``GatherBlockQuantized`` (embedding
lookup) read the same bytes: a [N, K] weight is cut into blocks of
``block_size`` along K, each block stored as ``bits``-bit codes with one float
scale. Activations are quantized per block at run time by the kernel
(accuracy level 4), which keeps a single huge activation ("massive
activations" of small LMs) from flattening the rest of its row.

- int8: symmetric, zero point 128 (the kernels' default, so none is stored).
- int4: asymmetric with a float per-block offset (``w = scale*(q-8) + offset``)
  rather than a 4-bit integer zero point. An integer zero point forces zero
  onto the grid and cannot reproduce a grid whose minimum is an arbitrary
  float; GGUF Q4_1 weights are exactly such grids, and requantizing them with
  integer zero points measured a perplexity ratio of 1.36 on SmolLM2-135M
  (1.09 with offsets) and broke simple chat answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BlockQuantized", "quantize_blocks", "quantize_int4", "quantize_int8", "pack_nibbles"]

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


def quantize_int4(weight: np.ndarray, block_size: int = 32, *, offsets: bool = True) -> BlockQuantized:
    """Asymmetric 4-bit blocks with a float offset: ``w = scale*(q-8) + offset``.

    ``offsets=False`` gives the plain layout with a 4-bit integer zero point
    instead (zero always on the grid): no extra work at run time, less exact.

    For a GGUF Q4_1 source with the same block alignment the least-squares fit
    recovers the original grid almost exactly; for other sources it is an
    ordinary min/max asymmetric quantizer without the zero-in-range constraint
    of an integer zero point.
    """
    blocks, k = _blocks(weight, block_size)
    if not offsets:
        return _int4_zero_point(blocks, k, block_size)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    scale, base = _fit_affine(blocks, np.where(hi > lo, (hi - lo) / 15.0, 1.0), lo)
    q = np.clip(np.rint((blocks - base[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    scale = scale.astype(np.float32)
    # w = scale*q + base = scale*(q - 8) + (base + 8*scale): the kernel's default zero point 8, plus an offset
    return BlockQuantized(packed=pack_nibbles(q), scales=scale, offsets=(base + 8.0 * scale).astype(np.float32), bits=4, k=k, block_size=block_size)


def _int4_zero_point(blocks: np.ndarray, k: int, block_size: int) -> BlockQuantized:
    # the grid s*(q - z), z an integer in [0, 15], must contain zero: widen the range to include it
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15)
    q = np.clip(np.rint(blocks / scale[..., None] + zp[..., None]), 0, 15).astype(np.uint8)
    return BlockQuantized(packed=pack_nibbles(q), scales=scale, offsets=None, bits=4, k=k, block_size=block_size,
                          zero_points=zp.astype(np.uint8))


def quantize_blocks(weight: np.ndarray, precision: str, block_size: int = 32, *, offsets: bool = True) -> BlockQuantized:
    if precision == "int8":
        return quantize_int8(weight, block_size)
    if precision == "int4":
        return quantize_int4(weight, block_size, offsets=offsets)
    raise ValueError(f"no block quantization for precision {precision!r}")
