"""Where downloaded wheels, GGUF files and built bundles live.

Default ``~/.cache/edge-runtime``; ``EDGE_RUNTIME_CACHE`` overrides it. Read at
call time (not import time) so tests and users can change it per process.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["cache_dir", "CACHE_ENV"]

CACHE_ENV = "EDGE_RUNTIME_CACHE"


def cache_dir(*parts: str, create: bool = True) -> Path:
    """Return the cache directory (or a subdirectory of it), creating it if asked."""
    # "~/x" as a systemd Environment= line or a quoted shell value passes it, unexpanded; a relative value is
    # taken from the working directory once, so a process that changes directory keeps the same cache
    raw = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "edge-runtime")
    try:
        root = Path(raw).expanduser().absolute()
    except RuntimeError as err:  # "~nosuchuser/x", or no home directory to put the default in
        raise ConfigError(f"cannot expand {raw!r}: {err} (set {CACHE_ENV} to a directory)", field=CACHE_ENV) from err
    path = root.joinpath(*parts)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the cache directory {path}: {err.strerror or err} (set {CACHE_ENV} "
                              "to a writable directory)", field=CACHE_ENV) from err
    return path
