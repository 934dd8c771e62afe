"""Tokens, TLS, mTLS, the plaintext rule and what the bridge logs."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cloud_bridge import TokenStore, add_device_token, bearer_token, create_server, hash_token, remove_device_token
from cloud_bridge._auth import read_tokens_file
from edge_runtime.cloud import CloudClient, is_loopback_address
from edge_runtime.errors import CloudAuthError, CloudUnavailableError, ConfigError

from .conftest import OTHER_TOKEN, TOKEN, bridge_settings

HI = [{"role": "user", "content": "what is the secret recipe"}]


@pytest.mark.parametrize("token", ["", "ebt_wrong", TOKEN + "x", TOKEN[:-1]])
def test_missing_or_wrong_token_is_unauthenticated(start_bridge, make_client, token, caplog):
    bridge = start_bridge()
    client = make_client(bridge, token=token)
    caplog.set_level(logging.INFO, logger="cloud_bridge")
    with pytest.raises(CloudAuthError) as info:
        client.generate(HI)
    assert info.value.code == "UNAUTHENTICATED"
    # where a revoked or leaked token is still in use from, for the operator
    (line,) = [r.getMessage() for r in caplog.records if "status=UNAUTHENTICATED" in r.getMessage()]
    assert "peer=ipv4:127.0.0.1:" in line or "peer=ipv6:" in line
    with pytest.raises(CloudAuthError):
        client.list_models()
    assert bridge.backend().generations == []
    assert client.circuit.state == "closed"  # a bad token says nothing about the bridge's health


def test_the_device_id_comes_from_the_token(start_bridge, make_client, caplog):
    bridge = start_bridge()
    caplog.set_level(logging.INFO, logger="cloud_bridge")
    make_client(bridge, token=OTHER_TOKEN).generate(HI, request_id="from-b")
    (line,) = [r.getMessage() for r in caplog.records if "from-b" in r.getMessage()]
    assert "device=device-b" in line


def test_metadata_parsing_needs_a_bearer_scheme():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-token", "abc")]) is None
    assert bearer_token(None) is None


def test_token_store_matches_hashes_and_rejects_clear_text_entries():
    store = TokenStore({"a": hash_token("ta"), "b": hash_token("tb")})
    assert (store.authenticate("ta"), store.authenticate("tb"), store.authenticate("tc"), store.authenticate("")) == (
        "a",
        "b",
        None,
        None,
    )
    with pytest.raises(ConfigError):
        TokenStore({"a": "ta"})  # a token in clear instead of its hash is refused, not silently used
    with pytest.raises(ConfigError):
        TokenStore({"bad id!": hash_token("x")})


def test_tokens_file_keeps_only_hashes_readable_by_the_owner(tmp_path):
    path = tmp_path / "tokens.toml"
    token = add_device_token(path, "pi-kitchen")
    assert token.startswith("ebt_") and len(token) > 40
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert TokenStore(read_tokens_file(path)).authenticate(token) == "pi-kitchen"
    with pytest.raises(ConfigError):
        add_device_token(path, "pi-kitchen")  # no silent replacement
    second = add_device_token(path, "pi-kitchen", replace=True)
    assert TokenStore(read_tokens_file(path)).authenticate(token) is None
    assert TokenStore(read_tokens_file(path)).authenticate(second) == "pi-kitchen"
    remove_device_token(path, "pi-kitchen")
    assert read_tokens_file(path) == {}


def test_tokens_and_prompts_are_not_logged_unless_content_logging_is_on(start_bridge, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    bridge = start_bridge()
    make_client(bridge).generate(HI)
    with pytest.raises(CloudAuthError):
        make_client(bridge, token="ebt_intruder").generate(HI)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "device=device-a" in logged  # the access log is there...
    for secret in (TOKEN, "ebt_intruder", "secret recipe", "forty two"):
        assert secret not in logged  # ...without tokens, prompts or answers

    caplog.clear()
    bridge = start_bridge(server={"log_content": True})
    make_client(bridge).generate(HI)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "secret recipe" in logged and "forty two" in logged and TOKEN not in logged


def test_tls_with_the_bridge_ca(start_bridge, make_client, certs):
    bridge = start_bridge(insecure=False, server={"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)})
    assert bridge.server.secure
    assert make_client(bridge, ca_file=certs.ca).generate(HI).text == "the answer is forty two"
    # the name in the certificate is checked: "localhost" is in it, "elsewhere" is not
    assert make_client(bridge, address=f"localhost:{bridge.port}", ca_file=certs.ca).generate(HI).completion_tokens == 5
    # each failed check names the setting that decides it (gRPC's own text named none)
    with pytest.raises(CloudUnavailableError) as info:
        make_client(bridge, ca_file=certs.ca, server_name="elsewhere", max_attempts=1, timeout_s=3).generate(HI)
    assert "cloud.server_name" in str(info.value), str(info.value)
    # without the CA (system roots only) the handshake fails
    with pytest.raises(CloudUnavailableError) as info:
        make_client(bridge, insecure=False, max_attempts=1, timeout_s=3).generate(HI)
    assert "cloud.ca_file" in str(info.value), str(info.value)
    # and a plaintext client cannot talk to a TLS bridge; gRPC says only "Socket closed", the error says why
    with pytest.raises(CloudUnavailableError) as info:
        make_client(bridge, max_attempts=1, timeout_s=3).generate(HI)
    assert "may serve TLS" in str(info.value), str(info.value)


@pytest.mark.parametrize(("reason", "hint"), [
    ("certificate has expired", "clock is wrong"),
    ("certificate is not yet valid", "clock is behind"),
    ("unable to get local issuer certificate", "cloud.ca_file"),
])
def test_a_bridge_certificate_refused_for_its_dates_blames_the_clock_not_the_ca(reason, hint):
    # gRPC's text for the dates says CERTIFICATE_VERIFY_FAILED too: a Pi without a clock battery, booted with an old
    # time, was told to look at cloud.ca_file
    import grpc

    from edge_runtime.cloud._errors import translate_rpc_error

    class Failed(grpc.RpcError, grpc.Call):  # what a failed call raises: its code and gRPC's text
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake "
                    f"failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED: {reason}: OK")

        def trailing_metadata(self):
            return ()

        initial_metadata = trailing_metadata

        def is_active(self):
            return False

        def time_remaining(self):
            return None

        def cancel(self):
            return False

        def add_callback(self, _callback):
            return False

    message = str(translate_rpc_error(Failed(), tls=True))
    assert hint in message, message
    # a device speaking TLS to a plaintext bridge: gRPC's text names no setting
    Failed.details = lambda self: ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
                                   "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: WRONG_VERSION_NUMBER")
    assert "cloud.insecure = true" in str(translate_rpc_error(Failed(), tls=True))


def test_mtls_requires_a_client_certificate_from_the_trusted_ca(start_bridge, make_client, certs):
    bridge = start_bridge(
        insecure=False,
        server={"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key), "client_ca": str(certs.ca)},
    )
    ok = make_client(bridge, ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
    assert ok.generate(HI).text == "the answer is forty two"
    for fields, hint in (({}, "may require a client certificate"),
                         ({"cert_file": certs.rogue_cert, "key_file": certs.rogue_key}, "may not accept this client")):
        with pytest.raises(CloudUnavailableError) as info:
            make_client(bridge, ca_file=certs.ca, max_attempts=1, timeout_s=3, **fields).generate(HI)
        assert hint in str(info.value), str(info.value)
    # a certificate is not a token: mTLS adds to the token check, it does not replace it
    with pytest.raises(CloudAuthError):
        make_client(
            bridge, ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key, token=""
        ).generate(HI)


@pytest.mark.parametrize("address", ["0.0.0.0:0", "192.0.2.10:0", "[::]:0", "example.com:0"])
def test_plaintext_is_refused_off_loopback(address):
    with pytest.raises(ConfigError) as info:
        create_server(bridge_settings(server={"address": address}), insecure=True)
    assert "loopback" in str(info.value)


def test_without_tls_files_the_server_needs_an_explicit_insecure():
    with pytest.raises(ConfigError) as info:
        create_server(bridge_settings())
    assert "--insecure" in str(info.value)


def test_insecure_is_refused_when_tls_files_are_configured(tmp_path):
    # the config asks for TLS, the flag for plaintext: neither is silently dropped
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError) as info:
        create_server(bridge_settings(server={"tls_cert": str(cert), "tls_key": str(cert)}), insecure=True)
    assert info.value.field == "server.tls_cert" and "--insecure" in str(info.value)


def test_the_client_refuses_plaintext_off_loopback():
    with pytest.raises(ConfigError):
        CloudClient(address="192.0.2.10:50051", token=TOKEN, insecure=True)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.8.9.1:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("unix:/run/b.sock", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.0.0.1:1", False),
        ("bridge.example.com:443", False),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),  # gRPC may dial any of a list: every one must be loopback
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
        ("ipv4:127.0.0.1:1,", False),
        ("ipv6:[::1]:1,[::1]:2", True),
        ("ipv6:[::1]:1,[2001:db8::1]:2", False),
        ("dns:127.0.0.1:1", True),
        ("dns:localhost:1", True),
        ("dns:///localhost:1", True),
        ("dns://8.8.8.8/127.0.0.1:1", True),
        ("dns://8.8.8.8/localhost:1", False),  # that server, not this machine, says where localhost is
        ("dns://8.8.8.8/bridge.example.com:1", False),
    ],
)
def test_loopback_addresses(address, loopback):
    assert is_loopback_address(address) is loopback


def test_a_client_token_file_must_be_private(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        CloudClient(address="127.0.0.1:1", token_file=path, insecure=True)
    assert "chmod 600" in str(info.value)
    path.chmod(0o600)
    client = CloudClient(address="127.0.0.1:1", token_file=path, insecure=True)
    try:
        assert client._metadata() == [("authorization", f"Bearer {TOKEN}")]
        assert TOKEN not in repr(client)
    finally:
        client.close()


def test_tokens_added_or_revoked_apply_to_a_running_bridge(start_bridge, make_client, tmp_path):
    path = tmp_path / "tokens.toml"
    first = add_device_token(path, "pi-1")
    bridge = start_bridge(auth={"tokens": {}, "tokens_file": str(path), "reload_interval_s": 0.0})
    assert make_client(bridge, token=first).generate(HI).text == "the answer is forty two"
    second = add_device_token(path, "pi-2")
    assert make_client(bridge, token=second).generate(HI).completion_tokens == 5  # no restart needed
    remove_device_token(path, "pi-1")
    with pytest.raises(CloudAuthError):
        make_client(bridge, token=first).generate(HI)  # revoked at once
    path.write_text("[devices]\nbroken = 1\n")  # a bad edit keeps the last good tokens
    assert make_client(bridge, token=second).generate(HI).completion_tokens == 5
    path.write_bytes(b"# caf\xe9\n[devices]\n")  # not UTF-8
    assert make_client(bridge, token=second).generate(HI).completion_tokens == 5
    path.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")  # a RecursionError escaped every reload
    assert make_client(bridge, token=second).generate(HI).completion_tokens == 5
    path.unlink()
    path.mkdir()  # unreadable (as root, mode 0600 would not stop this test): the same
    assert make_client(bridge, token=second).generate(HI).completion_tokens == 5


@pytest.mark.parametrize("content", [b"# caf\xe9\n[devices]\n", None, b"x = " + b"[" * 50_000 + b"]" * 50_000])
def test_an_unreadable_tokens_file_is_a_config_error_naming_the_field(tmp_path, content):
    path = tmp_path / "tokens.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        read_tokens_file(path)
    assert info.value.field == "auth.tokens_file" and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("cert", "key", "field"),
    [
        ("garbage", "server_key", "server.tls_cert"),
        ("server_key", "server_cert", "server.tls_cert"),  # the two swapped
        ("server_cert", "client_key", "server.tls_key"),  # a key that is not the certificate's
        ("server_cert", "garbage", "server.tls_key"),
    ],
)
def test_bad_server_tls_files_name_their_field_not_the_address(certs, tmp_path, cert, key, field):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    files = {"garbage": garbage, "server_cert": certs.server_cert, "server_key": certs.server_key,
             "client_key": certs.client_key}
    with pytest.raises(ConfigError) as info:
        create_server(bridge_settings(server={"tls_cert": str(files[cert]), "tls_key": str(files[key])}))
    assert info.value.field == field
    with pytest.raises(ConfigError) as info:
        tls = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key), "client_ca": str(garbage)}
        create_server(bridge_settings(server=tls))
    assert info.value.field == "server.client_ca"


def test_a_private_key_every_user_can_read_is_warned_about_on_both_sides(certs, tmp_path, caplog):
    # whoever reads the bridge's key can pose as it and collect device tokens; not refused, as container secrets
    # are mounted 0644 by default
    open_key, group_key = tmp_path / "open.key", tmp_path / "group.key"
    for path, mode in ((open_key, 0o644), (group_key, 0o640)):
        path.write_bytes(certs.server_key.read_bytes())
        path.chmod(mode)
    with caplog.at_level(logging.WARNING):
        server, _ = create_server(bridge_settings(server={"tls_cert": str(certs.server_cert), "tls_key": str(open_key)}))
        server.stop(None)
    assert "server.tls_key: the private key" in caplog.text and "mode 644" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        server, _ = create_server(bridge_settings(server={"tls_cert": str(certs.server_cert), "tls_key": str(group_key)}))
        server.stop(None)
    assert "private key" not in caplog.text  # group read is how services share keys

    open_key.write_bytes(certs.client_key.read_bytes())
    with caplog.at_level(logging.WARNING):
        CloudClient(address="127.0.0.1:1", token=TOKEN, ca_file=certs.ca, cert_file=certs.client_cert, key_file=open_key)
    assert "cloud.key_file: the private key" in caplog.text


def test_a_key_grpc_cannot_use_is_refused_at_start_naming_its_field(tmp_path):
    # Python's OpenSSL loads them, gRPC does not: an Ed25519 bridge started and failed every handshake (the device
    # was told the bridge may want a client certificate); an RSA-PSS one, or a TRUSTED CERTIFICATE file, failed to
    # bind ("cannot listen on ...")
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from .conftest import _cert, _write

    key = ed25519.Ed25519PrivateKey.generate()
    cert = _cert("bridge", key, None, server=True, days=30)
    cert_path, key_path = _write(tmp_path, "ed", cert, key)
    with pytest.raises(ConfigError, match="is an Ed25519 key, which gRPC's TLS cannot use") as info:
        create_server(bridge_settings(server={"tls_cert": str(cert_path), "tls_key": str(key_path)}))
    assert info.value.field == "server.tls_key"
    if shutil.which("openssl") is None:
        return
    run = functools.partial(subprocess.run, cwd=tmp_path, check=True, capture_output=True)
    run(["openssl", "req", "-x509", "-newkey", "rsa-pss", "-pkeyopt", "rsa_keygen_bits:2048", "-nodes", "-days", "30",
         "-subj", "/CN=localhost", "-keyout", "pss.key", "-out", "pss.crt"])
    os.chmod(tmp_path / "pss.key", 0o600)
    with pytest.raises(ConfigError, match="is an RSA-PSS key") as info:
        create_server(bridge_settings(server={"tls_cert": str(tmp_path / "pss.crt"), "tls_key": str(tmp_path / "pss.key")}))
    assert info.value.field == "server.tls_key"
    run(["openssl", "x509", "-in", str(cert_path), "-trustout", "-out", "trusted.crt"])
    with pytest.raises(ConfigError, match="holds a TRUSTED CERTIFICATE") as info:
        create_server(bridge_settings(server={"tls_cert": str(tmp_path / "trusted.crt"), "tls_key": str(key_path)}))
    assert info.value.field == "server.tls_cert"


def test_an_expired_certificate_is_refused_at_start_naming_its_field(tmp_path):
    # every client would refuse the handshake ("certificate has expired" on its side only): the bridge's
    # health checks fail and the demo waited two minutes for it
    from .conftest import _cert, _key, _write

    key = _key()
    cert, key_path = _write(tmp_path, "old", _cert("bridge", key, None, server=True, days=-1), key)
    with pytest.raises(ConfigError) as info:
        create_server(bridge_settings(server={"tls_cert": str(cert), "tls_key": str(key_path)}))
    assert info.value.field == "server.tls_cert" and "expired on" in str(info.value)
    # and one not valid yet: the bridge started, and every device's handshake failed
    cert, key_path = _write(tmp_path, "future", _cert("bridge", key, None, server=True, days=30, starts_in_days=5), key)
    with pytest.raises(ConfigError) as info:
        create_server(bridge_settings(server={"tls_cert": str(cert), "tls_key": str(key_path)}))
    assert info.value.field == "server.tls_cert" and "is not valid until" in str(info.value)


def test_an_expired_client_certificate_is_logged_and_the_device_still_starts(tmp_path, caplog):
    # the bridge will refuse it, but the device's local answers must not stop on the day it lapses
    from edge_runtime.cloud import CloudClient
    from edge_runtime.settings import load_runtime_settings

    from .conftest import _cert, _key, _write

    key = _key()
    cert, key_path = _write(tmp_path, "device", _cert("device-a", key, None, days=-1), key)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    settings = load_runtime_settings(data={"cloud": {"address": "127.0.0.1:1", "token_file": str(token),
                                                     "cert_file": str(cert), "key_file": str(key_path)}}, env={})
    with caplog.at_level("ERROR"):
        CloudClient(settings.cloud).close()
    assert "cloud.cert_file" in caplog.text and "expired on" in caplog.text


def test_bad_client_tls_files_are_config_errors_not_outages(certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ({"ca_file": garbage}, "cloud.ca_file"),
        ({"ca_file": certs.server_key}, "cloud.ca_file"),
        ({"cert_file": garbage, "key_file": certs.client_key}, "cloud.cert_file"),
        ({"cert_file": certs.client_cert, "key_file": certs.server_key}, "cloud.key_file"),
    ]
    for fields, field in cases:
        with pytest.raises(ConfigError) as info:
            CloudClient(address="127.0.0.1:1", token=TOKEN, **fields)
        assert info.value.field == field


def _device_with_a_token_file(start_bridge, make_client, tmp_path):
    """A bridge trusting device pi-1, and a client reading pi-1's token from a file; (tokens file, token file, client)."""
    tokens = tmp_path / "tokens.toml"
    old = add_device_token(tokens, "pi-1")
    bridge = start_bridge(auth={"tokens": {}, "tokens_file": str(tokens), "reload_interval_s": 0.0})
    token_file = tmp_path / "device.token"
    token_file.write_text(old + "\n")
    os.chmod(token_file, 0o600)
    client = make_client(bridge, token=None, token_file=token_file)
    assert client.generate(HI).text
    return tokens, token_file, client


