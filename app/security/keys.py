"""API keys: stored hashed, scoped, revocable; in SQLite on one machine, in Postgres (``auth.url``, or the one
``database_url``) when several API processes must know the same keys.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash (a slow
password hash would only add latency to every request); the raw key is shown
once at creation and never stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from app.core.db import PostgresPool, SqliteFile
from app.core.errors import InvalidRequest, NotFound, StoreUnavailable
from app.core.migrate import Migrations, upgrade_postgres

log = logging.getLogger("keel.security")

SCOPES: dict[str, str] = {
    "chat": "call chat completions and list models",
    "prompts:read": "read prompt templates",
    "prompts:write": "create, edit and label prompt templates",
    "ingest": "ingest documents and retrieve",
    "evals": "run and read evaluations",
    "finetune": "submit and manage fine-tuning jobs",
    "releases": "create, watch, pause, promote and roll back releases (A/B, canary, shadow, blue/green)",
    "monitor": "read traces, lineage and drift reports, and run drift checks",
    "admin": "everything, including key management and backend logs",
}
KEY_PREFIX = "keel-"

# The api_keys table comes from these Alembic migrations (app/security/migrations), run on open.
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_keys",
                        pg_lock_key=0x6B65656C_6B79)  # "keelky"
#: How long a verified key is trusted without a database read: a revocation made by any process takes effect
#: within this, everywhere.
CACHE_TTL_S = 1.0
#: How long a verified key is still accepted while its store cannot be reached.
STALE_WHILE_DOWN_S = 600.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[str]
    rate_limit_per_minute: int | None
    created_at: str
    revoked_at: str | None = None
    teams: frozenset[str] = frozenset()  # whose shared memories (teams/<name>) the key may read
    tokens_per_minute: int | None = None  # model tokens (prompt + completion); None: the server's default

    def allows(self, scope: str) -> bool:
        return scope_allows(self.scopes, scope)

    def in_team(self, team: str) -> bool:
        """Membership decides team memory access; an admin key is in every team."""
        return team in self.teams or self.allows("admin")


def scope_allows(scopes: Iterable[str], scope: str) -> bool:
    """Whether a key with ``scopes`` may do what needs ``scope``: admin may do anything, writing prompts
    includes reading them."""
    return "admin" in scopes or scope in scopes or (scope == "prompts:read" and "prompts:write" in scopes)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def validate_scopes(scopes: Iterable[str]) -> frozenset[str]:
    scopes = frozenset(scopes)
    if not scopes:
        raise InvalidRequest("give at least one scope; known scopes: " + ", ".join(SCOPES), param="scopes")
    unknown = sorted(scopes - SCOPES.keys())
    if unknown:
        raise InvalidRequest(
            f"unknown scope(s) {', '.join(unknown)}; known scopes: {', '.join(SCOPES)}", param="scopes"
        )
    return scopes


_TEAM = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}$")


def validate_teams(teams: Iterable[str]) -> frozenset[str]:
    out = frozenset(t.strip() for t in teams)
    bad = sorted(t for t in out if not _TEAM.match(t))
    if bad:
        raise InvalidRequest(f"team name(s) {', '.join(map(repr, bad))}: use lower-case letters, digits, '.', '_' "
                             "or '-' (at most 64)", param="teams")
    return out


class ApiKeys(Protocol):
    """Where keys live (the contract every store passes: tests/unit/test_security.py)."""

    def create(self, name: str, scopes: Iterable[str], rate_limit_per_minute: int | None = None,
               teams: Iterable[str] = (), tokens_per_minute: int | None = None) -> tuple[ApiKey, str]: ...

    def verify(self, raw: str) -> ApiKey | None: ...

    def get(self, key_id: str) -> ApiKey | None:
        """The active key with that id (cached like :meth:`verify`), or None."""

    async def averify(self, raw: str) -> ApiKey | None:
        """:meth:`verify` for the event loop: from the cache at once, else read off the loop."""

    def list(self, include_revoked: bool = False) -> list[ApiKey]: ...

    def revoke(self, key_id: str) -> ApiKey: ...

    def close(self) -> None: ...


class _SqlKeyStore:
    """The SQL both stores share. Verified keys are cached for ``cache_ttl_s``: a revocation takes effect within
    it without a database read on every request."""

    _mark = "?"

    def __init__(self, cache_ttl_s: float) -> None:
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._by_id: dict[str, tuple[float, ApiKey | None]] = {}
        self._ttl = cache_ttl_s

    def _tx(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def create(
        self, name: str, scopes: Iterable[str], rate_limit_per_minute: int | None = None,
        teams: Iterable[str] = (), tokens_per_minute: int | None = None,
    ) -> tuple[ApiKey, str]:
        """Return the stored key and the raw secret (shown to the user once)."""
        if not name.strip():
            raise InvalidRequest("a key needs a non-empty name", param="name")
        for param, value in (("rate_limit_per_minute", rate_limit_per_minute),
                             ("tokens_per_minute", tokens_per_minute)):
            if value is not None and value < 1:
                raise InvalidRequest(f"{param} must be at least 1", param=param)
        key = ApiKey(
            id=secrets.token_hex(6),
            name=name.strip(),
            scopes=validate_scopes(scopes),
            rate_limit_per_minute=rate_limit_per_minute,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            teams=validate_teams(teams),
            tokens_per_minute=tokens_per_minute,
        )
        raw = f"{KEY_PREFIX}{key.id}-{secrets.token_urlsafe(32)}"
        m = self._mark
        with self._tx() as db:
            db.execute("INSERT INTO api_keys (id, name, key_hash, scopes, rate_limit_per_minute, created_at, teams, "
                       f"tokens_per_minute) VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m}, {m})",
                       (key.id, key.name, hash_key(raw), json.dumps(sorted(key.scopes)), rate_limit_per_minute,
                        key.created_at, json.dumps(sorted(key.teams)), tokens_per_minute))
        return key, raw

    def get(self, key_id: str) -> ApiKey | None:
        hit = self._by_id.get(key_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        rows = self._read(f"SELECT * FROM api_keys WHERE id = {self._mark} AND revoked_at IS NULL", (key_id,))
        key = _row_to_key(rows[0]) if rows else None
        if len(self._by_id) > 10_000:
            self._by_id.clear()
        self._by_id[key_id] = (time.monotonic() + self._ttl, key)
        return key

    def _cached(self, digest: str) -> tuple[ApiKey | None] | None:
        hit = self._cache.get(digest)
        return (hit[1],) if hit and hit[0] > time.monotonic() else None

    def verify(self, raw: str) -> ApiKey | None:
        digest = hash_key(raw)
        if (hit := self._cached(digest)) is not None:
            return hit[0]
        now = time.monotonic()
        try:
            rows = self._read(f"SELECT * FROM api_keys WHERE key_hash = {self._mark} AND revoked_at IS NULL",
                              (digest,))
        except StoreUnavailable:
            # The store is down: a key verified a little while ago keeps working (nobody can revoke it meanwhile
            # either); an unknown one waits for the store, with the 503 that says why.
            stale = self._cache.get(digest)
            if stale is not None and stale[1] is not None and now - stale[0] < STALE_WHILE_DOWN_S:
                log.warning("API key store unavailable: key %s accepted from a check %.0f s old", stale[1].id,
                            now - stale[0] + self._ttl)
                return stale[1]
            raise
        key = _row_to_key(rows[0]) if rows else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, key)
        return key

    async def averify(self, raw: str) -> ApiKey | None:
        if (hit := self._cached(hash_key(raw))) is not None:
            return hit[0]
        return await asyncio.to_thread(self.verify, raw)

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        return [_row_to_key(r) for r in self._read(sql + " ORDER BY created_at, id")]

    def revoke(self, key_id: str) -> ApiKey:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        m = self._mark
        with self._tx() as db:
            cur = db.execute(f"UPDATE api_keys SET revoked_at = {m} WHERE id = {m} AND revoked_at IS NULL",
                             (stamp, key_id))
            row = db.execute(f"SELECT * FROM api_keys WHERE id = {m}", (key_id,)).fetchone()
        if row is None or (cur.rowcount == 0 and row[6] is None):
            raise NotFound(f"no active API key with id {key_id!r}", param="key_id")
        self._cache.clear()
        self._by_id.clear()
        return _row_to_key(tuple(row))


class KeyStore(_SqlKeyStore):
    """One SQLite file (``<home>/keel.db``): the API processes of one machine."""

    def __init__(self, path: Path, cache_ttl_s: float = CACHE_TTL_S) -> None:
        super().__init__(cache_ttl_s)
        self._file = SqliteFile(path, MIGRATIONS, what="the API key store")

    def _tx(self) -> AbstractContextManager[Any]:
        return self._file.tx()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._file.read(sql, args)

    def close(self) -> None:
        self._file.close()


class PostgresKeyStore(_SqlKeyStore):
    """One table for every API process on every machine: a key created through one works on all."""

    _mark = "%s"

    def __init__(self, url: str, *, cache_ttl_s: float = CACHE_TTL_S, timeout_s: float = 10.0) -> None:
        super().__init__(cache_ttl_s)
        self._pg = PostgresPool(url, whose="the API keys'", setting="auth.url (or database_url)", name="keel-keys",
                                timeout_s=timeout_s,
                                migrate=lambda t: upgrade_postgres(url, MIGRATIONS, connect_timeout_s=t))

    def _tx(self) -> AbstractContextManager[Any]:
        return self._pg.transaction()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._pg.read(sql, args)

    def close(self) -> None:
        self._pg.close()


def open_key_store(url: str | None, path: Path) -> ApiKeys:
    """Postgres when ``url`` is set (``auth.url``, or ``database_url``), else the SQLite file at ``path``."""
    return PostgresKeyStore(url) if url else KeyStore(path)


def _row_to_key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(
        id=row[0], name=row[1], scopes=frozenset(json.loads(row[3])), rate_limit_per_minute=row[4],
        created_at=row[5], revoked_at=row[6], teams=frozenset(json.loads(row[7] or "[]")), tokens_per_minute=row[8],
    )
