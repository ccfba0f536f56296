"""Ingest snapshots: one row per run with its manifest, in SQLite under the Keel home folder.

A snapshot's file list is the collection's full content after the run (not just what the
run touched), so any two snapshots of a collection can be diffed directly.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.core.db import enable_wal
from app.core.migrate import Migrations, upgrade_sqlite
from ingest.errors import SnapshotNotFound

# The tables come from these Alembic migrations (ingest/migrations), run on first use.
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_ingest")


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


class SnapshotStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            enable_wal(conn)
            conn.execute("PRAGMA foreign_keys=ON")
            upgrade_sqlite(conn, MIGRATIONS)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def start(self, collection: str, *, embedding_model: str, sparse_encoder: str, chunker_config: dict[str, Any],
              paths: list[str], prune: bool) -> str:
        sid = new_snapshot_id()
        with self._lock, self._db() as db:
            db.execute(
                "INSERT INTO rag_snapshots (id, collection, status, started_at, embedding_model, sparse_encoder,"
                " chunker_config, paths, prune) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (sid, collection, _now(), embedding_model, sparse_encoder, json.dumps(chunker_config),
                 json.dumps(paths), int(prune)))
        return sid

    def finish(self, sid: str, *, files: list[FileEntry], counts: dict[str, int | float],
               rejections: list[dict[str, Any]], error: str | None = None) -> None:
        with self._lock, self._db() as db:
            db.execute("DELETE FROM rag_snapshot_files WHERE snapshot_id = ?", (sid,))
            db.executemany(
                "INSERT INTO rag_snapshot_files VALUES (?, ?, ?, ?, ?, ?)",
                [(sid, f.doc_id, f.source, f.source_sha256, f.version, f.chunks) for f in files])
            db.execute(
                "UPDATE rag_snapshots SET status = ?, finished_at = ?, counts = ?, rejections = ?, error = ? "
                "WHERE id = ?",
                ("failed" if error else "completed", _now(), json.dumps(counts), json.dumps(rejections), error,
                 sid))

    def mark_interrupted(self, collection: str) -> int:
        """Runs left 'running' by a killed process (older than this process) become 'failed'."""
        with self._lock, self._db() as db:
            cur = db.execute(
                "UPDATE rag_snapshots SET status = 'failed', error = ? WHERE collection = ? AND status = 'running'",
                (f"interrupted (found by pid {os.getpid()})", collection))
            return cur.rowcount

    def list(self, collection: str | None = None, limit: int = 50) -> list[Snapshot]:
        sql = "SELECT * FROM rag_snapshots"
        args: tuple[Any, ...] = ()
        if collection:
            sql += " WHERE collection = ?"
            args = (collection,)
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db().execute(sql, (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def get(self, sid: str, with_files: bool = True) -> Snapshot:
        with self._lock:
            row = self._db().execute("SELECT * FROM rag_snapshots WHERE id = ?", (sid,)).fetchone()
            if row is None:
                raise SnapshotNotFound(f"no snapshot {sid!r}", param="snapshot")
            snap = self._row(row)
            if with_files:
                rows = self._db().execute(
                    "SELECT * FROM rag_snapshot_files WHERE snapshot_id = ? ORDER BY doc_id", (sid,)).fetchall()
                snap.files = [FileEntry(doc_id=r["doc_id"], source=r["source"], source_sha256=r["source_sha256"],
                                        version=r["version"], chunks=r["chunks"]) for r in rows]
        return snap

    def latest(self, collection: str) -> Snapshot | None:
        for s in self.list(collection, limit=20):
            if s.status == "completed":
                return self.get(s.id)
        return None

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
    def _row(r: sqlite3.Row) -> Snapshot:
        return Snapshot(
            id=r["id"], collection=r["collection"], status=r["status"], started_at=r["started_at"],
            finished_at=r["finished_at"], embedding_model=r["embedding_model"], sparse_encoder=r["sparse_encoder"],
            chunker_config=json.loads(r["chunker_config"]), paths=json.loads(r["paths"]), prune=bool(r["prune"]),
            counts=json.loads(r["counts"]), rejections=json.loads(r["rejections"]), error=r["error"])