def _rotate(tokens):
    """The operator revokes pi-1's token and issues a new one; the new token."""
    remove_device_token(tokens, "pi-1")
    return add_device_token(tokens, "pi-1")


def test_a_device_token_file_rotated_on_disk_is_used_without_a_restart(start_bridge, make_client, tmp_path):
    tokens, token_file, client = _device_with_a_token_file(start_bridge, make_client, tmp_path)
    new = _rotate(tokens)  # the operator rotates the device's token...
    rotated = tmp_path / "device.token.new"
    rotated.write_text(new + "\n")
    os.chmod(rotated, 0o600)
    os.replace(rotated, token_file)  # ...and the device's file, atomically
    assert client.generate(HI).text  # read again: no restart


def test_a_rotated_token_file_refused_for_its_mode_is_read_once_it_is_fixed(start_bridge, make_client, tmp_path):
    tokens, token_file, client = _device_with_a_token_file(start_bridge, make_client, tmp_path)
    token_file.write_text(_rotate(tokens) + "\n")
    os.chmod(token_file, 0o644)  # readable by others: refused, the old token kept
    with pytest.raises(CloudAuthError):
        client.generate(HI)
    os.chmod(token_file, 0o600)  # what the warning says to do: no write, only the mode changes
    assert client.generate(HI).text


