"""Device tokens: made once, shown once, stored only as hashes, checked in constant time.

A token is 256 random bits, so a plain SHA-256 is enough to store it (salting
protects guessable secrets; these are not guessable). The device id comes from
whichever stored hash matches, never from the request. The tokens file is TOML::

    [devices]
    "pi-kitchen" = "sha256:0f1e..."
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: changes to the tokens file are not locked there
    fcntl = None  # type: ignore[assignment]

from edge_runtime._files import durable_replace
from edge_runtime.errors import ConfigError

__all__ = [
    "TOKEN_PREFIX",
    "new_token",
    "hash_token",
    "TokenStore",
    "bearer_token",
    "read_tokens_file",
    "write_tokens_file",
    "add_device_token",
    "remove_device_token",
    "validate_device_id",
]

TOKEN_PREFIX = "ebt_"  # "edge bridge token": recognisable in a leaked-secret scan
_HASH_PREFIX = "sha256:"
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
log = logging.getLogger("cloud_bridge.auth")

_FILE_HEADER = "# cloud-bridge device tokens: only SHA-256 hashes. Managed by `cloud-bridge token add/remove`.\n"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return _HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def validate_device_id(device: str, *, field: str = "device") -> str:
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ConfigError(f"device id must be 1-64 letters, digits or ._- (got {device!r})", field=field)
    return device


def check_inline_tokens(tokens: Mapping[str, str]) -> None:
    """The config's ``[auth] tokens``: device ids and ``sha256:`` hashes, as a TokenStore will read them."""
    for device, stored in tokens.items():
        validate_device_id(device, field="auth.tokens")
        _digest(stored, f"auth.tokens.{device}")


def _digest(stored: str, where: str) -> bytes:
    if not isinstance(stored, str) or not stored.startswith(_HASH_PREFIX):
        raise ConfigError(
            f"expected 'sha256:<64 hex digits>' (never a token in clear), got {type(stored).__name__}", field=where
        )
    try:
        digest = bytes.fromhex(stored[len(_HASH_PREFIX) :])
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ConfigError("expected 'sha256:<64 hex digits>'", field=where)
    return digest


class TokenStore:
    """Maps a presented token to its device id.

    With a tokens file, the store re-reads it when it changes (looked at no more
    than every ``reload_interval_s``), so ``cloud-bridge token add/remove`` takes
    effect on a running bridge: a revoked token stops working without a restart.
    A file that cannot be read keeps the last good entries (and says so in the log); a file that is deleted
    revokes what it held (with a warning).
    """

    def __init__(
        self,
        hashes: Mapping[str, str] | None = None,
        *,
        tokens_file: str | os.PathLike[str] | None = None,
        reload_interval_s: float = 1.0,
    ) -> None:
        self._inline = dict(hashes or {})
        self._tokens_file = None if tokens_file is None else Path(tokens_file)
        self._reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._checked_s = time.monotonic()
        self._stat_failed = False  # said once while the file cannot be looked at (each second would flood the log)
        try:
            self._file_stamp = self._stamp()
        except OSError as err:  # a loop of links, a directory the service may not enter
            raise ConfigError(f"cannot read {str(self._tokens_file)!r}: {err.strerror or err}",
                              field="auth.tokens_file") from err
        self._entries = self._build(read_tokens_file(tokens_file) if self._file_stamp is not None else {})

    def _stamp(self) -> tuple[int, int, int] | None:
        if self._tokens_file is None:
            return None
        try:
            st = os.stat(self._tokens_file)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)  # token files are replaced whole: a new inode

    def _build(self, from_file: Mapping[str, str]) -> list[tuple[str, bytes]]:
        entries = []
        for device, stored in {**from_file, **self._inline}.items():
            validate_device_id(device, field="auth.tokens" if device in self._inline else "auth.tokens_file")
            entries.append((device, _digest(stored, f"auth.tokens.{device}")))
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_sources(
        cls, inline: Mapping[str, str], tokens_file: str | os.PathLike[str] | None, *, reload_interval_s: float = 1.0
    ) -> TokenStore:
        return cls(inline, tokens_file=tokens_file, reload_interval_s=reload_interval_s)

    def _maybe_reload(self) -> None:
        if self._tokens_file is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._checked_s < self._reload_interval_s:
                return
            self._checked_s = now
            try:
                stamp = self._stamp()
            except OSError as err:
                # as for a file that cannot be read: the last good tokens stay (this failed every call, as an
                # outage, with the server's path in the error the device got)
                if not self._stat_failed:
                    log.error("keeping the previous device tokens: cannot read %s: %s", self._tokens_file,
                              err.strerror or err)
                self._stat_failed = True
                return
            self._stat_failed = False
            if stamp == self._file_stamp:
                return
            try:
                entries = self._build(read_tokens_file(self._tokens_file) if stamp is not None else {})
            except ConfigError as err:
                log.error("keeping the previous device tokens: %s", err)
                return
            self._entries, self._file_stamp = entries, stamp
            if stamp is None:
                # deleting the file revokes every token it held: that may be meant, but never silently
                log.warning("the tokens file %s is gone: the tokens it held are refused until it is back "
                            "(%d inline tokens remain)", self._tokens_file, len(entries))
            else:
                log.info("device tokens reloaded: %d devices", len(entries))

    def authenticate(self, token: str | None) -> str | None:
        """The device whose token this is, or None. Time does not depend on which entry matches."""
        self._maybe_reload()
        if not token:
            return None
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for device, digest in self._entries:
            # no early exit: every entry is compared whatever matched before
            if hmac.compare_digest(presented, digest):
                found = device
        return found


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


