"""``PostgresPromptStore``: the prompt registry in Postgres, for several API instances sharing one registry.

Same contract and semantics as ``SqlitePromptStore`` (the contract suite in
``tests/unit/test_prompts_store.py`` runs on both). Differences that matter:

* Writers are serialised by the row lock on the ``revision`` counter, taken as the first statement
  of every write transaction. That is Postgres' equivalent of SQLite's ``BEGIN IMMEDIATE``: the
  second of two racing writers waits, then (READ COMMITTED: each statement sees everything committed
  before it starts) reads the winner's version and gets the same 409. Prompt writes are rare, so one
  global write lock costs nothing and cannot deadlock (every writer takes the same lock first).
* Other workers see changes through the same counter: ``revision()`` is one primary-key read, which
  the registry does at most every ``change_check_interval_s`` (0.5 s). LISTEN/NOTIFY was not chosen:
  it needs a dedicated connection and a listener thread per worker, and a notification sent while
  that connection is reconnecting is lost, so the counter would still be needed as the truth.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.core.db import postgres_unavailable
from app.core.errors import NotFound, StoreUnavailable
from prompts.errors import ImportConflict
from prompts.models import AuditEntry, TemplateContent, TemplateSummary, TemplateVersion, validate_name
from prompts.store import _row_to_version, _stale, utc_now

log = logging.getLogger("keel.prompts")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS prompt_templates (
        name TEXT PRIMARY KEY,
        latest_version INTEGER NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS prompt_versions (
        name TEXT NOT NULL REFERENCES prompt_templates(name),
        version INTEGER NOT NULL,
        content TEXT NOT NULL,
        hash TEXT NOT NULL,
        parent INTEGER,
        author TEXT NOT NULL,
        message TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS prompt_labels (
        name TEXT NOT NULL REFERENCES prompt_templates(name),
        label TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated_at TEXT NOT NULL,
        updated_by TEXT NOT NULL,
        PRIMARY KEY (name, label))""",
    """CREATE TABLE IF NOT EXISTS prompt_audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        name TEXT NOT NULL,
        label TEXT,
        from_version INTEGER,
        to_version INTEGER,
        reason TEXT NOT NULL DEFAULT '',
        details JSONB NOT NULL DEFAULT '{}')""",
    "CREATE INDEX IF NOT EXISTS prompt_audit_name ON prompt_audit(name, label, id)",
    "CREATE TABLE IF NOT EXISTS prompt_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO prompt_meta VALUES ('revision', 0) ON CONFLICT DO NOTHING",
]
# Two workers starting at once would race on CREATE TABLE IF NOT EXISTS (a unique violation in the
# catalog); an advisory lock makes the schema set-up one at a time.
_SCHEMA_LOCK = 0x6B65656C_7072  # "keelpr"


PromptStoreUnavailable = StoreUnavailable  # the name callers and tests know


