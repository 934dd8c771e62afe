"""Bounded workers with a bounded queue in front of each backend.

At most ``workers`` generations run at once; at most ``queue_size`` more wait.
Beyond that a request is refused at once with a retry hint (never an
unbounded wait). A waiting request whose call is cancelled or expires leaves
the queue without ever reaching the backend.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from edge_runtime.errors import QueueFullError

__all__ = ["WorkerSlots"]

_POLL_S = 0.05  # how often a waiting request looks at its cancel flag


class WorkerSlots:
    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self.running = 0
        # first come, first served: a freed slot is handed to the oldest waiter, never to a newcomer
        self._waiters: deque[threading.Event] = deque()
        # moving average of how long a slot is held, for the retry hint
        self._hold_s = 1.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Wait for a slot. False if ``cancelled()`` became true first; QueueFullError if the queue is full."""
        if cancelled():
            # the call ended on its way here: a free worker would run the backend for nobody (an upstream bills it)
            # and the caller's request would stay spent (the service gives back what no backend ran)
            return False
        with self._lock:
            if self.running < self.workers and not self._waiters:
                self.running += 1
                return True
            if len(self._waiters) >= self.queue_size:
                retry_after_s = max(0.1, self._hold_s * (len(self._waiters) + 1) / self.workers)
                raise QueueFullError(
                    f"{self.running} generations running and {len(self._waiters)} waiting",
                    retry_after_s=round(retry_after_s, 3),
                )
            granted = threading.Event()
            self._waiters.append(granted)
        while not granted.wait(_POLL_S):
            if cancelled():
                with self._lock:
                    if not granted.is_set():
                        self._waiters.remove(granted)
                        return False
                break  # the slot was handed over just now
        if cancelled():
            # granted, but the call ended meanwhile (also within the last poll): the slot goes on at once, and the
            # backend is never asked (an upstream would bill an answer nobody reads)
            self.release()
            return False
        return True

    def release(self, held_s: float | None = None) -> None:
        with self._lock:
            if held_s is not None:
                self._hold_s = 0.8 * self._hold_s + 0.2 * held_s
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes on; running stays the same
            else:
                self.running -= 1
