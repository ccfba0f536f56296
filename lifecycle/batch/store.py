"""Where files and batches live: ``<home>/batches.db`` (SQLite, WAL) and the files' bytes under ``<home>/files/``;
or, for several API processes, Postgres (``batch.url``, or ``database_url``), the bytes too (1 MiB chunks), with
``<home>/files/`` as each process's copy of what it has read.

A batch is stored as its OpenAI ``Batch`` object (JSON) plus the columns it is found by; each request line's
outcome is one row of ``batch_results`` (written as the line finishes), so a batch interrupted by a restart
resumes at the lines it has not answered. The schema is Alembic's (``lifecycle/batch/migrations``, version
table ``alembic_version_batch``), brought to head on open.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from app.core.db import open_store_file
from app.core.migrate import Migrations

MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_batch",
                        pg_lock_key=0x6B65656C_6261)  # "keelba"
CHUNK_BYTES = 1024 * 1024


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class BatchStore:
    def __init__(self, home: Path, *, url: Any = None) -> None:
        """``url``: the shared Postgres (a ``SecretStr``), else ``<home>/batches.db``."""
        self.files_dir = Path(home) / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._file = open_store_file(url, Path(home) / "batches.db", MIGRATIONS, what="the batch store",
                                     setting="batch.url", name="keel-batches")

    # -- files -------------------------------------------------------------------------------------

    def add_file(self, row: dict[str, Any], data: bytes) -> None:
        """A file's row and bytes, both or neither (``row["path"]`` is set here)."""
        path = self.files_dir / f"{row['id']}.jsonl"
        _write_whole(path, [data])  # the row never names a half-written file
        try:
            with self._file.tx(serialize=False) as db:  # a new id: nothing to take turns over
                db.execute("INSERT INTO files (id, owner, filename, purpose, bytes, created_at, path) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (row["id"], row["owner"], row["filename"],
                                                            row["purpose"], row["bytes"], row["created_at"], str(path)))
                if self._file.postgres:
                    db.executemany("INSERT INTO file_chunks (file_id, seq, data) VALUES (?, ?, ?)",
                                   [(row["id"], i, data[o:o + CHUNK_BYTES])
                                    for i, o in enumerate(range(0, len(data), CHUNK_BYTES))])
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        row["path"] = str(path)

    def content(self, row: dict[str, Any]) -> Path | None:
        """A path on this machine to the file's bytes (from Postgres: copied under files/ on first read), or None
        when they are gone."""
        if not self._file.postgres:
            path = Path(row["path"])
            return path if path.is_file() else None
        path = self.files_dir / f"{row['id']}.jsonl"
        if path.is_file():
            return path
        chunks = self._file.read("SELECT data FROM file_chunks WHERE file_id = ? ORDER BY seq", (row["id"],))
        if not chunks:
            return None
        _write_whole(path, [bytes(c[0]) for c in chunks])
        return path

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        rows = self._file.read("SELECT id, owner, filename, purpose, bytes, created_at, path FROM files "
                               "WHERE id = ?", (file_id,))
        return _file(rows[0]) if rows else None

    def list_files(self, *, owner: str | None, purpose: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = ["1 = 1"], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        rows = self._file.read(f"SELECT id, owner, filename, purpose, bytes, created_at, path FROM files WHERE "
                               f"{' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
        return [_file(r) for r in rows]

    def delete_file(self, row: dict[str, Any]) -> None:
        with self._file.tx() as db:
            db.execute("DELETE FROM files WHERE id = ?", (row["id"],))
            db.execute("DELETE FROM file_chunks WHERE file_id = ?", (row["id"],))
        Path(row["path"]).unlink(missing_ok=True)
        (self.files_dir / f"{row['id']}.jsonl").unlink(missing_ok=True)

    # -- batches -----------------------------------------------------------------------------------

    def put_batch(self, batch: dict[str, Any], *, owner: str, job_id: str | None = None) -> bool:
        """Write the batch; False (nothing written) when the stored one is final, or is being cancelled and this
        would start it again: with processes on their own queues, a cancel and the runner's own writes cross."""
        with self._file.tx() as db:
            return bool(db.execute(
                "INSERT INTO batches (id, owner, status, created_at, job_id, batch) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET status = excluded.status, batch = excluded.batch, "
                "job_id = COALESCE(excluded.job_id, batches.job_id) WHERE batches.status NOT IN "
                "('completed', 'failed', 'expired', 'cancelled') AND NOT (batches.status = 'cancelling' AND "
                "excluded.status IN ('validating', 'in_progress')) RETURNING id",
                (batch["id"], owner, batch["status"], batch["created_at"], job_id, _dump(batch))).fetchall())

    def set_job(self, batch_id: str, job_id: str) -> None:
        with self._file.tx() as db:
            db.execute("UPDATE batches SET job_id = ? WHERE id = ?", (job_id, batch_id))

    def get_batch(self, batch_id: str) -> tuple[dict[str, Any], str, str | None] | None:
        """(the batch, its owner, its job's id)."""
        rows = self._file.read("SELECT batch, owner, job_id FROM batches WHERE id = ?", (batch_id,))
        return (json.loads(rows[0][0]), rows[0][1], rows[0][2]) if rows else None

    def list_batches(self, *, owner: str | None, after: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = ["1 = 1"], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if after is not None:
            where.append("(created_at, id) < (SELECT created_at, id FROM batches WHERE id = ?)")
            args.append(after)
        rows = self._file.read(f"SELECT batch FROM batches WHERE {' AND '.join(where)} "
                               f"ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
        return [json.loads(r[0]) for r in rows]

    # -- request lines ---------------------------------------------------------------------------

    def add_results(self, batch_id: str, results: list[tuple[int, str | None, bool, dict[str, Any]]]) -> None:
        with self._file.tx(serialize=False) as db:  # upserts of whole lines: nothing read first
            db.executemany("INSERT INTO batch_results (batch_id, line, custom_id, ok, record) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (batch_id, line) DO UPDATE SET custom_id = excluded.custom_id, "
                           "ok = excluded.ok, record = excluded.record",
                           [(batch_id, line, cid, int(ok), _dump(rec)) for line, cid, ok, rec in results])

    def status(self, batch_id: str) -> str | None:
        rows = self._file.read("SELECT status FROM batches WHERE id = ?", (batch_id,))
        return rows[0][0] if rows else None

    def done_lines(self, batch_id: str) -> set[int]:
        return {r[0] for r in self._file.read("SELECT line FROM batch_results WHERE batch_id = ?", (batch_id,))}

    def results(self, batch_id: str) -> list[tuple[int, bool, dict[str, Any]]]:
        rows = self._file.read("SELECT line, ok, record FROM batch_results WHERE batch_id = ? ORDER BY line",
                               (batch_id,))
        return [(line, bool(ok), json.loads(rec)) for line, ok, rec in rows]

    def counts(self, batch_id: str) -> tuple[int, int]:
        rows = self._file.read("SELECT COALESCE(SUM(ok), 0), COUNT(*) - COALESCE(SUM(ok), 0) FROM batch_results "
                               "WHERE batch_id = ?", (batch_id,))
        return int(rows[0][0]), int(rows[0][1])

    def close(self) -> None:
        self._file.close()


def _file(row: tuple) -> dict[str, Any]:
    fid, owner, filename, purpose, size, created, path = row
    return {"id": fid, "owner": owner, "filename": filename, "purpose": purpose, "bytes": size,
            "created_at": created, "path": path}


def _write_whole(path: Path, parts: list[bytes]) -> None:
    """Write ``path`` whole or not at all; readers racing to fetch the same file each write a temporary of
    their own and the last rename wins (the bytes are the same)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
