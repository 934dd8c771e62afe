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


def _run_engine_with_home(home, tiny_bundle, **env):
    import os

    code = ("from edge_runtime.engine import Engine\n"
            f"Engine({str(tiny_bundle)!r}).generate(prompt='hi', max_new_tokens=2)\n"
            "import os; print(os.environ.get('ORT_DISABLE_TELEMETRY'))")
    environ = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**environ, "HOME": str(home), **env})
    return out.stdout.strip(), sorted(p.name for p in home.rglob("*") if p.is_file())


def test_onnxruntimes_telemetry_is_off_unless_the_user_turns_it_on(tmp_path, tiny_bundle):
    # onnxruntime 1.32 kept a device id and queued events (OS, executable path, network type) for upload
    value, files = _run_engine_with_home(tmp_path / "home", tiny_bundle)
    assert value == "1" and files == []
    value, _ = _run_engine_with_home(tmp_path / "home2", tiny_bundle, ORT_DISABLE_TELEMETRY="0")
    assert value == "0"  # the user's choice is kept
