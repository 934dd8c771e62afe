"""Backends the bridge can serve a model alias with; ``create_backend`` picks one by the alias' settings.

Each backend module is imported only when an alias uses it, so a bridge that
serves only an upstream API never loads onnxruntime.
"""

from __future__ import annotations

import importlib

from .._settings import ModelSettings
from ._base import (
    Backend,
    BackendChunk,
    BackendRequest,
    BackendResult,
    CancelToken,
    UnusableAnswerError,
    estimated_tokens,
)

__all__ = ["Backend", "BackendChunk", "BackendRequest", "BackendResult", "CancelToken", "BACKENDS", "create_backend",
           "estimated_tokens", "UnusableAnswerError"]

# backend name -> "module:class" under cloud_bridge.backends
BACKENDS: dict[str, str] = {
    "onnx": "onnx:OnnxBackend",
    "openai": "openai:OpenAIBackend",
    "echo": "echo:EchoBackend",
}


def create_backend(settings: ModelSettings) -> Backend:
    module_name, _, class_name = BACKENDS[settings.backend].partition(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    backend: Backend = getattr(module, class_name)(settings)
    return backend
