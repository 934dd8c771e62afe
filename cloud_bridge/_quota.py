"""Per-device quotas: token buckets for requests per minute and tokens per minute.

A request is admitted when the device's request bucket holds a whole request
and its token bucket is not in debt. Tokens are charged after the answer,
when the real count is known, so one long answer may push the bucket below
zero; the device then waits until it refills. A rejection says how long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._settings import QuotaSettings

__all__ = ["TokenBucket", "QuotaRejection", "QuotaManager"]


class TokenBucket:
    """``capacity`` units, refilled at ``rate_per_s``. Not thread-safe: the manager locks."""

    def __init__(self, rate_per_s: float, capacity: float, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.level = capacity
        self._updated_s = now_s

    def _refill(self, now_s: float) -> None:
        elapsed = max(0.0, now_s - self._updated_s)
        self.level = min(self.capacity, self.level + elapsed * self.rate_per_s)
        self._updated_s = now_s

    def seconds_until(self, amount: float, now_s: float) -> float:
        """0 when ``amount`` is available now, else how long until it is."""
        self._refill(now_s)
        missing = amount - self.level
        return 0.0 if missing <= 1e-9 else missing / self.rate_per_s

    def take(self, amount: float, now_s: float) -> None:
        self._refill(now_s)
        self.level -= amount


@dataclass(frozen=True)
class QuotaRejection:
    limit: str  # "requests_per_minute" or "tokens_per_minute"
    retry_after_s: float


class QuotaManager:
    def __init__(self, settings: QuotaSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _bucket(
        self, table: dict[str, TokenBucket], device: str, per_minute: float, burst: int | None, now_s: float
    ) -> TokenBucket:
        bucket = table.get(device)
        if bucket is None:
            bucket = table[device] = TokenBucket(
                # at least one whole request or token: a bucket of 0.5 could never admit anything
                per_minute / 60.0, float(burst if burst is not None else max(per_minute, 1.0)), now_s
            )
        return bucket

    def admit(self, device: str) -> QuotaRejection | None:
        """Take one request from the device's quota, or say why not and for how long."""
        s = self._settings
        with self._lock:
            now_s = self._clock()
            requests = None
            waits: list[tuple[float, str]] = []
            if s.requests_per_minute > 0:
                requests = self._bucket(self._requests, device, s.requests_per_minute, s.requests_burst, now_s)
                waits.append((requests.seconds_until(1.0, now_s), "requests_per_minute"))
            if s.tokens_per_minute > 0:
                tokens = self._bucket(self._tokens, device, s.tokens_per_minute, s.tokens_burst, now_s)
                # a device in debt waits until its bucket is positive again
                waits.append((tokens.seconds_until(1e-6, now_s), "tokens_per_minute"))
            # both limits may bind: the retry hint is the longer wait, or a retry at the shorter one is refused again
            wait_s, limit = max(waits, default=(0.0, ""))
            if wait_s > 0:
                return QuotaRejection(limit, wait_s)
            if requests is not None:
                requests.take(1.0, now_s)
            return None

    def refund_request(self, device: str) -> None:
        """Give back the request taken by :meth:`admit` for a call no backend ran: the bridge itself refused it (queue
        full), or it ended while it waited for a worker."""
        if self._settings.requests_per_minute <= 0:
            return
        with self._lock:
            bucket = self._requests.get(device)
            if bucket is not None:
                bucket.take(-1.0, self._clock())
                bucket.level = min(bucket.level, bucket.capacity)

    def charge_tokens(self, device: str, count: int) -> None:
        s = self._settings
        if s.tokens_per_minute <= 0 or count <= 0:
            return
        with self._lock:
            now_s = self._clock()
            self._bucket(self._tokens, device, s.tokens_per_minute, s.tokens_burst, now_s).take(float(count), now_s)
