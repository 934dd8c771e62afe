"""Writing the files a command promises: whole or not at all, durable, and an error that names the file.

A write that fails (a full SD card: ``ENOSPC``; a file-size limit: ``EFBIG``) raises an ``OSError``
without a file name, so the CLIs' error boundary printed "error: File too large" and nothing else.

A rename is atomic, not durable: after a power cut (an edge device's everyday failure) the new name can
point at a file whose data never reached the disk, empty or short. :func:`durable_replace` flushes the
data first and the directory entry after.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["durable_replace", "naming", "write_text_whole"]


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An ``OSError`` raised inside names ``path`` when it names no file itself."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = os.fspath(path)
        raise


def write_text_whole(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it: a reader finds the old file or
    the new one, never half of it; a failed write leaves the old one and no temporary file."""
    path = Path(path)
    with naming(path):
        # a name of its own per call (two threads writing one file must not write into each other's temporary
        # file), created with the mode a plain write gets: the kernel applies the umask, or a directory's default
        # ACL, itself (mkstemp's 0600 hid a report from the other users; a chmod after it overrode an ACL)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            tmp.write_text(text, encoding="utf-8", newline="")
            durable_replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def durable_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace(src, dst)`` that survives a power cut: ``src`` (a file, or a directory and every file in it)
    is flushed to the disk first, and the directory holding ``dst`` after."""
    src = Path(src)
    if src.is_dir():
        for path in sorted(src.rglob("*")):
            _fsync(path)
    _fsync(src)
    os.replace(src, dst)
    _fsync(Path(dst).parent)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory on Windows, a special file: nothing to flush this way
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot (some network ones): the rename is still atomic
        pass
    finally:
        os.close(fd)