# far above any real file (a line per device), and a bound for a device or /dev/zero named by mistake
_MAX_TOKENS_FILE_BYTES = 16 << 20


def read_tokens_file(path: str | os.PathLike[str]) -> dict[str, str]:
    from edge_runtime.bundle import read_small_file

    try:
        # a regular file only: a FIFO blocked the bridge's start (and its reload) until killed
        data = tomllib.loads(read_small_file(Path(path), _MAX_TOKENS_FILE_BYTES).decode("utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"tokens file not found: {path}", field="auth.tokens_file") from err
    except OSError as err:  # unreadable: e.g. rewritten by `sudo cloud-bridge token add` as root, mode 0600
        raise ConfigError(f"cannot read tokens file {path}: {err.strerror or err}", field="auth.tokens_file") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text: {err}", field="auth.tokens_file") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}", field="auth.tokens_file") from err
    except RecursionError as err:  # escaped the reload's "keep the tokens you have" at every attempt
        raise ConfigError(f"{path} is not valid TOML: nested too deeply", field="auth.tokens_file") from err
    devices = data.get("devices", {})
    if not isinstance(devices, dict):
        raise ConfigError(f"{path}: [devices] must be a table", field="auth.tokens_file")
    for device, stored in devices.items():
        validate_device_id(device, field="auth.tokens_file")
        _digest(stored, f"{path}: devices.{device}")
    return dict(devices)


def _link_target(path: str | os.PathLike[str]) -> Path:
    """The file a tokens-file path names: through a symlink, the target is rewritten and the link kept (a rename
    would replace the link)."""
    return Path(path).resolve() if Path(path).is_symlink() else Path(path)


def write_tokens_file(path: str | os.PathLike[str], hashes: Mapping[str, str]) -> None:
    """Write atomically, readable by the owner only (the hashes are not secrets, but need not be public)."""
    path = _link_target(path)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConfigError(f"cannot use tokens file {path}: {err.strerror or err}", field="auth.tokens_file") from err
    else:
        # replaced by a rename, a device (/dev/null, run as root) or a FIFO would become a regular file
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path} is not a regular file", field="auth.tokens_file")
    lines = [_FILE_HEADER, "[devices]\n"]
    for device in sorted(hashes):
        validate_device_id(device)  # ids are [A-Za-z0-9._-]: quoting them needs no escaping
        _digest(hashes[device], f"devices.{device}")
        lines.append(f'"{device}" = "{hashes[device]}"\n')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise ConfigError(f"cannot write tokens file {path}: {err.strerror or err}", field="auth.tokens_file") from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.chmod(tmp, 0o600)
        durable_replace(tmp, path)  # a tokens file lost to a power cut would lock every device out
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_held_locks = threading.local()  # the lock files this thread holds, and how many times (tokens_file_lock nests)


@contextlib.contextmanager
def tokens_file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock for changing the tokens file (``.<name>.lock`` beside it).

    Each change reads the file, changes one device and writes the file back: two at once lost one of them
    (an added device whose printed token never worked, or a removed one that came back). The file itself
    cannot carry the lock, as every write replaces it. Nests within a thread; a no-op where there is no fcntl.
    """
    target = _link_target(path)
    lock_path = target.parent / f".{target.name}.lock"
    held: dict[Path, int] = getattr(_held_locks, "held", None) or {}
    _held_locks.held = held
    if held.get(lock_path) or fcntl is None:
        held[lock_path] = held.get(lock_path, 0) + 1
        try:
            yield
        finally:
            held[lock_path] -= 1
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise ConfigError(f"cannot lock tokens file {path} ({lock_path}): {err.strerror or err}",
                          field="auth.tokens_file") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held[lock_path] = 1
        try:
            yield
        finally:
            held[lock_path] = 0
    finally:
        os.close(fd)  # releases the lock


def add_device_token(path: str | os.PathLike[str], device: str, *, replace: bool = False) -> str:
    """Make a token for ``device``, store its hash in ``path`` and return the token (shown once)."""
    path = Path(path)
    validate_device_id(device)
    with tokens_file_lock(path):
        hashes = read_tokens_file(path) if path.exists() else {}
        if device in hashes and not replace:
            raise ConfigError(f"device {device!r} already has a token (use --replace to issue a new one)", field="device")
        token = new_token()
        hashes[device] = hash_token(token)
        write_tokens_file(path, hashes)
    return token


def remove_device_token(path: str | os.PathLike[str], device: str) -> None:
    with tokens_file_lock(path):
        hashes = read_tokens_file(path)
        if device not in hashes:
            raise ConfigError(f"no token for device {device!r} in {path}", field="device")
        del hashes[device]
        write_tokens_file(path, hashes)
