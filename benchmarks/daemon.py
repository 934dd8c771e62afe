"""Benchmark of the local daemon: what HTTP, queueing and routing add to a generation, and its throughput.

1. Overhead: the same greedy request (same prompt, same max_tokens, so the same
   tokens) made three ways, interleaved so that a change in the machine's load
   hits all three alike:
   - ``engine``: ``Engine.generate`` in this process (the floor);
   - ``runtime``: ``HybridRuntime.chat`` in this process (adds the policy, the
     confidence estimate, the energy and cost account);
   - ``daemon``: ``POST /v1/chat/completions`` to ``edge-runtime serve`` running
     in a subprocess, over a keep-alive loopback connection (adds HTTP, JSON,
     the queue and the worker thread hand-off).
   Each round runs engine, daemon, runtime, daemon: every call follows one
   made by the other process, so none of them finds its weights warm in the
   CPU caches from a call just before (a bias that favoured the in-process
   paths when the three only rotated).
   p50 and p99 of each, and the daemon's overhead over the engine (difference of
   the p50s, of the p99s, and the median of the per-round differences).
   Target: overhead p50 <= 5 ms on loopback.
2. Throughput with 1, 4 and 16 concurrent clients (each on its own keep-alive
   connection, back to back): requests/s, completion tokens/s, latency p50/p99,
   and how many were refused (the queue is sized so that none should be).

The bundle is the cached SmolLM2-135M-Instruct int4 bundle when there is one,
else ``--bundle DIR`` (e.g. a tiny test bundle); the results say which. The
machine may be shared: the run first waits (``--idle-wait``) for idle CPUs, and
each phase records the share of the CPUs other programs used meanwhile.

    python benchmarks/daemon.py [--bundle DIR] [--rounds 100] [--max-tokens 16] [--per-client 12] [--idle-wait 120]

Writes benchmarks/results/daemon-<host>.json and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._host import cpu_model  # noqa: E402
from edge_runtime._files import write_text_whole  # noqa: E402
from edge_runtime.cli.bench import _int_at_least, _out_file  # noqa: E402

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    return {"p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


def _busy_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def _own_cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


class OtherPrograms:
    """How much CPU other programs took while a phase ran: this machine is shared, the figures say how much."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self) -> OtherPrograms:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), _own_cpu_s(self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        other = max(0.0, (_busy_s() - self.busy0) - (_own_cpu_s(self.pids) - self.own0))
        self.share = round(other / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else 0.0


def wait_for_idle(max_wait_s: float, busy_percent: float = 10.0) -> bool:
    """Wait until the CPUs were nearly idle for two seconds in a row (at most ``max_wait_s``)."""
    import psutil

    deadline, quiet = time.monotonic() + max_wait_s, 0
    while time.monotonic() < deadline:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1.0) < busy_percent else 0
        if quiet >= 2:
            return True
    return False


def default_bundle() -> Path | None:
    from edge_runtime.bundle import verify_bundle
    from edge_runtime.errors import BundleError
    from edge_runtime.models import default_bundle_dir

    path = default_bundle_dir("smollm2-135m-instruct", "int4")
    try:
        verify_bundle(path, "fast")
    except BundleError:
        return None
    return path


