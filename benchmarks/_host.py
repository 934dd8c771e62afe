"""The CPU a results file was measured on.

Both of the project's VMs are called ``vm``; the CPU model is what tells their results files apart (an EPYC and a
Xeon decode at different speeds, and their 4-bit kernels choose differently at near-ties).
"""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_model"]


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The ``model name`` of the first CPU, or what ``platform`` knows where there is no ``/proc/cpuinfo``."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
