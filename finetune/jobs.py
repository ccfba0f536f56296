"""The fine-tuning job store: what each job is (spec, progress, metrics, adapter, evaluation) and its
state machine. *Who runs it* is the job queue's business (:mod:`app.jobs`): the service puts a ``finetune.train``
job on the queue for each submitted job, and a ``finetune.evals`` job for each evaluation; a worker
(:mod:`finetune.worker`) claims them with a lease, beats their heartbeat and records here what happened.

States::

    queued ──start──▶ running ──▶ succeeded
       │                 │ ├───▶ failed
       │                 │ └───▶ cancelled
       └──cancel──▶ cancelled    running ──worker stops (shutdown) / lost──▶ queued | running again

A job whose worker died (its process is gone, or its lease on the queue lapsed) is taken back by the queue and
claimed again; the next worker :meth:`JobStore.start`s it once more and it resumes from its last checkpoint.
Once the queue gives up (``finetune.max_attempts`` runs), :meth:`JobStore.fail_lost` records the failure here.

Evaluation of a succeeded job's adapter (its spec's eval suites) has its own small state,
``evals_state``, next to ``state``: the training outcome stays ``succeeded`` whatever the
evals say (a failing eval makes the adapter unpromotable, it does not undo the training)::

    pending ──start_evals──▶ running ──▶ passed | failed | error
       ▲                        │
       └──── interrupted / lost worker ─┘

``queue_evals`` puts a finished evaluation back to ``pending`` (re-run after a suite changed).

Every process (API, CLI, workers) opens the same store: a SQLite file under the home (WAL mode lets readers run
while a worker writes progress), or Postgres (``finetune.url``, or ``jobs.url``: the job queue the jobs run on)
when they do not share one volume's SQLite file or there are several API processes. Each call is one short
transaction, written once for both (:mod:`app.core.db`). The jobs' logs and run folders stay files under
``runs_dir`` either way.

The audit (job cancels and evaluations, adapter promotions, rollbacks and deploys) is the kernel's
(:mod:`app.core.audit`): trail ``adapters`` in the database's ``audit_events`` table; :meth:`JobStore.audit_log`
keeps its earlier shape (``model``, ``version``, ``job_id`` columns).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.core import audit
from app.core.audit import AuditEvent, AuditRetention, Pruner
from app.core.db import SqliteFile, StoreFile, open_store_file, store_file
from app.core.migrate import Migrations
from finetune.errors import JobNotFound, JobStateConflict

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EVAL_STATES: tuple[str, ...] = ("pending", "running", "passed", "failed", "error")
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

# The tables come from these Alembic migrations (finetune/migrations), run on open, after the kernel's audit
# schema (revision 0002 moves the old audit table into it).
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_finetune",
                        pg_lock_key=0x6B65656C_6674)  # "keelft"
AUDIT_TRAIL = "adapters"
WHAT = "the fine-tuning job store"
DEPLOYMENT_COLUMNS = ("alias", "model", "version", "backend", "served_name", "adapter_path", "fallback", "updated_at",
                      "actor")
log = logging.getLogger("keel.finetune")


@dataclass
class Job:
    id: str
    name: str
    state: JobState
    spec_yaml: str
    spec_hash: str
    submitted_by: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    step: int
    max_steps: int
    attempts: int
    worker: str | None
    heartbeat_at: float | None
    cancel_requested: bool
    error: str | None
    error_code: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_report: dict[str, Any] | None = None
    data_hash: str | None = None
    run_dir: str = ""
    adapter_path: str | None = None
    mlflow_run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    evals_state: str | None = None
    evals: dict[str, Any] | None = None

    @property
    def progress(self) -> float:
        if self.state == "succeeded":
            return 1.0
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir) / "job.log"

    def to_dict(self, *, with_spec: bool = False) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "spec_yaml"}
        out["progress"] = round(self.progress, 4)
        if with_spec:
            out["spec_yaml"] = self.spec_yaml
        return out


class JobOwnershipLost(JobStateConflict):
    """A worker acted on a job that is no longer its own (recovered after its heartbeat stopped)."""

    code = "finetune_job_lost"


# A job's fields are the jobs table's columns, in this order (rows are tuples on both backends).
JOB_FIELDS = tuple(Job.__dataclass_fields__)
_JOB_COLUMNS = ", ".join(JOB_FIELDS)


def _row_to_job(row: Sequence[Any]) -> Job:
    d = dict(zip(JOB_FIELDS, row, strict=True))
    d["cancel_requested"] = bool(d["cancel_requested"])
    d["metrics"] = json.loads(d["metrics"] or "{}")
    d["data_report"] = json.loads(d["data_report"]) if d["data_report"] else None
    d["evals"] = json.loads(d["evals"]) if d["evals"] else None
    return Job(**d)


def new_job_id() -> str:
    return "ft-" + uuid.uuid4().hex[:12]


class JobStore:
    def __init__(self, where: Path | str | StoreFile, runs_dir: Path, *,
                 audit_retention: AuditRetention | None = None) -> None:
        """``where``: the SQLite file's path, or a store file :func:`open_job_store` opened (SQLite or Postgres)."""
        # The kernel's audit table first: revision 0002 moves the old audit rows into it.
        self._file = store_file(where, MIGRATIONS, what=WHAT, with_audit=True)
        self.path = Path(self._file.path) if self._file.path else None  # None: in Postgres
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._audit_pruner = Pruner(AUDIT_TRAIL, audit_retention)
        self._prune_audit()

    @property
    def postgres(self) -> bool:
        return self._file.postgres

    def close(self) -> None:
        self._file.close()

    def _tx(self):
        return self._file.tx()

    @staticmethod
    def _row(db: Any, columns: str, job_id: str) -> tuple[Any, ...] | None:
        """``columns`` of the job, in the write transaction ``db``: writers take turns there (SQLite's write lock,
        the store's advisory lock on Postgres), so what is read stays true until the transaction commits."""
        return db.execute(f"SELECT {columns} FROM jobs WHERE id = ?", (job_id,)).fetchone()

    # -- reads -------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        rows = self._file.read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no fine-tuning job {job_id!r}", param="job_id")
        return _row_to_job(rows[0])

    def list(self, *, state: str | None = None, limit: int = 50) -> list[Job]:
        sql, args = f"SELECT {_JOB_COLUMNS} FROM jobs", []
        if state:
            sql += " WHERE state = ?"
            args.append(state)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        return [_row_to_job(r) for r in self._file.read(sql, args)]

    def unfinished(self) -> list[Job]:
        """Jobs with work left: training queued or running, or an evaluation pending or running (oldest first)."""
        rows = self._file.read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') OR "
                               "(state = 'succeeded' AND evals_state IN ('pending', 'running')) ORDER BY created_at")
        return [_row_to_job(r) for r in rows]

    def find_by_model_version(self, model: str, version: str) -> Job | None:
        rows = self._file.read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE model_name = ? AND model_version = ?",
                               (model, str(version)))
        return _row_to_job(rows[0]) if rows else None

    # -- writes ------------------------------------------------------------------------------------

    def create(self, *, name: str, spec_yaml: str, spec_hash: str, submitted_by: str = "",
               data_report: dict[str, Any] | None = None, job_id: str | None = None) -> Job:
        job_id = job_id or new_job_id()
        run_dir = self.runs_dir / job_id
        run_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, name, state, spec_yaml, spec_hash, submitted_by, created_at, updated_at, "
                "run_dir, data_report, data_hash) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, spec_yaml, spec_hash, submitted_by, now, now, str(run_dir),
                 json.dumps(data_report) if data_report else None,
                 (data_report or {}).get("data_hash")),
            )
        self.append_log(job_id, f"queued by {submitted_by or 'unknown'} (spec {spec_hash[:12]})")
        return self.get(job_id)

    def transition(self, job_id: str, to: JobState, *, owner: str | None = None, **fields: Any) -> Job:
        """Move a job to ``to`` if the state machine allows it from its current state. ``owner``: the
        worker that claimed it; if the job is no longer that worker's (recovered while it went silent, and
        maybe claimed by another), :class:`JobOwnershipLost` and nothing changes."""
        with self._tx() as db:
            row = self._row(db, "state, worker", job_id)
            if row is None:
                raise JobNotFound(f"no fine-tuning job {job_id!r}", param="job_id")
            current, worker = row
            if owner is not None and (current != "running" or worker != owner):
                raise JobOwnershipLost(f"job {job_id} is no longer worker {owner}'s (now {current}"
                                       f"{', worker ' + worker if worker else ''})")
            if to not in TRANSITIONS[current]:
                raise JobStateConflict(f"job {job_id} is {current}; it cannot become {to}")
            now = time.time()
            fields.setdefault("updated_at", now)
            if to in TERMINAL:
                fields.setdefault("finished_at", now)
            self._update(db, job_id, state=to, **fields)
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> None:
        fields.setdefault("updated_at", time.time())
        with self._tx() as db:
            self._update(db, job_id, **fields)

    @staticmethod
    def _update(db: Any, job_id: str, **fields: Any) -> None:
        for key in ("metrics", "data_report", "evals"):
            if key in fields and not isinstance(fields[key], str | None):
                fields[key] = json.dumps(fields[key])
        cols = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def merge_metrics(self, job_id: str, values: dict[str, Any], **fields: Any) -> None:
        with self._tx() as db:
            row = self._row(db, "metrics", job_id)
            metrics = json.loads(row[0] or "{}") if row else {}
            metrics.update(values)
            self._update(db, job_id, metrics=json.dumps(metrics), updated_at=time.time(), **fields)

    def start(self, job_id: str, worker: str, *, attempt: int, note: str = "") -> Job:
        """A worker holds the job now (its lease on the job queue): ``running``, on its ``attempt``-th run. From
        ``queued``, or from ``running`` when the worker that ran it before was lost (the run resumes from its
        last checkpoint). A job cancelled meanwhile is a :class:`JobStateConflict`."""
        with self._tx() as db:
            row = self._row(db, "state", job_id)
            if row is None:
                raise JobNotFound(f"no fine-tuning job {job_id!r}", param="job_id")
            if row[0] not in ("queued", "running"):
                raise JobStateConflict(f"job {job_id} is {row[0]}; it cannot run")
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = 'running', worker = ?, heartbeat_at = ?, started_at = COALESCE(started_at, "
                "?), attempts = ?, updated_at = ?, error = NULL, error_code = NULL WHERE id = ?",
                (worker, now, now, attempt, now, job_id))
        if note:
            self.append_log(job_id, note)
        self.append_log(job_id, f"claimed by worker {worker} (attempt {attempt})")
        return self.get(job_id)

    # -- evaluation of a succeeded job's adapter -----------------------------------------------------

    def queue_evals(self, job_id: str, *, suites: list[str] | None = None) -> Job:
        """Ask a worker to (re-)run the job's eval suites on its adapter. Refused while they run."""
        with self._tx() as db:
            row = self._row(db, "state, evals_state, evals, model_version", job_id)
            if row is None:
                raise JobNotFound(f"no fine-tuning job {job_id!r}", param="job_id")
            state, evals_state, before, model_version = row
            if state != "succeeded" or not model_version:
                raise JobStateConflict(f"job {job_id} is {state} with no registered adapter version; only a "
                                       "succeeded job's adapter can be evaluated")
            if evals_state == "running":
                raise JobStateConflict(f"the evals of job {job_id} are running now")
            # A fresh record: the verdicts of an earlier evaluation stay in the eval store and in MLflow.
            # ``seq`` numbers the evaluations of one job: each is its own job on the queue.
            seq = int((json.loads(before) if before else {}).get("seq", 0)) + 1
            evals = {"attempts": 0, "queued_at": time.time(), "suites_requested": suites, "seq": seq}
            self._update(db, job_id, evals_state="pending", evals=evals, updated_at=time.time())
        self.append_log(job_id, "evals queued")
        return self.get(job_id)

    def start_evals(self, job_id: str, worker: str) -> Job:
        """A worker evaluates the job's adapter now: evals ``running``, one more attempt. From ``pending``, or from
        ``running`` when the worker that evaluated it was lost (the eval runs resume)."""
        with self._tx() as db:
            row = self._row(db, "state, evals_state, evals", job_id)
            if row is None:
                raise JobNotFound(f"no fine-tuning job {job_id!r}", param="job_id")
            state, evals_state, before = row
            if state != "succeeded" or evals_state not in ("pending", "running"):
                raise JobStateConflict(f"job {job_id} has no evaluation waiting (evals {evals_state})")
            evals = json.loads(before) if before else {}
            evals["attempts"] = int(evals.get("attempts", 0)) + 1
            now = time.time()
            self._update(db, job_id, evals_state="running", evals=evals, worker=worker, heartbeat_at=now,
                         updated_at=now)
        job = self.get(job_id)
        self.append_log(job_id, f"evals claimed by worker {worker} (attempt {evals['attempts']})")
        return job

    def finish_evals(self, job_id: str, state: str, evals: dict[str, Any]) -> Job:
        """Record the evaluation outcome (``pending`` puts an interrupted one back in the queue)."""
        if state not in EVAL_STATES or state == "running":
            raise ValueError(f"not a final eval state: {state!r}")
        with self._tx() as db:
            row = self._row(db, "evals", job_id)
            if row is None:
                raise JobNotFound(f"no fine-tuning job {job_id!r}", param="job_id")
            merged = {**(json.loads(row[0]) if row[0] else {}), **evals}
            self._update(db, job_id, evals_state=state, evals=merged, worker=None, heartbeat_at=None,
                         updated_at=time.time())
        return self.get(job_id)

    def request_cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Running: flagged; the worker stops at the next step."""
        with self._tx() as db:
            row = self._row(db, "state, run_dir", job_id)
            if row is None:
                raise JobNotFound(f"no fine-tuning job {job_id!r}", param="job_id")
            state, run_dir = row
            now = time.time()
            if state == "queued":
                self._update(db, job_id, state="cancelled", cancel_requested=1, finished_at=now, updated_at=now)
            elif state == "running":
                self._update(db, job_id, cancel_requested=1, updated_at=now)
                with contextlib.suppress(OSError):
                    (Path(run_dir) / "CANCEL").touch()
            else:
                raise JobStateConflict(f"job {job_id} is already {state}; nothing to cancel")
        self.append_log(job_id, "cancel requested")
        return self.get(job_id)

    def fail_lost(self, job_id: str, message: str, *, evals_seq: int | None = None) -> Job | None:
        """The job queue gave up on the job (its workers were lost ``max_attempts`` times) or cancelled it while
        nobody ran it: record that on the job, unless it has ended already. ``evals_seq`` None: its training
        ended so; else that evaluation did (a newer one is left alone). Returns the job if it changed."""
        now = time.time()
        with self._tx() as db:
            row = self._row(db, "state, evals_state, evals, cancel_requested", job_id)
            if row is None:
                return None
            state, evals_state, before, cancel_requested = row
            if evals_seq is None and state in ("queued", "running"):
                if cancel_requested:
                    self._update(db, job_id, state="cancelled", finished_at=now, updated_at=now, worker=None)
                else:
                    self._update(db, job_id, state="failed", finished_at=now, updated_at=now, worker=None,
                                 error=message, error_code="worker_lost")
            elif evals_seq is not None and state == "succeeded" and evals_state in ("pending", "running"):
                evals = json.loads(before) if before else {}
                if int(evals.get("seq", 0)) != evals_seq:
                    return None
                evals.update(error=message, finished_at=now)
                self._update(db, job_id, evals_state="error", evals=evals, worker=None, heartbeat_at=None,
                             updated_at=now)
            else:
                return None
        self.append_log(job_id, f"recovery: {message}")
        return self.get(job_id)

    # -- logs and audit ----------------------------------------------------------------------------

    def log_path(self, job_id: str) -> Path:
        return self.runs_dir / job_id / "job.log"

    def append_log(self, job_id: str, line: str) -> None:
        path = self.log_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with path.open("a") as f:
            f.write(f"{stamp} [keel] {line}\n")

    def read_log(self, job_id: str, offset: int = 0, max_bytes: int = 1_000_000) -> tuple[str, int]:
        """Text from byte ``offset`` and the offset to continue from (for `logs -f`)."""
        self.get(job_id)  # 404 for unknown jobs
        path = self.log_path(job_id)
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(max_bytes)
        except FileNotFoundError:
            return "", offset
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def save_deployment(self, *, alias: str, model: str, version: str, backend: str, served_name: str,
                        adapter_path: str, fallback: str | None = None, actor: str = "") -> None:
        """Remember which adapter version serves as ``alias`` (restored at start-up and after vLLM restarts)."""
        with self._tx() as db:
            db.execute(f"INSERT INTO deployments ({', '.join(DEPLOYMENT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (alias) DO UPDATE SET "
                       + ", ".join(f"{c} = excluded.{c}" for c in DEPLOYMENT_COLUMNS if c != "alias"),
                       (alias, model, str(version), backend, served_name, adapter_path, fallback, time.time(), actor))

    def deployments(self) -> list[dict[str, Any]]:
        rows = self._file.read(f"SELECT {', '.join(DEPLOYMENT_COLUMNS)} FROM deployments")
        # sorted here: Postgres orders text by the database's locale, SQLite byte by byte
        return sorted((dict(zip(DEPLOYMENT_COLUMNS, r, strict=True)) for r in rows), key=lambda d: d["alias"])

    def delete_deployment(self, alias: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM deployments WHERE alias = ?", (alias,)).rowcount > 0

    def audit(self, *, actor: str, action: str, model: str | None = None, version: str | None = None,
              job_id: str | None = None, reason: str = "", details: dict[str, Any] | None = None,
              request_id: str | None = None) -> None:
        """One event of the ``adapters`` trail: subject the adapter (kind ``adapter``, name the model) or, without
        a model, the job (kind ``job``); ``subject_ref`` the job, ``to_ref`` the version, ``from_ref`` the
        version it replaced when ``details`` says (``from``)."""
        with self._tx() as db:
            self.append_audit(db, actor=actor, action=action, model=model, version=version, job_id=job_id,
                              reason=reason, details=details, request_id=request_id)
        self._prune_audit()

    @staticmethod
    def append_audit(db: Any, *, actor: str, action: str, model: str | None = None,
                     version: str | None = None, job_id: str | None = None, reason: str = "",
                     details: dict[str, Any] | None = None, request_id: str | None = None) -> None:
        """:meth:`audit` inside a transaction of this store's (``db``): the change and its event commit together."""
        details = details or {}
        before = details.get("from")
        audit.append(db, AuditEvent(
            trail=AUDIT_TRAIL, actor=actor, action=action, subject_kind="adapter" if model else "job",
            subject=model or job_id or "", subject_ref=job_id, to_ref=version,
            from_ref=before if isinstance(before, str | int) and not isinstance(before, bool) else None,
            reason=reason, details=details, request_id=request_id))

    def audit_log(self, *, model: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        events = self.audit_events(subject_kind="adapter" if model else None, subject=model or None, limit=limit)
        return [{"id": e.id, "at": e.at, "actor": e.actor, "action": e.action,
                 "model": e.subject if e.subject_kind == "adapter" else None, "version": e.to_ref,
                 "job_id": e.subject_ref, "reason": e.reason, "details": dict(e.details)} for e in events]

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        """The kernel's audit query (:func:`app.core.audit.select`'s filters) on the ``adapters`` trail."""
        return self._file.audit_events(**{**filters, "trail": AUDIT_TRAIL})

    def _prune_audit(self) -> None:
        if not self._audit_pruner.due():
            return
        if isinstance(self._file, SqliteFile):  # batch by batch, each under the write lock
            self._audit_pruner.run(self._file.db, lock=self._file.lock)
            return
        try:  # Postgres: the pass in one write transaction of the store's (each batch a savepoint)
            with self._file.tx() as db:
                self._audit_pruner.run(db.raw)
        except Exception:  # retention never fails the write before it; it runs again at the next check
            log.exception("could not apply the retention of the %s audit trail", AUDIT_TRAIL)


def open_job_store(settings: Any) -> JobStore:
    """The job store the settings name (``finetune.url``, else the SQLite file ``finetune.jobs_db``)."""
    fs = settings.finetune
    home = Path(settings.home)
    where = open_store_file(fs.url, fs.resolved_jobs_db(home), MIGRATIONS, what=WHAT, setting="finetune.url",
                            name="keel-finetune", with_audit=True, filled_by="jobs.url")
    return JobStore(where, fs.resolved_runs_dir(home), audit_retention=fs.audit_retention)
