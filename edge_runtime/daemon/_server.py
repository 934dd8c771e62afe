"""The daemon's lifecycle: bind, load the model, serve HTTP and gRPC, drain on SIGTERM, exit.

::

    server, port = create_server(settings)   # binds 127.0.0.1:<port> and the gRPC socket; nothing runs yet
    server.start()                           # background thread (tests, embedding); or:
    exit_code = server.serve_forever()       # main thread, with SIGTERM/SIGINT/SIGHUP handlers (`edge-runtime serve`)

Without a ``runtime`` the model loads in a background thread after start:
``/health`` answers 503 ``loading`` until it is ready. A drain (SIGTERM, or
:meth:`DaemonServer.drain`) turns ``/health`` to 503 ``draining``, refuses new
requests with 503 and lets admitted ones finish for up to
``server.drain_timeout_s``; what is still running then is cancelled. The
listeners close only after that, and the process exits 0. SIGHUP drains the same way and exits 129: settings
are read only at start, and systemd's ``Restart=on-failure`` restarts a process that exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._signals import exit_status_after_stop, stop_signals
from .._unix_socket import check_socket_path_length
from ..errors import ConfigError, EdgeRuntimeError
from ._guard import BrowserGuard, is_loopback_host
from ._http import create_app
from ._service import ChatService, handover_permits

if TYPE_CHECKING:
    from ..hybrid import HybridRuntime
    from ..settings import RuntimeSettings

__all__ = ["DaemonServer", "create_server", "is_loopback_host"]

log = logging.getLogger("edge_runtime.daemon")

# after a drain, what uvicorn may still spend closing connections
_CLOSE_GRACE_S = 2.0
# at most one log line per this many seconds while accept() fails for lack of file descriptors
_ACCEPT_ERROR_LOG_S = 10.0
# how long an exiting daemon waits for a model load in progress (a large model on a Pi loads for tens of seconds)
_LOAD_JOIN_S = 300.0
# after a drain timed out and the rest was cancelled: time for the engines to notice
_CANCEL_GRACE_S = 5.0


class _AcceptErrorsOncePer:
    """The event loop's exception handler: one line per interval for accept() failing for lack of descriptors.

    asyncio logs a whole traceback for every failed accept(); with the process' descriptors held by
    a flood of connections that was ~10,000 a second (a 174 MB log in 30 s). Everything else goes to
    asyncio's default handler.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next_s = 0.0
        self._suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now < self._next_s:
            self._suppressed += 1
            return
        self._next_s = now + self.interval_s
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        self._suppressed = 0
        log.error("cannot accept connections: %s%s; raise the open-file limit (LimitNOFILE) or find who holds "
                  "so many connections", context.get("exception") or "out of file descriptors", more)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"cannot resolve {host!r}: {err.strerror}", field="server.host") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}", field="server.port") from err
    sock.setblocking(False)
    return sock


