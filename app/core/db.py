"""The plumbing Keel's stores share: a SQLite file (the embedded default) or a Postgres database (several
processes), driven the same way, so a store writes its SQL once (SQLite's ``?`` marks) and runs on either."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.core import audit
from app.core.audit import AuditEvent
from app.core.errors import StoreUnavailable
from app.core.migrate import Migrations, upgrade_postgres, upgrade_sqlite


@contextmanager
def write_transaction(db: sqlite3.Connection, lock: threading.Lock) -> Iterator[sqlite3.Connection]:
    """One write transaction that takes SQLite's write lock up front (BEGIN IMMEDIATE), so racing writers
    queue up instead of both reading the same stale state; any error rolls the whole write back.
    ``db`` must be in autocommit mode (``isolation_level=None``)."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class SqliteFile:
    """The plumbing a SQLite-backed Keel store shares: one file in WAL mode (or ``:memory:``), its schema brought
    to head by its Alembic ``migrations`` on open (after ``before``, e.g. the audit table), writes in
    :func:`write_transaction` (the write lock taken up front), reads on a connection of their own (WAL readers
    never wait for a writer), and every driver error as the store's 503 ``store_unavailable`` naming ``what``."""

    postgres = False
    integrity_error: type[Exception] = sqlite3.IntegrityError

    def __init__(self, path: Any, migrations: Migrations | None, *, what: str, timeout_s: float = 30.0,
                 before: Callable[[sqlite3.Connection], object] | None = None) -> None:
        self.path = str(path)
        self.what = what
        memory = self.path == ":memory:"
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=timeout_s)
        self.lock = threading.Lock()
        with self.errors():
            if not memory:
                enable_wal(self.db)
            if before is not None:
                before(self.db)
            if migrations is not None:
                upgrade_sqlite(self.db, migrations)
            # ``:memory:`` is one database per connection: there, reads share the writer's connection.
            self._reader = self.db if memory else sqlite3.connect(self.path, check_same_thread=False,
                                                                  isolation_level=None, timeout=5)
        self._rlock = self.lock if memory else threading.Lock()

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:  # locked past the busy timeout, unreadable file, full disk
            raise StoreUnavailable(f"{self.what} at {self.path} is unavailable ({e})") from None

    @contextmanager
    def tx(self, *, serialize: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction (SQLite has one writer at a time: ``serialize`` is :class:`PostgresFile`'s)."""
        with self.errors(), write_transaction(self.db, self.lock) as db:
            yield db

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.errors(), self._rlock:
            return self._reader.execute(sql, tuple(args)).fetchall()

    def read_all(self, *queries: tuple[str, Sequence[Any]]) -> list[list[tuple[Any, ...]]]:
        """Several reads from one snapshot."""
        with self.errors(), self._rlock:
            self._reader.execute("BEGIN")
            try:
                return [self._reader.execute(sql, tuple(args)).fetchall() for sql, args in queries]
            finally:
                self._reader.execute("COMMIT")

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        """The kernel audit table's events in this database (:func:`app.core.audit.select`'s filters)."""
        sql, args = audit.select(**filters)
        return [audit.decode(r) for r in self.read(sql, args)]

    def close(self) -> None:
        with self.lock:
            if self._reader is not self.db:
                self._reader.close()
            self.db.close()


def enable_wal(conn: sqlite3.Connection, *, timeout_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried while the file is locked: switching a new file to WAL needs an
    exclusive lock that SQLite does not always wait for with the busy handler, so processes (or threads)
    opening the same new store at once saw "database is locked" (measured: 2 of ~800 unit tests, now and then)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def warn_if_left_behind(path: Path, what: str, setting: str) -> None:
    """A store now in Postgres whose SQLite file from before is still under the home: its rows are not read
    (gates, lineage, audit look empty there). Said once at start, loudly, so it is not found out later."""
    if path.is_file() and path.stat().st_size > 0:
        logging.getLogger("keel.db").warning(
            "%s now lives in Postgres (%s) but %s from before is still here: its rows are not read or moved; "
            "unset %s to keep using the file", what, setting, path, setting)


def redact_url(url: str) -> str:
    """host:port/db of a postgresql:// URL, without user or password, for messages and logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or '/'}"


def postgres_unavailable(whose: str, url: str, setting: str, exc: Exception):
    """The one 503 for a Postgres that Keel keeps state in and cannot reach (password never shown)."""
    return StoreUnavailable(f"{whose} Postgres at {redact_url(url)} is unavailable ({type(exc).__name__}: {exc}); "
                            f"check {setting} and that the server is up")


def postgres_url(value, *, setting: str, otherwise: str):
    """Validate an optional Postgres URL setting, kept as a ``SecretStr`` (it usually carries a password, so
    ``keel config`` and logs show it masked); empty means "not configured"."""
    from pydantic import SecretStr

    url = (value.get_secret_value() if isinstance(value, SecretStr) else str(value or "")).strip()
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"{setting} must be a postgresql:// URL (leave it unset for {otherwise})")
    return SecretStr(url)


@asynccontextmanager
async def advisory_lock(url: str, key: int, *, what: str, poll_s: float = 0.05,
                        connect_timeout_s: float = 10.0) -> AsyncIterator[None]:
    """Hold the Postgres session advisory lock ``key`` (on a connection of its own) for the block.

    It waits by polling ``pg_try_advisory_lock``, never in ``pg_advisory_lock``: a statement blocked on a lock
    keeps its snapshot for the whole wait, and a schema set-up under the lock that runs ``CREATE INDEX
    CONCURRENTLY`` (LangGraph's checkpointer does) waits for every older snapshot in the database. The holder then
    waits for the waiter and the waiter for the holder through two connections, a cycle Postgres's deadlock
    detector cannot see: two API processes first starting on an empty database hung for minutes that way."""
    import psycopg

    log = logging.getLogger("keel.db")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True,
                                                     connect_timeout=max(2, int(connect_timeout_s))) as conn:
        started = time.monotonic()
        told = False
        while not (await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))).fetchone())[0]:
            if not told and time.monotonic() - started > 5.0:
                told = True
                log.info("waiting for another process to finish %s on %s", what, redact_url(url))
            await asyncio.sleep(poll_s)
        try:
            yield
        finally:
            # Closing the connection would release it too; unlocking first keeps a pooled proxy honest.
            await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


#: How long a pool keeps retrying one new connection before it gives up and the next request starts afresh.
#: psycopg_pool's retries back off exponentially (1, 2, 4 ... s) until this: at its default (300 s), a Postgres
#: down for a minute was answered again only 30-60 s after it came back (seen in
#: tests/integration/test_postgres_down.py); capped here, a request finds a connection within seconds.
RECONNECT_TIMEOUT_S = 10.0
#: How long a request waits for a pooled connection before it asks whether the pool has any connection at all.
#: psycopg_pool hides a refused connect behind its background reconnect, so a request to a stopped Postgres
#: waited out the whole pool timeout (10 s per store: a 503 after ~21 s in test_postgres_down.py); after this
#: wait a direct connect asks the server (``PostgresPool._checkout``), and a refused one is a 503 at once.
FIRST_WAIT_S = 0.5


class PostgresPool:
    """The plumbing a Postgres-backed Keel store shares: its schema migrated on a connection of its own first (a
    wrong URL, password or host fails at once with libpq's reason instead of a pool retrying quietly), then a
    small autocommit pool whose connections are checked on checkout (a server restart costs a reconnect, not a
    failed request); every driver or pool error becomes the store's 503 ``store_unavailable``."""

    def __init__(self, url: str, *, whose: str, setting: str, name: str, migrate: Callable[[float], object],
                 max_size: int = 4, timeout_s: float = 10.0) -> None:
        import psycopg  # lazy: the driver only when Postgres is configured
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.url, self._whose, self._setting = url, whose, setting
        self._connect, self._timeout_s, self._pool_timeout = psycopg.connect, timeout_s, PoolTimeout
        self._max_size, self._out, self._lock = max_size, 0, threading.Lock()
        self._errors = (psycopg.OperationalError, PoolTimeout)
        try:
            migrate(timeout_s)
        except psycopg.OperationalError as e:
            raise self.unavailable(e) from None
        self._pool = ConnectionPool(url, min_size=1, max_size=max_size, timeout=timeout_s, open=True,
                                    kwargs={"autocommit": True}, check=ConnectionPool.check_connection, name=name,
                                    reconnect_timeout=RECONNECT_TIMEOUT_S)

    def unavailable(self, e: Exception) -> StoreUnavailable:
        return postgres_unavailable(self._whose, self.url, self._setting, e)

    @contextmanager
    def _checkout(self) -> Iterator[Any]:
        """``ConnectionPool.connection()``, failing fast when the server is gone: a request that waited a moment
        while fewer than all of the pool's connections are out was not kept waiting by other requests but by a
        connect that does not come (the pool retries quietly in the background), so one direct connect decides:
        refused or unreachable is the 503 at once instead of after the pool timeout. With every connection out,
        the pool is just busy: the request waits its turn, and no probe adds connections to a loaded server."""
        try:
            conn = self._pool.getconn(timeout=min(FIRST_WAIT_S, self._timeout_s))
        except self._pool_timeout:
            with self._lock:
                saturated = self._out >= self._max_size
            if not saturated:
                self._connect(self.url, connect_timeout=2).close()  # raises OperationalError while it is down
            conn = self._pool.getconn(timeout=self._timeout_s)
        with self._lock:
            self._out += 1
        try:
            with conn:  # commit or roll back as the pool's own connection() does; a pooled one is not closed
                yield conn
        finally:
            with self._lock:
                self._out -= 1
            self._pool.putconn(conn)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        try:
            with self._checkout() as conn, conn.transaction():
                yield conn
        except self._errors as e:
            raise self.unavailable(e) from None

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A pooled connection in autocommit, for callers that run several statements of their own."""
        try:
            with self._checkout() as conn:
                yield conn
        except self._errors as e:
            raise self.unavailable(e) from None

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.statement(sql, tuple(args))

    def statement(self, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple[Any, ...]]:
        """One statement in autocommit (atomic on its own: one round trip, no BEGIN/COMMIT); its rows."""
        try:
            with self._checkout() as conn:
                cur = conn.execute(sql, args)
                return [tuple(r) for r in cur.fetchall()] if cur.description else []
        except self._errors as e:
            raise self.unavailable(e) from None

    def read_all(self, *queries: tuple[str, Sequence[Any]]) -> list[list[tuple[Any, ...]]]:
        """Several reads from one snapshot (REPEATABLE READ)."""
        try:
            with self._checkout() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                return [[tuple(r) for r in conn.execute(sql, tuple(args)).fetchall()] for sql, args in queries]
        except self._errors as e:
            raise self.unavailable(e) from None

    def close(self) -> None:
        self._pool.close()


@lru_cache(maxsize=1024)
def postgres_sql(sql: str) -> str:
    """SQL written for SQLite (``?`` marks) as psycopg takes it: ``%s`` marks, a literal ``%`` doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


#: How long a write waits for the store's other writers (SQLite's busy timeout, 30 s, plays this part there).
LOCK_TIMEOUT_S = 30.0


def _text_safe(args: Sequence[Any]) -> tuple[Any, ...]:
    """Postgres text cannot hold NUL (SQLite's can): a NUL in a value becomes U+FFFD instead of failing the write
    (a tool's output or a batch line's ``custom_id`` may carry one)."""
    return tuple(a.replace("\x00", "\ufffd") if isinstance(a, str) and "\x00" in a else a for a in args)


class PostgresTx:
    """A psycopg connection inside a transaction, driven like a sqlite3 connection: ``?`` marks, ``execute``
    returns the cursor (``fetchone``, ``fetchall``, ``rowcount``), ``executemany``. ``raw`` is the connection itself,
    for SQL written for Postgres (:func:`app.core.audit.append` takes either)."""

    postgres = True

    def __init__(self, conn: Any) -> None:
        self.raw = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.raw.execute(postgres_sql(sql), _text_safe(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cur = self.raw.cursor()
        if rows:
            cur.executemany(postgres_sql(sql), [_text_safe(r) for r in rows])
        return cur


class PostgresFile:
    """:class:`SqliteFile`'s twin on Postgres, for a store that several processes (or machines) share: the same
    ``tx``/``read``/``read_all``/``audit_events``/``close`` over the same SQL, on a :class:`PostgresPool` (schema
    by the store's Alembic ``migrations`` under its advisory lock, after the kernel audit table when ``with_audit``;
    every driver error the store's 503 naming ``setting``, never the password).

    Each write transaction first takes the store's advisory transaction lock, so writers take turns as they do on
    SQLite (BEGIN IMMEDIATE): a store's "read the state, check it, write" stays correct with no row locks of its
    own (at READ COMMITTED two processes would otherwise both pass the check). Reads never wait."""

    postgres = True
    path = None

    def __init__(self, url: str, migrations: Migrations, *, what: str, setting: str, name: str,
                 with_audit: bool = False, timeout_s: float = 10.0) -> None:
        import psycopg  # lazy: the driver only when Postgres is configured

        def migrate(t: float) -> None:
            if with_audit:
                audit.ensure_schema_postgres(url, connect_timeout_s=t)
            upgrade_postgres(url, migrations, connect_timeout_s=t)

        self.what = what
        self.integrity_error = psycopg.IntegrityError
        self._lock_key = int(migrations.pg_lock_key or 0)
        self._pg = PostgresPool(url, whose=f"{what}'s", setting=setting, name=name, migrate=migrate,
                                timeout_s=timeout_s)

    @contextmanager
    def tx(self, *, serialize: bool = True) -> Iterator[PostgresTx]:
        """A write transaction; ``serialize=False`` for blind writes (inserts of new rows, whole-row upserts) that
        need not wait for the store's other writers (a 100 MiB upload would hold them all)."""
        with self._pg.transaction() as conn:
            if serialize:
                # bounded like SQLite's busy timeout: a stuck writer elsewhere is a 503 here, not a hang
                conn.execute(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            yield PostgresTx(conn)

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._pg.statement(postgres_sql(sql), tuple(args))

    def read_all(self, *queries: tuple[str, Sequence[Any]]) -> list[list[tuple[Any, ...]]]:
        return self._pg.read_all(*((postgres_sql(sql), args) for sql, args in queries))

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        sql, args = audit.select(postgres=True, **filters)
        return [audit.decode(r) for r in self._pg.statement(sql, args)]

    def close(self) -> None:
        self._pg.close()


StoreFile = SqliteFile | PostgresFile


def store_file(where: Path | str | StoreFile, migrations: Migrations, *, what: str,
               with_audit: bool = False) -> StoreFile:
    """``where`` if it is an opened store file (SQLite or Postgres), else the SQLite file at that path (with the
    kernel's audit table first when ``with_audit``): what a store's constructor takes."""
    if isinstance(where, StoreFile):
        return where
    return SqliteFile(where, migrations, what=what, before=audit.ensure_schema_sqlite if with_audit else None)


def open_store_file(url: Any, path: Path | str, migrations: Migrations, *, what: str, setting: str, name: str,
                    with_audit: bool = False, filled_by: str | None = "database_url") -> StoreFile:
    """A store's database as the settings name it: Postgres at ``url`` (a ``SecretStr``; its SQLite file from
    before, if any, is warned about, naming ``setting`` and the setting that fills it, ``filled_by``) or the SQLite
    file at ``path``."""
    if url is None:
        return store_file(path, migrations, what=what, with_audit=with_audit)
    warn_if_left_behind(Path(path), what, f"{setting} (or {filled_by})" if filled_by else setting)
    return PostgresFile(url.get_secret_value(), migrations, what=what, setting=setting, name=name,
                        with_audit=with_audit)


class ThrottledRefresh:
    """Re-read shared state at most every ``interval_s``, never making the request path wait for the store.

    ``refresh()`` is called on every read: with a positive interval the ``check`` runs on a background thread and
    the copy in memory answers meanwhile (one check at a time; a check in flight answers for the reads that come
    during it); ``force`` (writes, start-up) and an interval of 0 (tests) check now, on the caller's thread.
    ``check(force)`` is the owner's: it re-reads when the store's revision moved."""

    def __init__(self, interval_s: float, check: Callable[[bool], None], *, name: str) -> None:
        self.interval_s = interval_s
        self._check = check
        self._name = name
        self._checked = 0.0
        self._lock = threading.Lock()

    def __call__(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.interval_s:
            return
        if force or self.interval_s <= 0:
            with self._lock:
                self._checked = time.monotonic()
                self._check(force)
            return
        if self._lock.acquire(blocking=False):
            self._checked = now
            threading.Thread(target=self._in_background, name=self._name, daemon=True).start()

    def now(self) -> None:
        """Check now, on the caller's thread (re-reading only what moved), after any check in flight: one check at
        a time, so an older read never lands after a newer one."""
        with self._lock:
            self._checked = time.monotonic()
            self._check(False)

    def _in_background(self) -> None:
        try:
            self._check(False)
        finally:
            self._lock.release()
