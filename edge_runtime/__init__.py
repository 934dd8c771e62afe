"""Hybrid edge runtime: quantized ONNX SLMs on the device, escalation to a cloud bridge, measured energy.

Importing this package must stay cheap and must never import torch or
transformers (a test checks ``sys.modules``): an edge device installs neither.
"""

from __future__ import annotations

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = ["__version__", *_errors_all]
