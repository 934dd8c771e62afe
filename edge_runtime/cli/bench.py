"""``edge-runtime bench``: benchmarks that ship with the source tree.

    edge-runtime bench throughput [--threads N] [--repetitions R] [--peers llamacpp,genai|none] [--json]

``throughput`` runs ``benchmarks/throughput.py`` (the same code as ``python
benchmarks/throughput.py``): this engine on the int4 and int8 SmolLM2 bundles
against llama.cpp and onnxruntime-genai on the same machine and threads. It
needs a source checkout (an editable install); peers are set up under
``<cache>/peers`` on first use (minutes; ``--no-peer-setup`` never builds).
The flags are defined here, once, and the script reuses them.
"""

from __future__ import annotations

import argparse
import re
import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import EdgeRuntimeError

__all__ = ["add_throughput_arguments", "register"]


def _int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lowest``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)  # warm-up runs, retries


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _amount_of(unit: str) -> Callable[[str], float]:
    """An argparse type: a finite number of ``unit`` >= 0."""
    def parse(text: str) -> float:
        value = _number(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"must be a number of {unit} >= 0, got {text!r}")
        return value

    return parse


_seconds = _amount_of("seconds")


def _peers(text: str) -> str:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one peer (llamacpp, genai), or 'none'")
    return text


def host_name(text: str) -> str:
    """A results-file name part: no path separators, nothing that climbs out of the results directory."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", text or ""):
        raise argparse.ArgumentTypeError(f"must be a plain name (letters, digits, '.', '_', '-'), got {text!r}")
    return text


def _out_dir(text: str) -> Path:
    """An output directory, checked now (not after the whole benchmark has run) and made only when the results
    are written: a command refused for another flag leaves no directory behind."""
    from .._files import check_can_make_dir

    path = Path(text).expanduser()
    try:
        check_can_make_dir(path)
    except NotADirectoryError as err:  # a file in the way
        raise argparse.ArgumentTypeError(f"{err.filename} is not a directory") from err
    except OSError as err:  # no permission, a read-only file system; err names the directory it would be made in
        if err.filename == str(path):
            raise argparse.ArgumentTypeError(f"cannot write in {path}: {err.strerror or err}") from err
        raise argparse.ArgumentTypeError(f"cannot create {path} in {err.filename}: {err.strerror or err}") from err
    return path


def _out_file(text: str) -> Path:
    """A results file's path, its directory checked before measuring (made when it is written), as ``_out_dir``'s."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory: give the results file's path")
    _out_dir(str(path.parent))
    return path


def check_bundle_given(parser: argparse.ArgumentParser, bundle: Path, precision: str) -> None:
    """Refuse a --bundle (or the default one) that is not a bundle, saying how to make the default."""
    if not (Path(bundle) / "manifest.json").is_file():
        parser.error(f"--bundle: {bundle} is not a bundle; build the default one with `edge-runtime quantize "
                     f"smollm2-135m-instruct --precision {precision}`, or give --bundle DIR")


def _share(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _bundle_arg(value: str) -> tuple[str, Path]:
    label, sep, path = value.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {value!r}")
    return label.strip(), Path(path).expanduser()


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    """The throughput benchmark's flags (shared by this command and ``benchmarks/throughput.py``)."""
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="intra-op threads for every runtime (default: physical cores, fewer under a CPU affinity mask or cgroup quota)")
    parser.add_argument("--repetitions", type=_positive_int, default=5, help="measured runs per prompt (median reported)")
    parser.add_argument("--warmup", type=_count, default=1, help="unmeasured runs of each prompt before measuring")
    parser.add_argument("--load-repetitions", type=_positive_int, default=5,
                        help="model loads per process (median reported)")
    parser.add_argument("--rounds", type=_positive_int, default=1,
                        help="fresh processes per runtime, run in alternating order")
    parser.add_argument("--decode-tokens", type=_positive_int, default=128, help="greedy tokens for the decode figure")
    parser.add_argument("--short-tokens", type=_positive_int, default=20, help="length of the short prompt")
    parser.add_argument("--long-tokens", type=_positive_int, default=500, help="length of the long prompt")
    parser.add_argument("--peers", type=_peers, default="llamacpp,genai",
                        help="comma-separated peers to compare (llamacpp, genai), or 'none'")
    parser.add_argument("--no-peer-setup", action="store_true",
                        help="use peers only if already set up under <cache>/peers (never build)")
    parser.add_argument("--bundle", type=_bundle_arg, action="append", metavar="LABEL=DIR",
                        help="engine bundle(s) to measure instead of the SmolLM2 int4 and int8 bundles (repeatable; one "
                             "model; another model than SmolLM2 needs --peers none)")
    parser.add_argument("--max-other-cpu", type=_share, default=0.05,
                        help="rerun a runtime if other programs used more than this share of the CPUs while it was "
                             "measured (default 0.05; 1 disables)")
    parser.add_argument("--noisy-retries", type=_count, default=2, help="reruns of a runtime measured on a busy machine")
    parser.add_argument("--idle-wait", type=_seconds, default=120.0,
                        help="seconds to wait for an idle machine before a rerun (default 120)")
    parser.add_argument("--out-dir", type=_out_dir, default=None,
                        help="where throughput-<host>.json/.md go (default: benchmarks/results in the checkout)")
    parser.add_argument("--host", type=host_name, default=None, help="name in the results files (default: the hostname)")
    parser.add_argument("--json", action="store_true", help="print the results document instead of the table")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (throughput against llama.cpp and onnxruntime-genai)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benchmarks.required = True
    throughput = benchmarks.add_parser(
        "throughput",
        help="load time, TTFT, prefill and decode tok/s, peak RSS, J/token vs peer runtimes",
        description="Throughput of this engine against llama.cpp and onnxruntime-genai, same machine and threads; "
                    "writes benchmarks/results/throughput-<host>.json and .md.",
    )
    add_throughput_arguments(throughput)
    throughput.set_defaults(func=_run_throughput)


def _throughput_module() -> Any:
    """``benchmarks/throughput.py`` of the checkout this package was installed from (editable installs)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "throughput.py").is_file():
        raise EdgeRuntimeError(
            f"the throughput benchmark ships with the source tree, not with the package: no {root}/benchmarks/"
            "throughput.py (install from a checkout with `pip install -e .`)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.throughput")


def _run_throughput(args: argparse.Namespace) -> int:
    return int(_throughput_module().run_from_args(args))
