"""Where pipeline runs live: ``<home>/pipelines.db`` (SQLite, WAL), or Postgres (``pipelines.url``, or
``jobs.url``: the job queue the runs are driven through) for several API processes and workers: each run, each
of its steps (state, log, artifacts), and the audit trail ``pipelines`` (starts, decisions, outcomes), written in
the same transaction as the change it records.

A run is *open* until it finishes; a partial unique index keeps one open run per pipeline, so two API processes
whose triggers fire at once start one run between them. The schema is Alembic's (``lifecycle/pipeline/
migrations``, version table ``alembic_version_pipelines``), brought to head on open.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.core import audit
from app.core.audit import AuditEvent
from app.core.db import StoreFile, open_store_file, store_file
from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.migrate import Migrations
from lifecycle.pipeline.spec import STEPS

MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_pipelines",
                        pg_lock_key=0x6B65656C_7069)  # "keelpi"
TRAIL = "pipelines"

RunState = Literal["queued", "running", "waiting", "succeeded", "failed", "cancelled"]
StepState = Literal["pending", "running", "waiting", "succeeded", "failed", "skipped", "cancelled"]
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
_RUN_COLUMNS = ("id, pipeline, model, state, outcome, trigger, definition, definition_hash, created_by, created_at, "
                "updated_at, finished_at, job_id, decision, error")


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not run_id.startswith("pr-") or len(run_id) > 40 or not run_id[3:].isalnum():
        raise InvalidRequest(f"{str(run_id)[:80]!r} is not a pipeline run id: they look like pr-0123456789abcdef "
                             "(GET /v1/pipelines/runs lists them)", param="run_id", code="invalid_run_id")
    return run_id


@dataclass
class Step:
    name: str
    state: StepState
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    log: str = ""

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "attempts": self.attempts, "started_at": self.started_at,
                "finished_at": self.finished_at, "artifacts": self.artifacts, "error": self.error, "log": self.log}


@dataclass
class Run:
    id: str
    pipeline: str
    model: str
    state: RunState
    outcome: str | None
    trigger: dict[str, Any]
    definition: dict[str, Any]  # {"pipeline": spec, "job": job spec, "source": path}
    definition_hash: str
    created_by: str
    created_at: float
    updated_at: float
    finished_at: float | None
    job_id: str | None
    decision: dict[str, Any] | None
    error: str | None
    steps: dict[str, Step] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def current_step(self) -> str | None:
        """The first step not done (the one a resumed run continues at)."""
        return next((s.name for s in self.steps.values() if s.state not in ("succeeded", "skipped")), None)

    def public(self, *, logs: bool = True) -> dict[str, Any]:
        steps = [s.public() for s in self.steps.values()]
        if not logs:
            for s in steps:
                s.pop("log")
        return {"id": self.id, "pipeline": self.pipeline, "model": self.model, "state": self.state,
                "outcome": self.outcome, "trigger": self.trigger, "definition_hash": self.definition_hash,
                "created_by": self.created_by, "created_at": self.created_at, "updated_at": self.updated_at,
                "finished_at": self.finished_at, "job_id": self.job_id, "decision": self.decision,
                "error": self.error, "current_step": self.current_step, "steps": steps}


class PipelineStore:
    def __init__(self, where: Path | str | StoreFile) -> None:
        self._file = store_file(where, MIGRATIONS, what="the pipeline store", with_audit=True)

    # -- definitions ---------------------------------------------------------------------------------

    def arm(self, name: str, *, now: float | None = None) -> float:
        """When this home first saw pipeline ``name`` (recorded now if never)."""
        now = time.time() if now is None else now
        with self._file.tx() as db:
            db.execute("INSERT INTO pipelines (name, armed_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       (name, now))
            return float(db.execute("SELECT armed_at FROM pipelines WHERE name = ?", (name,)).fetchone()[0])

    # -- runs ----------------------------------------------------------------------------------------

    def create(self, *, pipeline: str, model: str, trigger: Mapping[str, Any], definition: Mapping[str, Any],
               definition_hash: str, actor: str, skip: Sequence[str] = (), now: float | None = None) -> Run:
        """A new open run with every step pending (``skip``: skipped); 409 ``pipeline_run_open`` while another
        run of ``pipeline`` is open."""
        now = time.time() if now is None else now
        run_id = "pr-" + secrets.token_hex(8)
        try:
            with self._file.tx() as db:
                db.execute(f"INSERT INTO pipeline_runs ({_RUN_COLUMNS}, open) VALUES "
                           "(?, ?, ?, 'queued', NULL, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, 1)",
                           (run_id, pipeline, model, _dump(trigger), _dump(definition), definition_hash, actor, now,
                            now))
                db.executemany("INSERT INTO pipeline_steps (run_id, step, position, state) VALUES (?, ?, ?, ?)",
                               [(run_id, s, i, "skipped" if s in skip else "pending") for i, s in enumerate(STEPS)])
                audit.append(db, AuditEvent(trail=TRAIL, action="run.start", subject_kind="pipeline",
                                            subject=pipeline, subject_ref=run_id, actor=actor,
                                            reason=str(trigger.get("reason") or trigger.get("kind") or ""),
                                            details={"trigger": dict(trigger), "hash": definition_hash}))
        except self._file.integrity_error:
            open_run = self.open_run(pipeline)
            raise Conflict(f"pipeline {pipeline!r} already has an open run ({open_run.id if open_run else '?'}, "
                           f"{open_run.state if open_run else '?'}); one run at a time: wait for it, or cancel it",
                           param="pipeline", code="pipeline_run_open") from None
        return self.get(run_id)

    def get(self, run_id: str) -> Run:
        runs, steps = self._file.read_all(
            (f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE id = ?", (run_id,)),
            ("SELECT run_id, step, state, attempts, started_at, finished_at, artifacts, error, log FROM "
             "pipeline_steps WHERE run_id = ? ORDER BY position", (run_id,)))
        if not runs:
            raise _missing(run_id)
        run = _run(runs[0])
        run.steps = {r[1]: _step(r) for r in steps}
        return run

    def list(self, *, pipeline: str | None = None, state: str | None = None, limit: int = 50,
             open_only: bool = False) -> list[Run]:
        """Newest first, without step logs."""
        where, args = ["open = 1" if open_only else "1 = 1"], []
        for clause, value in (("pipeline = ?", pipeline), ("state = ?", state)):
            if value is not None:
                where.append(clause)
                args.append(value)
        rows = self._file.read(f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE {' AND '.join(where)} "
                               "ORDER BY created_at DESC, id DESC LIMIT ?", (*args, int(limit)))
        runs = [_run(r) for r in rows]
        if runs:
            marks = ", ".join("?" * len(runs))
            by_run: dict[str, dict[str, Step]] = {r.id: {} for r in runs}
            for r in self._file.read("SELECT run_id, step, state, attempts, started_at, finished_at, artifacts, "
                                     f"error, '' FROM pipeline_steps WHERE run_id IN ({marks}) ORDER BY position",
                                     [r.id for r in runs]):
                by_run[r[0]][r[1]] = _step(r)
            for run in runs:
                run.steps = by_run[run.id]
        return runs

    def open_run(self, pipeline: str) -> Run | None:
        rows = self._file.read("SELECT id FROM pipeline_runs WHERE pipeline = ? AND open = 1", (pipeline,))
        return self.get(rows[0][0]) if rows else None

    def last_run(self, pipeline: str) -> Run | None:
        rows = self._file.read("SELECT id FROM pipeline_runs WHERE pipeline = ? ORDER BY created_at DESC, id DESC "
                               "LIMIT 1", (pipeline,))
        return self.get(rows[0][0]) if rows else None

    def last_finished(self, pipeline: str, *, outcome: str | None = None) -> Run | None:
        sql = "SELECT id FROM pipeline_runs WHERE pipeline = ? AND open = 0"
        args: list[Any] = [pipeline]
        if outcome is not None:
            sql += " AND outcome = ?"
            args.append(outcome)
        rows = self._file.read(sql + " ORDER BY created_at DESC, id DESC LIMIT 1", args)
        return self.get(rows[0][0]) if rows else None

    def set_run(self, run_id: str, *, state: RunState | None = None, job_id: str | None = None,
                decision: Mapping[str, Any] | None = None, event: AuditEvent | None = None,
                expect: frozenset[str] | None = None) -> Run:
        """Change an open run (``expect``: only from these states, else 409 ``pipeline_run_state``)."""
        now = time.time()
        with self._file.tx() as db:
            row = db.execute("SELECT state, open FROM pipeline_runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise _missing(run_id)
            if expect is not None and row[0] not in expect:
                raise Conflict(f"pipeline run {run_id} is {row[0]}; this needs it {' or '.join(sorted(expect))}",
                               param="run_id", code="pipeline_run_state")
            if not row[1]:
                raise Conflict(f"pipeline run {run_id} is finished ({row[0]})", param="run_id",
                               code="pipeline_run_finished")
            sets, args = ["updated_at = ?"], [now]
            for column, value in (("state", state), ("job_id", job_id),
                                  ("decision", _dump(decision) if decision is not None else None)):
                if value is not None:
                    sets.append(f"{column} = ?")
                    args.append(value)
            db.execute(f"UPDATE pipeline_runs SET {', '.join(sets)} WHERE id = ?", (*args, run_id))
            if event is not None:
                audit.append(db, event)
        return self.get(run_id)

    def finish(self, run_id: str, state: Literal["succeeded", "failed", "cancelled"], *, outcome: str | None,
               error: str | None = None, actor: str = "pipeline") -> Run:
        """Close the run (no-op on a finished one): its open steps end ``cancelled`` when the run is."""
        now = time.time()
        with self._file.tx() as db:
            row = db.execute("SELECT pipeline, open FROM pipeline_runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise _missing(run_id)
            if row[1]:
                db.execute("UPDATE pipeline_runs SET state = ?, outcome = ?, error = ?, open = 0, finished_at = ?, "
                           "updated_at = ? WHERE id = ?", (state, outcome, error, now, now, run_id))
                if state == "cancelled":
                    db.execute("UPDATE pipeline_steps SET state = 'cancelled', finished_at = ? WHERE run_id = ? "
                               "AND state IN ('pending', 'running', 'waiting')", (now, run_id))
                audit.append(db, AuditEvent(trail=TRAIL, action=f"run.{state}", subject_kind="pipeline",
                                            subject=row[0], subject_ref=run_id, actor=actor, to_ref=outcome,
                                            reason=error or ""))
        return self.get(run_id)

    # -- steps ---------------------------------------------------------------------------------------

    def step_started(self, run_id: str, step: str) -> None:
        now = time.time()
        with self._file.tx() as db:
            db.execute("UPDATE pipeline_steps SET state = 'running', attempts = attempts + 1, "
                       "started_at = COALESCE(started_at, ?), error = NULL WHERE run_id = ? AND step = ?",
                       (now, run_id, step))
            db.execute("UPDATE pipeline_runs SET state = 'running', updated_at = ? WHERE id = ? AND open = 1",
                       (now, run_id))

    def step_update(self, run_id: str, step: str, *, state: StepState | None = None,
                    artifacts: Mapping[str, Any] | None = None, error: str | None = None, log: str | None = None,
                    finished: bool = False) -> None:
        """Merge ``artifacts`` into the step's, append ``log`` lines, set its state (all in one write)."""
        now = time.time()
        with self._file.tx() as db:
            row = db.execute("SELECT artifacts FROM pipeline_steps WHERE run_id = ? AND step = ?",
                             (run_id, step)).fetchone()
            if row is None:
                raise NotFound(f"pipeline run {run_id} has no step {step!r}", param="step")
            merged = {**json.loads(row[0]), **(artifacts or {})}
            db.execute("UPDATE pipeline_steps SET artifacts = ?, state = COALESCE(?, state), "
                       "error = COALESCE(?, error), log = log || ?, finished_at = CASE WHEN ? = 1 THEN ? "
                       "ELSE finished_at END WHERE run_id = ? AND step = ?",
                       (_dump(merged), state, error, log or "", int(finished), now, run_id, step))
            db.execute("UPDATE pipeline_runs SET updated_at = ? WHERE id = ?", (now, run_id))

    def reopen(self, run_id: str, *, actor: str, reason: str) -> Run:
        """A failed run goes back to the queue at its failed step (``retry``)."""
        now = time.time()
        with self._file.tx() as db:
            row = db.execute("SELECT pipeline, state FROM pipeline_runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise _missing(run_id)
            try:
                # only from what was checked: of two retries at once, one reopens the run and the other is a 409
                changed = db.execute(
                    "UPDATE pipeline_runs SET state = 'queued', outcome = NULL, error = NULL, open = 1, "
                    "finished_at = NULL, updated_at = ? WHERE id = ? AND open = 0 AND state = 'failed' AND "
                    "outcome = 'error'", (now, run_id)).rowcount
            except self._file.integrity_error:
                raise Conflict(f"pipeline {row[0]!r} has another open run; retry this one when it is finished",
                               param="run_id", code="pipeline_run_open") from None
            if not changed:
                raise Conflict(f"pipeline run {run_id} is {row[1]} now; only a run that failed on an error resumes",
                               param="run_id", code="pipeline_run_state")
            # what the failed step started failed with it: the retry starts it afresh (its log stays)
            db.execute("UPDATE pipeline_steps SET state = 'pending', error = NULL, finished_at = NULL, "
                       "artifacts = '{}' WHERE run_id = ? AND state = 'failed'", (run_id,))
            audit.append(db, AuditEvent(trail=TRAIL, action="run.retry", subject_kind="pipeline", subject=row[0],
                                        subject_ref=run_id, actor=actor, reason=reason))
        return self.get(run_id)

    # -- audit ---------------------------------------------------------------------------------------

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        """The pipelines trail, newest first (filters: :func:`app.core.audit.select`'s; a run's: subject_ref)."""
        return self._file.audit_events(**{**filters, "trail": TRAIL})

    def close(self) -> None:
        self._file.close()


def _missing(run_id: str) -> NotFound:
    return NotFound(f"no pipeline run {run_id!r}", param="run_id", code="pipeline_run_not_found")


def _run(r: Sequence[Any]) -> Run:
    (rid, pipeline, model, state, outcome, trigger, definition, dhash, by, created, updated, finished, job_id,
     decision, error) = r
    return Run(rid, pipeline, model, state, outcome, json.loads(trigger), json.loads(definition), dhash, by,
               float(created), float(updated), finished, job_id, json.loads(decision) if decision else None, error)


def _step(r: Sequence[Any]) -> Step:
    _, name, state, attempts, started, finished, artifacts, error, log = r
    return Step(name, state, int(attempts), started, finished, json.loads(artifacts), error, log or "")


def open_pipeline_store(settings: Any) -> PipelineStore:
    """The pipeline store the settings name (``pipelines.url``, else ``<home>/pipelines.db``)."""
    return PipelineStore(open_store_file(settings.pipelines.url, Path(settings.home) / "pipelines.db", MIGRATIONS,
                                         what="the pipeline store", setting="pipelines.url", name="keel-pipelines",
                                         with_audit=True, filled_by="jobs.url"))
