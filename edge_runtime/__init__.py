"""Hybrid edge runtime: quantized ONNX SLMs on the device, escalation to a cloud bridge, measured energy.

Importing this package must stay cheap and must never import torch or
transformers (a test checks ``sys.modules``): an edge device installs neither.
"""

from __future__ import annotations

import os as _os

# onnxruntime 1.32 and later send usage telemetry from Linux and macOS too: a device id kept under
# ~/.cache/Microsoft, and events naming the OS, the executable's path, the network type, sessions and models,
# queued there and uploaded to Microsoft. A runtime that keeps prompts on the device opts out unless its user
# chose otherwise (ORT_DISABLE_TELEMETRY=0). onnxruntime reads the variable once, when it loads; child processes
# inherit it. An empty value (a bare systemd Environment= line) counts as unset.
if not _os.environ.get("ORT_DISABLE_TELEMETRY"):
    _os.environ["ORT_DISABLE_TELEMETRY"] = "1"

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = ["__version__", *_errors_all]
