"""The daemon's bounded queue: ``slots`` requests run at once, at most ``queue_size`` more wait, the rest are refused.

A request takes its place with :meth:`Admission.enter` (never blocks: a full
queue raises :class:`~edge_runtime.errors.QueueFullError` with a retry hint),
then waits for a slot in a worker thread with :meth:`Ticket.wait`, first come
first served. HTTP and gRPC requests share one admission, so the engine never
has more generations than it has KV caches, whatever the transport.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import QueueFullError

__all__ = ["Admission", "Ticket"]

_POLL_S = 0.02  # how often a waiting request looks at its cancel flag


class Ticket:
    """One admitted request: wait for a slot, then release it (exactly once, even when never granted)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._granted = threading.Event()
        self._released = False
        self.enqueued_s = time.monotonic()
        self.started_s: float | None = None

    @property
    def granted(self) -> bool:
        return self._granted.is_set()

    @property
    def queue_s(self) -> float:
        return (self.started_s or time.monotonic()) - self.enqueued_s

    def wait(self, cancelled: Callable[[], bool]) -> bool:
        """Block until this request holds a slot (True) or ``cancelled()`` became true first (False)."""
        while not self._granted.wait(_POLL_S):
            if cancelled():
                # a slot handed over right now is kept: release() gives it to the next request
                return self._granted.is_set()
        if self.started_s is None:
            self.started_s = time.monotonic()
        return True

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._leave(self)


class Admission:
    """Counts running and waiting requests; thread-safe."""

    def __init__(self, slots: int, queue_size: int) -> None:
        if slots < 1 or queue_size < 0:
            raise ValueError("slots must be >= 1 and queue_size >= 0")
        self.slots = slots
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._waiting: deque[Ticket] = deque()
        self._running = 0
        self._idle = threading.Condition(self._lock)
        self._hold_s = 1.0  # moving average of how long a slot is held, for the retry hint

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def admitted(self) -> int:
        return self._running + len(self._waiting)

    def retry_after_s(self) -> float:
        """A hint for a refused request: when the queue has likely moved up by one place."""
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> float:
        return max(1.0, math.ceil(self._hold_s * (len(self._waiting) + 1) / self.slots))

    def enter(self) -> Ticket:
        """Take a place: a slot at once when one is free, else a place in the queue; QueueFullError if full."""
        ticket = Ticket(self)
        with self._lock:
            if not self._grant_if_free_locked(ticket):
                if len(self._waiting) >= self.queue_size:
                    raise QueueFullError(
                        f"the daemon is busy: {self._running} requests running and {len(self._waiting)} waiting "
                        f"(server.queue_size = {self.queue_size})",
                        retry_after_s=self._retry_after_locked(),
                    )
                self._waiting.append(ticket)
        return ticket

    def reenter(self) -> Ticket:
        """A place for a request that gave its slot on and needs the engine again (its escalation failed before
        it had a local answer): a slot at once when one is free, else the front of the queue, whatever its
        length. It was admitted once; refusing it now would lose its answer."""
        ticket = Ticket(self)
        with self._lock:
            if not self._grant_if_free_locked(ticket):
                self._waiting.appendleft(ticket)
        return ticket

    def _grant_if_free_locked(self, ticket: Ticket) -> bool:
        """Give ``ticket`` a slot if one is free and nobody waits for it (the caller holds the lock)."""
        if self._running < self.slots and not self._waiting:
            self._running += 1
            ticket._granted.set()
            return True
        return False

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._granted.is_set():
                if ticket.started_s is not None:
                    self._hold_s = 0.8 * self._hold_s + 0.2 * (time.monotonic() - ticket.started_s)
                if self._waiting:
                    self._waiting.popleft()._granted.set()  # the slot passes on: running stays the same
                else:
                    self._running -= 1
            else:
                self._waiting.remove(ticket)
            if not self.admitted:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing runs or waits (True), or ``timeout_s`` passed (False)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self.admitted, timeout=timeout_s)
