"""The runs table: one row per run (status, question, answer, pending approval, steps with timings).

Lives in the same SQLite file as the checkpoints. Checkpoints hold the graph state; this table
is the index the API and CLI list and inspect, and the claim that makes a resume happen once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVE = ("running",)
RESUMABLE = ("interrupted", "stalled", "failed", "cancelled")
TERMINAL = ("completed", "step_limit")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_runs (
    run_id TEXT PRIMARY KEY,
    thread_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    owner TEXT,
    namespace TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL,
    question TEXT NOT NULL DEFAULT '',
    answer TEXT,
    citations TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    pending TEXT,
    steps TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS agent_runs_thread ON agent_runs(thread_id, created_at);
CREATE INDEX IF NOT EXISTS agent_runs_status ON agent_runs(status, created_at);
"""


@dataclass
class RunRecord:
    run_id: str
    thread_id: str
    workflow: str
    owner: str | None
    namespace: list[str]
    status: str
    question: str
    answer: str | None = None
    citations: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None

    @property
    def duration_ms(self) -> float | None:
        end = self.finished_at or (self.updated_at if self.status not in ACTIVE else None)
        return round((end - self.created_at) * 1000, 1) if end else None

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "thread_id": self.thread_id, "workflow": self.workflow, "owner": self.owner,
                "namespace": "/".join(self.namespace), "status": self.status, "question": self.question,
                "answer": self.answer, "citations": self.citations, "error": self.error, "pending": self.pending,
                "steps": self.steps, "created_at": self.created_at, "updated_at": self.updated_at,
                "finished_at": self.finished_at, "duration_ms": self.duration_ms}


class RunStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _row(r: sqlite3.Row) -> RunRecord:
        return RunRecord(
            run_id=r["run_id"], thread_id=r["thread_id"], workflow=r["workflow"], owner=r["owner"],
            namespace=json.loads(r["namespace"]), status=r["status"], question=r["question"], answer=r["answer"],
            citations=json.loads(r["citations"]), error=json.loads(r["error"]) if r["error"] else None,
            pending=json.loads(r["pending"]) if r["pending"] else None, steps=json.loads(r["steps"]),
            created_at=r["created_at"], updated_at=r["updated_at"], finished_at=r["finished_at"])

    def create(self, rec: RunRecord) -> RunRecord:
        now = time.time()
        rec.created_at = rec.updated_at = now
        with self._lock:
            self._db.execute(
                "INSERT INTO agent_runs (run_id, thread_id, workflow, owner, namespace, status, question, "
                "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (rec.run_id, rec.thread_id, rec.workflow, rec.owner, json.dumps(rec.namespace), rec.status,
                 rec.question, now, now))
        return rec

    def get(self, run_id: str) -> RunRecord | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM agent_runs WHERE run_id=?", (run_id,)).fetchone()
        return self._row(r) if r else None

    def list(self, *, workflow: str | None = None, status: str | None = None, thread_id: str | None = None,
             owner: str | None = None, limit: int = 50) -> list[RunRecord]:
        where, args = [], []
        for col, val in (("workflow", workflow), ("status", status), ("thread_id", thread_id), ("owner", owner)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM agent_runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def active_on_thread(self, thread_id: str) -> RunRecord | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM agent_runs WHERE thread_id=? AND status IN ('running','interrupted') "
                                 "ORDER BY created_at DESC LIMIT 1", (thread_id,)).fetchone()
        return self._row(r) if r else None

    def claim(self, run_id: str, from_statuses: tuple[str, ...]) -> bool:
        """Atomically move a run to ``running`` if it is in one of ``from_statuses`` (one resumer wins)."""
        marks = ",".join("?" * len(from_statuses))
        with self._lock:
            cur = self._db.execute(
                f"UPDATE agent_runs SET status='running', pending=NULL, error=NULL, updated_at=? "
                f"WHERE run_id=? AND status IN ({marks})", (time.time(), run_id, *from_statuses))
        return cur.rowcount == 1

    def update(self, run_id: str, **fields: Any) -> None:
        if not fields:
            return
        enc = {k: (json.dumps(v, default=str) if k in ("citations", "error", "pending", "steps", "namespace")
                   and v is not None else v) for k, v in fields.items()}
        enc["updated_at"] = time.time()
        if fields.get("status") in TERMINAL:
            enc["finished_at"] = enc["updated_at"]
        cols = ", ".join(f"{k}=?" for k in enc)
        with self._lock:
            self._db.execute(f"UPDATE agent_runs SET {cols} WHERE run_id=?", (*enc.values(), run_id))

    def mark_stalled(self) -> int:
        """At start-up: runs left ``running`` by a dead process become ``stalled`` (resumable)."""
        with self._lock:
            cur = self._db.execute("UPDATE agent_runs SET status='stalled', updated_at=? WHERE status='running'",
                                   (time.time(),))
        return cur.rowcount
