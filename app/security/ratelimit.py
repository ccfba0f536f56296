"""Per-key token-bucket rate limiting (per API process)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from app.core.errors import RateLimited


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allows ``limit`` requests per minute per key, with bursts up to ``limit``."""

    def __init__(self, clock=time.monotonic) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._clock = clock

    def check(self, key_id: str, limit_per_minute: int) -> None:
        now = self._clock()
        rate = limit_per_minute / 60.0
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(float(limit_per_minute), now)
        bucket.tokens = min(float(limit_per_minute), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            retry_after = (1.0 - bucket.tokens) / rate
            raise RateLimited(
                f"rate limit of {limit_per_minute} requests per minute exceeded for this API key; "
                f"retry after {retry_after:.1f} s",
                retry_after_s=retry_after,
            )
        bucket.tokens -= 1.0
