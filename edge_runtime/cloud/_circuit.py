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
        self._probe = 0  # the number of the last probe let through

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

    def admit(self) -> int | None:
        """Like :meth:`allow`, saying which call it lets through: 0 for an ordinary call, the probe's number
        (> 0) for the half-open state's one probe, None when refused. Pass it back to ``record_*``: only the
        current probe's own end frees the probe slot or reopens the circuit."""
        with self._lock:
            if self._state == "closed":
                return 0
            if self._state == "open":
                if self._clock() < self._opened_s + self.cooldown_s:
                    return None
                self._state = "half_open"
                self._probing = False
            if self._probing:
                return None
            self._probing = True
            self._probe += 1
            return self._probe

    def record_success(self) -> None:
        with self._lock:
            self._state = "closed"
            self._failures = 0
            self._probing = False

    def record_failure(self, *, probe: int | None = None) -> None:
        """A call failed in a way that says the bridge cannot serve. ``probe``: what :meth:`admit` returned
        (None: unknown, taken as the probe). In half-open only the probe's own failure reopens the circuit: a
        call from before it opened failing late is old news, and reopening would let a second probe out."""
        with self._lock:
            self._failures += 1
            if self._state == "half_open":
                if probe is None or probe == self._probe:
                    self._probing = False
                    self._state = "open"
                    self._opened_s = self._clock()
            elif self._failures >= self.failure_threshold:
                self._probing = False
                self._state = "open"
                self._opened_s = self._clock()

    def record_neutral(self, *, probe: int | None = None) -> None:
        """A call ended in a way that says nothing about the bridge's health (bad request, caller gave up).

        ``probe``: what :meth:`admit` returned (None: unknown, taken as the probe). Only the current probe
        frees the probe slot: a call from before (0, or an older probe's number) leaves it to the probe still
        running, so no second one is let through.
        """
        with self._lock:
            if probe is None or probe == self._probe:
                self._probing = False
