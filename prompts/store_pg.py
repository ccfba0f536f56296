"""``PostgresPromptStore``: the prompt registry in Postgres, for several API instances sharing one registry.

The registry's logic is ``SqlPromptStore``'s, shared with ``SqlitePromptStore`` (the contract suite in
``tests/unit/test_prompts_store.py`` runs on both); this module holds the connection handling and the
dialect (the schema is Alembic's, in ``prompts/migrations``, shared with SQLite). Differences that matter:

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

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.core import audit
from app.core.audit import AuditRetention, Pruner
from app.core.db import RECONNECT_TIMEOUT_S, postgres_unavailable
from app.core.errors import StoreUnavailable
from app.core.migrate import upgrade_postgres
from prompts.store import MIGRATIONS, TRAIL, SqlPromptStore

log = logging.getLogger("keel.prompts")

PromptStoreUnavailable = StoreUnavailable  # the name callers and tests know


class PostgresPromptStore(SqlPromptStore):
    """A small psycopg connection pool; every write is one transaction (partial writes roll back)."""

    _placeholder = "%s"
    _collate = ' COLLATE "C"'  # byte order, as SQLite sorts, whatever locale the database was created with

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4, timeout_s: float = 10.0,
                 audit_retention: AuditRetention | None = None) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._errors = (psycopg.OperationalError, PoolTimeout)
        self._url = url
        # autocommit: reads are single statements; writes open an explicit transaction.
        # check_connection on checkout: a Postgres restart costs a reconnect, not a failed request.
        self._pool = ConnectionPool(
            url, min_size=min_size, max_size=max_size, timeout=timeout_s, open=False,
            kwargs={"autocommit": True}, check=ConnectionPool.check_connection, name="keel-prompts",
            reconnect_timeout=RECONNECT_TIMEOUT_S,
        )
        self._closed = threading.Event()
        # The schema (Alembic, prompts/migrations) on a connection of its own first: a wrong URL, password or
        # host fails here at once with libpq's reason, where the pool would retry quietly until its timeout.
        # Two workers starting at once take turns on an advisory lock (see app.core.migrate).
        # The kernel's audit table first: revision 0002 of the registry moves prompt_audit into it.
        try:
            audit.ensure_schema_postgres(url, connect_timeout_s=timeout_s)
            upgrade_postgres(url, MIGRATIONS, connect_timeout_s=timeout_s)
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        self._pool.open()
        self._pruner = Pruner(TRAIL, audit_retention)
        self._after_write()  # the retention, on open

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
        self._after_write()

    def _prune_audit(self) -> None:
        try:
            with self._pool.connection() as conn:  # autocommit: each batch is its own short transaction
                self._pruner.run(conn)
        except self._errors as e:  # the retention never fails a write; it runs again at its next check
            log.warning("audit retention skipped: %s", self._unavailable(e))

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
