"""API keys: stored hashed in SQLite, scoped, revocable.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash (a slow
password hash would only add latency to every request); the raw key is shown
once at creation and never stored.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.core.db import enable_wal
from app.core.errors import InvalidRequest, NotFound
from app.core.migrate import Migrations, upgrade_sqlite

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
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_keys")


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[str]
    rate_limit_per_minute: int | None
    created_at: str
    revoked_at: str | None = None

    def allows(self, scope: str) -> bool:
        return scope_allows(self.scopes, scope)


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


class KeyStore:
    """SQLite-backed key store. Verified keys are cached briefly: a revocation takes effect within
    ``cache_ttl_s`` without a database read on every request."""

    def __init__(self, path: Path, cache_ttl_s: float = 5.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        enable_wal(self._db)
        upgrade_sqlite(self._db, MIGRATIONS)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._ttl = cache_ttl_s

    def close(self) -> None:
        self._db.close()

    def create(
        self, name: str, scopes: Iterable[str], rate_limit_per_minute: int | None = None
    ) -> tuple[ApiKey, str]:
        """Return the stored key and the raw secret (shown to the user once)."""
        if not name.strip():
            raise InvalidRequest("a key needs a non-empty name", param="name")
        if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
            raise InvalidRequest("rate_limit_per_minute must be at least 1", param="rate_limit_per_minute")
        key = ApiKey(
            id=secrets.token_hex(6),
            name=name.strip(),
            scopes=validate_scopes(scopes),
            rate_limit_per_minute=rate_limit_per_minute,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        raw = f"{KEY_PREFIX}{key.id}-{secrets.token_urlsafe(32)}"
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (key.id, key.name, hash_key(raw), json.dumps(sorted(key.scopes)),
                 rate_limit_per_minute, key.created_at),
            )
        return key, raw

    def verify(self, raw: str) -> ApiKey | None:
        digest = hash_key(raw)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (digest,)
            ).fetchone()
        key = _row_to_key(row) if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, key)
        return key

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at").fetchall()
        return [_row_to_key(r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            cur = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (stamp, key_id)
            )
            row = self._db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None or (cur.rowcount == 0 and row[6] is None):
            raise NotFound(f"no active API key with id {key_id!r}", param="key_id")
        self._cache.clear()
        return _row_to_key(row)


def _row_to_key(row: tuple) -> ApiKey:
    return ApiKey(
        id=row[0], name=row[1], scopes=frozenset(json.loads(row[3])), rate_limit_per_minute=row[4],
        created_at=row[5], revoked_at=row[6],
    )
