"""Bundle builder: GGUF / Hugging Face checkpoint -> fused ONNX graph -> fp32/int8/int4 bundle.

Needs the ``export`` extra (torch, transformers, gguf, onnx); the runtime in
``edge_runtime`` never imports this package.
"""

import importlib.util

# checked before anything is fetched: with part of the extra installed, a build used to download the model
# (500 MB for Qwen) and then fail, or call the good file damaged ("No module named 'gguf'")
_missing = [m for m in ("torch", "transformers", "accelerate", "gguf", "onnx") if importlib.util.find_spec(m) is None]
if _missing:
    raise ImportError(f"missing {', '.join(_missing)}", name=_missing[0])

from .build import PRECISIONS, BuildReport, build_bundle  # noqa: E402 (after the check)
from .source import SUPPORTED_ARCHITECTURES

__all__ = ["build_bundle", "BuildReport", "PRECISIONS", "SUPPORTED_ARCHITECTURES"]
