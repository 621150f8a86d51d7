"""Per-key limits: requests in flight, and a token bucket of requests per second. Over a limit: 429
with ``Retry-After`` (seconds, rounded up), which the OpenAI SDKs honour when they retry."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .config import Limits
from .errors import APIError

__all__ = ["Limiter", "Lease"]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Lease:
    """One admitted request: ``release()`` (idempotent) when it ends, stream included."""

    def __init__(self, limiter: "Limiter", name: str):
        self._limiter = limiter
        self._name = name
        self._open = True

    def release(self) -> None:
        if self._open:
            self._open = False
            self._limiter._release(self._name)


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._in_flight: Dict[str, int] = {}
        self._buckets: Dict[str, _Bucket] = {}

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def acquire(self, name: str, limits: Limits) -> Lease:
        """Admit one request of key `name` or raise a 429 :class:`APIError` (nothing is taken then).
        Runs on the event loop, so check-and-take needs no lock."""
        n = self._in_flight.get(name, 0)
        if limits.max_concurrent is not None and n >= limits.max_concurrent:
            raise APIError(429, f"Too many concurrent requests for this key: {n} in flight, the limit is "
                                f"{limits.max_concurrent}. Retry when one has finished.", "rate_limit_error",
                           code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
        wait = self._take(name, limits)
        if wait is not None:
            raise APIError(429, f"Rate limit reached: {limits.requests_per_s:g} requests per second "
                                f"(burst {limits.bucket_size()}). Retry in {wait:.2f} s.", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        self._in_flight[name] = n + 1
        return Lease(self, name)

    def _take(self, name: str, limits: Limits) -> Optional[float]:
        """Take one token; None if taken, else the seconds until one is there."""
        size = limits.bucket_size()
        if size is None:
            return None
        rate = float(limits.requests_per_s)
        now = self._clock()
        b = self._buckets.get(name)
        if b is None:
            b = self._buckets[name] = _Bucket(float(size), now)
        b.tokens = min(float(size), b.tokens + (now - b.stamp) * rate)
        b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return None
        return (1.0 - b.tokens) / rate

    def _release(self, name: str) -> None:
        n = self._in_flight.get(name, 0) - 1
        if n > 0:
            self._in_flight[name] = n
        else:
            self._in_flight.pop(name, None)
