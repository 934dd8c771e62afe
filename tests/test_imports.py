import subprocess
import sys


def test_importing_edge_runtime_never_imports_torch_or_transformers():
    code = (
        "import sys, edge_runtime, edge_runtime.cli;"
        "edge_runtime.cli.build_parser();"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
