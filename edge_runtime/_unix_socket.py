"""The path a server's Unix socket is bound to (the daemon's gRPC socket, a bridge's ``unix:`` address).

gRPC unlinks whatever socket is at the path when it binds: a second server would take the path over from a
live one, which then runs unreachable. So a live socket is refused; a stale one (its process died) is removed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

__all__ = ["MAX_SOCKET_PATH_BYTES", "check_socket_path_length", "prepare_socket_path", "socket_mode"]

_UMASK_LOCK = threading.Lock()
# sun_path with its terminating NUL: 108 bytes on Linux, 104 on macOS and the BSDs (gRPC's own error for a longer
# path there was a vague "Failed to bind")
MAX_SOCKET_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103


def check_socket_path_length(path: Path, *, field: str) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(f"{path} is longer than {MAX_SOCKET_PATH_BYTES} bytes, the limit of a Unix socket path",
                          field=field)


def prepare_socket_path(path: Path, *, field: str, server: str) -> None:
    """Refuse a path in use by a live ``server``; remove a stale socket; create a private parent directory."""
    check_socket_path_length(path, field=field)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the socket's directory {path.parent}: {err.strerror or err}",
                              field=field) from err
        return
    except OSError as err:  # a parent that is a file, or one this user may not search
        raise ConfigError(f"cannot use {path}: {err.strerror or err}", field=field) from err
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket", field=field)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a previous server died without cleaning up
    else:
        raise ConfigError(f"{path} is in use (another {server}?)", field=field)
    finally:
        probe.close()


@contextlib.contextmanager
def socket_mode(path: Path, mode: int) -> Iterator[None]:
    """Bind ``path`` inside this block: the socket is created owner-only and then given ``mode`` (0600, 0660)
    less what the process's umask takes away, so it is never looser than that, even between bind and chmod,
    and a stricter umask (077) wins. A umask of 002 had made the bridge's socket group-writable.

    The umask is the process's: it is tightened only by 077 for the bind, so that a file or directory another
    thread makes meanwhile stays usable by its owner."""
    with _UMASK_LOCK:  # two servers binding at once in one process: each must restore the umask it found
        old = os.umask(0o077)
        os.umask(old | 0o077)
        try:
            yield
        finally:
            os.umask(old)
    try:
        os.chmod(path, mode & ~old)
    except FileNotFoundError:  # nothing was bound: the caller reports that
        pass
