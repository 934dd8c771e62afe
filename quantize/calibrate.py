"""How much each input channel of each projection matters, measured on a calibration text.

A projection's output error from quantizing weight ``w[n, k]`` grows with the
size of its input ``x[k]``. Small LMs have a few input channels whose
activations are hundreds of times larger than the rest ("massive activations"),
so an error-minimizing quantizer should weight each weight's error by the mean
``x[k]^2`` of its channel. This module runs the fp32 source model on
``data/calibration.txt`` (prose, dialogue, a little code and arithmetic, written
for this project and distinct from the quality sample) and returns those means,
keyed by the graph's projection names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CALIBRATION_TEXT", "input_importance"]

CALIBRATION_TEXT = Path(__file__).with_name("data") / "calibration.txt"

# graph projection name suffix -> the source module whose input it reads (q, k and v share an input; gate and up too)
_INPUT_OF = {
    "qkv_proj": ("self_attn", "q_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_up_proj": ("mlp", "gate_proj"),
    "down_proj": ("mlp", "down_proj"),
}


def input_importance(model: Any, tokenizer: Any, text: str, *, chunk_tokens: int = 512) -> tuple[dict[str, np.ndarray], int]:
    """Mean squared input per channel for every projection: ({name: float32[K]}, tokens seen).

    ``model`` is a transformers causal LM of the llama family (llama, qwen2,
    mistral), ``tokenizer`` its tokenizer. The text is fed in independent
    chunks of ``chunk_tokens`` so that memory stays flat.
    """
    import torch

    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def watch(module: Any, name: str) -> None:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)

        hooks.append(module.register_forward_pre_hook(hook))

    for i, layer in enumerate(model.model.layers):
        for kind, (block, proj) in _INPUT_OF.items():
            watch(getattr(getattr(layer, block), proj), f"layers.{i}.{kind}")
    watch(model.lm_head, "lm_head")
    ids = tokenizer(text, return_tensors="pt").input_ids
    n_tokens = int(ids.shape[1])
    try:
        with torch.no_grad():
            for start in range(0, n_tokens, chunk_tokens):
                model(ids[:, start:start + chunk_tokens])
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / max(n_tokens, 1)).numpy().astype(np.float32) for name, s in sums.items()}, n_tokens
