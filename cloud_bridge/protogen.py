"""Regenerate the Python gRPC code from ``proto/``: ``python -m cloud_bridge.protogen`` (or ``make proto``).

The .proto files live in ``proto/`` at the repository root; the generated code
goes to ``edge_runtime/_proto/`` so that the device's base install can import
it without grpcio-tools. protoc's ``-I<virtual>=<physical>`` mapping makes the
generated imports read ``edge_runtime._proto.edgecloud.v1...``.

The generator is pinned in setup.py (DEV) because its version is written into
the generated files; ``--check`` (and tests/bridge/test_proto.py) fail when the
checked-in code differs from what the pinned generator makes of the .proto.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REPO_ROOT", "PROTO_DIR", "GENERATED_PACKAGE", "generate", "compare_trees", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
# the package the generated modules live in, as a path relative to the output root
GENERATED_PACKAGE = Path("edge_runtime") / "_proto"

_PACKAGE_DOC = '"""Generated protobuf and gRPC code. Do not edit: change proto/ and run `make proto`."""\n'


def generate(out_root: str | Path, *, proto_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Run protoc over every .proto under ``proto_dir``; write into ``out_root/edge_runtime/_proto``.

    Returns the generated files (relative to ``out_root``), ``__init__.py`` files included.
    """
    from importlib import resources

    from grpc_tools import protoc  # DEV dependency: imported only when regenerating

    from edge_runtime.errors import BuildError

    proto_dir = Path(proto_dir).resolve()
    out_root = Path(out_root)
    sources = sorted(proto_dir.rglob("*.proto"))
    if not sources:
        raise BuildError(f"no .proto files under {proto_dir}")
    include = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    virtual = GENERATED_PACKAGE.as_posix()
    args = [
        "grpc_tools.protoc",
        f"-I{virtual}={proto_dir}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(s) for s in sources),
    ]
    out_root.mkdir(parents=True, exist_ok=True)
    code = protoc.main(args)
    if code != 0:
        raise BuildError(f"protoc failed with exit code {code} (see its message above)")
    package_root = out_root / GENERATED_PACKAGE
    # every generated directory must be a regular package, or find_packages() leaves it out of the wheel
    for directory in [
        package_root,
        *sorted(p for p in package_root.rglob("*") if p.is_dir() and p.name != "__pycache__"),
    ]:
        init = directory / "__init__.py"
        init.write_text(_PACKAGE_DOC if directory == package_root else "")
    return sorted(
        p.relative_to(out_root) for p in package_root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def _files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".pyi")
    }


def compare_trees(expected: Path, actual: Path) -> list[str]:
    """Differences between two generated trees, as readable lines (empty when identical)."""
    problems = []
    want, have = _files(expected), _files(actual)
    problems += [f"missing: {p}" for p in sorted(want - have)]
    problems += [f"unexpected: {p}" for p in sorted(have - want)]
    problems += [
        f"differs: {p}" for p in sorted(want & have) if not filecmp.cmp(expected / p, actual / p, shallow=False)
    ]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_bridge.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the checked-in code is stale")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp)
            problems = compare_trees(Path(tmp) / GENERATED_PACKAGE, REPO_ROOT / GENERATED_PACKAGE)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated code is stale: run `make proto`", file=sys.stderr)
        return 1 if problems else 0
    for path in generate(REPO_ROOT):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
