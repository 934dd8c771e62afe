"""The public names of the bridge and the cloud client exist, and importing them stays light."""

from __future__ import annotations

import subprocess
import sys

import cloud_bridge
import cloud_bridge.backends
import edge_runtime.cloud


def test_every_exported_name_exists():
    for module in (cloud_bridge, cloud_bridge.backends, edge_runtime.cloud):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], module.__name__


def test_the_client_and_bridge_import_without_onnxruntime_or_torch():
    code = (
        "import sys, edge_runtime.cloud, cloud_bridge, cloud_bridge.cli; cloud_bridge.cli.build_parser();"
        "print(','.join(m for m in ('onnxruntime', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
