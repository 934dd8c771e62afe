"""The one place that reads sysfs/procfs files.

Every backend reads through :func:`cat` / :func:`read_int` / :func:`try_read_int`,
so missing files, permission errors, devices that vanish (``ENODEV``/``EIO``) and
bytes that are not UTF-8 are handled here once. Paths are always built from a
root directory that the caller passes in, so tests point the readers at fake
trees built in ``tmp_path``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["cat", "read_int", "try_read_int", "describe_os_error", "PERMISSION_DENIED", "under_root"]

log = logging.getLogger(__name__)

_RAISE: Any = object()

# problem string used when the kernel refuses the read; detection looks for it
PERMISSION_DENIED = "permission denied"

# a sysfs attribute is at most one page
_MAX_BYTES = 4096


def under_root(root: str | os.PathLike[str], absolute: str) -> Path:
    """``/sys/class/powercap`` under ``root`` (``root='/'`` gives the real path)."""
    return Path(root) / absolute.lstrip("/")


def cat(path: str | os.PathLike[str], *, fallback: Any = _RAISE) -> str:
    """The text of a small file, stripped of whitespace and trailing NULs.

    Undecodable bytes become U+FFFD rather than an exception: callers that need a
    number will then fail to parse it and report garbage. Without ``fallback`` an
    ``OSError`` propagates; with it, the fallback is returned and the failure is
    logged at debug level.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_BYTES)
    except OSError as err:
        if fallback is _RAISE:
            raise
        log.debug("cannot read %s: %s", path, describe_os_error(err))
        return fallback  # type: ignore[no-any-return]
    # device-tree strings end with NUL
    return data.decode("utf-8", errors="replace").strip().strip("\x00").strip()


_LIMIT = 1 << 64


def read_int(path: str | os.PathLike[str], *, fallback: Any = _RAISE) -> int:
    """An integer file. Raises ``OSError`` or ``ValueError`` (garbage) unless ``fallback`` is given."""
    try:
        text = cat(path)
    except OSError:
        if fallback is _RAISE:
            raise
        return fallback  # type: ignore[no-any-return]
    try:
        value = int(text)
        if not -_LIMIT < value < _LIMIT:  # no counter is wider than 64 bits; past a float's range it would crash later
            raise ValueError
        return value
    except ValueError:
        if fallback is not _RAISE:
            log.debug("garbage in %s: %r", path, text[:40])
            return fallback  # type: ignore[no-any-return]
        raise ValueError(f"garbage {text[:40]!r}") from None


def try_read_int(path: str | os.PathLike[str]) -> tuple[int | None, str | None]:
    """``(value, None)`` or ``(None, problem)``; never raises for I/O or parse errors."""
    try:
        return read_int(path), None
    except OSError as err:
        return None, describe_os_error(err)
    except ValueError as err:
        return None, str(err)


def describe_os_error(err: OSError) -> str:
    if isinstance(err, PermissionError):
        return PERMISSION_DENIED
    if isinstance(err, FileNotFoundError):
        return "missing"
    if err.errno:
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__
