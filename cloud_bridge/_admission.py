"""Bounded workers with a bounded queue in front of each backend.

At most ``workers`` generations run at once; at most ``queue_size`` more wait.
Beyond that a request is refused at once with a retry hint (never an
unbounded wait). A waiting request whose call is cancelled or expires leaves
the queue without ever reaching the backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edge_runtime.errors import QueueFullError

__all__ = ["WorkerSlots"]

_POLL_S = 0.05  # how often a waiting request looks at its cancel flag


class WorkerSlots:
    def __init__(self, workers: int, queue_size: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self._clock = clock
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0
        # moving average of how long a slot is held, for the retry hint
        self._hold_s = 1.0

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Wait for a slot. False if ``cancelled()`` became true first; QueueFullError if the queue is full."""
        with self._cond:
            if self.running < self.workers and self.waiting == 0:
                self.running += 1
                return True
            if self.waiting >= self.queue_size:
                retry_after_s = max(0.1, self._hold_s * (self.waiting + 1) / self.workers)
                raise QueueFullError(
                    f"{self.running} generations running and {self.waiting} waiting", retry_after_s=round(retry_after_s, 3)
                )
            self.waiting += 1
            try:
                while self.running >= self.workers:
                    if cancelled():
                        return False
                    self._cond.wait(_POLL_S)
                self.running += 1
                return True
            finally:
                self.waiting -= 1

    def release(self, held_s: float | None = None) -> None:
        with self._cond:
            self.running -= 1
            if held_s is not None:
                self._hold_s = 0.8 * self._hold_s + 0.2 * held_s
            self._cond.notify()
