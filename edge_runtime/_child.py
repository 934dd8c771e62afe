"""A service run as a child process for as long as a ``with`` block: started, awaited until healthy, stopped.

The explorer's live check (``edge-runtime serve``) and ``make demo`` (``cloud-bridge
serve``) both need this; a child that dies, or never becomes healthy, is an error
naming its log.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from .errors import EdgeRuntimeError

__all__ = ["free_port", "child_service"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a child process to bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def child_service(cmd: Sequence[str], log_path: Path, healthy: Callable[[], bool], *, name: str,
                  timeout_s: float = 120.0, stop_timeout_s: float = 30.0,
                  env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (output to ``log_path``; ``env``, else this process's environment) until ``healthy()`` is true;
    terminate it when the block ends."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=None if env is None else dict(env))
    try:
        deadline = time.monotonic() + timeout_s
        while not healthy():
            if proc.poll() is not None:
                raise EdgeRuntimeError(f"{name} exited with code {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise EdgeRuntimeError(f"{name} did not become healthy within {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
