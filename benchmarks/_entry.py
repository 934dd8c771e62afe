"""How a benchmark script runs from the command line: stopped cleanly, failing in one line.

A benchmark starts processes (runtimes in their own interpreters, a daemon) and
makes temporary directories, all cleaned up in ``finally`` blocks. Python runs
those on Ctrl-C, but SIGTERM (``kill``, a CI timeout) ends the interpreter at
once and leaves them behind; here it is turned into SystemExit so they run too.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["run_main"]


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], int], name: str) -> int:
    """``main()``'s exit status; the project's errors as one line, SIGTERM through the ``finally`` blocks."""
    from edge_runtime.errors import EdgeRuntimeError

    signal.signal(signal.SIGTERM, _terminated)
    try:
        return main()
    except EdgeRuntimeError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
