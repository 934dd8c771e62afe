"""Writing the files a command promises: whole or not at all, and an error that names the file.

A write that fails (a full SD card: ``ENOSPC``; a file-size limit: ``EFBIG``) raises an ``OSError``
without a file name, so the CLIs' error boundary printed "error: File too large" and nothing else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["naming", "write_text_whole"]


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with naming(path):
        try:
            tmp.write_text(text, encoding="utf-8", newline="")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
