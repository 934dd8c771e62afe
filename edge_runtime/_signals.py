"""The signals the two servers (`edge-runtime serve`, `cloud-bridge serve`) stop on gracefully, and their exit status.

SIGHUP is one of them: settings are read only at start, so a "reload" has to be a restart, and a closed
terminal should stop a server started by hand cleanly rather than kill it mid-answer (Python's default for
SIGHUP, which left its socket file behind). Unless the signal was ignored when the process started: SIGHUP
ignored is ``nohup``'s request to survive a closed terminal, SIGINT ignored a shell's background job's (a
Ctrl-C at that terminal is not for it), and both are kept.
"""

from __future__ import annotations

import logging
import signal

__all__ = ["stop_signals", "exit_status_after_stop"]

_SIGHUP = getattr(signal, "SIGHUP", None)  # not on Windows
# read once, at import (before any handler of ours is installed): asyncio restores SIG_DFL, not this, when its loop ends
_IGNORED_AT_START = frozenset(name for name in ("SIGINT", "SIGHUP")
                              if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is signal.SIG_IGN)
_HANGUP_NOTE = "SIGHUP: settings are read only at start; draining and stopping (restart to apply changes)"


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, and SIGINT and SIGHUP unless the process started with them ignored (a background job, ``nohup``)."""
    names = [name for name in ("SIGTERM", "SIGINT", "SIGHUP") if name not in _IGNORED_AT_START]
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


def exit_status_after_stop(sig: int, logger: logging.Logger) -> int:
    """The exit status of a server stopped gracefully by ``sig``; says in ``logger`` why a SIGHUP stops it.

    SIGTERM and SIGINT are stops the operator asked for: 0. SIGHUP exits 128 + SIGHUP after its drain, which
    systemd's ``Restart=on-failure`` counts as a failure (a process killed by SIGHUP it would count as clean),
    so under systemd a HUP is a graceful restart that applies new settings.
    """
    if sig != _SIGHUP:
        return 0
    logger.warning("%s", _HANGUP_NOTE)
    return 128 + sig
