"""Per-key token-bucket rate limiting: in the API process by default, or in Postgres (next to the API keys, at
``auth.url`` or ``database_url``) so that every API process counts the same requests: a key allowed 600 a minute
gets 600 from the whole fleet, not 600 from each process.

Both are the same bucket: ``limit`` tokens at most, refilled at ``limit`` per minute, one taken per request.
A key may also have a budget of model tokens per minute (``tokens_per_minute``): a second bucket per key, which a
request must find not spent (at least one token left) and which the answer's usage (prompt + completion tokens)
is taken from once known, possibly below zero: the key then waits until the bucket has refilled. The usage of
an answer is not known before it is generated, so a key can overshoot its budget by the requests it has in flight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.core.db import PostgresPool
from app.core.errors import RateLimited, StoreUnavailable
from app.core.migrate import upgrade_postgres
from app.security.keys import MIGRATIONS, ApiKey, ApiKeys

log = logging.getLogger("keel.security")


class RateLimits(Protocol):
    def check(self, key_id: str, limit_per_minute: int) -> None:
        """Take one request from the key's bucket, or raise :class:`RateLimited` (with when to retry)."""

    async def acheck(self, key_id: str, limit_per_minute: int) -> None:
        """:meth:`check` for the event loop (a shared bucket is a database round trip: off the loop)."""

    def check_tokens(self, key_id: str, tokens_per_minute: int) -> None:
        """Raise :class:`RateLimited` while the key's token bucket is spent (less than one token left)."""

    async def acheck_tokens(self, key_id: str, tokens_per_minute: int) -> None: ...

    def spend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        """Take an answer's ``tokens`` from the key's token bucket (it may go below zero)."""

    async def aspend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None: ...

    def close(self) -> None: ...


def _limited(limit_per_minute: int, tokens: float) -> RateLimited:
    retry_after = (1.0 - tokens) / (limit_per_minute / 60.0)
    return RateLimited(f"rate limit of {limit_per_minute} requests per minute exceeded for this API key; "
                       f"retry after {retry_after:.1f} s", retry_after_s=retry_after)


def _tokens_limited(tokens_per_minute: int, tokens: float) -> RateLimited:
    retry_after = (1.0 - tokens) / (tokens_per_minute / 60.0)
    return RateLimited(f"token limit of {tokens_per_minute} tokens per minute (prompt + completion) used up for this "
                       f"API key; retry after {retry_after:.1f} s", retry_after_s=retry_after)


def token_bucket(key_id: str) -> str:
    """The bucket of a key's model tokens, beside its requests' (same table, its own row)."""
    return f"{key_id}#tokens"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allows ``limit`` requests per minute per key, with bursts up to ``limit`` (this process's count)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._clock = clock
        self._lock = threading.Lock()  # the event loop checks while other threads may count usage

    def _refilled(self, name: str, per_minute: int) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(float(per_minute), now)
        bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.updated) * per_minute / 60.0)
        bucket.updated = now
        return bucket

    def check(self, key_id: str, limit_per_minute: int) -> None:
        with self._lock:
            bucket = self._refilled(key_id, limit_per_minute)
            if bucket.tokens < 1.0:
                raise _limited(limit_per_minute, bucket.tokens)
            bucket.tokens -= 1.0

    async def acheck(self, key_id: str, limit_per_minute: int) -> None:
        self.check(key_id, limit_per_minute)  # a dict and some arithmetic: no need to leave the loop

    def check_tokens(self, key_id: str, tokens_per_minute: int) -> None:
        with self._lock:
            tokens = self._refilled(token_bucket(key_id), tokens_per_minute).tokens
        if tokens < 1.0:
            raise _tokens_limited(tokens_per_minute, tokens)

    async def acheck_tokens(self, key_id: str, tokens_per_minute: int) -> None:
        self.check_tokens(key_id, tokens_per_minute)

    def spend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        with self._lock:
            bucket = self._refilled(token_bucket(key_id), tokens_per_minute)
            bucket.tokens = max(-float(tokens_per_minute), bucket.tokens - tokens)  # a debt of a minute at most

    async def aspend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        self.spend_tokens(key_id, tokens_per_minute, tokens)

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
# A key's token bucket: how full it is now (no row: full), and taking an answer's usage from it (below zero too).
_TOKENS_LEFT = f"""
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t)
SELECT {_REFILL} FROM rate_buckets AS b WHERE b.key_id = %(key)s
"""
_TOKENS_SPEND = f"""
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t)
INSERT INTO rate_buckets AS b (key_id, tokens, updated_at, last_allowed)
SELECT %(key)s, GREATEST(-%(cap)s, %(cap)s - %(n)s), now.t, TRUE FROM now
ON CONFLICT (key_id) DO UPDATE SET
    tokens = GREATEST(-%(cap)s, {_REFILL} - %(n)s),
    updated_at = GREATEST(b.updated_at, (SELECT t FROM now))
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

    def _run(self, sql: str, args: dict, what: str) -> list[tuple] | None:
        """The statement's rows; None when the database is down and the limiter fails open (counted, logged)."""
        try:
            if time.monotonic() < self._down_until:
                raise StoreUnavailable(self._down_reason)
            try:
                return self._pg.statement(sql, args)
            except StoreUnavailable as exc:
                self._down_until = time.monotonic() + self._retry_after_error_s
                self._down_reason = exc.message
                raise
        except StoreUnavailable as exc:
            if self._on_error is not None:
                self._on_error()
            if not self.fail_open:
                raise
            log.warning("%s (auth.rate_limit_fail_open): %s", what, exc.message)
            return None

    def check(self, key_id: str, limit_per_minute: int) -> None:
        args = {"key": key_id, "cap": float(limit_per_minute), "rate": limit_per_minute / 60.0}
        rows = self._run(_TAKE, args, "rate limit not checked")
        if rows is not None:
            [(tokens, allowed)] = rows
            if not allowed:
                raise _limited(limit_per_minute, tokens)

    async def acheck(self, key_id: str, limit_per_minute: int) -> None:
        await asyncio.to_thread(self.check, key_id, limit_per_minute)

    def check_tokens(self, key_id: str, tokens_per_minute: int) -> None:
        args = {"key": token_bucket(key_id), "cap": float(tokens_per_minute), "rate": tokens_per_minute / 60.0}
        rows = self._run(_TOKENS_LEFT, args, "token limit not checked")
        if rows and rows[0][0] < 1.0:
            raise _tokens_limited(tokens_per_minute, rows[0][0])

    async def acheck_tokens(self, key_id: str, tokens_per_minute: int) -> None:
        await asyncio.to_thread(self.check_tokens, key_id, tokens_per_minute)

    def spend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        """Counted in the background: a failure here is logged and counted, but never takes the limiter off the
        requests' path (as a failed check does, for ``retry_after_error_s``)."""
        args = {"key": token_bucket(key_id), "cap": float(tokens_per_minute), "rate": tokens_per_minute / 60.0,
                "n": float(tokens)}
        if time.monotonic() < self._down_until:
            return  # the checks found the database away: they try it again, not every answer
        try:
            self._pg.statement(_TOKENS_SPEND, args)
        except StoreUnavailable as exc:
            if self._on_error is not None:
                self._on_error()
            log.warning("token usage of key %s not counted: %s", key_id, exc.message)

    async def aspend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        await asyncio.to_thread(self.spend_tokens, key_id, tokens_per_minute, tokens)

    def close(self) -> None:
        self._pg.close()


