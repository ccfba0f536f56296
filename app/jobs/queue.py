"""The job queue: durable jobs with a lease, on SQLite (one machine) or Postgres (several).

A job is a row: a ``kind`` (``ingest``, ``eval``), a JSON ``payload``, the ``owner`` that submitted it (an API
key id: only the owner or an admin sees and cancels it), a ``state``, ``attempts`` out of ``max_attempts``, a
JSON ``progress`` written while it runs, a ``result`` or an ``error`` (``{"code", "message"}``), timestamps,
and a lease: ``claimed_by`` (the worker running it) and ``heartbeat_at``. States::

    queued ──claim──▶ running ──complete──▶ succeeded
      │  ▲               │ ├──fail (no retry left, or not retryable)──▶ failed
      │  │               │ └──confirm_cancel──▶ cancelled
      │  └─fail (retry, after a backoff) / release (shutdown) / recover_stale (lease expired)─┘
      └──cancel──▶ cancelled        running ──cancel──▶ running + cancel_requested (the worker stops)

* :meth:`~JobQueue.claim` takes the oldest queued job of the given kinds whose ``run_after`` has come,
  exactly once however many workers race for it: SQLite takes its write lock first (``BEGIN IMMEDIATE``: the
  claimers of every process on the file take turns); Postgres locks the row with ``SELECT ... FOR UPDATE SKIP
  LOCKED`` (concurrent claimers skip it and take the next).
* Every call that a worker makes on a job it runs (heartbeat, progress, complete, fail, release,
  confirm_cancel) checks the lease in the same transaction: the job must still be ``running`` and claimed by
  that worker, else :class:`LeaseLost` (a worker silent for longer than the lease lost it to
  :meth:`~JobQueue.recover_stale`, and another worker may be running the job now).
* :meth:`~JobQueue.recover_stale` puts running jobs back in the queue whose heartbeat is older than the lease
  or whose worker is known dead (a process of this host that is gone): a job running when its process died
  runs again after the next start. A recovery counts as an attempt (a job that kills its worker every time
  must end), a graceful :meth:`~JobQueue.release` at shutdown does not.
* :meth:`~JobQueue.cancel`: a queued job is cancelled at once; a running one gets ``cancel_requested``, which
  its worker learns at its next heartbeat or progress write and stops.
* :meth:`~JobQueue.enqueue` with an ``idempotency_key``: the same owner sending the same key again gets the
  job of the first request (a retried POST does not run twice); the same key with another request is refused.

Timestamps are the clients' clocks (``time.time()``): workers on several machines need clocks in sync to well
under the lease (NTP gives milliseconds).

Why not procrastinate or pgqueuer: both are Postgres-only (they are built on LISTEN/NOTIFY, advisory locks
and PL/pgSQL), and Keel runs on one machine with SQLite and no server; one small queue with the same
contract on both databases (tests/unit/test_jobs_queue.py runs the same suite on both) is less than a second
queue for the SQLite case.

Cancellations are audited on the kernel's trail (:mod:`app.core.audit`, trail ``jobs``, in the queue's own
database, in the cancel's transaction): :meth:`~JobQueue.history`.

Schema: Alembic (``app/jobs/migrations``, version table ``alembic_version_jobs``; the audit table's own
migrations first), run when a queue opens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from app.core import audit
from app.core.audit import AuditEvent
from app.core.db import PostgresPool, enable_wal, write_transaction
from app.core.errors import Conflict, KeelError, NotFound
from app.core.migrate import Migrations, upgrade_postgres, upgrade_sqlite

MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_jobs",
                        pg_lock_key=0x6B65656C_6A6F)  # "keeljo"

TRAIL = "jobs"  # the audit trail of cancellations (who cancelled whose job)
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}$")
MAX_LIST = 1000


class LeaseLost(Conflict):
    """The job is no longer this worker's: it finished, was recovered while the worker was silent, or another
    worker runs it now. The worker must stop and write nothing more about it."""

    code = "job_lease_lost"


class JobCancelled(KeelError):
    """Raised inside a job whose cancellation was requested (the handler stops at a safe point)."""

    code = "job_cancelled"
    status = 409
    type = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    kind: str
    owner: str
    payload: dict[str, Any]
    state: JobState
    attempts: int
    max_attempts: int
    run_after: float
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    idempotency_key: str | None
    cancel_requested: bool
    claimed_by: str | None
    heartbeat_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def public(self) -> dict[str, Any]:
        """The job as API clients see it (the worker's id stays on the server)."""
        return {"id": self.id, "kind": self.kind, "owner": self.owner, "state": self.state,
                "payload": self.payload, "progress": self.progress, "result": self.result, "error": self.error,
                "attempts": self.attempts, "max_attempts": self.max_attempts,
                "cancel_requested": self.cancel_requested, "created_at": self.created_at,
                "started_at": self.started_at, "finished_at": self.finished_at, "updated_at": self.updated_at}


class JobQueue(Protocol):
    """Where jobs live (see the module docstring). Every method is one short transaction; the ones a worker
    calls on its job raise :class:`LeaseLost` when the job is no longer its own."""

    lease_s: float

    def enqueue(self, kind: str, payload: Mapping[str, Any], *, owner: str = "", idempotency_key: str | None = None,
                max_attempts: int | None = None) -> Job: ...

    def claim(self, kinds: Sequence[str], worker_id: str) -> Job | None: ...

    def heartbeat(self, job_id: str, worker_id: str) -> bool: ...

    def progress(self, job_id: str, worker_id: str, progress: Mapping[str, Any]) -> bool: ...

    def complete(self, job_id: str, worker_id: str, result: Mapping[str, Any] | None = None) -> Job: ...

    def fail(self, job_id: str, worker_id: str, error: Mapping[str, Any], *, retry: bool = True) -> Job: ...

    def release(self, job_id: str, worker_id: str) -> Job: ...

    def confirm_cancel(self, job_id: str, worker_id: str) -> Job: ...

    def cancel(self, job_id: str, *, owner: str | None = None, kinds: Sequence[str] | None = None,
               actor: str = "", request_id: str | None = None) -> Job: ...

    def history(self, job_id: str | None = None, limit: int = 100) -> list[AuditEvent]: ...

    def recover_stale(self, *, now: float | None = None) -> list[Job]: ...

    def get(self, job_id: str, *, owner: str | None = None, kinds: Sequence[str] | None = None) -> Job: ...

    def list(self, *, kinds: Sequence[str] | None = None, owner: str | None = None,
             states: Sequence[str] | None = None, limit: int = 50) -> list[Job]: ...

    def prune(self, *, older_than_s: float, now: float | None = None) -> int: ...

    def close(self) -> None: ...


# --- workers --------------------------------------------------------------------------------------------

_HOST = socket.gethostname()
_LIVE_WORKERS: set[str] = set()
_LIVE_LOCK = threading.Lock()


def new_worker_id() -> str:
    """``host:pid:token``, registered as live in this process until :func:`retire_worker`."""
    worker = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with _LIVE_LOCK:
        _LIVE_WORKERS.add(worker)
    return worker


def retire_worker(worker_id: str) -> None:
    with _LIVE_LOCK:
        _LIVE_WORKERS.discard(worker_id)


def worker_gone(worker_id: str | None) -> bool:
    """True when ``worker_id`` certainly runs nothing any more: a worker of this host whose process is gone, or
    one of this very process that was retired (or belonged to an earlier process with the same pid, as after a
    container restart). Workers of other hosts are judged by their heartbeat only."""
    if not worker_id:
        return True
    host, _, rest = worker_id.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        with _LIVE_LOCK:
            return worker_id not in _LIVE_WORKERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    # A killed child its parent has not reaped yet (the API's fine-tuning worker) is a zombie: gone for our purposes.
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    return False


# --- the SQL both queues share -------------------------------------------------------------------------

_COLUMNS = ("id", "kind", "owner", "payload", "state", "attempts", "max_attempts", "run_after", "progress", "result",
            "error", "idempotency_key", "cancel_requested", "claimed_by", "heartbeat_at", "created_at", "started_at",
            "finished_at", "updated_at")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM job_queue"


def _load(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _decode(row: Sequence[Any]) -> Job:
    r = dict(zip(_COLUMNS, row, strict=True))
    return Job(id=r["id"], kind=r["kind"], owner=r["owner"], payload=_load(r["payload"]), state=r["state"],
               attempts=int(r["attempts"]), max_attempts=int(r["max_attempts"]), run_after=float(r["run_after"]),
               progress=_load(r["progress"]) or {}, result=_load(r["result"]), error=_load(r["error"]),
               idempotency_key=r["idempotency_key"], cancel_requested=bool(r["cancel_requested"]),
               claimed_by=r["claimed_by"], heartbeat_at=r["heartbeat_at"], created_at=float(r["created_at"]),
               started_at=r["started_at"], finished_at=r["finished_at"], updated_at=float(r["updated_at"]))


def _dump(value: Any, *, strict: bool = False) -> str | None:
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=None if strict else str)


def _error(error: Mapping[str, Any] | BaseException | str) -> dict[str, Any]:
    if isinstance(error, KeelError):
        return {"code": error.code, "message": error.message}
    if isinstance(error, BaseException):
        return {"code": "internal_error", "message": f"{type(error).__name__}: {error}"}
    if isinstance(error, str):
        return {"code": "internal_error", "message": error}
    return {"code": "internal_error", "message": "", **dict(error)}


class _SqlJobQueue:
    """The queue's SQL; a subclass gives it a transaction and a reader, and its dialect's bits."""

    _mark = "?"
    _json = "?"
    _for_update = ""  # locks the row read in a transaction (Postgres); SQLite's BEGIN IMMEDIATE already did
    _skip_locked = ""

    def __init__(self, *, lease_s: float = 60.0, max_attempts: int = 3, retry_backoff_s: float = 5.0,
                 retry_backoff_max_s: float = 300.0) -> None:
        if lease_s <= 0 or max_attempts < 1:
            raise ValueError("lease_s must be positive and max_attempts at least 1")
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s

    def _tx(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def backoff(self, attempts: int) -> float:
        """Seconds before the retry that follows the ``attempts``-th failed run: the base, doubling."""
        return min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** max(0, attempts - 1))

    # -- submitters ----------------------------------------------------------------------------------------

    def enqueue(self, kind: str, payload: Mapping[str, Any], *, owner: str = "", idempotency_key: str | None = None,
                max_attempts: int | None = None) -> Job:
        if not _KIND.match(kind or ""):
            raise ValueError(f"job kind {kind!r} must be a short lower-case name")
        try:
            body = _dump(dict(payload), strict=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"a job's payload must be JSON: {e}") from None
        attempts = self.max_attempts if max_attempts is None else max_attempts
        if attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        m, j = self._mark, self._json
        now = time.time()
        job_id = uuid.uuid4().hex[:16]
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO job_queue (id, kind, owner, payload, state, attempts, max_attempts, run_after, progress, "
                f"idempotency_key, cancel_requested, created_at, updated_at) VALUES ({m}, {m}, {m}, {j}, 'queued', 0, "
                f"{m}, {m}, {j}, {m}, 0, {m}, {m}) ON CONFLICT (owner, idempotency_key) DO NOTHING",
                (job_id, kind, owner, body, attempts, now, "{}", idempotency_key, now, now))
            if cur.rowcount == 1:
                return Job(job_id, kind, owner, json.loads(body or "{}"), "queued", 0, attempts, now, {}, None, None,
                           idempotency_key, False, None, None, now, None, None, now)
            row = db.execute(f"{_SELECT} WHERE owner = {m} AND idempotency_key = {m}",
                             (owner, idempotency_key)).fetchone()
        job = _decode(row)
        if job.kind != kind or job.payload != json.loads(body or "{}"):
            raise Conflict(f"idempotency key {idempotency_key!r} was used for another request (job {job.id}); "
                           "use a new key for a new request", param="Idempotency-Key", code="idempotency_key_reused")
        return job

    def cancel(self, job_id: str, *, owner: str | None = None, kinds: Sequence[str] | None = None,
               actor: str = "", request_id: str | None = None) -> Job:
        """Cancel ``job_id`` (visible to ``owner``; None: any owner's). The request is audited (trail ``jobs``)
        in the same transaction: who cancelled whose job, and whether it was queued or running."""
        m = self._mark
        now = time.time()
        with self._tx() as db:
            job = self._visible(db.execute(f"{_SELECT} WHERE id = {m}{self._for_update}", (job_id,)).fetchone(),
                                job_id, owner, kinds)
            if job.state == "cancelled" or (job.state == "running" and job.cancel_requested):
                return job
            if job.state == "queued":
                db.execute(f"UPDATE job_queue SET state = 'cancelled', cancel_requested = 1, finished_at = {m}, "
                           f"updated_at = {m} WHERE id = {m}", (now, now, job_id))
                after = replace(job, state="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
            elif job.state == "running":
                db.execute(f"UPDATE job_queue SET cancel_requested = 1, updated_at = {m} WHERE id = {m}",
                           (now, job_id))
                after = replace(job, cancel_requested=True, updated_at=now)
            else:
                after = None
            if after is not None:
                audit.append(db, AuditEvent(
                    trail=TRAIL, action="job.cancel", subject_kind=job.kind, subject=job.id, actor=actor,
                    from_ref=job.state, to_ref=after.state if after.state == "cancelled" else "cancel_requested",
                    details={"owner": job.owner, "attempts": job.attempts}, request_id=request_id), now=now)
                return after
        raise Conflict(f"job {job_id} has already {job.state}; there is nothing to cancel", param="job_id",
                       code="job_finished")

    def history(self, job_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """Audited cancellations, newest first (of one job, or all)."""
        return self.audit_events(subject=job_id, limit=limit)

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        """The jobs trail's events, newest first (filters: :func:`app.core.audit.select`'s)."""
        sql, args = audit.select(postgres=self._mark == "%s", trail=TRAIL, **filters)
        return [audit.decode(r) for r in self._read(sql, args)]

    def get(self, job_id: str, *, owner: str | None = None, kinds: Sequence[str] | None = None) -> Job:
        rows = self._read(f"{_SELECT} WHERE id = {self._mark}", (job_id,))
        return self._visible(rows[0] if rows else None, job_id, owner, kinds)

    def list(self, *, kinds: Sequence[str] | None = None, owner: str | None = None,
             states: Sequence[str] | None = None, limit: int = 50) -> list[Job]:
        where, args = [], []
        for column, values in (("kind", kinds), ("state", states)):
            if values is not None:
                if not values:
                    return []
                where.append(f"{column} IN ({', '.join([self._mark] * len(values))})")
                args.extend(values)
        if owner is not None:
            where.append(f"owner = {self._mark}")
            args.append(owner)
        sql = _SELECT + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += f" ORDER BY created_at DESC, id DESC LIMIT {self._mark}"
        return [_decode(r) for r in self._read(sql, (*args, max(1, min(int(limit), MAX_LIST))))]

    @staticmethod
    def _visible(row: Sequence[Any] | None, job_id: str, owner: str | None, kinds: Sequence[str] | None) -> Job:
        """The job, if the caller may see it (``owner`` None: an admin, every owner); else 404, so that
        nobody learns the ids of other owners' jobs."""
        job = _decode(row) if row is not None else None
        if job is None or (owner is not None and job.owner != owner) or (kinds is not None and job.kind not in kinds):
            raise NotFound(f"no job {job_id!r}", param="job_id")
        return job

    # -- workers -------------------------------------------------------------------------------------------

    def claim(self, kinds: Sequence[str], worker_id: str) -> Job | None:
        if not kinds:
            return None
        m = self._mark
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                f"{_SELECT} WHERE state = 'queued' AND kind IN ({', '.join([m] * len(kinds))}) AND run_after <= {m} "
                f"ORDER BY created_at, id LIMIT 1{self._skip_locked}", (*kinds, now)).fetchone()
            if row is None:
                return None
            job = _decode(row)
            started = job.started_at or now
            db.execute(f"UPDATE job_queue SET state = 'running', claimed_by = {m}, heartbeat_at = {m}, attempts = "
                       f"attempts + 1, started_at = {m}, updated_at = {m} WHERE id = {m}",
                       (worker_id, now, started, now, job.id))
        return replace(job, state="running", claimed_by=worker_id, heartbeat_at=now, attempts=job.attempts + 1,
                       started_at=started, updated_at=now)

    def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """Extend the lease; True when a cancel was requested (the worker should stop)."""
        return self._beat(job_id, worker_id, None)

    def progress(self, job_id: str, worker_id: str, progress: Mapping[str, Any]) -> bool:
        """Record the job's progress (replacing the last), which also extends the lease; True when a cancel
        was requested."""
        return self._beat(job_id, worker_id, dict(progress))

    def _beat(self, job_id: str, worker_id: str, progress: dict[str, Any] | None) -> bool:
        m = self._mark
        now = time.time()
        sets, args = f"heartbeat_at = {m}, updated_at = {m}", [now, now]
        if progress is not None:
            sets += f", progress = {self._json}"
            args.append(_dump(progress))
        with self._tx() as db:
            cur = db.execute(f"UPDATE job_queue SET {sets} WHERE id = {m} AND state = 'running' AND claimed_by = {m}",
                             (*args, job_id, worker_id))
            if cur.rowcount != 1:
                raise _lost(job_id, worker_id)
            return bool(db.execute(f"SELECT cancel_requested FROM job_queue WHERE id = {m}", (job_id,)).fetchone()[0])

    def complete(self, job_id: str, worker_id: str, result: Mapping[str, Any] | None = None) -> Job:
        return self._finish(job_id, worker_id, lambda job, now: {
            "state": "succeeded", "result": dict(result) if result is not None else None, "finished_at": now})

    def fail(self, job_id: str, worker_id: str, error: Mapping[str, Any] | BaseException | str, *,
             retry: bool = True) -> Job:
        """Record a failed run: queued again after a backoff while attempts remain (and ``retry``), else
        failed. A job whose cancel was requested is cancelled instead: nobody wants it retried."""
        err = _error(error)

        def outcome(job: Job, now: float) -> dict[str, Any]:
            if job.cancel_requested:
                return {"state": "cancelled", "error": err, "finished_at": now}
            if retry and job.attempts < job.max_attempts:
                return {"state": "queued", "error": err, "claimed_by": None, "heartbeat_at": None,
                        "run_after": now + self.backoff(job.attempts)}
            return {"state": "failed", "error": err, "finished_at": now}

        return self._finish(job_id, worker_id, outcome)

    def release(self, job_id: str, worker_id: str) -> Job:
        """Give the job back unfinished (the worker is shutting down): queued at once, this run not counted as
        an attempt; the next worker starts it again (handlers resume what the last run did)."""
        return self._finish(job_id, worker_id, lambda job, now: (
            {"state": "cancelled", "finished_at": now} if job.cancel_requested else
            {"state": "queued", "claimed_by": None, "heartbeat_at": None, "run_after": now,
             "attempts": max(0, job.attempts - 1)}))

    def confirm_cancel(self, job_id: str, worker_id: str) -> Job:
        """The worker stopped the job because its cancel was requested."""
        return self._finish(job_id, worker_id, lambda job, now: {"state": "cancelled", "finished_at": now})

    def _finish(self, job_id: str, worker_id: str, outcome: Any) -> Job:
        m = self._mark
        now = time.time()
        with self._tx() as db:
            row = db.execute(f"{_SELECT} WHERE id = {m}{self._for_update}", (job_id,)).fetchone()
            job = _decode(row) if row is not None else None
            if job is None or job.state != "running" or job.claimed_by != worker_id:
                raise _lost(job_id, worker_id, job)
            changes = {**outcome(job, now), "updated_at": now}
            self._update(db, job_id, changes)
        return replace(job, **changes)

    def _update(self, db: Any, job_id: str, changes: Mapping[str, Any]) -> None:
        sets, args = [], []
        for column, value in changes.items():
            if column in ("payload", "progress", "result", "error"):
                sets.append(f"{column} = {self._json}")
                args.append(_dump(value))
            else:
                sets.append(f"{column} = {self._mark}")
                args.append(value)
        db.execute(f"UPDATE job_queue SET {', '.join(sets)} WHERE id = {self._mark}", (*args, job_id))

    # -- housekeeping --------------------------------------------------------------------------------------

    def recover_stale(self, *, now: float | None = None) -> list[Job]:
        """Running jobs whose worker is gone (heartbeat older than the lease, or a dead process of this host):
        back to the queue (the run counts as an attempt), failed when no attempt is left, cancelled when a
        cancel was requested. Returns the jobs moved, as they are now. ``now`` (tests) only decides who is
        silent; the moved jobs are stamped with the real time."""
        clock = time.time()
        now = clock if now is None else now
        moved: list[Job] = []
        with self._tx() as db:
            rows = db.execute(f"{_SELECT} WHERE state = 'running'{self._skip_locked}").fetchall()
            for job in map(_decode, rows):
                silent = job.heartbeat_at is None or now - job.heartbeat_at > self.lease_s
                gone = worker_gone(job.claimed_by)
                if not (silent or gone):
                    continue
                why = (f"its worker {job.claimed_by} is gone" if gone else
                       f"its worker {job.claimed_by} was silent for {now - (job.heartbeat_at or 0):.0f} s "
                       f"(lease {self.lease_s:.0f} s)")
                err = {"code": "worker_lost", "message": f"attempt {job.attempts} stopped: {why}"}
                if job.cancel_requested:
                    changes: dict[str, Any] = {"state": "cancelled", "finished_at": clock}
                elif job.attempts >= job.max_attempts:
                    err["message"] += f"; {job.attempts} of {job.max_attempts} attempts used"
                    changes = {"state": "failed", "error": err, "finished_at": clock}
                else:
                    changes = {"state": "queued", "error": err, "claimed_by": None, "heartbeat_at": None,
                               "run_after": clock}
                changes["updated_at"] = clock
                self._update(db, job.id, changes)
                moved.append(replace(job, **changes))
        return moved

    def prune(self, *, older_than_s: float, now: float | None = None) -> int:
        """Delete finished jobs that finished more than ``older_than_s`` ago; returns how many."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._tx() as db:
            cur = db.execute("DELETE FROM job_queue WHERE state IN ('succeeded', 'failed', 'cancelled') AND "
                             f"finished_at < {self._mark}", (cutoff,))
            return max(0, cur.rowcount)


def _lost(job_id: str, worker_id: str, job: Job | None = None) -> LeaseLost:
    now = f"it is {job.state}" + (f", claimed by {job.claimed_by}" if job.claimed_by else "") if job else "it is gone"
    return LeaseLost(f"job {job_id} is no longer run by {worker_id}: {now}", param="job_id")


class SqliteJobQueue(_SqlJobQueue):
    """One file for every process of one machine; claims serialised by SQLite's write lock."""

    def __init__(self, path: Path | str, **options: Any) -> None:
        super().__init__(**options)
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        if self.path != ":memory:":
            enable_wal(self._db)
        audit.ensure_schema_sqlite(self._db)
        upgrade_sqlite(self._db, MIGRATIONS)

    def _tx(self) -> Any:
        return write_transaction(self._db, self._lock)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresJobQueue(_SqlJobQueue):
    """One table for API processes on several machines; claims with ``FOR UPDATE SKIP LOCKED``."""

    _mark = "%s"
    _json = "%s::jsonb"
    _for_update = " FOR UPDATE"
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, *, timeout_s: float = 10.0, pool_size: int = 8, **options: Any) -> None:
        super().__init__(**options)

        def migrate(timeout: float) -> None:
            audit.ensure_schema_postgres(url, connect_timeout_s=timeout)
            upgrade_postgres(url, MIGRATIONS, connect_timeout_s=timeout)

        self._pg = PostgresPool(url, whose="the job queue's", setting="jobs.url", name="keel-jobs",
                                migrate=migrate, max_size=pool_size, timeout_s=timeout_s)

    def _tx(self):
        return self._pg.transaction()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return self._pg.read(sql, args)

    def close(self) -> None:
        self._pg.close()


def open_queue(settings: Any, home: Path) -> JobQueue:
    """The queue ``settings`` (:class:`~app.jobs.settings.JobSettings`) describe: Postgres when ``url`` is set,
    else the SQLite file (``<home>/jobs.db`` by default)."""
    options = {"lease_s": settings.lease_s, "max_attempts": settings.max_attempts,
               "retry_backoff_s": settings.retry_backoff_s, "retry_backoff_max_s": settings.retry_backoff_max_s}
    if settings.url is not None:
        return PostgresJobQueue(settings.url.get_secret_value(), **options)
    return SqliteJobQueue(settings.resolved_db_path(home), **options)
