"""Real Postgres for the tests: one server for the whole session, a fresh database for each test.

The server is a Postgres 16 started from the ``pgserver`` PyPI package (no system install, no
network), or the external server named by ``KEEL_TEST_POSTGRES_URL`` (a URL whose user may
``CREATE DATABASE``; CI can point it at a service container). When neither works, the tests that
asked for Postgres fail instead of skipping: a CI run must not silently lose them.

Tests ask for ``postgres_url`` (a database of their own, dropped afterwards) and never see each
other's data. The server starts on first use, so test runs that need no Postgres pay nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

T = TypeVar("T")
EXTERNAL_URL_ENV = "KEEL_TEST_POSTGRES_URL"
# Read at import: tests/conftest.py removes every KEEL_* variable right after importing this module,
# so that settings never pick up a developer's environment.
_EXTERNAL_URL = os.environ.get(EXTERNAL_URL_ENV) or None


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database (keeps host, credentials and query, e.g. the socket)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """An admin URL of a running Postgres server, for the whole session."""
    if _EXTERNAL_URL:
        yield _EXTERNAL_URL
        return
    # Not under pytest's basetemp: a concurrent pytest session of the same user prunes old numbered
    # base directories, which would delete the data directory under the running server.
    home = Path(tempfile.mkdtemp(prefix="keel-pg-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR in CI containers
            import pgserver

            server = pgserver.get_server(home / "data", cleanup_mode="delete")
        url = server.get_uri()
    except Exception as e:  # any failure to start must fail the Postgres tests, with the reason
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(f"could not start a Postgres server with pgserver ({type(e).__name__}: {e}); install the dev "
                    f"extras, or set {EXTERNAL_URL_ENV} to an external server's URL", pytrace=False)
    try:
        yield url
    finally:
        server.cleanup()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server; dropped (connections and all) after the test."""
    import psycopg
    from psycopg import sql

    name = f"keel_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server, autocommit=True, connect_timeout=10) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(postgres_server, name)
    finally:
        with psycopg.connect(postgres_server, autocommit=True, connect_timeout=10) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def store_handles(request: pytest.FixtureRequest, sqlite: Callable[[], T], postgres: Callable[[str], T]
                  ) -> Iterator[Callable[[], T]]:
    """For a fixture parametrized ``["sqlite", "postgres"]``: a function that opens another handle on one store
    (like another API process), the SQLite file's or a fresh Postgres database's; every handle closed after."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    opened: list[T] = []

    def make() -> T:
        store = postgres(url) if url else sqlite()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()  # type: ignore[attr-defined]


class StoppableServer:
    """A Postgres of a test's own (pgserver, in a temporary folder) that the test stops and starts again, on the same
    socket; its databases' URLs carry a password (trust auth ignores it) so that "never the password" can fail."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="keel-pg-stoppable-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            self.server = pgserver.get_server(self.home / "data", cleanup_mode="delete")

    def database(self) -> str:
        import psycopg

        name = f"keel_stoppable_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.server.get_uri(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return with_database(self.server.get_uri().replace("postgres:@", "postgres:s3cr3t-pw@"), name)

    def stop(self) -> None:
        from pgserver.postgres_server import pg_ctl

        with self.server._lock:  # pgserver's own lock around its server's state (another process may start one)
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        with self.server._lock:
            self.server.ensure_postgres_running()

    def close(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.home, ignore_errors=True)
