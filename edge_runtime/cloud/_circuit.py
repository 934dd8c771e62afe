"""A circuit breaker: after N consecutive failed calls, skip the cloud for a cool-down.

closed --N failures--> open --cool-down--> half-open --success--> closed
                                     half-open --failure--> open
In half-open one call at a time goes through to test the bridge; the others
are refused at once (the runtime answers them locally).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["CircuitBreaker", "CircuitState"]

CircuitState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self, failure_threshold: int = 3, cooldown_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: CircuitState = "closed"
        self._failures = 0
        self._opened_s = 0.0
        self._probing = False

    @property
    def state(self) -> CircuitState:
        """The state a call made now would meet: an open circuit whose cool-down is over reads ``half_open``."""
        with self._lock:
            if self._state == "open" and self._clock() >= self._opened_s + self.cooldown_s:
                return "half_open"
            return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after_s(self) -> float:
        """Seconds until the open circuit lets a call try again (0 unless open)."""
        with self._lock:
            if self._state != "open":
                return 0.0
            return max(0.0, self._opened_s + self.cooldown_s - self._clock())

    def allow(self) -> bool:
        """May a call go to the cloud now? In half-open, only the first caller is let through."""
        return self.admit() is not None

    def admit(self) -> Literal["call", "probe"] | None:
        """Like :meth:`allow`, saying which kind of call it lets through: the half-open state's one ``probe``,
        or an ordinary ``call``. Only the probe's own end frees the probe slot (``record_neutral(probe=True)``)."""
        with self._lock:
            if self._state == "closed":
                return "call"
            if self._state == "open":
                if self._clock() < self._opened_s + self.cooldown_s:
                    return None
                self._state = "half_open"
                self._probing = False
            if self._probing:
                return None
            self._probing = True
            return "probe"

    def record_success(self) -> None:
        with self._lock:
            self._state = "closed"
            self._failures = 0
            self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._state == "half_open" or self._failures >= self.failure_threshold:
                self._state = "open"
                self._opened_s = self._clock()

    def record_neutral(self, *, probe: bool = True) -> None:
        """A call ended in a way that says nothing about the bridge's health (bad request, caller gave up).

        ``probe=False``: it was not the half-open probe (it started while the circuit was closed), so the
        probe still running keeps its slot and no second one is let through.
        """
        with self._lock:
            if probe:
                self._probing = False
