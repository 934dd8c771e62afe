"""Where downloaded wheels, GGUF files and built bundles live.

Default ``~/.cache/edge-runtime``; ``EDGE_RUNTIME_CACHE`` overrides it. Read at
call time (not import time) so tests and users can change it per process.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["cache_dir", "CACHE_ENV", "current_umask", "publish_dir"]

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


def current_umask() -> int:
    """The process's umask, read without changing it."""
    try:  # Linux >= 4.7 shows it; setting and restoring it instead would race with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def publish_dir(path: Path) -> None:
    """Give a directory made by ``tempfile.mkdtemp`` (owner-only) the mode the umask allows.

    Cached models are no secret, and a service account (the bridge's, the daemon's) reads them.
    """
    os.chmod(path, 0o777 & ~current_umask())
