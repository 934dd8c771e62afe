import subprocess
import sys

RUNTIME_MODULES = (
    "edge_runtime", "edge_runtime.cli", "edge_runtime.engine", "edge_runtime.bundle", "edge_runtime.models",
    "edge_runtime.confidence", "edge_runtime.policies", "edge_runtime.tasks", "edge_runtime.metrics", "edge_runtime.power",
    "edge_runtime.cloud", "edge_runtime.hybrid", "edge_runtime.settings", "edge_runtime.runs", "edge_runtime.daemon",
    "edge_runtime.explore", "edge_runtime.cost", "cloud_bridge",
)


def test_importing_edge_runtime_never_imports_torch_or_transformers():
    code = (
        "import importlib, sys\n"
        f"for m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n"
        "import edge_runtime.cli; edge_runtime.cli.build_parser()\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'onnx', 'accelerate', 'gguf') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_cli_starts_without_onnxruntime():
    code = "import sys, edge_runtime.cli; edge_runtime.cli.build_parser(); print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
