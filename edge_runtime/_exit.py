"""Threads inside native code (onnxruntime, tokenizers) when the interpreter exits.

When Python finalizes, a daemon thread that comes back from C code and asks for the GIL is ended by unwinding
its stack. Unwound through onnxruntime's C++ frames (or tokenizers' Rust ones), that aborts the whole process
(SIGABRT, "terminate called without an active exception"): an app that exited while a request ran in a daemon thread
(a GUI's worker, a web framework's) crashed, whatever it had closed, since ``close()`` lets a running generation
finish. At exit (atexit runs before finalization) new calls are refused and the ones under way, a fraction of a
second each (a model's load: a few), are waited for. Python's own imports in such a thread are not covered.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Iterator

from .errors import EdgeRuntimeError

__all__ = ["native_call"]

EXIT_WAIT_S = 5.0  # a prefill chunk or a model load on a slow device; a step takes milliseconds

_cond = threading.Condition()
_inside = 0  # threads inside a native call now
_exiting = False


@contextlib.contextmanager
def native_call() -> Iterator[None]:
    """Around every native call that runs for long: an onnxruntime run or session's creation, a tokenizer's load
    or long encode (tokenizers' Rust frames abort the same way: "FATAL: exception not rethrown")."""
    global _inside
    with _cond:
        if _exiting:
            raise EdgeRuntimeError("the interpreter is exiting")
        _inside += 1
    try:
        yield
    finally:
        with _cond:
            _inside -= 1
            if _inside <= 0:
                _cond.notify_all()


def _wait_at_exit(wait_s: float = EXIT_WAIT_S) -> bool:
    """Refuse new runs and wait for the ones under way; False if some were still running after ``wait_s``."""
    global _exiting
    with _cond:
        _exiting = True
        return _cond.wait_for(lambda: _inside <= 0, timeout=wait_s)


def _reset_in_child() -> None:
    """A forked child (gunicorn's --preload workers) runs none of its parent's calls: it must not wait for them at
    its exit, nor find the condition's lock held by a parent's thread that does not exist in it."""
    global _cond, _inside, _exiting
    _cond, _inside, _exiting = threading.Condition(), 0, False


atexit.register(_wait_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
