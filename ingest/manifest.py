"""Ingest snapshots: one row per run with its manifest, in SQLite under the Keel home folder or in Postgres.

A snapshot's file list is the collection's full content after the run (not just what the
run touched), so any two snapshots of a collection can be diffed directly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.core.db import StoreFile, open_store_file
from app.core.errors import KeelError
from app.core.migrate import Migrations
from ingest.errors import SnapshotNotFound

# The tables come from these Alembic migrations (ingest/migrations), run on first use.
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_ingest",
                        pg_lock_key=0x6B65656C_696E)  # "keelin"


class FileEntry(BaseModel):
    doc_id: str
    source: str
    source_sha256: str
    version: str
    chunks: int


class Snapshot(BaseModel):
    id: str
    collection: str
    status: Literal["running", "completed", "failed"]
    started_at: str
    finished_at: str | None = None
    embedding_model: str
    sparse_encoder: str
    chunker_config: dict[str, Any]
    paths: list[str]
    prune: bool
    counts: dict[str, int | float] = Field(default_factory=dict)
    rejections: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None
    files: list[FileEntry] | None = None


class SnapshotDiff(BaseModel):
    base: str
    target: str
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: int


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_snapshot_id() -> str:
    # Sortable by time, unique across processes.
    return f"snap_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{uuid.uuid4().hex[:8]}"


_COLUMNS = ("id, collection, status, started_at, finished_at, embedding_model, sparse_encoder, chunker_config, paths, "
            "prune, counts, rejections, error")
log = logging.getLogger("keel.ingest")
#: A 'running' snapshot whose process has not made progress for this long is taken for dead, wherever it ran.
STALE_AFTER_S = 900.0
#: host:pid:token: the token tells this process from an earlier one with the same pid on the same host (a
#: restarted container is pid 1 again, with the same host name)
_RUNNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SnapshotStore:
    """Snapshots in ``<home>/rag.db`` (SQLite), or in Postgres (``url``: ``rag.snapshots_url`` or ``database_url``)
    so that every API process lists, diffs and continues the same collections' history. Opened on first use."""

    def __init__(self, path: Path, *, url: Any = None) -> None:
        self.path = Path(path)
        self._url = url
        self._file: StoreFile | None = None
        self._lock = threading.Lock()

    def _db(self) -> StoreFile:
        with self._lock:
            if self._file is None:
                self._file = open_store_file(self._url, self.path, MIGRATIONS, what="the ingest snapshot store",
                                             setting="rag.snapshots_url", name="keel-snapshots")
            return self._file

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def start(self, collection: str, *, embedding_model: str, sparse_encoder: str, chunker_config: dict[str, Any],
              paths: list[str], prune: bool) -> str:
        sid = new_snapshot_id()
        with self._db().tx() as db:
            db.execute(
                "INSERT INTO rag_snapshots (id, collection, status, started_at, embedding_model, sparse_encoder,"
                " chunker_config, paths, prune, runner, beat_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, collection, _now(), embedding_model, sparse_encoder, json.dumps(chunker_config),
                 json.dumps(paths), int(prune), _RUNNER, time.time()))
        return sid

    def beat(self, sid: str) -> None:
        """The run behind ``sid`` is making progress (it is not the leftover of a dead process). A failed beat is
        logged, never the ingest's failure: the next batch beats again."""
        try:
            with self._db().tx(serialize=False) as db:
                db.execute("UPDATE rag_snapshots SET beat_at = ? WHERE id = ? AND status = 'running'",
                           (time.time(), sid))
        except KeelError as e:
            log.warning("could not record the progress of snapshot %s: %s", sid, e)

    def finish(self, sid: str, *, files: list[FileEntry], counts: dict[str, int | float],
               rejections: list[dict[str, Any]], error: str | None = None) -> None:
        with self._db().tx() as db:
            db.execute("DELETE FROM rag_snapshot_files WHERE snapshot_id = ?", (sid,))
            db.executemany(
                "INSERT INTO rag_snapshot_files (snapshot_id, doc_id, source, source_sha256, version, chunks) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(sid, f.doc_id, f.source, f.source_sha256, f.version, f.chunks) for f in files])
            db.execute(
                "UPDATE rag_snapshots SET status = ?, finished_at = ?, counts = ?, rejections = ?, error = ? "
                "WHERE id = ?",
                ("failed" if error else "completed", _now(), json.dumps(counts), json.dumps(rejections), error,
                 sid))

    def mark_interrupted(self, collection: str) -> int:
        """Runs of ``collection`` left 'running' by a process that died become 'failed': one of this host whose
        process is gone, one of a release before runners were recorded, or one silent for ``STALE_AFTER_S``.
        A run another live process (here or on another machine) is writing is left alone."""
        with self._db().tx() as db:
            rows = db.execute("SELECT id, runner, beat_at FROM rag_snapshots WHERE collection = ? AND "
                              "status = 'running'", (collection,)).fetchall()
            dead = [sid for sid, runner, beat_at in rows if _gone(runner, beat_at)]
            for sid in dead:
                db.execute("UPDATE rag_snapshots SET status = 'failed', error = ? WHERE id = ? AND status = 'running'",
                           (f"interrupted (found by {_RUNNER})", sid))
            return len(dead)

    def list(self, collection: str | None = None, limit: int = 50) -> list[Snapshot]:
        sql = f"SELECT {_COLUMNS} FROM rag_snapshots"
        args: tuple[Any, ...] = ()
        if collection:
            sql += " WHERE collection = ?"
            args = (collection,)
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        return [self._row(r) for r in self._db().read(sql, (*args, limit))]

    def get(self, sid: str, with_files: bool = True) -> Snapshot:
        queries = [(f"SELECT {_COLUMNS} FROM rag_snapshots WHERE id = ?", (sid,))]
        if with_files:
            queries.append(("SELECT doc_id, source, source_sha256, version, chunks FROM rag_snapshot_files "
                            "WHERE snapshot_id = ?", (sid,)))
        runs, *files = self._db().read_all(*queries)
        if not runs:
            raise SnapshotNotFound(f"no snapshot {sid!r}", param="snapshot")
        snap = self._row(runs[0])
        if files:
            # sorted here, not by the database: Postgres orders text by its locale, SQLite by code point
            snap.files = [FileEntry(doc_id=d, source=src, source_sha256=sha, version=v, chunks=n)
                          for d, src, sha, v, n in sorted(files[0])]
        return snap

    def latest(self, collection: str, *, with_files: bool = True) -> Snapshot | None:
        """The newest completed snapshot: the documents as the last finished ingest left them."""
        for s in self.list(collection):
            if s.status == "completed":
                return self.get(s.id) if with_files else s
        return None

    def current(self, collection: str) -> Snapshot | None:
        """The snapshot that says what the collection's documents are now: a running ingest if any (one that
        started before the newest may still be writing), else the newest, whatever its status; runs whose process
        died are failed first, so a crashed ingest never reads as running. None: never ingested."""
        self.mark_interrupted(collection)
        snaps = self.list(collection, 20)
        return next((s for s in snaps if s.status == "running"), snaps[0] if snaps else None)

    def diff(self, base: str, target: str) -> SnapshotDiff:
        a = {f.doc_id: f.version for f in self.get(base).files or []}
        b = {f.doc_id: f.version for f in self.get(target).files or []}
        return SnapshotDiff(
            base=base, target=target,
            added=sorted(set(b) - set(a)), removed=sorted(set(a) - set(b)),
            changed=sorted(k for k in set(a) & set(b) if a[k] != b[k]),
            unchanged=sum(1 for k in set(a) & set(b) if a[k] == b[k]),
        )

    @staticmethod
    def _row(r: tuple[Any, ...]) -> Snapshot:
        (sid, collection, status, started, finished, model, sparse, chunker, paths, prune, counts, rejections,
         error) = r
        return Snapshot(
            id=sid, collection=collection, status=status, started_at=started, finished_at=finished,
            embedding_model=model, sparse_encoder=sparse, chunker_config=json.loads(chunker), paths=json.loads(paths),
            prune=bool(prune), counts=json.loads(counts), rejections=json.loads(rejections), error=error)


def _gone(runner: str | None, beat_at: float | None) -> bool:
    if runner is None or beat_at is None or time.time() - beat_at > STALE_AFTER_S:
        return True
    host, pid = [*runner.rsplit(":", 2), ""][:2]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's: only its silence tells
    if runner == _RUNNER:
        return False  # this process's own run, still going
    if int(pid) == os.getpid():
        return True  # an earlier process with this pid (a restarted container)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
