"""The guardrail audit trail: one SQLite row per validator decision, queryable by request, validator, time.

Rows never contain the text that was checked (nor redacted values): only verdicts, actions, scores,
reasons (which name kinds, not values) and latencies.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.core.migrate import Migrations, upgrade_sqlite

log = logging.getLogger("keel.guardrails")

# The guardrail_audit table comes from these Alembic migrations (app/guardrails/migrations), run on open.
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_guardrail_audit")


@dataclass(frozen=True)
class AuditRecord:
    request_id: str
    stage: str
    policy: str
    policy_version: str
    validator: str
    registered: str
    verdict: str
    action: str
    score: float
    latency_ms: float
    reason: str = ""
    window: int | None = None
    ts: float = 0.0
    id: int | None = None


class AuditStore:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per commit, still crash-safe
            upgrade_sqlite(self._conn, MIGRATIONS)

    def write(self, records: Iterable[AuditRecord]) -> int:
        now = time.time()
        rows = [(r.ts or now, r.request_id, r.stage, r.policy, r.policy_version, r.validator, r.registered, r.verdict,
                 r.action, r.score, r.latency_ms, r.reason, r.window) for r in records]
        if not rows:
            return 0
        with self._lock:
            self._conn.executemany(
                "INSERT INTO guardrail_audit (ts, request_id, stage, policy, policy_version, validator, registered,"
                " verdict, action, score, latency_ms, reason, window) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def query(self, *, request_id: str | None = None, validator: str | None = None, verdict: str | None = None,
              action: str | None = None, stage: str | None = None, since: float | None = None,
              limit: int = 100) -> list[AuditRecord]:
        """Newest first. Every filter is optional; ``since`` is a unix timestamp."""
        where, args = [], []
        for col, val in (("request_id", request_id), ("validator", validator), ("verdict", verdict),
                         ("action", action), ("stage", stage)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        sql = ("SELECT id, ts, request_id, stage, policy, policy_version, validator, registered, verdict, action,"
               " score, latency_ms, reason, window FROM guardrail_audit")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [AuditRecord(id=r[0], ts=r[1], request_id=r[2], stage=r[3], policy=r[4], policy_version=r[5],
                            validator=r[6], registered=r[7], verdict=r[8], action=r[9], score=r[10], latency_ms=r[11],
                            reason=r[12] or "", window=r[13]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class AuditWriter:
    """Writes audit rows on one background thread, in batches: a request only enqueues its rows.

    Why: a request's guards produce a few rows per stage (and per streamed window); one executor hop and
    one SQLite statement each competed for the GIL with the validators of the requests in flight. Rows
    waiting here when the process is killed are lost (milliseconds' worth); :meth:`flush` and a clean
    shutdown write them all.
    """

    def __init__(self, write: Callable[[list[AuditRecord]], object]) -> None:
        self._write = write
        self._queue: queue.Queue[list[AuditRecord] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="keel-guard-audit", daemon=True)
        self._thread.start()

    def submit(self, rows: list[AuditRecord]) -> None:
        self._queue.put(rows)

    def flush(self) -> None:
        """Block until every row submitted so far is written (or failed and was logged)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # drain what else is waiting into the same batch
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [r for item in items if item for r in item]
            try:
                if rows:
                    self._write(rows)
            except Exception:  # the audit must never take a request down; the loss is logged
                log.exception("could not write %d guardrail audit rows", len(rows))
            finally:
                for _ in items:
                    self._queue.task_done()
            if any(item is None for item in items):
                return
