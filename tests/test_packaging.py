"""What a user installs: the wheel carries the licence and the gRPC contracts and no file deleted since the last
build; the source distribution carries what it takes to regenerate the code and run the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_tree(dest: Path) -> Path:
    """A copy of the tracked files (and new ones not ignored), as a fresh clone has them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _wheel(tree: Path, out: Path) -> zipfile.ZipFile:
    for old in out.glob("*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
                   cwd=tree, check=True, capture_output=True)
    return zipfile.ZipFile(next(out.glob("*.whl")))


def test_the_wheel_has_the_licence_and_the_proto_contracts_and_nothing_deleted(tmp_path):
    tree = _source_tree(tmp_path / "src")
    (tree / "edge_runtime" / "zz_deleted_since.py").write_text("")
    _wheel(tree, tmp_path / "dist")
    (tree / "edge_runtime" / "zz_deleted_since.py").unlink()
    names = set(_wheel(tree, tmp_path / "dist").namelist())
    assert "edge_runtime/zz_deleted_since.py" not in names  # setuptools reuses build/lib: it used to be kept
    for proto in (ROOT / "proto").rglob("*.proto"):
        assert f"edge_runtime/_proto/{proto.relative_to(ROOT / 'proto').as_posix()}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "edge_runtime/confidence/data/default_estimator.json" in names and "edge_runtime/py.typed" in names
    # the systemd units and the Pi guide travel with the code they deploy
    assert {"edge_runtime/daemon/deploy/edge-runtime.service", "edge_runtime/daemon/deploy/RASPBERRY_PI.md",
            "cloud_bridge/deploy/cloud-bridge.service"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    from edge_runtime import __version__

    assert f"edge_runtime-{__version__}.dist-info/METADATA" in names  # one version: the package's own


@pytest.mark.parametrize("command", ["edge-runtime", "cloud-bridge"])
def test_both_commands_print_the_version(command, capsys):
    from cloud_bridge.cli import main as bridge_main
    from edge_runtime import __version__
    from edge_runtime.cli import main

    with pytest.raises(SystemExit) as info:
        (main if command == "edge-runtime" else bridge_main)(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"{command} {__version__}\n"


def test_the_source_distribution_can_regenerate_the_code_and_run_the_tests(tmp_path):
    tree = _source_tree(tmp_path / "src")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree, check=True,
                   capture_output=True)
    with tarfile.open(next((tmp_path / "dist").glob("*.tar.gz"))) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"LICENSE", "Makefile", "README.md", "setup.py", "pyproject.toml", "tests/conftest.py",
                "tests/tiny_models.py", "benchmarks/throughput.py", "edge_runtime/_proto/edgecloud/v1/bridge_pb2.py"}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "proto").rglob("*.proto")}
    assert expected <= names
    assert not any("__pycache__" in n for n in names)