class Daemon:
    """``edge-runtime serve`` in a subprocess, on a free loopback port, without gRPC."""

    def __init__(self, bundle: Path, *, threads: int | None, queue_size: int, max_tokens: int) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="edge-daemon-bench-")
        config = Path(self.dir.name) / "edge.toml"
        # absolute: the daemon reads a relative path in its config from the config's (temporary) directory; JSON
        # quoting is valid TOML for a path with quotes or backslashes
        engine = (f"bundle = {json.dumps(str(bundle.resolve()))}\nmax_new_tokens = {max_tokens}\n"
                  + (f"threads = {threads}\n" if threads else ""))
        config.write_text(f'[engine]\n{engine}[policy]\ntype = "never"\n'
                          f'[server]\nport = 0\ngrpc_socket = ""\nqueue_size = {queue_size}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME_") or k == "EDGE_RUNTIME_CACHE"}
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                                     env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.log_tail: collections.deque[str] = collections.deque(maxlen=20)  # what it said last, for a failure
        self._reader: threading.Thread | None = None
        try:
            self._wait_ready()
        except BaseException:  # a failure, Ctrl-C or SIGTERM while it starts: no daemon left behind
            self.proc.kill()
            self.proc.wait()
            if self._reader is not None:
                self._reader.join(5)  # it reads to the end of the killed process's output
            assert self.proc.stderr is not None
            self.proc.stderr.close()
            self.dir.cleanup()
            raise

    def _wait_ready(self) -> None:
        self.port = 0
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_tail.append(line.rstrip())
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        if not self.port:
            raise SystemExit(f"the daemon did not start (exit code {self.proc.wait()}):\n" + "\n".join(self.log_tail))
        # keep reading its log (a line per request) so that it never blocks on a full pipe
        self._reader = threading.Thread(target=self._drain_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # it failed after listening (the model would not load)
                time.sleep(0.2)  # let the reader take its last lines
                raise SystemExit(f"the daemon exited with code {self.proc.returncode}:\n" + "\n".join(self.log_tail))
            probe = Client(self.port)
            try:
                if probe.get("/health") == 200:
                    return
            except OSError:
                pass
            finally:
                probe.conn.close()
            time.sleep(0.1)
        raise SystemExit("the daemon did not become ready in 120 s:\n" + "\n".join(self.log_tail))

    def _drain_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_tail.append(line.rstrip())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.dir.cleanup()
        return code


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def get(self, path: str) -> int:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        resp.read()
        return resp.status

    def chat(self, max_tokens: int) -> tuple[int, dict[str, Any]]:
        body = json.dumps({"model": "local", "messages": MESSAGES, "max_tokens": max_tokens}).encode()
        self.conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def close(self) -> None:
        self.conn.close()


def overhead(bundle: Path, daemon: Daemon, *, rounds: int, max_tokens: int, threads: int | None) -> dict[str, Any]:
    from edge_runtime.engine import Engine
    from edge_runtime.hybrid import HybridRuntime

    engine = Engine(bundle, intra_op_threads=threads)
    runtime = HybridRuntime(engine, policy={"type": "never"})
    client = Client(daemon.port)
    inside: list[dict[str, float]] = []  # the daemon's own account of each request (its "latency" object)

    def via_daemon() -> str:
        body = client.chat(max_tokens)[1]
        inside.append(body["latency"])
        return body["choices"][0]["message"]["content"]

    calls = {
        "engine": lambda: engine.generate(messages=MESSAGES, max_new_tokens=max_tokens).text,
        "runtime": lambda: runtime.chat(MESSAGES, model="local", max_new_tokens=max_tokens).text,
        "daemon": via_daemon,
    }
    # The first call of each path prefills the whole prompt (it doubles as the warm-up), the second
    # reuses the cached prefix, as the timed calls do: all six answers must be the same.
    texts = {f"{name} {which}": call() for which in ("first", "again") for name, call in calls.items()}
    if len(set(texts.values())) != 1:
        raise SystemExit(f"the three paths answered differently: {texts}")
    inside.clear()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        # Every call follows a call made by the other process: a call right after one in its own process
        # finds that process' weights still in the CPU caches and runs faster. (Rotating the three paths
        # did not do this: the two in-process paths often followed each other, the daemon never did.)
        for name in ("engine", "daemon", "runtime", "daemon"):
            # a pause between calls: onnxruntime's threads spin for a while after a run, and the other
            # process' spinning threads would otherwise steal the cores of the next call (2 cores here)
            time.sleep(0.05)
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    client.close()
    engine.close()
    # two daemon calls per round: their mean against the round's engine call
    per_round_daemon = [(a + b) / 2 for a, b in zip(times["daemon"][0::2], times["daemon"][1::2], strict=True)]
    diffs = [d - e for d, e in zip(per_round_daemon, times["engine"], strict=True)]
    routing = [r - e for r, e in zip(times["runtime"], times["engine"], strict=True)]
    out: dict[str, Any] = {name: summary_ms(values) for name, values in times.items()}
    out["daemon_overhead"] = {
        "p50_ms": round(out["daemon"]["p50_ms"] - out["engine"]["p50_ms"], 3),
        "p99_ms": round(out["daemon"]["p99_ms"] - out["engine"]["p99_ms"], 3),
        "median_of_paired_differences_ms": round(statistics.median(diffs) * 1000.0, 3),
    }
    out["routing_overhead"] = {
        "p50_ms": round(out["runtime"]["p50_ms"] - out["engine"]["p50_ms"], 3),
        "median_of_paired_differences_ms": round(statistics.median(routing) * 1000.0, 3),
    }
    # within each daemon request, immune to the other process: HTTP + JSON + thread hand-offs (round trip minus
    # the queue and the runtime's call; the key keeps its old name), the queue apart, and routing (the runtime's
    # call minus prefill and decode)
    outside = [d * 1000.0 - (x["queue_ms"] + x["total_ms"]) for d, x in zip(times["daemon"], inside, strict=True)]
    route = [x["total_ms"] - x["local_prefill_ms"] - x["local_decode_ms"] for x in inside]
    out["daemon_breakdown"] = {
        "http_queue_handoff_p50_ms": round(percentile(outside, 50), 3),
        "http_queue_handoff_p99_ms": round(percentile(outside, 99), 3),
        "queue_p50_ms": round(percentile([x["queue_ms"] for x in inside], 50), 3),
        "routing_p50_ms": round(percentile(route, 50), 3),
        "routing_p99_ms": round(percentile(route, 99), 3),
        "http_queue_handoff_plus_routing_p50_ms": round(
            percentile([a + b for a, b in zip(outside, route, strict=True)], 50), 3),
    }
    out["completion_tokens"] = client_tokens(daemon.port, max_tokens)
    return out


def client_tokens(port: int, max_tokens: int) -> int:
    c = Client(port)
    try:
        return int(c.chat(max_tokens)[1]["usage"]["completion_tokens"])
    finally:
        c.close()


def throughput(daemon: Daemon, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = [0]
    refused = [0]
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def run() -> None:
        c = Client(daemon.port)
        try:
            barrier.wait(60)
            for _ in range(per_client):
                t0 = time.perf_counter()
                try:
                    status, body = c.chat(max_tokens)
                except Exception as err:  # a reset or refused connection: counted, or the phase read as complete
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}")
                    return
                took = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        latencies.append(took)
                        tokens[0] += body["usage"]["completion_tokens"]
                    elif status == 429:
                        refused[0] += 1
                    else:
                        failures.append(f"{status}: {body}")
        finally:
            c.close()

    threads = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {"clients": clients, "requests": len(latencies), "refused_429": refused[0], "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3), "completion_tokens_per_s": round(tokens[0] / wall, 2),
            **summary_ms(latencies)}


_positive_int = _int_at_least(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the cached SmolLM2-135M int4 bundle)")
    parser.add_argument("--rounds", type=_positive_int, default=100, help="overhead: requests per path (default 100)")
    parser.add_argument("--max-tokens", type=_positive_int, default=16, help="completion tokens per request (default 16)")
    parser.add_argument("--per-client", type=_positive_int, default=12, help="throughput: requests per client (default 12)")
    parser.add_argument("--threads", type=_int_at_least(1), help="intra-op threads of both engines (default: physical cores)")
    parser.add_argument("--idle-wait", type=float, default=120.0,
                        help="first wait up to this many seconds for an idle machine (0: start at once)")
    parser.add_argument("--out", type=_out_file,
                        default=ROOT / "benchmarks" / "results" / f"daemon-{socket.gethostname()}.json")
    args = parser.parse_args(argv)

    bundle = args.bundle or default_bundle()
    if bundle is None:
        raise SystemExit("no cached smollm2-135m-instruct int4 bundle: pass --bundle DIR")
    idle = wait_for_idle(args.idle_wait) if args.idle_wait > 0 else None
    load_before = os.getloadavg()
    daemon = Daemon(bundle, threads=args.threads, queue_size=32, max_tokens=args.max_tokens)
    pids = [os.getpid(), daemon.proc.pid]
    try:
        with OtherPrograms(pids) as during_overhead:
            over = overhead(bundle, daemon, rounds=args.rounds, max_tokens=args.max_tokens, threads=args.threads)
        over["other_programs_cpu_share"] = during_overhead.share
        through = []
        for n in (1, 4, 16):
            with OtherPrograms(pids) as during:
                row = throughput(daemon, n, args.per_client, args.max_tokens)
            row["other_programs_cpu_share"] = during.share
            through.append(row)
    finally:
        exit_code = daemon.stop()
    load_after = os.getloadavg()

    from edge_runtime.bundle import verify_bundle

    manifest = verify_bundle(bundle, "fast")
    results = {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "idle_before_start": idle,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "bundle": {"name": manifest.name, "precision": manifest.precision, "path": str(bundle)},
        "settings": {"max_tokens": args.max_tokens, "rounds": args.rounds, "per_client": args.per_client,
                     "threads": args.threads, "max_sessions": 1, "queue_size": 32, "policy": "never",
                     "transport": "HTTP/1.1 keep-alive on loopback, uvicorn h11"},
        "overhead": over,
        "throughput": through,
        "daemon_exit_code_after_sigterm": exit_code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(args.out, json.dumps(results, indent=2) + "\n")  # never half a results file

    print(f"bundle {manifest.name} ({manifest.precision}), {args.max_tokens} tokens a request, "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"other programs used {over['other_programs_cpu_share']:.0%} of the CPUs during the overhead rounds")
    print(f"{'path':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name in ("engine", "runtime", "daemon"):
        s = over[name]
        print(f"{name:<10}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}{s['mean_ms']:>10.2f}")
    o = over["daemon_overhead"]
    print(f"daemon overhead over the engine: p50 {o['p50_ms']:.2f} ms, p99 {o['p99_ms']:.2f} ms, "
          f"median paired {o['median_of_paired_differences_ms']:.2f} ms (target p50 <= 5 ms)")
    k = over["daemon_breakdown"]
    print(f"inside each daemon request: HTTP+hand-off p50 {k['http_queue_handoff_p50_ms']:.2f} ms "
          f"(p99 {k['http_queue_handoff_p99_ms']:.2f}), routing p50 {k['routing_p50_ms']:.2f} ms, "
          f"together p50 {k['http_queue_handoff_plus_routing_p50_ms']:.2f} ms")
    print(f"{'clients':>8}{'req/s':>9}{'tok/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'429':>6}{'others':>8}")
    for t in through:
        print(f"{t['clients']:>8}{t['requests_per_s']:>9.2f}{t['completion_tokens_per_s']:>9.1f}"
              f"{t['p50_ms']:>10.1f}{t['p99_ms']:>10.1f}{t['refused_429']:>6}{t['other_programs_cpu_share']:>8.0%}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from benchmarks._entry import run_main

    sys.exit(run_main(main, "daemon.py"))
