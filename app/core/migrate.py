"""Schema migrations for Keel's databases, run through Alembic when a store opens.

Every store keeps an Alembic script folder next to its module (``<package>/migrations/``, with an
``env.py`` that calls :func:`run_env` and revisions in ``versions/``) and its own version table
(``alembic_version_<store>``), so stores that share one database file never see each other's
revisions. The store keeps its own driver (sqlite3, psycopg) for its queries; only the schema comes
from here:

* :func:`upgrade_sqlite` migrates on the store's own ``sqlite3`` connection (which also makes it work
  for ``:memory:``), inside one ``BEGIN IMMEDIATE`` transaction: SQLite's write lock serialises the
  processes that open the same file at once (the second waits its busy timeout, then finds the schema
  at head), and a failed upgrade rolls back whole (SQLite's DDL is transactional).
* :func:`upgrade_postgres` migrates in one transaction that first takes the store's advisory lock
  (``pg_advisory_xact_lock``): the same key the store used before Alembic, so a process of the previous
  release starting at the same time waits too.

Opening a store whose database is already at head costs one read of its version table, without
importing Alembic or SQLAlchemy (a few hundred milliseconds, paid only when there is work to do). That
needs the head revision without Alembic, so revisions follow one convention, which :func:`upgrade_sqlite`
and :func:`upgrade_postgres` check after every upgrade: linear history, each file named
``NNNN_<slug>.py`` with ``revision = "NNNN"`` (the next free number, ``down_revision`` the previous one).

Writing a revision: copy the previous one, bump the number, and write the DDL by hand (``op.execute`` or
``op.add_column``; there are no models to autogenerate from); where one folder serves SQLite and Postgres
(agents, prompts), branch on ``op.get_bind().dialect.name``. Revisions must not import Keel code: they
describe the schema as it was when written, whatever the code becomes. The baseline revision of each
store (``0001``) is the schema of the release before Alembic, written with ``IF NOT EXISTS`` and adding
columns that the old hand-kept ``ALTER TABLE`` lists added when they are missing, so a database created
by that release upgrades in place with no manual ``alembic stamp``.

This module is the kernel's: it imports only the standard library, SQLAlchemy and Alembic (and psycopg
for Postgres, lazily), never a Keel feature.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

_REVISION_FILE = re.compile(r"(\d{4})_\w+\.py$")
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*$")
# Alembic keeps the running migration context in module globals (``alembic.context``, ``alembic.op``): two
# threads of one process migrating two stores at once must take turns. Always taken after the database's
# own lock and held only while Alembic runs, which waits on nothing else: no deadlock.
_ALEMBIC = threading.Lock()


@dataclass(frozen=True)
class Migrations:
    """One store's migrations: its script folder, its version table and (Postgres) its advisory lock."""

    location: Path
    version_table: str
    pg_lock_key: int | None = None

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(self.version_table):
            raise ValueError(f"version table {self.version_table!r} must be a plain lower-case SQL identifier")

    @cached_property
    def head(self) -> str:
        """The newest revision, from the file names (see the module docstring): no Alembic import needed."""
        numbers = sorted(m.group(1) for name in os.listdir(self.location / "versions")
                         if (m := _REVISION_FILE.match(name)))
        if not numbers:
            raise RuntimeError(f"no revisions in {self.location / 'versions'}")
        return numbers[-1]


def upgrade_sqlite(conn: sqlite3.Connection, migrations: Migrations) -> bool:
    """Bring the database behind ``conn`` (file or ``:memory:``) to head; True if anything had to run.

    ``conn`` must not be inside a transaction; its busy timeout bounds the wait for another process that
    is migrating the same file. Errors are the driver's own (``sqlite3.Error``)."""
    if _sqlite_revision(conn, migrations.version_table) == migrations.head:
        return False
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    # SQLAlchemy drives the store's own connection (no second connection: works for :memory: too, and the
    # store's pragmas apply); _Borrowed keeps SQLAlchemy from ever closing it.
    engine = create_engine("sqlite://", creator=lambda: _Borrowed(conn), poolclass=StaticPool)
    row_factory, conn.row_factory = conn.row_factory, None  # SQLAlchemy wants plain tuples
    try:
        with _driver_errors(), engine.connect() as bind:
            # SQLAlchemy's transaction is a no-op at the driver level for sqlite3: this BEGIN is the real one,
            # and its write lock is the migration lock. Alembic sees a transaction in progress and leaves it
            # to us.
            bind.exec_driver_sql("BEGIN IMMEDIATE")
            _upgrade(bind, migrations)
            bind.commit()
    finally:
        conn.row_factory = row_factory
    return True


def upgrade_postgres(url: str, migrations: Migrations, *, connect_timeout_s: float = 10.0) -> bool:
    """Bring the Postgres database at ``url`` to head; True if anything had to run.

    A URL that cannot be reached raises ``psycopg.OperationalError`` (the store's callers turn it into a
    503), as the stores' own connections do."""
    import psycopg

    if migrations.pg_lock_key is None:
        raise ValueError(f"{migrations.location}: Postgres migrations need an advisory lock key")
    timeout = max(2, int(connect_timeout_s))
    with psycopg.connect(url, autocommit=True, connect_timeout=timeout) as conn:
        current = _postgres_revision(conn, migrations.version_table)
    if current == migrations.head:
        return False
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine("postgresql+psycopg://", poolclass=NullPool,
                           creator=lambda: psycopg.connect(url, connect_timeout=timeout))
    try:
        with _driver_errors(), engine.connect() as bind:
            # Held until the commit: a second process waits here, then sees the first one's revision.
            bind.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(migrations.pg_lock_key)})")
            _upgrade(bind, migrations)
            bind.commit()
    finally:
        engine.dispose()
    return True


def alembic_config(bind: Any, migrations: Migrations) -> Any:
    """An Alembic ``Config`` (no alembic.ini) whose ``env.py`` (:func:`run_env`) migrates on ``bind``,
    a SQLAlchemy connection, with the store's version table. For tools and tests (``alembic.command``)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations.location))
    cfg.attributes["connection"] = bind
    cfg.attributes["version_table"] = migrations.version_table
    return cfg


def run_env() -> None:
    """The body of every migrations folder's ``env.py``: run the migrations on the connection that
    :func:`alembic_config` put in the config, in the transaction its caller holds."""
    from alembic import context

    bind = context.config.attributes.get("connection")
    if bind is None or context.is_offline_mode():
        raise RuntimeError("Keel's migrations run when a store opens (app.core.migrate), on a live connection; "
                           "there is no alembic.ini to run them from the alembic command line")
    # transactional_ddl: the caller's transaction holds the whole upgrade, SQLite's too (its DDL is
    # transactional; Alembic assumes otherwise only because of the old pysqlite driver's implicit commits).
    context.configure(connection=bind, version_table=context.config.attributes["version_table"],
                      transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def _upgrade(bind: Any, migrations: Migrations) -> None:
    from alembic import command

    with _ALEMBIC:
        command.upgrade(alembic_config(bind, migrations), "head")
    got = [r[0] for r in bind.exec_driver_sql(f"SELECT version_num FROM {migrations.version_table}")]
    if got != [migrations.head]:  # rolls the upgrade back: a revision broke the naming convention
        raise RuntimeError(f"{migrations.location}: the upgrade reached {got}, but the newest revision file is "
                           f"{migrations.head}_*.py; name revision files NNNN_<slug>.py with revision = 'NNNN'")


def _sqlite_revision(conn: sqlite3.Connection, table: str) -> str | None:
    try:
        rows = conn.execute(f"SELECT version_num FROM {table}").fetchall()
    except sqlite3.OperationalError:  # no such table (yet): the upgrade, under the lock, will tell
        return None
    return rows[0][0] if len(rows) == 1 else None


def _postgres_revision(conn: Any, table: str) -> str | None:
    if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
        return None
    rows = conn.execute(f"SELECT version_num FROM {table}").fetchall()
    return rows[0][0] if len(rows) == 1 else None


@contextmanager
def _driver_errors() -> Iterator[None]:
    """Raise the driver's exception, not SQLAlchemy's wrapper: the stores' callers catch the driver's."""
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except DBAPIError as e:
        if isinstance(e.orig, Exception):
            raise e.orig from e
        raise


class _Borrowed:
    """A sqlite3 connection lent to SQLAlchemy: everything passes through but ``close``, which the owner does."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        object.__setattr__(self, "_conn", conn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._conn, name, value)

    def close(self) -> None:
        pass
