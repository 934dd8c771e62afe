"""How a device reaches its bridge: a settings section (``[cloud]`` in the daemon's config) for the client."""

from __future__ import annotations

import dataclasses
import numbers
import os
import stat
import typing
from dataclasses import dataclass
from pathlib import Path

from ..config import describe_type, documented, setting
from ..errors import ConfigError
from ._address import check_address

__all__ = ["CloudSettings"]

MAX_SECONDS = 86_400.0  # a deadline or delay: gRPC fails a farther deadline at once, as a timeout
_MAX_MESSAGE_BYTES = 2**31 - 1
_PATH_FIELDS = ("token_file", "ca_file", "cert_file", "key_file")


def _as_path(value: object, field: str) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    try:
        return Path(value)  # type: ignore[arg-type]  # str and os.PathLike; anything else is a TypeError
    except TypeError as err:
        raise ConfigError(f"expected a path, got {value!r}", field=field) from err


@documented
@dataclass(frozen=True, kw_only=True)
class CloudSettings:
    """The device's connection to the cloud bridge (``[cloud]``; ``EDGE_RUNTIME_CLOUD_*``)."""

    address: str = setting("", path="unix", help="bridge address host:port (empty: never escalate)")
    model: str = setting("", help="model alias to ask the bridge for (empty: the bridge's default)")
    token: str = setting(
        "", help="device token (no command-line flag, which other users could read in ps; prefer token_file or EDGE_RUNTIME_CLOUD_TOKEN to writing it in a file)", secret=True
    )
    token_file: Path | None = setting(None, help="file holding the device token; must be readable by its owner only")
    insecure: bool = setting(False, help="plaintext gRPC, only allowed to a bridge on a loopback address")
    ca_file: Path | None = setting(
        None, help="PEM CA bundle that signed the bridge's certificate (default: system roots)"
    )
    cert_file: Path | None = setting(None, help="PEM client certificate, for a bridge that requires one (mTLS)")
    key_file: Path | None = setting(None, help="PEM private key of cert_file")
    server_name: str = setting("", help="name the bridge's certificate carries, when it differs from the address' host")
    timeout_s: float = setting(30.0, help="deadline of one escalation, retries and backoff included")
    max_attempts: int = setting(4, help="tries per call when the bridge is unavailable or over quota")
    backoff_initial_s: float = setting(0.1, help="first retry delay; doubled (backoff_multiplier) after each failure")
    backoff_multiplier: float = setting(2.0, help="growth of the retry delay")
    backoff_max_s: float = setting(5.0, help="longest retry delay (the server's RetryInfo may ask for more)")
    jitter: float = setting(0.5, help="fraction of each delay drawn at random (0: none, 1: full jitter)")
    circuit_failure_threshold: int = setting(3, help="consecutive failed calls after which the cloud is skipped")
    circuit_cooldown_s: float = setting(30.0, help="how long the cloud is skipped before one call tries it again")
    max_message_bytes: int = setting(4 << 20, help="largest message sent or received, in bytes")
    keepalive_s: float = setting(
        10.0, help="while a call is in flight, ping the bridge after this many seconds without news from it; a "
                   "connection whose ping goes unanswered for as long is dropped and the call retried on a new one "
                   "(a bridge older than this runtime cuts a call silent for three pings: update bridges first)")

    def validate(self) -> None:
        if self.address:
            check_address(self.address, field="cloud.address", min_port=1)
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file must be given together", field="cloud.cert_file")
        if self.insecure and (self.ca_file or self.cert_file):
            raise ConfigError("TLS files make no sense with insecure = true", field="cloud.insecure")
        # a day at most: gRPC cannot represent a far deadline (it fails the call at once), nor Python a huge backoff
        for name in ("timeout_s", "backoff_initial_s", "backoff_max_s", "circuit_cooldown_s"):
            value = getattr(self, name)
            if not 0 < value <= MAX_SECONDS:  # also refuses nan
                raise ConfigError(f"must be > 0 and at most {MAX_SECONDS:.0f} s, got {value!r}", field=f"cloud.{name}")
        if not 1 <= self.keepalive_s <= MAX_SECONDS:  # the bridge accepts pings down to 1 s apart
            raise ConfigError(f"must be from 1 to {MAX_SECONDS:.0f} s, got {self.keepalive_s!r}",
                              field="cloud.keepalive_s")
        if not 1 <= self.backoff_multiplier <= 100:
            raise ConfigError(f"must be from 1 to 100, got {self.backoff_multiplier!r}", field="cloud.backoff_multiplier")
        if not 1024 <= self.max_message_bytes <= _MAX_MESSAGE_BYTES:  # gRPC's limits are signed 32-bit
            raise ConfigError(f"must be from 1024 to {_MAX_MESSAGE_BYTES}, got {self.max_message_bytes!r}",
                              field="cloud.max_message_bytes")
        if self.token and self.token_file is not None:
            # set in different layers (the file's token, the environment's token_file), neither may silently win
            raise ConfigError("set token or token_file, not both (one may come from the config file and the other "
                              "from the environment or a flag)", field="cloud.token_file")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("must be in [0, 1]", field="cloud.jitter")
        if self.max_attempts < 1 or self.circuit_failure_threshold < 1:
            raise ConfigError(
                "must be at least 1",
                field="cloud.max_attempts" if self.max_attempts < 1 else "cloud.circuit_failure_threshold",
            )

    def __post_init__(self) -> None:
        # CloudClient(ca_file="ca.pem") passes str (or os.PathLike); the rest of the client reads Paths
        for name in _PATH_FIELDS:
            object.__setattr__(self, name, _as_path(getattr(self, name), f"cloud.{name}"))
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """The Python API's values (a config file's are converted when it is read): timeout_s="5" failed later as
        a TypeError, insecure="false" was taken as true."""
        hints = typing.get_type_hints(CloudSettings)
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            if tp is bool:
                ok = isinstance(value, bool)
            elif tp is int:
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            elif tp is float:
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            elif tp is str:
                if value is None:  # token=None: no token given, as the default ""
                    object.__setattr__(self, f.name, value := "")
                ok = isinstance(value, str)
            else:
                continue
            if not ok:  # the type only: the value may be the token
                raise ConfigError(f"expected {describe_type(tp)}, got {type(value).__name__}", field=f"cloud.{f.name}")
            if tp in (int, float):
                try:
                    object.__setattr__(self, f.name, tp(value))
                except OverflowError as err:  # an integer past a float's range
                    raise ConfigError(f"expected a finite number, got {value!r:.40}", field=f"cloud.{f.name}") from err

    def resolve_token(self) -> str:
        """The device token, from ``token`` or ``token_file`` (which must not be group- or world-readable)."""
        if self.token:
            return _checked_token(self.token, "cloud.token")
        if self.token_file is None:
            return ""
        try:
            mode = os.stat(self.token_file).st_mode
            if stat.S_ISDIR(mode):  # a directory's usual 755 was refused as "readable by others: chmod 600 it"
                raise ConfigError(f"{self.token_file} is a directory, not the file holding the token",
                                  field="cloud.token_file")
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{self.token_file} is readable by others: chmod 600 it", field="cloud.token_file")
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"cannot read {self.token_file}: {err.strerror}", field="cloud.token_file") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{self.token_file} is not UTF-8 text", field="cloud.token_file") from err
        return _checked_token(token, "cloud.token_file")


def no_token_warning(settings: CloudSettings | None) -> str:
    """What the daemon (at start) and ``serve --check`` say when a bridge is configured and no device token is: the
    bridge refuses every call then, so each escalation comes back as the local fallback. Not an error: a token
    written into ``token_file`` later is read without a restart."""
    if isinstance(settings, CloudSettings) and settings.token_file is not None:  # there, holding nothing but spaces
        what = f"the token file {settings.token_file} is empty"
    else:
        what = "no device token is configured (token_file, token or EDGE_RUNTIME_CLOUD_TOKEN)"
    return (f"cloud.token_file: {what}: the bridge refuses calls without one, so every escalation will come back "
            "as the local fallback")


def _checked_token(token: str, field: str) -> str:
    """A token goes into gRPC metadata, which carries printable ASCII only: anything else would fail every call."""
    if not all("!" <= ch <= "~" for ch in token):
        # the token itself is never echoed: it is a secret
        raise ConfigError("the device token must be printable ASCII without spaces (as `cloud-bridge token add` "
                          "makes them)", field=field)
    return token
