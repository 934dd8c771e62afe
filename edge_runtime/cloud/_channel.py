"""Opening the gRPC channel to the bridge: TLS (optionally with a client certificate) unless asked otherwise."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from ..errors import ConfigError
from ._settings import CloudSettings

__all__ = ["is_loopback_address", "open_channel"]


def _host(address: str) -> str:
    if address.startswith("["):  # [::1]:50051
        return address[1 : address.index("]")]
    host, sep, _port = address.rpartition(":")
    return host if sep else address


def is_loopback_address(address: str) -> bool:
    """True for 127.0.0.0/8, ::1, localhost and Unix sockets: places only this machine can reach."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = _host(address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:"))
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", field=f"cloud.{name}") from err


def open_channel(settings: CloudSettings) -> grpc.Channel:
    if not settings.address:
        raise ConfigError("no bridge address configured", field="cloud.address")
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # reconnect soon after the bridge returns: the circuit breaker, not gRPC's
        # 2-minute backoff ceiling, decides how long the cloud is skipped
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if settings.insecure:
        if not is_loopback_address(settings.address):
            raise ConfigError(
                f"plaintext is only allowed to a loopback address, not {settings.address!r}: the token would "
                "cross the network in clear",
                field="cloud.insecure",
            )
        return grpc.insecure_channel(settings.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.ca_file, "ca_file"),
        private_key=_read(settings.key_file, "key_file"),
        certificate_chain=_read(settings.cert_file, "cert_file"),
    )
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    return grpc.secure_channel(settings.address, credentials, options=options)
