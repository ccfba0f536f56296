"""Per-key token-bucket rate limiting: in the API process by default, or in Postgres (next to the API keys, at
``auth.url`` or ``database_url``) so that every API process counts the same requests: a key allowed 600 a minute
gets 600 from the whole fleet, not 600 from each process.

Both are the same bucket: ``limit`` tokens at most, refilled at ``limit`` per minute, one taken per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.core.db import PostgresPool
from app.core.errors import RateLimited, StoreUnavailable
from app.core.migrate import upgrade_postgres
from app.security.keys import MIGRATIONS

log = logging.getLogger("keel.security")


class RateLimits(Protocol):
    def check(self, key_id: str, limit_per_minute: int) -> None:
        """Take one request from the key's bucket, or raise :class:`RateLimited` (with when to retry)."""

    async def acheck(self, key_id: str, limit_per_minute: int) -> None:
        """:meth:`check` for the event loop (a shared bucket is a database round trip: off the loop)."""

    def close(self) -> None: ...


def _limited(limit_per_minute: int, tokens: float) -> RateLimited:
    retry_after = (1.0 - tokens) / (limit_per_minute / 60.0)
    return RateLimited(f"rate limit of {limit_per_minute} requests per minute exceeded for this API key; "
                       f"retry after {retry_after:.1f} s", retry_after_s=retry_after)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allows ``limit`` requests per minute per key, with bursts up to ``limit`` (this process's count)."""

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
            raise _limited(limit_per_minute, bucket.tokens)
        bucket.tokens -= 1.0

    async def acheck(self, key_id: str, limit_per_minute: int) -> None:
        self.check(key_id, limit_per_minute)  # a dict and some arithmetic: no need to leave the loop

    def close(self) -> None:
        pass


# One statement, one round trip: refill by the time since the last request (the database's clock, the same for
# every process), take a token if there is one, and say whether it did. A key's first request finds a full bucket.
_REFILL = "LEAST(%(cap)s, b.tokens + ((SELECT t FROM now) - b.updated_at) * %(rate)s)"
_TAKE = f"""
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t)
INSERT INTO rate_buckets AS b (key_id, tokens, updated_at, last_allowed)
SELECT %(key)s, %(cap)s - 1, now.t, TRUE FROM now
ON CONFLICT (key_id) DO UPDATE SET
    tokens = CASE WHEN {_REFILL} >= 1 THEN {_REFILL} - 1 ELSE {_REFILL} END,
    last_allowed = {_REFILL} >= 1,
    updated_at = GREATEST(b.updated_at, (SELECT t FROM now))
RETURNING tokens, last_allowed
"""


class PostgresRateLimiter:
    """The bucket in Postgres, shared by every API process on the database: one statement per request, in
    autocommit. When the database cannot be reached, ``fail_open`` lets requests through (each counted by
    ``on_store_error``) instead of refusing every caller while it is down, and the limiter does not try it again
    for ``retry_after_error_s`` (a request must not wait out a connection timeout each time)."""

    def __init__(self, url: str, *, fail_open: bool = True, on_store_error: Callable[[], None] | None = None,
                 timeout_s: float = 1.0, retry_after_error_s: float = 5.0) -> None:
        self.fail_open = fail_open
        self._on_error = on_store_error
        self._retry_after_error_s = retry_after_error_s
        self._down_until = 0.0
        self._down_reason = ""
        self._pg = PostgresPool(url, whose="the rate limits'", setting="auth.url (or database_url)",
                                name="keel-rate-limits", timeout_s=timeout_s,
                                migrate=lambda t: upgrade_postgres(url, MIGRATIONS, connect_timeout_s=t))

    def check(self, key_id: str, limit_per_minute: int) -> None:
        args = {"key": key_id, "cap": float(limit_per_minute), "rate": limit_per_minute / 60.0}
        try:
            if time.monotonic() < self._down_until:
                raise StoreUnavailable(self._down_reason)
            try:
                [(tokens, allowed)] = self._pg.statement(_TAKE, args)
            except StoreUnavailable as exc:
                self._down_until = time.monotonic() + self._retry_after_error_s
                self._down_reason = exc.message
                raise
        except StoreUnavailable as exc:
            if self._on_error is not None:
                self._on_error()
            if not self.fail_open:
                raise
            log.warning("rate limit not checked (auth.rate_limit_fail_open): %s", exc.message)
            return
        if not allowed:
            raise _limited(limit_per_minute, tokens)

    async def acheck(self, key_id: str, limit_per_minute: int) -> None:
        await asyncio.to_thread(self.check, key_id, limit_per_minute)

    def close(self) -> None:
        self._pg.close()


def open_rate_limiter(url: str | None, *, shared: bool = True, fail_open: bool = True,
                      on_store_error: Callable[[], None] | None = None) -> RateLimits:
    """Shared in Postgres when the keys live there (``url``) and ``shared``; else this process's own count."""
    if url and shared:
        return PostgresRateLimiter(url, fail_open=fail_open, on_store_error=on_store_error)
    return RateLimiter()
