"""The runs table: one row per run (status, question, answer, pending approval, steps with timings).

Checkpoints hold the graph state; this table is the index the API and CLI list and inspect, and
the claim that makes a resume happen once. It lives next to the checkpoints: a SQLite file
(``agents.runs.db`` beside ``agents.db``) by default, or the same Postgres database as the
checkpointer when ``agents.postgres_url`` is set, so several API processes share one index.
Both stores run the same SQL (written once, with ``?`` placeholders) and the same test suite.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.db import RECONNECT_TIMEOUT_S, enable_wal
from app.core.migrate import Migrations, upgrade_postgres, upgrade_sqlite

ACTIVE = ("running",)
RESUMABLE = ("interrupted", "stalled", "failed", "cancelled", "timed_out")
TERMINAL = ("completed", "step_limit", "blocked")  # blocked: a guardrail refused the input or the answer

# The table comes from these Alembic migrations (agents/migrations), run on open, on SQLite and Postgres alike.
# The advisory lock key is the one the release before Alembic took around its schema set-up ("keelru").
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_agent_runs",
                        pg_lock_key=0x6B65656C_7275)


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
    guardrails: str | None = None  # "<policy>@<version>" that checked the run (None: unguarded)
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
                "steps": self.steps, "guardrails": self.guardrails, "created_at": self.created_at,
                "updated_at": self.updated_at, "finished_at": self.finished_at, "duration_ms": self.duration_ms}


def runs_db_path(checkpoint_db: Path) -> Path:
    """The runs table's SQLite file, next to the checkpoints: ``agents.db`` -> ``agents.runs.db``."""
    return checkpoint_db.with_name(checkpoint_db.stem + ".runs.db")


class RunStoreBase:
    """The runs index over any SQL database; subclasses provide ``_query`` and ``_execute``."""

    shared = False  # True where several processes use the store at once (see mark_stalled)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Rows (addressable by column name) of a SELECT."""
        raise NotImplementedError

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        """Run a write; return the number of rows it changed."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _row(r: Any) -> RunRecord:
        return RunRecord(
            run_id=r["run_id"], thread_id=r["thread_id"], workflow=r["workflow"], owner=r["owner"],
            namespace=json.loads(r["namespace"]), status=r["status"], question=r["question"], answer=r["answer"],
            citations=json.loads(r["citations"]), error=json.loads(r["error"]) if r["error"] else None,
            pending=json.loads(r["pending"]) if r["pending"] else None, steps=json.loads(r["steps"]),
            guardrails=r["guardrails"], created_at=r["created_at"], updated_at=r["updated_at"],
            finished_at=r["finished_at"])

    def create(self, rec: RunRecord) -> RunRecord:
        now = time.time()
        rec.created_at = rec.updated_at = now
        self._execute(
            "INSERT INTO agent_runs (run_id, thread_id, workflow, owner, namespace, status, question, "
            "guardrails, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (rec.run_id, rec.thread_id, rec.workflow, rec.owner, json.dumps(rec.namespace), rec.status,
             rec.question, rec.guardrails, now, now))
        return rec

    def get(self, run_id: str) -> RunRecord | None:
        rows = self._query("SELECT * FROM agent_runs WHERE run_id=?", (run_id,))
        return self._row(rows[0]) if rows else None

    def list(self, *, workflow: str | None = None, status: str | None = None, thread_id: str | None = None,
             owner: str | None = None, limit: int = 50) -> list[RunRecord]:
        where, args = [], []
        for col, val in (("workflow", workflow), ("status", status), ("thread_id", thread_id), ("owner", owner)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM agent_runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC LIMIT ?"
        return [self._row(r) for r in self._query(sql, (*args, limit))]

    def active_on_thread(self, thread_id: str) -> RunRecord | None:
        rows = self._query("SELECT * FROM agent_runs WHERE thread_id=? AND status IN ('running','interrupted') "
                           "ORDER BY created_at DESC LIMIT 1", (thread_id,))
        return self._row(rows[0]) if rows else None

    def claim(self, run_id: str, from_statuses: tuple[str, ...]) -> bool:
        """Atomically move a run to ``running`` if it is in one of ``from_statuses`` (one resumer wins)."""
        marks = ",".join("?" * len(from_statuses))
        changed = self._execute(
            f"UPDATE agent_runs SET status='running', pending=NULL, error=NULL, updated_at=? "
            f"WHERE run_id=? AND status IN ({marks})", (time.time(), run_id, *from_statuses))
        return changed == 1

    def update(self, run_id: str, **fields: Any) -> None:
        if not fields:
            return
        enc = {k: (json.dumps(v, default=str) if k in ("citations", "error", "pending", "steps", "namespace")
                   and v is not None else v) for k, v in fields.items()}
        enc["updated_at"] = time.time()
        if fields.get("status") in TERMINAL:
            enc["finished_at"] = enc["updated_at"]
        cols = ", ".join(f"{k}=?" for k in enc)
        self._execute(f"UPDATE agent_runs SET {cols} WHERE run_id=?", (*enc.values(), run_id))

    def mark_stalled(self, *, idle_for_s: float | None = None) -> int:
        """Runs left ``running`` by a dead process become ``stalled`` (resumable). ``idle_for_s`` None: every
        running run (right for a store one process owns, at its start-up); otherwise only runs not updated
        for that long (for a shared store, where other live processes have runs in flight)."""
        now = time.time()
        if idle_for_s is None:
            return self._execute("UPDATE agent_runs SET status='stalled', updated_at=? WHERE status='running'",
                                 (now,))
        return self._execute("UPDATE agent_runs SET status='stalled', updated_at=? WHERE status='running' "
                             "AND updated_at < ?", (now, now - idle_for_s))


class RunStore(RunStoreBase):
    """The runs index in its own SQLite file (WAL); one connection serialised by a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            enable_wal(self._db)
            upgrade_sqlite(self._db, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount


class PostgresRunStore(RunStoreBase):
    """The runs index in Postgres (a small psycopg pool, autocommit: every write is one statement)."""

    shared = True

    def __init__(self, url: str, *, max_size: int = 4, timeout_s: float = 10.0) -> None:
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        # The schema on a connection of its own first: a wrong URL or a server that is down fails here at
        # once with libpq's reason (psycopg.OperationalError), where the pool would retry until its timeout.
        upgrade_postgres(url, MIGRATIONS, connect_timeout_s=timeout_s)
        # check on checkout: a Postgres restart costs a reconnect, not a failed request.
        self._pool = ConnectionPool(url, min_size=1, max_size=max_size, timeout=timeout_s, open=True,
                                    kwargs={"autocommit": True, "row_factory": dict_row},
                                    check=ConnectionPool.check_connection, name="keel-agent-runs",
                                    reconnect_timeout=RECONNECT_TIMEOUT_S)

    def close(self) -> None:
        self._pool.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._pool.connection() as conn:
            return conn.execute(sql.replace("?", "%s"), args).fetchall()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._pool.connection() as conn:
            return conn.execute(sql.replace("?", "%s"), args).rowcount


def open_run_store(settings: Any, home: Path) -> RunStoreBase:
    """The runs index for ``AgentSettings``: Postgres when ``postgres_url`` is set, else the SQLite file."""
    if settings.postgres_url:
        return PostgresRunStore(settings.postgres_url.get_secret_value())
    return RunStore(runs_db_path(settings.db_path(home)))
