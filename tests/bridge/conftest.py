"""Fixtures for the bridge tests: real servers on 127.0.0.1 port 0, real channels, generated certificates."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloud_bridge import BridgeServer, create_server, hash_token, load_bridge_settings
from edge_runtime._proto.edgecloud.v1 import bridge_pb2_grpc
from edge_runtime.cloud import CloudClient

TOKEN = "ebt_test-token-device-a"
OTHER_TOKEN = "ebt_test-token-device-b"


@dataclass
class Bridge:
    server: BridgeServer
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def backend(self, alias: str = "tiny") -> Any:
        return self.server.backends[alias]


def bridge_settings(**sections: Any) -> Any:
    data: dict[str, Any] = {
        "server": {"address": "127.0.0.1:0", "grace_period_s": 1.0},
        "auth": {"tokens_file": None, "tokens": {"device-a": hash_token(TOKEN), "device-b": hash_token(OTHER_TOKEN)}},
        "models": {"tiny": {"backend": "echo", "reply": "the answer is forty two"}},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict) and name != "models":
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return load_bridge_settings(data=data, env={})


@pytest.fixture
def start_bridge() -> Iterator[Callable[..., Bridge]]:
    """``start_bridge(models=..., quota=..., backends=..., insecure=True)`` -> a started Bridge; stopped at teardown."""
    started: list[BridgeServer] = []

    def start(
        *, backends: dict[str, Any] | None = None, insecure: bool = True, clock: Any = None, **sections: Any
    ) -> Bridge:
        server, port = create_server(bridge_settings(**sections), backends=backends, insecure=insecure, clock=clock)
        started.append(server)
        server.start()
        return Bridge(server, port)

    yield start
    for server in started:
        server.stop(0)


@pytest.fixture
def make_client() -> Iterator[Callable[..., CloudClient]]:
    """``make_client(bridge, **CloudSettings fields)`` -> a CloudClient (plaintext, TOKEN by default); closed later."""
    clients: list[CloudClient] = []

    def make(bridge: Bridge, **fields: Any) -> CloudClient:
        fields.setdefault("token", TOKEN)
        fields.setdefault("insecure", "ca_file" not in fields)
        fields.setdefault("timeout_s", 10.0)
        client = CloudClient(address=fields.pop("address", bridge.address), **fields)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def raw_stub() -> Iterator[Callable[[Bridge], bridge_pb2_grpc.CloudBridgeStub]]:
    """A bare generated stub on a plaintext channel, to see statuses exactly as the server sends them."""
    channels: list[grpc.Channel] = []

    def make(bridge: Bridge) -> bridge_pb2_grpc.CloudBridgeStub:
        channel = grpc.insecure_channel(bridge.address)
        channels.append(channel)
        return bridge_pb2_grpc.CloudBridgeStub(channel)

    yield make
    for channel in channels:
        channel.close()


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by a CA the server does not trust
    rogue_key: Path


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: Any, issuer: tuple[str, Any] | None, *, ca: bool = False, server: bool = False,
          days: float = 1, starts_in_days: float | None = None) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=starts_in_days) if starts_in_days is not None
                          else now - datetime.timedelta(days=max(0.0, -days) + 1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    # Ed25519 and Ed448 sign without a separate hash
    eddsa = isinstance(issuer_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
    return builder.sign(issuer_key, None if eddsa else hashes.SHA256())


def _write(directory: Path, name: str, cert: Any, key: Any | None = None) -> tuple[Path, Path | None]:
    from cryptography.hazmat.primitives import serialization

    cert_path = directory / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = directory / f"{name}.key"
    key_path.touch(mode=0o600)  # a private key others can read is refused
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("test-ca", ca_key, None, ca=True)
    rogue_ca = _cert("rogue-ca", rogue_ca_key, None, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    ca_path, _ = _write(directory, "ca", ca)
    server_cert, server_key_path = _write(
        directory, "server", _cert("bridge", server_key, ("test-ca", ca_key), server=True), server_key
    )
    client_cert, client_key_path = _write(
        directory, "client", _cert("device-a", client_key, ("test-ca", ca_key)), client_key
    )
    rogue_cert, rogue_key_path = _write(
        directory, "rogue", _cert("device-x", rogue_key, ("rogue-ca", rogue_ca_key)), rogue_key
    )
    assert server_key_path and client_key_path and rogue_key_path
    _ = rogue_ca
    return Certs(ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_cert, rogue_key_path)