class PostgresPromptStore:
    """A small psycopg connection pool; every write is one transaction (partial writes roll back)."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4, timeout_s: float = 10.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._errors = (psycopg.OperationalError, PoolTimeout)
        self._url = url
        # autocommit: reads are single statements; writes open an explicit transaction.
        # check_connection on checkout: a Postgres restart costs a reconnect, not a failed request.
        self._pool = ConnectionPool(
            url, min_size=min_size, max_size=max_size, timeout=timeout_s, open=False,
            kwargs={"autocommit": True}, check=ConnectionPool.check_connection, name="keel-prompts",
        )
        self._closed = threading.Event()
        # The schema on a connection of its own first: a wrong URL, password or host fails here at once
        # with libpq's reason, where the pool would retry quietly until its timeout.
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=max(2, int(timeout_s))) as conn, \
                    conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _SCHEMA:
                    conn.execute(statement)
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        self._pool.open()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._pool.close()

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        return postgres_unavailable("the prompt registry's", self._url, "prompts.url", e)

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except self._errors as e:
            raise self._unavailable(e) from None

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except self._errors as e:
            raise self._unavailable(e) from None

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """A write transaction holding the global write lock (see the module docstring)."""
        with self._tx() as cur:
            cur.execute("UPDATE prompt_meta SET value = value + 1 WHERE key = 'revision'")
            yield cur

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    # --- writes -------------------------------------------------------------------------------
    def save(
        self, name: str, content: TemplateContent, *, author: str, message: str, base_version: int | None
    ) -> TemplateVersion:
        validate_name(name)
        now = utc_now()
        with self._write() as cur:
            row = cur.execute("SELECT latest_version FROM prompt_templates WHERE name = %s", (name,)).fetchone()
            latest = row[0] if row else None
            if base_version != latest:
                raise _stale(name, base_version, latest)
            version = TemplateVersion(
                name=name, version=(latest or 0) + 1, content=content, hash=content.content_hash(),
                parent=latest, author=author, message=message, created_at=now,
            )
            self._insert_version(cur, version)
            self._audit(cur, actor=author, action="version.create", name=name, from_version=latest,
                        to_version=version.version, reason=message, details={"hash": version.hash})
        return version

    def import_version(self, version: TemplateVersion, *, actor: str) -> bool:
        validate_name(version.name)
        with self._write() as cur:
            existing = cur.execute(
                "SELECT hash FROM prompt_versions WHERE name = %s AND version = %s", (version.name, version.version)
            ).fetchone()
            if existing:
                if existing[0] != version.hash:
                    raise ImportConflict(
                        f"{version.ref} already exists with hash {existing[0]}, but the import has "
                        f"{version.hash}: history differs; export the registry and reconcile before importing",
                        param=version.ref,
                    )
                return False
            row = cur.execute(
                "SELECT latest_version FROM prompt_templates WHERE name = %s", (version.name,)
            ).fetchone()
            latest = row[0] if row else 0
            if version.version != latest + 1:
                raise ImportConflict(
                    f"cannot import {version.ref}: the registry's latest version of {version.name!r} is "
                    f"{latest}, so the next must be {latest + 1}",
                    param=version.ref,
                )
            self._insert_version(cur, version)
            self._audit(cur, actor=actor, action="version.import", name=version.name,
                        from_version=latest or None, to_version=version.version,
                        reason=version.message, details={"hash": version.hash, "author": version.author})
        return True

    def _insert_version(self, cur: Any, v: TemplateVersion) -> None:
        if v.version == 1:
            cur.execute(
                "INSERT INTO prompt_templates VALUES (%s, 1, %s, %s, %s)",
                (v.name, v.content.description, v.created_at, v.created_at),
            )
        else:
            cur.execute(
                "UPDATE prompt_templates SET latest_version = %s, description = %s, updated_at = %s WHERE name = %s",
                (v.version, v.content.description, v.created_at, v.name),
            )
        cur.execute(
            "INSERT INTO prompt_versions VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (v.name, v.version, v.content.canonical_json(), v.hash, v.parent, v.author, v.message, v.created_at),
        )

    def set_label(
        self, name: str, label: str, version: int | None, *, actor: str, reason: str = "",
        action: str = "label.move", details: dict[str, Any] | None = None,
    ) -> int | None:
        now = utc_now()
        with self._write() as cur:
            if not cur.execute("SELECT 1 FROM prompt_templates WHERE name = %s", (name,)).fetchone():
                raise NotFound(f"no prompt template named {name!r}", param="name")
            if version is not None and not cur.execute(
                "SELECT 1 FROM prompt_versions WHERE name = %s AND version = %s", (name, version)
            ).fetchone():
                raise NotFound(f"{name!r} has no version {version}", param="version")
            row = cur.execute(
                "SELECT version FROM prompt_labels WHERE name = %s AND label = %s", (name, label)
            ).fetchone()
            previous = row[0] if row else None
            if version is None:
                if previous is None:
                    raise NotFound(f"{name!r} has no label {label!r}", param="label")
                cur.execute("DELETE FROM prompt_labels WHERE name = %s AND label = %s", (name, label))
            else:
                cur.execute(
                    "INSERT INTO prompt_labels VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name, label) "
                    "DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at, "
                    "updated_by = excluded.updated_by",
                    (name, label, version, now, actor),
                )
            self._audit(cur, actor=actor, action=action, name=name, label=label, from_version=previous,
                        to_version=version, reason=reason, details=details or {})
        return previous

    def _audit(
        self, cur: Any, *, actor: str, action: str, name: str, label: str | None = None,
        from_version: int | None = None, to_version: int | None = None, reason: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        cur.execute(
            "INSERT INTO prompt_audit (at, actor, action, name, label, from_version, to_version, reason, "
            "details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
            (utc_now(), actor, action, name, label, from_version, to_version, reason,
             json.dumps(details or {}, sort_keys=True, default=str)),
        )

    # --- reads --------------------------------------------------------------------------------
    def get_version(self, name: str, version: int) -> TemplateVersion:
        rows = self._read(
            "SELECT name, version, content, hash, parent, author, message, created_at FROM prompt_versions "
            "WHERE name = %s AND version = %s", (name, version),
        )
        if not rows:
            latest = self.latest_version(name)
            if latest is None:
                raise NotFound(f"no prompt template named {name!r}", param="name")
            raise NotFound(f"{name!r} has no version {version} (latest is {latest})", param="version")
        return _row_to_version(rows[0])

    def latest_version(self, name: str) -> int | None:
        rows = self._read("SELECT latest_version FROM prompt_templates WHERE name = %s", (name,))
        return rows[0][0] if rows else None

    def list_versions(self, name: str) -> list[TemplateVersion]:
        rows = self._read(
            "SELECT name, version, content, hash, parent, author, message, created_at FROM prompt_versions "
            "WHERE name = %s ORDER BY version", (name,),
        )
        if not rows:
            raise NotFound(f"no prompt template named {name!r}", param="name")
        return [_row_to_version(r) for r in rows]

    def list_templates(self, query: str | None = None) -> list[TemplateSummary]:
        # COLLATE "C": byte order, as SQLite sorts, whatever locale the database was created with.
        sql = "SELECT name, description, latest_version, created_at, updated_at FROM prompt_templates"
        args: tuple[Any, ...] = ()
        if query:
            like = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += " WHERE lower(name) LIKE %s ESCAPE '\\' OR lower(description) LIKE %s ESCAPE '\\'"
            args = (like, like)
        rows = self._read(sql + ' ORDER BY name COLLATE "C"', args)
        labels: dict[str, dict[str, int]] = {}
        for name, label, version in self._read(
            'SELECT name, label, version FROM prompt_labels ORDER BY label COLLATE "C"'
        ):
            labels.setdefault(name, {})[label] = version
        return [
            TemplateSummary(name=r[0], description=r[1], latest_version=r[2], labels=labels.get(r[0], {}),
                            created_at=r[3], updated_at=r[4])
            for r in rows
        ]

    def get_labels(self, name: str) -> dict[str, int]:
        rows = self._read(
            'SELECT label, version FROM prompt_labels WHERE name = %s ORDER BY label COLLATE "C"', (name,)
        )
        if not rows and self.latest_version(name) is None:
            raise NotFound(f"no prompt template named {name!r}", param="name")
        return dict(rows)

    def audit_log(
        self, *, name: str | None = None, label: str | None = None, limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        where, args = [], []
        if name is not None:
            where.append("name = %s")
            args.append(name)
        if label is not None:
            where.append("label = %s")
            args.append(label)
        if before_id is not None:
            where.append("id < %s")
            args.append(before_id)
        sql = "SELECT id, at, actor, action, name, label, from_version, to_version, reason, details " \
              "FROM prompt_audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._read(sql + " ORDER BY id DESC LIMIT %s", (*args, max(1, min(limit, 1000))))
        return [
            AuditEntry(id=r[0], at=r[1], actor=r[2], action=r[3], name=r[4], label=r[5], from_version=r[6],
                       to_version=r[7], reason=r[8], details=r[9])
            for r in rows
        ]

    def revision(self) -> int:
        return self._read("SELECT value FROM prompt_meta WHERE key = 'revision'")[0][0]
