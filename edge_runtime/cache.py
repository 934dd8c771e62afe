"""Where downloaded wheels, GGUF files and built bundles live.

Default ``~/.cache/edge-runtime``; ``EDGE_RUNTIME_CACHE`` overrides it. Read at
call time (not import time) so tests and users can change it per process.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "CACHE_ENV"]

CACHE_ENV = "EDGE_RUNTIME_CACHE"


def cache_dir(*parts: str, create: bool = True) -> Path:
    """Return the cache directory (or a subdirectory of it), creating it if asked."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "edge-runtime")
    path = Path(root).joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