def _uvicorn_server(app: Any, settings: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # the daemon handles SIGTERM itself (drain first); uvicorn's handler would stop at once
            # and re-raise the signal after shutdown, so the process would not exit 0
            yield

        def install_signal_handlers(self) -> None:  # the same hook in uvicorn releases before capture_signals
            pass

    from ._protocol import H11WithHeadersTimeout

    config = uvicorn.Config(
        app, http=H11WithHeadersTimeout, loop="asyncio", ws="none", lifespan="off", log_config=None, access_log=False,
        server_header=False, timeout_graceful_shutdown=int(_CLOSE_GRACE_S), timeout_keep_alive=5,
    )
    return Server(config)


class DaemonServer:
    """One daemon: the HTTP app, the optional gRPC server and the runtime they share."""

    def __init__(self, settings: RuntimeSettings, sock: socket.socket, *, runtime: HybridRuntime | None = None,
                 ) -> None:
        self.settings = settings
        self.service = ChatService(settings.server)
        self.app = BrowserGuard(create_app(self.service), check_host=not settings.server.allow_remote,
                                on_refused=self.service.refused_at_the_door)
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.host: str = settings.server.host
        self._own_runtime = runtime is None
        self._runtime = runtime
        self._meter: Any = None
        self.grpc_server: Any = None
        self.grpc_health: Any = None
        self.grpc_socket: Path | None = None
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._plain_handlers: dict[int, Any] = {}  # signals handled without the loop's help, and what they had before
        self._thread: threading.Thread | None = None
        self._load_thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ---- running --------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve in a background thread (no signal handlers); returns once the listeners are up."""
        self._thread = threading.Thread(target=self._run, args=(False,), name="edge-runtime-daemon", daemon=True)
        self._thread.start()
        self._started.wait()

    def serve_forever(self) -> int:
        """Serve in this (main) thread until SIGTERM/SIGINT/SIGHUP and the drain are done; the process' exit code."""
        self._run(True)
        loader = self._load_thread
        if loader is not None and loader.is_alive():
            # the process must not exit while onnxruntime builds a session in that thread: C++ aborts
            # ("terminate called without an active exception") when its statics go with a thread inside it
            log.info("waiting for the model load to end before exiting (a second signal exits at once)")
            # asyncio.run restored the default handlers: a second Ctrl-C would raise here and exit normally
            previous = {sig: signal.signal(sig, self._exit_at_once) for sig in stop_signals()}
            try:
                loader.join(_LOAD_JOIN_S)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            if loader.is_alive():
                self._exit_at_once()
        return self.exit_code

    def _exit_at_once(self, *_signal: Any) -> None:
        """Exit without the interpreter's cleanup, which would abort with the load thread inside onnxruntime."""
        # straight to stderr: a queued log record would be lost with the process
        sys.stderr.write("edge-runtime: exiting while the model is still loading\n")
        sys.stderr.flush()
        os._exit(self.exit_code)

    def _run(self, install_signals: bool) -> None:
        try:
            asyncio.run(self._main(install_signals))
        finally:
            self._cleanup()
            self._started.set()
            self._stopped.set()

    async def _main(self, install_signals: bool) -> None:
        loop = self._loop = asyncio.get_running_loop()
        loop.set_exception_handler(_AcceptErrorsOncePer(_ACCEPT_ERROR_LOG_S))
        self._stop = asyncio.Event()
        if install_signals:
            for sig in stop_signals():
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                except NotImplementedError:  # Windows' event loops: a plain handler, which hands the signal to the loop
                    self._plain_handlers[sig] = signal.signal(
                        sig, lambda signum, _frame: loop.call_soon_threadsafe(self._on_signal, signum))
        try:
            await self._serve()
        finally:
            # undone before the loop closes, as its own handlers are: they would call into the closed loop (and
            # asyncio.run puts back the default SIGINT handler only when it finds its own)
            for sig, handler in self._plain_handlers.items():
                signal.signal(sig, handler)
            self._plain_handlers.clear()

    async def _serve(self) -> None:
        server = _uvicorn_server(self.app, self.settings)
        serving = asyncio.create_task(server.serve(sockets=[self._sock]))
        if self.grpc_server is not None:
            self.grpc_server.start()
        # not "serving" yet: the model loads next (503 "loading" meanwhile), and a bad bundle or cloud setting
        # found then still ends the process; "model ... ready" says when requests are answered
        log.info("listening on %s%s; loading the model", self.url,
                 f" and unix:{self.grpc_socket}" if self.grpc_socket else "")
        if self._runtime is not None:
            self._attach(self._runtime)
        else:
            self._load_thread = threading.Thread(target=self._load, name="edge-runtime-load", daemon=True)
            self._load_thread.start()
        while not server.started and not serving.done():
            await asyncio.sleep(0.005)
        self._started.set()
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await serving

    def _on_signal(self, sig: int) -> None:
        if self._draining:
            log.warning("%s again: stopping now", signal.Signals(sig).name)
            self.service.cancel_all("shutdown")
            assert self._stop is not None
            self._stop.set()
            return
        self.exit_code = self.exit_code or exit_status_after_stop(sig, log)  # a failed load's 1 stays
        log.info("%s: draining (up to %g s)", signal.Signals(sig).name, self.settings.server.drain_timeout_s)
        self._begin_drain(self.settings.server.drain_timeout_s)

    def _load(self) -> None:
        try:
            from ..hybrid import HybridRuntime
            from ..power import EnergyMeter, set_default_meter

            t0 = time.perf_counter()
            self._meter = EnergyMeter.from_settings(self.settings.power)
            set_default_meter(self._meter)  # anything else in this process measures with the same meter
            self.service.metrics.energy_source = (self._meter.source, self._meter.estimated)
            runtime = HybridRuntime.from_settings(self.settings, energy_meter=self._meter)
        except Exception as err:  # any failure to load ends the daemon; systemd restarts it
            what = "invalid configuration" if isinstance(err, ConfigError) else "cannot load the model"
            log.error("%s: %s", what, err, exc_info=not isinstance(err, EdgeRuntimeError))
            self.service.fail(err)
            self.exit_code = 1
            self._call_soon(self._stop_now)
            return
        if self._stopped.is_set():  # stopped while loading: nobody will serve (or close) it
            runtime.close()
            return
        # which estimator decides the escalations: the built-in one, or the file calibrate or explore fitted
        log.info("model %s ready in %.1f s (energy: %s; estimator: %s from %s)", runtime.engine.model_name,
                 time.perf_counter() - t0, self._meter.source, getattr(runtime.estimator, "name", "?"),
                 self.settings.engine.estimator or "the built-in default")
        self._runtime = runtime
        self._call_soon(self._attach, runtime)

    def _attach(self, runtime: Any) -> None:
        self.service.attach(runtime)
        if self.grpc_health is not None and self.service.state == "ready":
            from grpc_health.v1 import health_pb2

            from ._grpc import SERVICE_NAME

            for name in ("", SERVICE_NAME):
                self.grpc_health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _call_soon(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def _stop_now(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # ---- draining and stopping ------------------------------------------------------------------

    def _begin_drain(self, timeout_s: float) -> None:
        if self._draining:
            return
        self._draining = True
        self.service.begin_drain()
        if self.grpc_health is not None:
            self.grpc_health.enter_graceful_shutdown()
        # the loop keeps only a weak reference to a task: one nobody holds may be collected before it ends
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(timeout_s))

    async def _drain(self, timeout_s: float) -> None:
        try:
            deadline = time.monotonic() + timeout_s
            while self.service.active_jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.service.active_jobs:
                n = self.service.cancel_all("shutdown")
                log.warning("drain timeout: cancelled %d request(s) still running", n)
                deadline = time.monotonic() + _CANCEL_GRACE_S
                while self.service.active_jobs and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            # let the last responses reach their clients before uvicorn closes the connections
            await asyncio.sleep(0.05)
            if self.grpc_server is not None:
                await asyncio.to_thread(lambda: self.grpc_server.stop(1.0).wait())
            log.info("drained")
        except Exception as err:
            # e.g. no thread could be started (memory or a tasks limit): the daemon stops all the same, else it
            # would answer 503 until killed, and a supervisor that waits for it would wait for ever
            log.error("drain failed (%s: %s): stopping now", type(err).__name__, err)
        finally:
            self._stop_now()

    def drain(self, timeout_s: float | None = None) -> None:
        """Start a drain from any thread (as SIGTERM does); :meth:`wait` for the end."""
        t = self.settings.server.drain_timeout_s if timeout_s is None else timeout_s
        self._call_soon(self._begin_drain, t)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the daemon stopped; False on timeout."""
        return self._stopped.wait(timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.service.state == "ready":
                return True
            if self.service.state == "failed" or self._stopped.is_set():
                return False
            time.sleep(0.01)
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop at once: cancel what runs, close the listeners, release the runtime we loaded."""
        self.service.cancel_all("shutdown")
        self._call_soon(self._stop_now)
        if self._thread is not None:
            self._thread.join(timeout_s)
        elif not self._stopped.is_set() and self._loop is None:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.grpc_server is not None:
            self.grpc_server.stop(0)
        if self.grpc_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.grpc_socket.unlink()
        with contextlib.suppress(OSError):
            self._sock.close()
        self.service.close()
        if self._own_runtime and self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        if self._meter is not None:
            from ..power import set_default_meter

            set_default_meter(None)
            self._meter.close()
            self._meter = None


def check_listeners(settings: RuntimeSettings) -> None:
    """What create_server refuses about its listeners before binding (``serve --check`` too, with nothing bound)."""
    s = settings.server
    if not s.allow_remote and not is_loopback_host(s.host):
        raise ConfigError(
            f"{s.host!r} is not a loopback address: the daemon has no authentication, so binding it to a network "
            "needs server.allow_remote = true (and a firewall or reverse proxy in front)", field="server.host")
    if s.grpc_socket:
        check_socket_path_length(Path(s.grpc_socket).expanduser().absolute(), field="server.grpc_socket")


def create_server(settings: RuntimeSettings, *, runtime: HybridRuntime | None = None) -> tuple[DaemonServer, int]:
    """Bind the daemon (HTTP on server.host:server.port, gRPC on server.grpc_socket); returns it and its HTTP port.

    ``settings`` is a :class:`~edge_runtime.settings.RuntimeSettings`. ``runtime``: serve this HybridRuntime
    (the caller closes it) instead of loading one from the settings after :meth:`DaemonServer.start`.
    """
    s = settings.server
    check_listeners(settings)
    if not is_loopback_host(s.host):
        log.warning("the daemon listens on %s with no authentication: anyone who reaches this port can use it "
                    "(and its cloud quota); keep a firewall or an authenticating reverse proxy in front", s.host)
    sock = _bind(s.host, s.port)
    server = DaemonServer(settings, sock, runtime=runtime)
    if s.grpc_socket:
        from ._grpc import create_grpc_server

        try:
            # a call may run, wait in the queue or wait for the bridge; beyond those the service refuses anyway
            calls = settings.engine.max_sessions + s.queue_size + handover_permits(s)
            server.grpc_server, server.grpc_health, server.grpc_socket = create_grpc_server(
                server.service, s.grpc_socket, max_calls=calls)
        except BaseException:
            sock.close()
            raise
    return server, server.port
