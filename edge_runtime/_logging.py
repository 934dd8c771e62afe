"""How the command-line programs write their log: one line per event, and for servers a UTC time.

Budget windows and the bridge's billing are counted in UTC; a log in local time without an offset could not be
lined up with them (nor two machines' logs with each other).
"""

from __future__ import annotations

import logging
import time

__all__ = ["configure_logging"]


class _UtcFormatter(logging.Formatter):
    """``%(asctime)s`` as ISO 8601 in UTC with its ``Z``: 2026-11-30T21:03:39.237Z."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def configure_logging(level: int, *, stamped: bool) -> None:
    """The root logger to stderr at ``level``; ``stamped``: each line starts with its UTC time (servers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_UtcFormatter(("%(asctime)s " if stamped else "") + "%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