def test_a_deleted_tokens_file_revokes_its_tokens_with_a_warning(tmp_path, caplog):
    # it was logged at INFO as "device tokens reloaded: 0 devices"
    path = tmp_path / "tokens.toml"
    token = add_device_token(path, "pi")
    store = TokenStore(tokens_file=path, reload_interval_s=0.0)
    assert store.authenticate(token) == "pi"
    path.unlink()
    with caplog.at_level("WARNING", logger="cloud_bridge"):
        assert store.authenticate(token) is None
    assert "is gone" in caplog.text


def test_a_tokens_file_that_cannot_be_looked_at_keeps_the_last_good_tokens(tmp_path, caplog):
    # a loop of links (or a directory the service may not enter) failed every call as UNKNOWN, an outage to the
    # device, with the bridge's path in its error
    path = tmp_path / "tokens.toml"
    token = add_device_token(path, "pi")
    store = TokenStore(tokens_file=path, reload_interval_s=0.0)
    path.unlink()
    path.symlink_to(path)  # ELOOP
    with caplog.at_level("ERROR", logger="cloud_bridge"):
        assert store.authenticate(token) == "pi"
        assert store.authenticate(token) == "pi"
    assert caplog.text.count("keeping the previous device tokens") == 1  # said once, not every second
    with pytest.raises(ConfigError) as info:  # at start: an error naming the setting
        TokenStore(tokens_file=path)
    assert info.value.field == "auth.tokens_file"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl on this machine")
def test_the_readmes_certificate_commands_make_a_bridge_a_device_can_reach_over_mtls(start_bridge, make_client, tmp_path):
    # the README's block, run as written: its files are what the bridge and a device are configured with
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- tls-setup -->", 1)[1].split("<!-- /tls-setup -->", 1)[0]
    commands = block.split("```sh\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(["sh", "-e", "-c", commands], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    bridge = start_bridge(insecure=False, server={"tls_cert": str(tmp_path / "server.crt"),
                                                  "tls_key": str(tmp_path / "server.key"),
                                                  "client_ca": str(tmp_path / "devices-ca.crt")})
    client = make_client(bridge, address=f"localhost:{bridge.port}", ca_file=tmp_path / "bridge-ca.crt",
                         cert_file=tmp_path / "device.crt", key_file=tmp_path / "device.key")
    assert client.generate(HI).text == "the answer is forty two"
