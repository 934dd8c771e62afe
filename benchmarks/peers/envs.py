"""Set up the peer runtimes the throughput benchmark compares against, cached under ``<cache>/peers``.

* ``llamacpp``: llama-cpp-python compiled from source for this CPU (about five
  minutes on two cores; without AMX, see ``LLAMACPP_CFLAGS``) into
  ``<cache>/peers/wheels/llamacpp-<build tag>``, installed into
  ``<cache>/peers/llamacpp-venv``; it runs the original Q4_1 GGUF.
* ``genai``: onnxruntime-genai in ``<cache>/peers/genai-venv`` with what its
  model builder needs (a newer transformers than this project's export extra
  allows, hence its own environment; torch pinned to the CPU build). The
  builder makes an int4 model from a Hugging Face directory that
  ``export_hf.py`` dequantizes from the same GGUF (the builder reads float GGUF
  files only).

Everything is reused when present: a second run costs a version check per
peer. Nothing here runs during ``make test``. Run it by hand with

    python benchmarks/peers/envs.py [llamacpp] [genai]

A peer that cannot be set up comes back with ``reason`` set (the benchmark
records it and goes on without that peer).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime.cache import cache_dir

__all__ = ["GENAI_VERSION", "LLAMACPP_VERSION", "PEERS", "Peer", "setup_genai", "setup_llamacpp", "setup_peer"]

MODEL = "smollm2-135m-instruct"
LLAMACPP_VERSION = "0.3.36"
GENAI_VERSION = "0.18.0"
# a CPU build tuned for this machine's instruction set; no GPU backends, no network code
LLAMACPP_CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF "
    "-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
)
# ... except AMX on x86: -march=native turns on ggml's AMX kernels on a Xeon that has it, and there they die of an
# illegal instruction at the first matrix product (seen on a KVM guest; llama.cpp's pull request 26954: the tile
# configuration is optimized away). Explicit -mno- flags win over -march=native in GCC and Clang whatever their
# order; llama.cpp then uses its AVX-512 VNNI kernels.
LLAMACPP_CFLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine().lower() in ("x86_64", "amd64") else ""


def _llamacpp_build_env() -> dict[str, str]:
    env = {"CMAKE_ARGS": LLAMACPP_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    if LLAMACPP_CFLAGS:
        env["CFLAGS"] = env["CXXFLAGS"] = LLAMACPP_CFLAGS
    return env


def _llamacpp_build_tag() -> str:
    """Names the build: a wheel or venv made with other flags is made again."""
    flags = f"{LLAMACPP_VERSION} {LLAMACPP_CMAKE_ARGS} {LLAMACPP_CFLAGS}"
    return hashlib.sha256(flags.encode()).hexdigest()[:12]
# torch: ONLY this exact pin (an unpinned torch pulls a multi-GB CUDA build)
GENAI_REQUIREMENTS = (
    "torch==2.13.0",
    f"onnxruntime-genai=={GENAI_VERSION}",
    "transformers==5.24.0",
    "onnx==1.23.2",
    "onnx_ir==1.1.0",
    "safetensors",
    "tqdm",
    "psutil",
)
GENAI_BUILDER_OPTIONS = ("accuracy_level=4", "block_size=32")

Log = Callable[[str], None]


@dataclass
class Peer:
    """A peer runtime ready to run (``python`` and ``model`` set) or skipped (``reason`` set)."""

    name: str
    python: Path | None = None
    model: Path | None = None
    runner: Path | None = None
    version: str | None = None
    reason: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.reason is None and self.python is not None and self.model is not None


class SetupError(Exception):
    """A peer could not be set up; the message says why."""


def peers_dir() -> Path:
    return cache_dir("peers")


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str], log: Log, *, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    log("$ " + " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SetupError(f"{cmd[0]}: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise SetupError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: " + " | ".join(tail))
    return proc.stdout


def _probe(python: Path, code: str) -> str | None:
    """Run a snippet in a venv; its stdout, or None when the venv or the import is not there."""
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False, timeout=300)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _make_venv(venv: Path, log: Log) -> Path:
    python = _venv_python(venv)
    if not python.exists():
        # `python -m venv` from inside a venv bases the new one on the same interpreter
        _run([sys.executable, "-m", "venv", str(venv)], log)
        _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], log)
    return python


def _gguf(log: Log) -> Path:
    from edge_runtime.models import fetch_model

    log(f"fetching {MODEL} (cached after the first time)")
    return fetch_model(MODEL)


def setup_llamacpp(*, build: bool = True, log: Log = print) -> Peer:
    """llama-cpp-python on the original Q4_1 GGUF."""
    peer = Peer("llamacpp", runner=Path(__file__).with_name("run_llamacpp.py"))
    venv = peers_dir() / "llamacpp-venv"
    python = _venv_python(venv)
    tag = _llamacpp_build_tag()
    stamp = venv / "edge-runtime-build-tag"
    version = _probe(python, "import llama_cpp; print(llama_cpp.__version__)")
    built_as = stamp.read_text().strip() if stamp.is_file() else None
    if version != LLAMACPP_VERSION or built_as != tag:
        if not build:
            raise SetupError(f"llama-cpp-python {LLAMACPP_VERSION} is not set up in {venv} with this benchmark's "
                             "build flags (building was not allowed)")
        wheels = peers_dir() / "wheels" / f"llamacpp-{tag}"
        wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{LLAMACPP_VERSION}-*.whl"))), None)
        python = _make_venv(venv, log)
        if wheel is None:
            log(f"compiling llama-cpp-python {LLAMACPP_VERSION} for this CPU (about 5 minutes on 2 cores)")
            _run(
                [str(python), "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(wheels),
                 f"llama-cpp-python=={LLAMACPP_VERSION}"],
                log,
                env=_llamacpp_build_env(),
            )
            wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{LLAMACPP_VERSION}-*.whl"))), None)
            if wheel is None:
                raise SetupError(f"pip built no llama-cpp-python wheel into {wheels}")
        # forced: a venv may hold the same version built with other flags; then its dependencies, if missing
        _run([str(python), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)], log)
        _run([str(python), "-m", "pip", "install", "--quiet", str(wheel), "psutil"], log)
        version = _probe(python, "import llama_cpp; print(llama_cpp.__version__)")
        if version != LLAMACPP_VERSION:
            raise SetupError(f"llama_cpp does not import in {venv} after installing {wheel.name}")
        stamp.write_text(tag + "\n")
    peer.python, peer.version = python, version
    peer.model = _gguf(log)
    peer.details = {"venv": str(venv), "cmake_args": LLAMACPP_CMAKE_ARGS, "cflags": LLAMACPP_CFLAGS,
                    "model_format": "GGUF Q4_1 (original)"}
    return peer


def _genai_model(python: Path, log: Log) -> tuple[Path, dict[str, object]]:
    root = peers_dir()
    out = root / f"genai-{MODEL}-int4"
    stamp = out / "edge-runtime-stamp.json"
    options = {"precision": "int4", "execution_provider": "cpu", "extra_options": list(GENAI_BUILDER_OPTIONS),
               "onnxruntime-genai": GENAI_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()).get("options") == options:
        return out, options
    hf_dir = root / f"{MODEL}-hf"
    if not (hf_dir / "config.json").is_file():
        gguf = _gguf(log)
        log(f"dequantizing {gguf.name} into a Hugging Face directory for the genai builder")
        _run([sys.executable, str(Path(__file__).with_name("export_hf.py")), str(gguf), str(hf_dir)], log)
    log("building the onnxruntime-genai int4 model with its own model builder")
    _run(
        [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", "int4",
         "-e", "cpu", "-c", str(root / "genai-build-cache"), "--extra_options", *GENAI_BUILDER_OPTIONS],
        log,
    )
    if not (out / "genai_config.json").is_file():
        raise SetupError(f"the genai builder wrote no genai_config.json into {out}")
    stamp.write_text(json.dumps({"options": options, "source": str(hf_dir)}, indent=1))
    return out, options


def setup_genai(*, build: bool = True, log: Log = print) -> Peer:
    """onnxruntime-genai on an int4 model built by its own builder from the same checkpoint."""
    peer = Peer("genai", runner=Path(__file__).with_name("run_genai.py"))
    venv = peers_dir() / "genai-venv"
    python = _venv_python(venv)
    check = "import onnxruntime_genai as og, transformers, onnx_ir, psutil; print(og.__version__)"
    version = _probe(python, check)
    if version != GENAI_VERSION:
        if not build:
            raise SetupError(f"onnxruntime-genai {GENAI_VERSION} is not set up in {venv} (building was not allowed)")
        python = _make_venv(venv, log)
        _run([str(python), "-m", "pip", "install", "--quiet", *GENAI_REQUIREMENTS], log)
        version = _probe(python, check)
        if version != GENAI_VERSION:
            raise SetupError(f"onnxruntime_genai {GENAI_VERSION} does not import in {venv}")
    if build:
        model_dir, options = _genai_model(python, log)
    else:
        model_dir, options = peers_dir() / f"genai-{MODEL}-int4", {}
        if not (model_dir / "genai_config.json").is_file():
            raise SetupError(f"no genai model in {model_dir} (building was not allowed)")
    peer.python, peer.version, peer.model = python, version, model_dir
    peer.details = {"venv": str(venv), "builder": options, "model_format": "ONNX int4 MatMulNBits (genai builder)"}
    return peer


PEERS: dict[str, Callable[..., Peer]] = {"llamacpp": setup_llamacpp, "genai": setup_genai}


def setup_peer(name: str, *, build: bool = True, log: Log = print) -> Peer:
    """Set up one peer; never raises for an expected failure: the Peer says why it was skipped."""
    if name not in PEERS:
        return Peer(name, reason=f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    try:
        return PEERS[name](build=build, log=log)
    except SetupError as err:
        return Peer(name, reason=str(err))
    except Exception as err:  # e.g. the model fetch failing: the benchmark goes on without this peer
        return Peer(name, reason=f"{type(err).__name__}: {err}")


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PEERS)
    failed = 0
    for name in names:
        peer = setup_peer(name)
        if peer.ready:
            print(f"{name}: ready ({peer.version}) python={peer.python} model={peer.model}")
        else:
            failed += 1
            print(f"{name}: not set up: {peer.reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
