"""The Postgres a benchmark measures: the URL given, else a throwaway local server from the ``pgserver`` package
(the tests' own, over a Unix socket: a networked server adds its round trips)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def postgres(url: str | None, folder: Path) -> Iterator[str]:
    if url is not None:
        yield url
        return
    import pgserver  # the dev extras' (tests/postgres.py uses it too)

    server = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
