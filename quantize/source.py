"""Load a checkpoint (GGUF file or Hugging Face directory) into a ModelSpec + weights.

transformers reads both: for GGUF it dequantizes every tensor to float (it needs
the ``gguf`` package), so one code path serves both kinds of source and the
PyTorch model doubles as the fp32 reference for the quality report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import sha256_file
from edge_runtime.errors import BuildError, UnsupportedModelError

from .graph import LayerWeights, ModelSpec, ModelWeights

__all__ = ["SUPPORTED_ARCHITECTURES", "LoadedSource", "check_source", "load_source"]

log = logging.getLogger(__name__)

# model_type -> whether q/k/v projections carry a bias
SUPPORTED_ARCHITECTURES = {"llama": False, "qwen2": True, "mistral": False}

GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedSource:
    model: Any  # transformers PreTrainedModel, fp32, eval mode
    tokenizer: Any  # transformers fast tokenizer
    spec: ModelSpec
    weights: ModelWeights
    kind: str  # "gguf" or "hf"
    path: Path
    source_sha256: str
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    name: str


def _dir_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _check_gguf(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise BuildError(f"cannot read {path}: {err.strerror}") from err
    if head != GGUF_MAGIC:
        raise BuildError(f"{path} is not a GGUF file (bad magic {head!r})")
    # a truncated file fails inside the gguf reader with a numpy error; check sizes first
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise BuildError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    except BuildError:
        raise
    except Exception as err:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise BuildError(f"{path} is damaged or truncated: {err}") from err


def _gguf_architecture(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        return str(field.contents()) if field is not None else "unknown"
    except Exception as err:  # a damaged string field: UnicodeDecodeError, or the reader's own errors
        raise BuildError(f"{path} is damaged: cannot read its general.architecture ({type(err).__name__}: {err})") from err


# what transformers can build the fast tokenizer a bundle stores from
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_source(source: str | os.PathLike[str]) -> Path:
    """Fail fast, before any heavy loading: the source exists and looks like what it claims to be."""
    path = Path(source)
    if not path.exists():
        from edge_runtime.models import KNOWN_MODELS

        raise BuildError(f"source not found: {path} (a GGUF file, a Hugging Face model directory, or a known "
                         f"model: {', '.join(KNOWN_MODELS)})")
    if path.is_file():
        _check_gguf(path)
    elif not (path / "config.json").is_file():
        raise BuildError(f"{path} is neither a GGUF file nor a Hugging Face model directory (no config.json)")
    return path


def load_source(source: str | os.PathLike[str]) -> LoadedSource:
    """Load a GGUF file or a Hugging Face model directory with transformers (fp32)."""
    path = check_source(source)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the install
        raise BuildError("building bundles needs the export extra: pip install 'edge-runtime[export]'") from err

    if path.is_file():
        arch = _gguf_architecture(path)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {arch!r} is not supported (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        kind, load_dir, kwargs = "gguf", str(path.parent), {"gguf_file": path.name}
        sha = sha256_file(path)
    else:
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BuildError(f"{path / 'config.json'} is not a readable JSON file: {err}") from err
        if not isinstance(cfg, dict):
            raise BuildError(f"{path / 'config.json'}: expected a JSON object, got {type(cfg).__name__}")
        arch = cfg.get("model_type", "unknown")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {arch!r} is not supported (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            # transformers would fail deep inside, with an AttributeError on a missing file name
            raise BuildError(f"{path} has no tokenizer ({', '.join(_TOKENIZER_FILES)}: none found)")
        kind, load_dir, kwargs = "hf", str(path), {}
        sha = _dir_sha256(path)

    # our build shows its own progress; transformers' GGUF progress bar and tokenizer notices would interleave with it
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the GGUF dequantization bar is a bare tqdm that ignores the setting above, and tqdm reads its TQDM_*
    # environment overrides only when it is imported: silence that one module's bar while loading
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        config = AutoConfig.from_pretrained(load_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(load_dir, **kwargs)
        model, loading = AutoModelForCausalLM.from_pretrained(load_dir, dtype=torch.float32, output_loading_info=True,
                                                              **kwargs)
    except Exception as err:  # transformers and safetensors raise many types on a damaged or incomplete model
        raise BuildError(f"transformers could not load {path}: {type(err).__name__}: {err}") from err
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    # transformers fills a weight the checkpoint lacks with random numbers (its warning is silenced above):
    # the bundle would pass its quality gate, which compares it with the same random model
    for what in ("missing_keys", "mismatched_keys"):
        keys = [str(k) for k in loading.get(what) or ()]
        if keys:
            raise BuildError(f"{path} is incomplete: {len(keys)} weight(s) {what.split('_')[0]} "
                             f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    model.eval()
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise UnsupportedModelError("sliding-window attention is not supported")
    spec = _spec_from_model(model, config)
    weights = _weights_from_model(model, spec)

    gen = getattr(model, "generation_config", None)
    eos: list[int] = []
    for candidate in (getattr(gen, "eos_token_id", None), config.eos_token_id, tokenizer.eos_token_id):
        for tid in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if isinstance(tid, int) and tid not in eos:
                eos.append(tid)
    # chat models end a turn with a template marker that is not always the configured eos
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in eos and marker in (tokenizer.chat_template or "") + str(tokenizer.eos_token):
            eos.append(tid)
    bos = config.bos_token_id if isinstance(config.bos_token_id, int) else tokenizer.bos_token_id
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    name = path.stem if kind == "gguf" else path.name
    return LoadedSource(
        model=model, tokenizer=tokenizer, spec=spec, weights=weights, kind=kind, path=path, source_sha256=sha,
        eos_token_ids=eos, bos_token_id=bos, pad_token_id=config.pad_token_id if isinstance(config.pad_token_id, int) else None,
        add_bos_token=add_bos, chat_template=tokenizer.chat_template, name=name,
    )


def _rope_tables(model: Any, config: Any, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(torch.float64).cpu().numpy()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if inv_freq.shape[0] * 2 != head_dim:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    pos = np.arange(length, dtype=np.float64)
    freqs = np.outer(pos, inv_freq)
    return (np.cos(freqs) * scaling).astype(np.float32), (np.sin(freqs) * scaling).astype(np.float32)


def _spec_from_model(model: Any, config: Any) -> ModelSpec:
    # a damaged header (a GGUF's llama.context_length of 0) would otherwise fail a minute into the build
    for name in ("max_position_embeddings", "num_hidden_layers", "num_attention_heads", "hidden_size",
                 "intermediate_size", "vocab_size"):
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BuildError(f"the model's {name} is {value!r}: a positive integer is needed (a damaged header?)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ctx = int(config.max_position_embeddings)
    cos, sin = _rope_tables(model, config, head_dim, ctx)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    return ModelSpec(
        architecture=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        context_length=ctx,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(tied),
        attention_bias=attn.q_proj.bias is not None,
        rope_cos=cos,
        rope_sin=sin,
        rope_theta=float(getattr(config, "rope_theta", 10000.0)),
    )


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _weights_from_model(model: Any, spec: ModelSpec) -> ModelWeights:
    inner = model.model

    def layers() -> Iterator[LayerWeights]:
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            if getattr(m, "act_fn", None) is not None and type(m.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                raise UnsupportedModelError(f"MLP activation {type(m.act_fn).__name__} is not supported (SiLU only)")
            yield LayerWeights(
                attn_norm=_np(layer.input_layernorm.weight),
                q=_np(a.q_proj.weight), k=_np(a.k_proj.weight), v=_np(a.v_proj.weight), o=_np(a.o_proj.weight),
                mlp_norm=_np(layer.post_attention_layernorm.weight),
                gate=_np(m.gate_proj.weight), up=_np(m.up_proj.weight), down=_np(m.down_proj.weight),
                q_bias=_np(a.q_proj.bias) if a.q_proj.bias is not None else None,
                k_bias=_np(a.k_proj.bias) if a.k_proj.bias is not None else None,
                v_bias=_np(a.v_proj.bias) if a.v_proj.bias is not None else None,
            )

    return ModelWeights(
        embed=_np(inner.embed_tokens.weight),
        final_norm=_np(inner.norm.weight),
        lm_head=None if spec.tie_word_embeddings else _np(model.lm_head.weight),
        layers=layers,
    )
