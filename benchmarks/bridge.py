"""Benchmark of the cloud bridge: what gRPC adds, and how many requests it serves at once.

1. Added latency: a loopback gRPC round trip through the bridge (auth, validation,
   quota, queue, pricing, CloudClient) against the same in-process backend call
   made directly. p50 and p99 of both, and their difference. Target: p50 <= 2 ms.
2. Throughput with 1, 4 and 16 concurrent clients against the onnx backend
   (``--bundle DIR``; the engine must be installed), every request answered: a
   request the bridge refuses for a full queue is retried by the client after
   the delay it is told, and one that is finally lost fails the benchmark.
   Without a bundle or engine the echo backend stands in (``--token-delay-ms``
   per token), and the results say so.

    python benchmarks/bridge.py [--bundle DIR] [--requests 2000] [--per-client 8]
                                [--workers 2] [--intra-op-threads N]

On a 2-core machine, ``--workers 2`` with the engine's default threads runs two
2-thread generations on two cores; ``--workers 2 --intra-op-threads 1`` serves
more tokens per second to concurrent clients, fewer to a single one.

Writes benchmarks/results/bridge-<host>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._host import cpu_model  # noqa: E402
from cloud_bridge import create_server, hash_token, load_bridge_settings  # noqa: E402
from cloud_bridge.backends import BackendRequest, CancelToken  # noqa: E402
from cloud_bridge.backends.echo import EchoBackend  # noqa: E402
from edge_runtime._files import write_text_whole  # noqa: E402
from edge_runtime.cli.bench import _amount_of, _int_at_least, _out_file, check_bundle_given  # noqa: E402
from edge_runtime.cloud import CloudClient  # noqa: E402
from edge_runtime.engine.types import SamplingParams  # noqa: E402

TOKEN = "ebt_benchmark-only-token"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a Python function that reverses a string."},
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _settings(models: dict[str, Any], **server: Any) -> Any:
    return load_bridge_settings(
        data={
            "server": {"address": "127.0.0.1:0", "max_concurrent_rpcs": 64, **server},
            "auth": {"tokens_file": None, "tokens": {"bench": hash_token(TOKEN)}},
            "quota": {"requests_per_minute": 0, "tokens_per_minute": 0},
            "models": models,
        },
        env={},
    )


def added_latency(requests: int) -> dict[str, Any]:
    """Direct in-process backend calls vs. the same calls through the bridge on loopback."""
    reply = "def reverse(s): return s[::-1]"
    backend = EchoBackend(
        load_bridge_settings(data={"models": {"e": {"backend": "echo", "reply": reply}}}, env={}).models["e"]
    )
    params = SamplingParams(max_new_tokens=64)
    request = BackendRequest("bench", [dict(m) for m in MESSAGES], params)
    direct: list[float] = []
    for i in range(requests + 100):
        started = time.perf_counter()
        backend.generate(request, CancelToken())
        if i >= 100:  # warm-up
            direct.append((time.perf_counter() - started) * 1000.0)
    backend.generations.clear()

    server, port = create_server(_settings({}), backends={"echo": backend}, insecure=True)
    server.start()
    via: list[float] = []
    try:
        with CloudClient(address=f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout_s=10) as client:
            for i in range(requests + 100):
                started = time.perf_counter()
                client.generate(MESSAGES, params=params)
                if i >= 100:
                    via.append((time.perf_counter() - started) * 1000.0)
    finally:
        server.stop(0)
    return {
        "requests": requests,
        "direct_p50_ms": percentile(direct, 50),
        "direct_p99_ms": percentile(direct, 99),
        "grpc_p50_ms": percentile(via, 50),
        "grpc_p99_ms": percentile(via, 99),
        "added_p50_ms": percentile(via, 50) - percentile(direct, 50),
        "added_p99_ms": percentile(via, 99) - percentile(direct, 99),
        "target_added_p50_ms": 2.0,
    }


def _model(
    bundle: str | None, token_delay_ms: float, workers: int, intra_op_threads: int | None = None
) -> tuple[dict[str, Any], str]:
    if bundle:
        try:
            from edge_runtime.engine import Engine  # noqa: F401
        except ImportError as err:
            raise SystemExit(f"--bundle given but the engine cannot be imported: {err}") from err
        model = {"backend": "onnx", "bundle": str(Path(bundle).expanduser()), "workers": workers, "queue_size": 32}
        threads = "the engine's default threads"
        if intra_op_threads:
            model["intra_op_threads"] = intra_op_threads
            threads = f"{intra_op_threads} thread(s)"
        return model, f"onnx ({Path(bundle).name}, {threads} per generation)"
    reply = " ".join(f"tok{i}" for i in range(32))
    return (
        {"backend": "echo", "reply": reply, "token_delay_ms": token_delay_ms, "workers": workers, "queue_size": 32},
        f"echo stand-in ({token_delay_ms:g} ms/token; no engine bundle given)",
    )


def _run_clients(port: int, clients: int, per_client: int, max_new_tokens: int) -> dict[str, Any]:
    """``clients`` threads, each with its own CloudClient, making ``per_client`` requests one after another."""
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    answered, tokens, retries = [0] * clients, [0] * clients, [0] * clients
    failures: list[str] = []
    latencies: list[float] = []

    def work(index: int) -> None:
        with CloudClient(
            address=f"127.0.0.1:{port}",
            token=TOKEN,
            insecure=True,
            timeout_s=300,
            max_attempts=50,
            circuit_failure_threshold=10_000,
        ) as client:
            barrier.wait()
            for _ in range(per_client):
                started = time.perf_counter()
                try:
                    result = client.generate(MESSAGES, params=SamplingParams(max_new_tokens=max_new_tokens))
                except Exception as err:  # counted: the benchmark fails if any request is lost
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}")
                    continue
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000.0)
                answered[index] += 1
                tokens[index] += result.completion_tokens
                retries[index] += result.attempts - 1

    # daemon threads: an interrupted run (Ctrl-C, SIGTERM) exits instead of waiting for clients that keep retrying
    # the stopped bridge
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        # in short waits: a signal that reaches one of gRPC's threads does not wake a join that waits for good,
        # and Ctrl-C or SIGTERM would be handled only when every client had given up
        while thread.is_alive():
            thread.join(0.2)
    elapsed = time.perf_counter() - started
    sent = clients * per_client
    return {
        "clients": clients,
        "sent": sent,
        "answered": sum(answered),
        "lost": sent - sum(answered),
        "retried_after_queue_full": sum(retries),
        "requests_per_s": sum(answered) / elapsed,
        "completion_tokens_per_s": sum(tokens) / elapsed,
        "latency_p50_ms": percentile(latencies, 50) if latencies else None,
        "latency_p99_ms": percentile(latencies, 99) if latencies else None,
        "failures": failures[:5],
    }


def throughput(
    bundle: str | None,
    concurrency: list[int],
    per_client: int,
    token_delay_ms: float,
    workers: int,
    max_new_tokens: int,
    intra_op_threads: int | None = None,
) -> dict[str, Any]:
    model, description = _model(bundle, token_delay_ms, workers, intra_op_threads)
    server, port = create_server(_settings({"m": model}), insecure=True)
    server.start()
    try:
        runs = [_run_clients(port, clients, per_client, max_new_tokens) for clients in concurrency]
    finally:
        server.stop(0)
    return {
        "backend": description,
        "bundle": str(Path(bundle).expanduser().resolve()) if bundle else None,
        # which build was measured: a later build at the same path (another quantization layout) decodes at
        # another speed, and the path alone does not say so
        "bundle_build": _bundle_build(bundle) if bundle else None,
        "workers": workers,
        "intra_op_threads": intra_op_threads,
        "max_new_tokens": max_new_tokens,
        "per_client": per_client,
        "runs": runs,
    }


def _bundle_build(bundle: str) -> dict[str, Any]:
    from edge_runtime.bundle import load_manifest

    manifest = load_manifest(Path(bundle).expanduser())
    return {"bundle_hash": manifest.bundle_hash, "created_at": manifest.raw.get("created_at"),
            "quantization": manifest.raw.get("quantization"), "quality": manifest.raw.get("quality")}


_positive_int = _int_at_least(1)


def _counts(text: str) -> list[int]:
    """--concurrency 1,4,16: checked when parsed, not after the latency phase has run"""
    try:
        return [_positive_int(c) for c in text.split(",")]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="model bundle for the onnx backend (default: the echo stand-in)")
    parser.add_argument("--requests", type=_positive_int, default=2000, help="round trips measured for the added latency")
    parser.add_argument("--per-client", type=_positive_int, default=8, help="requests each concurrent client makes")
    parser.add_argument("--concurrency", type=_counts, default="1,4,16", help="client counts, comma-separated")
    parser.add_argument("--workers", type=_positive_int, default=2, help="generations the bridge runs at once")
    parser.add_argument("--intra-op-threads", type=_positive_int, default=None,
                        help="onnx backend: onnxruntime threads per generation (default: the engine's, all cores)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--token-delay-ms", type=_amount_of("milliseconds"), default=5.0, help="echo stand-in: pause per token")
    parser.add_argument(
        "--out", type=_out_file, default=ROOT / "benchmarks" / "results" / f"bridge-{socket.gethostname()}.json"
    )
    args = parser.parse_args(argv)
    if args.bundle is not None:  # checked now, not after the latency phase's 2,000 round trips
        check_bundle_given(parser, Path(args.bundle), "int4")

    latency = added_latency(args.requests)
    load = throughput(
        args.bundle,
        args.concurrency,
        args.per_client,
        args.token_delay_ms,
        args.workers,
        args.max_new_tokens,
        args.intra_op_threads,
    )
    report = {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "added_latency": latency,
        "throughput": load,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(args.out, json.dumps(report, indent=2) + "\n")  # never half a results file

    print(f"Added latency of a loopback gRPC round trip ({latency['requests']} calls, echo backend in-process)")
    print(f"  {'':<22}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"  {'direct backend call':<22}{latency['direct_p50_ms']:>10.3f}{latency['direct_p99_ms']:>10.3f}")
    print(f"  {'through the bridge':<22}{latency['grpc_p50_ms']:>10.3f}{latency['grpc_p99_ms']:>10.3f}")
    verdict = "meets" if latency["added_p50_ms"] <= latency["target_added_p50_ms"] else "MISSES"
    print(
        f"  {'added':<22}{latency['added_p50_ms']:>10.3f}{latency['added_p99_ms']:>10.3f}"
        f"   ({verdict} the 2 ms p50 target)"
    )
    print()
    print(
        f"Throughput: {load['backend']}, {load['workers']} workers, {load['max_new_tokens']} new tokens, "
        f"{load['per_client']} requests per client"
    )
    print(
        f"  {'clients':>8}{'sent':>7}{'answered':>10}{'lost':>6}{'retried':>9}"
        f"{'req/s':>9}{'tok/s':>9}{'p50 ms':>10}{'p99 ms':>10}"
    )
    for run in load["runs"]:
        print(
            f"  {run['clients']:>8}{run['sent']:>7}{run['answered']:>10}{run['lost']:>6}"
            f"{run['retried_after_queue_full']:>9}"
            f"{run['requests_per_s']:>9.2f}{run['completion_tokens_per_s']:>9.1f}"
            f"{_ms(run['latency_p50_ms']):>10}{_ms(run['latency_p99_ms']):>10}"
        )
    print(f"\nwrote {args.out}")
    lost = sum(run["lost"] for run in load["runs"])
    if lost:  # every run's failures: the last run may have lost none
        failures = "; ".join(f"{run['clients']} client(s): {run['failures']}" for run in load["runs"] if run["lost"])
        print(f"{lost} requests lost: {failures}", file=sys.stderr)
    return 1 if lost else 0


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"  # None: every request of that level was lost


if __name__ == "__main__":
    from benchmarks._entry import run_main

    sys.exit(run_main(main, "bridge.py"))
