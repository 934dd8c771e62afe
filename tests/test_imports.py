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


def _run_with_home(home, code, **env):
    import os

    # onnxruntime keeps its files under $XDG_CACHE_HOME when that is set, else under $HOME/.cache
    inherited = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**inherited, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), **env})
    return out.stdout.strip(), sorted(p.name for p in home.rglob("*") if p.is_file())


def test_onnxruntimes_telemetry_is_off_unless_the_user_turns_it_on(tmp_path, tiny_bundle):
    # onnxruntime 1.32 kept a device id and queued events (OS, executable path, network type) for upload
    run = ("from edge_runtime.engine import Engine\n"
           f"Engine({str(tiny_bundle)!r}).generate(prompt='hi', max_new_tokens=2)\n"
           "import os; print(os.environ['ORT_DISABLE_TELEMETRY'])")
    for env in ({}, {"ORT_DISABLE_TELEMETRY": ""}):  # unset, or set empty (a bare systemd Environment= line)
        value, files = _run_with_home(tmp_path / f"home{len(env)}", run, **env)
        assert value == "1" and files == []
    # the user's choice is kept (checked without running a model: that would send the telemetry)
    value, _ = _run_with_home(tmp_path / "home-on", "import os, edge_runtime; print(os.environ['ORT_DISABLE_TELEMETRY'])",
                              ORT_DISABLE_TELEMETRY="0")
    assert value == "0"
