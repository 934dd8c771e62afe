"""Bundle builder: GGUF / Hugging Face checkpoint -> fused ONNX graph -> fp32/int8/int4 bundle.

Needs the ``export`` extra (torch, transformers, gguf, onnx); the runtime in
``edge_runtime`` never imports this package.
"""

from .build import PRECISIONS, BuildReport, build_bundle
from .source import SUPPORTED_ARCHITECTURES

__all__ = ["build_bundle", "BuildReport", "PRECISIONS", "SUPPORTED_ARCHITECTURES"]