class TokenMeter:
    """Takes each answer's usage from its key's token bucket, off the answer's path (a shared bucket is a database
    round trip: in a worker thread), and tells a key's budget (its own limit, else the server's default)."""

    #: how long a key's budget read by its id is reused (a batch's lines: one read, not one per line)
    BUDGET_TTL_S = 30.0

    def __init__(self, keys: ApiKeys, limiter: RateLimits, default_per_minute: int | None) -> None:
        self.keys = keys
        self.limiter = limiter
        self.default_per_minute = default_per_minute
        self._pending: set[asyncio.Task[None]] = set()
        self._budgets: dict[str, tuple[float, int | None]] = {}

    def budget(self, key: ApiKey | None) -> int | None:
        """``key``'s model tokens per minute, or None: not limited."""
        return (key.tokens_per_minute if key is not None else None) or self.default_per_minute

    def budget_of(self, key_id: str) -> int | None:
        """:meth:`budget` by the key's id (a batch's owner; may read the key store: call it off the event loop).
        While the store cannot be read, the budget last read (else the default): a batch runs on through it."""
        now = time.monotonic()
        hit = self._budgets.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            budget = self.budget(self.keys.get(key_id))
        except StoreUnavailable:
            return hit[1] if hit is not None else self.default_per_minute
        if len(self._budgets) > 10_000:
            self._budgets.clear()
        self._budgets[key_id] = (now + self.BUDGET_TTL_S, budget)
        return budget

    def record(self, key_id: str, budget: int, tokens: int) -> None:
        """Count ``tokens`` against ``key_id``'s ``budget`` soon (called on the event loop as usage arrives)."""
        if tokens <= 0 or budget <= 0:
            return
        task = asyncio.get_running_loop().create_task(self._spend(key_id, budget, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _spend(self, key_id: str, budget: int, tokens: int) -> None:
        try:
            await self.limiter.aspend_tokens(key_id, budget, tokens)
        except StoreUnavailable as exc:  # an answer already sent must not fail over its accounting
            log.warning("token usage of key %s not counted: %s", key_id, exc.message)
        except Exception:
            log.exception("token usage of key %s not counted", key_id)

    async def drain(self) -> None:
        """Wait for the usage counted so far (tests, shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def open_rate_limiter(url: str | None, *, shared: bool = True, fail_open: bool = True,
                      on_store_error: Callable[[], None] | None = None) -> RateLimits:
    """Shared in Postgres when the keys live there (``url``) and ``shared``; else this process's own count."""
    if url and shared:
        return PostgresRateLimiter(url, fail_open=fail_open, on_store_error=on_store_error)
    return RateLimiter()
