"""Eval results: runs with the exact identity of what they evaluated, one row per (run, case) so a resumed run
never counts a case twice, and the response cache. In SQLite (``<home>/evals.db``) by default, or in Postgres
(``evals.url``, or ``database_url``) so that every API process gates promotions on the same runs."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.db import PostgresPool, enable_wal, warn_if_left_behind
from app.core.errors import NotFound
from app.core.migrate import Migrations, upgrade_postgres, upgrade_sqlite

# The tables come from these Alembic migrations (evals/migrations), run on open. Postgres: "keelev".
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_evals",
                        pg_lock_key=0x6B65656C_6576)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunRow:
    id: str
    suite: str
    suite_hash: str
    identity_key: str
    identity: dict[str, Any]
    target_kind: str
    prompt_name: str | None
    prompt_version: int | None
    prompt_hash: str | None
    status: str
    passed: bool | None
    cases_total: int
    baseline: str | None
    summary: dict[str, Any] | None
    verdict: dict[str, Any] | None
    started_at: str
    finished_at: str | None

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class CaseRow:
    case_id: str
    record: dict[str, Any]
    scores: dict[str, dict[str, Any]]
    error: str | None
    cached: bool


class EvalStoreBase:
    """The SQL both stores share; subclasses run it (``_rows``: a statement's rows, ``_run``: no rows)."""

    _mark = "?"
    _order = "rowid"  # insertion order (Postgres: the seq column)

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:  # pragma: no cover
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._mark).replace("rowid", self._order)

    def close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    # --- runs -------------------------------------------------------------------------------------
    def create_run(self, *, suite: str, suite_hash: str, identity_key: str, identity: dict[str, Any],
                   cases_total: int, baseline: str | None = None) -> str:
        run_id = f"run-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        prompt = identity.get("prompt") or {}
        self._rows(self._q(
            "INSERT INTO eval_runs (id, suite, suite_hash, identity_key, identity, target_kind, prompt_name,"
            " prompt_version, prompt_hash, status, cases_total, baseline, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)"),
            (run_id, suite, suite_hash, identity_key, json.dumps(identity, sort_keys=True), identity["kind"],
             prompt.get("name"), prompt.get("version"), prompt.get("hash"), cases_total, baseline, now()),
        )
        return run_id

    def set_status(self, run_id: str, status: str) -> None:
        self._rows(self._q("UPDATE eval_runs SET status = ? WHERE id = ? AND status != 'completed'"),
                   (status, run_id))

    def set_baseline(self, run_id: str, baseline: str | None) -> None:
        self._rows(self._q("UPDATE eval_runs SET baseline = ? WHERE id = ?"), (baseline, run_id))

    def finish_run(self, run_id: str, *, passed: bool, summary: dict[str, Any], verdict: dict[str, Any]) -> None:
        self._rows(self._q(
            "UPDATE eval_runs SET status = 'completed', passed = ?, summary = ?, verdict = ?, finished_at = ?"
            " WHERE id = ?"), (int(passed), json.dumps(summary), json.dumps(verdict), now(), run_id),
        )

    @staticmethod
    def _run(row: tuple) -> RunRow:
        (rid, suite, shash, ikey, ident, kind, pname, pver, phash, status, passed, total, baseline, summary,
         verdict, started, finished) = row
        return RunRow(rid, suite, shash, ikey, json.loads(ident), kind, pname, pver, phash, status,
                      None if passed is None else bool(passed), total, baseline,
                      json.loads(summary) if summary else None, json.loads(verdict) if verdict else None,
                      started, finished)

    _COLS = ("id, suite, suite_hash, identity_key, identity, target_kind, prompt_name, prompt_version, prompt_hash,"
             " status, passed, cases_total, baseline, summary, verdict, started_at, finished_at")

    def get_run(self, run_id: str) -> RunRow:
        rows = self._rows(self._q(f"SELECT {self._COLS} FROM eval_runs WHERE id = ?"), (run_id,))
        if not rows:
            raise NotFound(f"no eval run {run_id!r}", param="run")
        return self._run(rows[0])

    def list_runs(self, *, suite: str | None = None, limit: int = 50) -> list[RunRow]:
        sql = f"SELECT {self._COLS} FROM eval_runs"
        args: tuple = ()
        if suite:
            sql += " WHERE suite = ?"
            args = (suite,)
        sql += " ORDER BY started_at DESC, rowid DESC LIMIT ?"
        return [self._run(r) for r in self._rows(self._q(sql), (*args, limit))]

    def unfinished_run(self, identity_key: str) -> RunRow | None:
        rows = self._rows(self._q(
            f"SELECT {self._COLS} FROM eval_runs WHERE identity_key = ? AND status != 'completed'"
            " ORDER BY started_at DESC, rowid DESC LIMIT 1"), (identity_key,))
        return self._run(rows[0]) if rows else None

    def prompt_runs(self, name: str, version: int) -> list[RunRow]:
        rows = self._rows(self._q(
            f"SELECT {self._COLS} FROM eval_runs WHERE prompt_name = ? AND prompt_version = ? AND status = 'completed'"
            " ORDER BY finished_at DESC, rowid DESC"), (name, version))
        return [self._run(r) for r in rows]

    def completed_runs(self, *, kind: str | None = None, contains: tuple[str, str] | None = None,
                       limit: int = 500) -> list[RunRow]:
        """Completed runs, newest first, of one kind of target (``rag``, ``agent``, ``model``, ``prompt``) or all,
        and, with ``contains=(key, value)``, whose stored identity (sorted JSON, as :meth:`create_run` writes it)
        sets ``key`` to ``value`` somewhere: what the release gates read. A prefilter: callers check the identity."""
        where, args = "", ()
        if kind:
            where, args = " AND target_kind = ?", (kind,)
        if contains:
            key, value = contains
            piece = f"{json.dumps(key)}: {json.dumps(value)}"
            escaped = piece.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where, args = where + " AND identity LIKE ? ESCAPE '\\'", (*args, f"%{escaped}%")
        rows = self._rows(self._q(
            f"SELECT {self._COLS} FROM eval_runs WHERE status = 'completed'{where}"
            " ORDER BY finished_at DESC, rowid DESC LIMIT ?"), (*args, limit))
        return [self._run(r) for r in rows]

    # --- case results -----------------------------------------------------------------------------
    def save_result(self, run_id: str, case_id: str, *, record: dict[str, Any], scores: dict[str, Any],
                    error: str | None, cached: bool) -> bool:
        """False when the case already has a result in this run (it is never counted twice)."""
        return bool(self._rows(self._q(
            "INSERT INTO eval_results (run_id, case_id, record, scores, error, cached, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, case_id) DO NOTHING RETURNING case_id"),
            (run_id, case_id, json.dumps(record), json.dumps(scores), error, int(cached), now())))

    def done_cases(self, run_id: str) -> set[str]:
        return {r[0] for r in self._rows(self._q("SELECT case_id FROM eval_results WHERE run_id = ?"), (run_id,))}

    def results(self, run_id: str) -> list[CaseRow]:
        rows = self._rows(self._q(
            "SELECT case_id, record, scores, error, cached FROM eval_results WHERE run_id = ? ORDER BY rowid"),
            (run_id,))
        return [CaseRow(c, json.loads(r), json.loads(s), e, bool(k)) for c, r, s, e, k in rows]

    # --- response cache ---------------------------------------------------------------------------
    def cache_get(self, key: str) -> dict[str, Any] | None:
        rows = self._rows(self._q("SELECT record FROM eval_cache WHERE key = ?"), (key,))
        return json.loads(rows[0][0]) if rows else None

    def cache_put(self, key: str, record: dict[str, Any]) -> None:
        self._rows(self._q("INSERT INTO eval_cache (key, record, created_at) VALUES (?, ?, ?) ON CONFLICT (key) DO "
                           "UPDATE SET record = excluded.record, created_at = excluded.created_at"),
                   (key, json.dumps(record), now()))


class EvalStore(EvalStoreBase):
    """``<home>/evals.db``: one connection in WAL mode (statements are each atomic; none needs a transaction)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        enable_wal(self._conn)
        self._conn.execute("PRAGMA foreign_keys=ON")
        upgrade_sqlite(self._conn, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()


class PostgresEvalStore(EvalStoreBase):
    """The same runs for every API process (and machine): a gate on one sees the eval runs made on another."""

    _mark = "%s"
    _order = "seq"

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.path = None
        self._pg = PostgresPool(url, whose="the eval store's", setting="evals.url", name="keel-evals",
                                migrate=lambda t: upgrade_postgres(url, MIGRATIONS, connect_timeout_s=t),
                                timeout_s=timeout_s)

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._pg.statement(sql, tuple(args))

    def close(self) -> None:
        self._pg.close()


def open_eval_store(settings: Any) -> EvalStore | PostgresEvalStore:
    """The eval store the settings name (``evals.url``, else ``<home>/<evals.db_name>``)."""
    url, path = settings.evals.url, settings.evals.db_path(settings.home)
    if url is None:
        return EvalStore(path)
    warn_if_left_behind(path, "the eval store", "evals.url (or database_url)")
    return PostgresEvalStore(url.get_secret_value())
