"""Giving freed heap memory back to the system after a large, short-lived allocation.

tokenizers (Rust, on the C allocator) builds an encoding of ~100 bytes a token: a 900 kB prompt took a process from
71 to 212 MiB, and glibc kept those pages after they were freed, for the process's life (a daemon refusing that
prompt as too long stayed ~300 MiB larger). ``malloc_trim(0)`` hands them back (to 72 MiB). Other C libraries
(musl, macOS) return large blocks themselves, and have no such call: there this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["release_free_heap"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Return the C heap's free pages to the system, where the C library can (glibc); else nothing.

    A few milliseconds: called after work that allocated tens of MB, not per token."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
