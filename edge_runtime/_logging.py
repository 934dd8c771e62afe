"""How the command-line programs write their log: one line per event, and for servers a UTC time.

Budget windows and the bridge's billing are counted in UTC; a log in local time without an offset could not be
lined up with them (nor two machines' logs with each other).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["configure_logging", "Throttle"]


class _UtcFormatter(logging.Formatter):
    """``%(asctime)s`` as ISO 8601 in UTC with its ``Z``: 2026-11-30T21:03:39.237Z."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def configure_logging(level: int, *, stamped: bool) -> None:
    """The root logger to stderr at ``level``; ``stamped``: each line starts with its UTC time (servers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_UtcFormatter(("%(asctime)s " if stamped else "") + "%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


class Throttle:
    """Lets an event through at most once per ``interval_s``, counting the ones it held back: for a warning that
    every request may raise while a condition lasts (escalations skipped during an outage: 2,000 lines in 40 s
    in a helper's soak), where the first says what happened and the rest only repeat it."""

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next_s = float("-inf")
        self._held = 0

    def admit(self) -> int | None:
        """None to hold this event back; else how many were held back since the last one let through."""
        with self._lock:
            now = self._clock()
            if now < self._next_s:
                self._held += 1
                return None
            held, self._held, self._next_s = self._held, 0, now + self.interval_s
            return held
