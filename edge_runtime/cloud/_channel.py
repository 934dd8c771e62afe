"""Opening the gRPC channel to the bridge: TLS (optionally with a client certificate) unless asked otherwise."""

from __future__ import annotations

from pathlib import Path

import grpc

from ..errors import ConfigError
from ._address import is_loopback_address
from ._settings import CloudSettings
from ._tls import check_certificates, check_key_pair

__all__ = ["open_channel"]


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
        # and not for long without calls: a channel whose handshake keeps failing (a wrong CA, an expired
        # certificate) went on reconnecting every 5 s for gRPC's default 30 idle minutes after one escalation, a
        # radio wake-up and a log line each on a cellular Pi. Idle after 5 minutes, it reconnects at the next call.
        ("grpc.client_idle_timeout_ms", 300_000),
        # A connection can die without a word: a NAT or cellular mapping that expired, a middlebox that dropped the
        # flow, a proxy whose backend hung. TCP keeps it "open" and every call on it timed out, for as long as the
        # daemon ran: the circuit breaker's probes went down the same dead connection. A ping while calls are in
        # flight (never on an idle connection: no radio wake-ups) that is not answered in time drops it, and the
        # next call connects anew. gRPC's own ping timeout (60 s, for any ping in flight) must be as short, or an
        # earlier unanswered ping holds the keepalive back.
        ("grpc.keepalive_time_ms", int(settings.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),  # a long answer may send nothing for a while: keep pinging
    ]
    if settings.insecure:
        if not is_loopback_address(settings.address):
            raise ConfigError(
                f"plaintext is only allowed to a loopback address, not {settings.address!r}: the token would "
                "cross the network in clear",
                field="cloud.insecure",
            )
        return grpc.insecure_channel(settings.address, options=options)
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    return grpc.secure_channel(settings.address, _credentials(settings), options=options)


def _credentials(settings: CloudSettings) -> grpc.ChannelCredentials:
    root_certificates = _read(settings.ca_file, "ca_file")
    private_key = _read(settings.key_file, "key_file")
    certificate_chain = _read(settings.cert_file, "cert_file")
    # gRPC would read these only at each handshake, and a bad file would fail every call as if the bridge were down
    if settings.ca_file is not None:
        check_certificates(settings.ca_file, field="cloud.ca_file")
    if settings.cert_file is not None and settings.key_file is not None:
        check_key_pair(settings.cert_file, settings.key_file, cert_field="cloud.cert_file", key_field="cloud.key_file",
                       refuse_expired=False)
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )
