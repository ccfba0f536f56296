"""Small SQLite helpers shared by Keel's stores."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from app.core.errors import StoreUnavailable


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
