"""Building, starting and stopping the bridge: ``create_server(settings_or_address) -> (server, port)``.

Security is on by default: the server needs a TLS certificate and key unless
``insecure=True`` is asked for explicitly, and even then it only binds a
loopback address or a Unix socket. The standard ``grpc.health.v1`` service is
served beside CloudBridge (it needs no token, so load balancers can probe it).
Stopping flips health to NOT_SERVING, refuses new calls, lets in-flight calls
finish within the grace period, then closes the backends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge_runtime._proto.edgecloud.v1 import bridge_pb2, bridge_pb2_grpc
from edge_runtime._grpc_decode import UndecodableRequests
from edge_runtime._unix_socket import prepare_socket_path, socket_mode
from edge_runtime.cloud import check_certificates, check_key_pair, is_loopback_address
from edge_runtime.errors import ConfigError

from ._auth import TokenStore
from ._quota import QuotaManager
from ._service import BridgeService
from ._settings import BridgeSettings, EchoModelSettings, ModelSettings, ServerSettings
from .backends import Backend, create_backend

__all__ = ["SERVICE_NAME", "BridgeServer", "create_server", "is_loopback_address"]

log = logging.getLogger("cloud_bridge")
# after a stop, how long the cancelled calls' threads get to notice before their backends are closed
_DRAIN_THREADS_S = 5.0

SERVICE_NAME = bridge_pb2.DESCRIPTOR.services_by_name["CloudBridge"].full_name


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}", field=f"server.{what}") from err


def _credentials(server: ServerSettings, insecure: bool) -> grpc.ServerCredentials | None:
    if insecure:
        # the config asks for TLS and the command line for plaintext: serving either would ignore one of them
        for name in ("tls_cert", "tls_key", "client_ca"):
            if getattr(server, name) is not None:
                raise ConfigError(
                    f"--insecure serves plaintext, but server.{name} is configured: drop one of the two",
                    field=f"server.{name}",
                )
        if not is_loopback_address(server.address):
            raise ConfigError(
                f"plaintext (--insecure) is only allowed on a loopback address, not {server.address!r}",
                field="server.address",
            )
        return None
    if server.tls_cert is None or server.tls_key is None:
        raise ConfigError(
            "TLS needs a certificate and key (or pass --insecure to serve plaintext on loopback)",
            field="server.tls_cert",
        )
    cert, key = _read(server.tls_cert, "tls_cert"), _read(server.tls_key, "tls_key")
    client_ca = _read(server.client_ca, "client_ca")
    # gRPC would report a bad certificate or key as a failure to bind the address
    check_key_pair(server.tls_cert, server.tls_key, cert_field="server.tls_cert", key_field="server.tls_key")
    if server.client_ca is not None:
        check_certificates(server.client_ca, field="server.client_ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class BridgeServer:
    """A configured bridge. ``start()``, then ``stop()`` (or use it as a context manager)."""

    def __init__(
        self,
        settings: BridgeSettings,
        backends: Mapping[str, Backend],
        *,
        insecure: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.backends = dict(backends)
        s = settings.server
        self.tokens = TokenStore.from_sources(
            settings.auth.tokens, settings.auth.tokens_file, reload_interval_s=settings.auth.reload_interval_s
        )
        if not len(self.tokens):
            log.warning(
                "no device tokens configured: every call will be refused (add one with `cloud-bridge token add DEVICE`)"
            )
        else:  # say whom the bridge trusts, so that a stray tokens file in the working directory shows
            log.info("trusting %d device token(s) (tokens file: %s)", len(self.tokens), settings.auth.tokens_file or "none")
        self.quotas = QuotaManager(settings.quota, clock=clock or time.monotonic)
        self.service = BridgeService(settings, self.backends, self.tokens, self.quotas)
        self.health = health.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),  # two bridges must not silently share a port
            # devices ping while their calls are in flight (cloud.keepalive_s, 1 s at the least) to find a dead
            # connection: accept that rather than answer it with GOAWAY "too_many_pings", which ends their calls
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ]
        # a thread per generation call the service admits (beyond max_concurrent_rpcs it answers RESOURCE_EXHAUSTED
        # at once), and a few more for health checks, ListModels and those refusals
        self._executor = futures.ThreadPoolExecutor(max_workers=s.max_concurrent_rpcs + 4, thread_name_prefix="bridge")
        self.grpc_server = grpc.server(self._executor, options=options,
                                       interceptors=[UndecodableRequests(self.service.refuse_undecodable)])
        bridge_pb2_grpc.add_CloudBridgeServicer_to_server(self.service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        credentials = _credentials(s, insecure)
        socket_path: Path | None = None
        if s.address.startswith("unix:"):
            # gRPC would unlink a live bridge's socket and take its place; "unix:///abs" is "/abs"
            rest = s.address[len("unix:"):]
            socket_path = Path(rest[2:] if rest.startswith("//") else rest)
            prepare_socket_path(socket_path, field="server.address", server="cloud bridge")
        try:
            # a unix: socket is the bridge user's and its group's (0660, less the umask): devices under another
            # user share a group with it; never anyone else (with --insecure, tokens cross it in clear)
            with socket_mode(socket_path, 0o660) if socket_path is not None else contextlib.nullcontext():
                if credentials is None:
                    self.port = self.grpc_server.add_insecure_port(s.address)
                else:
                    self.port = self.grpc_server.add_secure_port(s.address, credentials)
        except RuntimeError as err:
            raise ConfigError(f"cannot listen on {s.address}: {err}", field="server.address") from err
        if self.port == 0 and not s.address.startswith("unix"):
            raise ConfigError(f"cannot listen on {s.address}", field="server.address")
        self.secure = credentials is not None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def start(self) -> None:
        self.grpc_server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        unix = self.settings.server.address.startswith("unix")
        log.info(
            "cloud bridge listening on %s (%s%s) serving %s",
            self.settings.server.address,
            "" if unix else f"port {self.port}, ",
            "TLS" + (" + client certificates" if self.settings.server.client_ca else "")
            if self.secure
            else "plaintext",
            ", ".join(self.backends) or "no models",
        )

    def stop(self, grace_s: float | None = None, *, delay_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, still serving for ``delay_s`` (``server.shutdown_delay_s``), then refuse new
        calls and let in-flight ones finish within ``grace_s`` (``server.grace_period_s``)."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.settings.server.grace_period_s if grace_s is None else grace_s
            delay = self.settings.server.shutdown_delay_s if delay_s is None else delay_s
            self.health.enter_graceful_shutdown()
            if delay > 0:
                # gRPC's stop closes the listener at once, so a health check never saw NOT_SERVING: a load balancer
                # kept sending calls until they failed. Now it has this long to see it while calls are still served.
                log.info("health NOT_SERVING; still serving for %.1f s (server.shutdown_delay_s)", delay)
                time.sleep(delay)
            stopped = self.grpc_server.stop(grace)
            # gRPC cancels the calls still running when the grace ends: a call its device cancels in the grace's
            # last 50 ms is logged as the bridge's stop
            if not stopped.wait(max(0.0, grace - 0.05)):
                self.service.stopping.set()
            stopped.wait()
            # the calls still running were cancelled by the stop: let their threads see it before the backends
            # they use are closed under them (a queued call would otherwise start on a closed engine)
            drained = threading.Thread(target=self._executor.shutdown, kwargs={"wait": True}, daemon=True)
            drained.start()
            drained.join(_DRAIN_THREADS_S)
            if drained.is_alive():
                log.warning("calls still running %.0f s after shutdown; closing the backends anyway", _DRAIN_THREADS_S)
            for alias, backend in self.backends.items():
                try:
                    backend.close()
                except Exception:  # one backend failing to close must not keep the others open
                    log.exception("closing backend %r failed", alias)
            self._stopped.set()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until stopped; True if it was."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> BridgeServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _create_backend(alias: str, model: ModelSettings) -> Backend:
    try:
        return create_backend(model)
    except ConfigError as err:
        # a backend names its own field (api_key_env, bundle); the operator needs to know which alias it is in
        where = f"models.{alias}.{err.field}" if err.field else f"models.{alias}"
        message = str(err).removeprefix(f"{err.field}: ") if err.field else str(err)
        raise ConfigError(message, field=where) from err


def create_server(
    settings_or_address: BridgeSettings | str,
    *,
    backends: Mapping[str, Backend] | None = None,
    insecure: bool = False,
    clock: Callable[[], float] | None = None,
) -> tuple[BridgeServer, int]:
    """Build a bridge (not started) and return it with the port it bound.

    ``settings_or_address``: full settings, or just an address (then the other
    settings are defaults). ``backends`` maps aliases to ready backends (tests
    inject them); aliases without one get a backend built from their settings.
    An injected backend with no alias in the settings is served with default
    model settings.
    """
    if isinstance(settings_or_address, str):
        settings = BridgeSettings(server=ServerSettings(address=settings_or_address))
    else:
        settings = settings_or_address
    given = dict(backends or {})
    models: dict[str, ModelSettings] = dict(settings.models)
    for alias, backend in given.items():
        if alias not in models:
            models[alias] = (
                EchoModelSettings(model=backend.model)
                if backend.kind == "echo"
                else ModelSettings(backend=backend.kind)
            )
    if models != settings.models:
        settings = dataclasses.replace(settings, models=models)
    settings.validate()
    built: dict[str, Backend] = {}
    try:
        for alias, model in models.items():
            built[alias] = given[alias] if alias in given else _create_backend(alias, model)
        server = BridgeServer(settings, built, insecure=insecure, clock=clock)
    except BaseException:
        for alias, backend in built.items():
            if alias not in given:
                backend.close()
        raise
    return server, server.port
