"""Fixtures for the daemon tests: real daemons on 127.0.0.1 port 0 over the tiny model, a real bridge, raw HTTP."""

from __future__ import annotations

import http.client as httplib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud_bridge import create_server as create_bridge
from cloud_bridge import hash_token, load_bridge_settings
from edge_runtime.cloud import CloudClient
from edge_runtime.daemon import DaemonServer, create_server
from edge_runtime.engine import Engine
from edge_runtime.hybrid import HybridRuntime
from edge_runtime.power import ConstantPowerSource, EnergyMeter
from edge_runtime.settings import load_runtime_settings

TOKEN = "ebt_daemon-test-token"
ASK = [{"role": "user", "content": "what is 2 + 2?"}]
CLOUD_REPLY = "the cloud says four"


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Iterator[Engine]:
    e = Engine(tiny_bundle, energy_meter=EnergyMeter(source=ConstantPowerSource(5.0)))
    yield e
    e.close()


class SlowEngine:
    """The real engine, pausing ``delay_s`` after every token: long enough generations to cancel or drain.

    Records the finish reason of every generation, so a test sees when and why one ended.
    """

    def __init__(self, engine: Engine, delay_s: float) -> None:
        self._engine = engine
        self.delay_s = delay_s
        self.finished: list[str] = []
        self.started = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self._slowed(self._engine.stream(*args, **kwargs))

    def stream_tokens(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self._slowed(self._engine.stream_tokens(*args, **kwargs))

    def _slowed(self, inner: Iterator[Any]) -> Iterator[Any]:
        def run() -> Iterator[Any]:
            self.started.set()
            for chunk in inner:
                if chunk.result is not None:
                    self.finished.append(chunk.result.finish_reason)
                elif chunk.token is not None:
                    time.sleep(self.delay_s)
                yield chunk

        return run()


@dataclass
class Bridge:
    server: Any
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_bridge(**echo: Any) -> Bridge:
    settings = load_bridge_settings(data={
        "server": {"address": "127.0.0.1:0", "grace_period_s": 0.2},
        "auth": {"tokens_file": None, "tokens": {"dev": hash_token(TOKEN)}},
        "models": {"big": {"backend": "echo", "model": "big-cloud-model", "reply": CLOUD_REPLY,
                           "usd_per_million_input_tokens": 1000.0, "usd_per_million_output_tokens": 2000.0, **echo}},
    }, env={})
    server, port = create_bridge(settings, insecure=True)
    server.start()
    return Bridge(server, port)


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    b = start_bridge()
    yield b
    b.server.stop(0)


def cloud_client(address: str, **fields: Any) -> CloudClient:
    fields.setdefault("timeout_s", 5.0)
    fields.setdefault("max_attempts", 1)
    fields.setdefault("circuit_failure_threshold", 1)
    fields.setdefault("circuit_cooldown_s", 60.0)
    return CloudClient(address=address, token=TOKEN, insecure=True, **fields)


def daemon_settings(tmp_path: Path | None = None, **server: Any) -> Any:
    server.setdefault("port", 0)
    server.setdefault("grpc_socket", str(tmp_path / "edge.sock") if tmp_path is not None else "")
    return load_runtime_settings(data={"server": server}, env={})


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., DaemonServer]]:
    """``start_daemon(runtime, tmp_path=None, **server settings)`` -> a started daemon serving ``runtime``."""
    started: list[DaemonServer] = []

    def start(runtime: Any, tmp_path: Path | None = None, **server: Any) -> DaemonServer:
        daemon, _port = create_server(daemon_settings(tmp_path, **server), runtime=runtime)
        started.append(daemon)
        daemon.start()
        assert daemon.wait_ready(10)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def runtime(engine: Any, policy: Any = None, cloud: Any = None, **kw: Any) -> HybridRuntime:
    return HybridRuntime(engine, policy=policy or {"type": "never"}, cloud=cloud, default_max_new_tokens=8, **kw)


class Http:
    """A tiny HTTP client on one keep-alive connection (the stdlib's: no client library in between)."""

    def __init__(self, port: int, timeout_s: float = 30.0) -> None:
        self.conn = httplib.HTTPConnection("127.0.0.1", port, timeout=timeout_s)

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        self.conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        resp = self.conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, data = self.request(method, path, body, **kw)
        return status, headers, json.loads(data) if data else None

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def http() -> Iterator[Callable[[int], Http]]:
    clients: list[Http] = []

    def make(port: int, timeout_s: float = 30.0) -> Http:
        client = Http(port, timeout_s)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        sname, _, rest = series.partition("{")
        if sname != name:
            continue
        have = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


def stops_released_in_part(engine: Any, messages: list[dict[str, str]], max_new_tokens: int = 40,
                           ) -> tuple[dict[str, Any], list[str]]:
    """Sampling settings whose stop strings make the engine release held text in part, and the tokens shown.

    Three one-character tokens u, v, w then z: the stops u+v+"\\x07" and v+w+z[0] hold u and v, release u when w
    comes (v+w may start the second), and cut the text before v. Returns (sampling fields, tokens of the text).
    """
    for seed in range(200):
        plain = engine.generate(messages=messages, max_new_tokens=max_new_tokens, temperature=1.5, seed=seed)
        texts = [t.text for t in plain.tokens]
        for i in range(len(texts) - 3):
            u, v, w, z = texts[i:i + 4]
            if not all(len(c) == 1 and c.isascii() and c.isprintable() for c in (u, v, w)) or not z[:1].isprintable():
                continue
            stops = [u + v + "\x07", v + w + z[0]]
            head = "".join(texts[:i + 1])
            if "\x07" in plain.text or plain.text.find(stops[1]) != len(head) or any(s in head for s in "\x07" + v):
                continue
            return {"temperature": 1.5, "seed": seed, "stop": stops}, texts[:i + 1]
    raise AssertionError("no generation of the tiny model has the tokens this needs")
