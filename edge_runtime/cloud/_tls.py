"""Checking TLS files when the settings are applied, not at the first handshake.

gRPC reads certificates and keys only when it needs them: a server with a bad
certificate fails to bind ("cannot listen on ..."), a client with a bad CA file
fails every call with a handshake error that its circuit breaker counts as a
cloud outage. The standard library's ``ssl`` parses the same PEM files, so a bad
file is a ConfigError naming its field before gRPC sees it.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import ssl
import stat
import time

from ..errors import ConfigError

__all__ = ["check_certificates", "check_key_pair"]

log = logging.getLogger(__name__)


# PKCS#8 key algorithms gRPC's TLS (BoringSSL) cannot serve or sign with, though Python's OpenSSL loads them: an
# RSA-PSS key failed the bind ("cannot listen on ..."), an Ed25519 one every handshake (no common signature
# algorithm), named in neither case. Found by the DER of their algorithm's OID in the key's AlgorithmIdentifier.
_UNUSABLE_KEY_OIDS = {
    bytes.fromhex("06092a864886f70d01010a"): "RSA-PSS",
    bytes.fromhex("06032b6570"): "Ed25519",
    bytes.fromhex("06032b6571"): "Ed448",
}
_PKCS8 = re.compile(rb"-----BEGIN PRIVATE KEY-----(.*?)-----END PRIVATE KEY-----", re.DOTALL)


def _key_algorithm_grpc_lacks(key: str | os.PathLike[str]) -> str | None:
    """The name of ``key``'s algorithm when gRPC cannot use it, else None (RSA and EC keys, or unreadable)."""
    try:
        with open(key, "rb") as fh:
            pem = _PKCS8.search(fh.read(1 << 20))
        der = base64.b64decode(pem.group(1)) if pem else b""
    except (OSError, ValueError):
        return None  # the key was read a moment ago: whatever fails now is the next reader's error
    head = der[:32]  # SEQUENCE, version, then the AlgorithmIdentifier's OID
    return next((name for oid, name in _UNUSABLE_KEY_OIDS.items() if oid in head), None)


def _no_password() -> bytes:
    # an encrypted key would make OpenSSL prompt on the terminal; gRPC cannot use one anyway, so fail instead
    return b""


def check_certificates(path: str | os.PathLike[str], *, field: str) -> None:
    """Raise ConfigError naming ``field`` unless ``path`` holds at least one PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        with open(path, "rb") as fh:
            trusted = b"-----BEGIN TRUSTED CERTIFICATE-----" in fh.read(1 << 20)
    except ssl.SSLError as err:
        raise ConfigError(f"{path} holds no PEM certificate", field=field) from err
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", field=field) from err
    if trusted:  # OpenSSL's own form (x509 -trustout): Python reads it, gRPC does not, and failed to bind
        raise ConfigError(f"{path} holds a TRUSTED CERTIFICATE, OpenSSL's own form, which gRPC cannot read: "
                          "write it as a plain one (openssl x509 -in FILE -out FILE.pem)", field=field)


def _warn_if_public(key: str | os.PathLike[str], field: str) -> None:
    """Whoever reads a bridge's key can pose as the bridge and collect device tokens, and a device's key is its
    identity: a key every user of the machine can read is logged. Not refused: container secrets are mounted
    0644 or 0444 by default (Kubernetes, Docker), where "every user" is the container's own. Group read is
    how services share keys (Debian's ssl-cert group)."""
    try:
        mode = os.stat(key).st_mode
    except OSError:
        return  # it was just read: a file that vanished since is the next reader's error
    if mode & stat.S_IROTH:
        log.warning("%s: the private key %s is readable by every user of this machine (mode %03o): chmod 600 it, "
                    "or 640 for a group that needs it (a Kubernetes secret: defaultMode 0400)", field, key,
                    stat.S_IMODE(mode))


def check_key_pair(
    cert: str | os.PathLike[str], key: str | os.PathLike[str], *, cert_field: str, key_field: str,
    refuse_expired: bool = True,
) -> None:
    """Raise ConfigError unless ``cert`` holds PEM certificates and ``key`` the unencrypted PEM key of the first.

    An expired certificate, or one not valid yet, is refused too, or with ``refuse_expired=False`` only logged:
    a device whose client certificate lapsed keeps serving its local answers (escalations fall back) rather
    than failing to start.
    """
    check_certificates(cert, field=cert_field)  # so that what fails below is the key
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key} is not the private key of the certificate in {cert}", field=key_field) from err
        raise ConfigError(f"{key} holds no unencrypted PEM private key", field=key_field) from err
    except OSError as err:
        raise ConfigError(f"cannot read {key}: {err.strerror}", field=key_field) from err
    algorithm = _key_algorithm_grpc_lacks(key)
    if algorithm is not None:
        raise ConfigError(f"{key} is an {algorithm} key, which gRPC's TLS cannot use: make an RSA or EC (P-256) key "
                          "and certificate", field=key_field)
    _warn_if_public(key, key_field)
    not_before, not_after = _validity_s(cert)
    now = time.time()
    # the other side would refuse the handshake, and say only "certificate has expired" (or "is not yet valid")
    # on its side
    if not_after is not None and not_after < now:
        problem = ConfigError(f"the certificate in {cert} expired on {_utc(not_after)}", field=cert_field)
    elif not_before is not None and not_before > now:
        problem = ConfigError(f"the certificate in {cert} is not valid until {_utc(not_before)} (or this "
                              "machine's clock is behind)", field=cert_field)
    else:
        return
    if refuse_expired:
        raise problem
    log.error("%s: the bridge will refuse it until it is valid", problem)


def _utc(when_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when_s))


def _validity_s(cert: str | os.PathLike[str]) -> tuple[float | None, float | None]:
    """From when and until when the first certificate in ``cert`` is valid (Unix time); None when the
    standard library cannot say."""
    try:
        # the ssl module decodes a certificate file only through this helper (no public API reads a PEM's dates)
        decoded = ssl._ssl._test_decode_cert(os.fspath(cert))  # type: ignore[attr-defined]
    except (AttributeError, OSError, ssl.SSLError):
        return None, None

    def seconds(key: str) -> float | None:
        try:
            return float(ssl.cert_time_to_seconds(decoded[key]))
        except (KeyError, ValueError):
            return None

    return seconds("notBefore"), seconds("notAfter")
