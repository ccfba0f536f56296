"""One audit trail for every Keel feature: one event type, one table, one way to append, query and retain.

Every audited change — a guardrail decision, a prompt version or label move, an adapter promotion, a release
step — is an :class:`AuditEvent`: **who** (``actor``), **what** (``action``), **on what** (``subject_kind``,
``subject`` and an optional ``subject_ref``: a label, a job id, a registered validator), **from → to**
(``from_ref``, ``to_ref``: versions, aliases), **why** (``reason``), ``details`` (JSON), the ``request_id`` it
came from and **when** (``at``, unix seconds). Each feature's events form a *trail* (``guardrails``,
``prompts``, ``adapters``, ``releases``) and live in the ``audit_events`` table of that feature's own
database, next to the rows they audit, so that an event can commit in the same transaction as its change.

Three ways in, one table:

* :func:`append` writes events on the caller's connection (sqlite3 or psycopg, connection or cursor) inside
  whatever transaction the caller holds: an audited change and its audit row commit together or not at all.
* :class:`BufferedWriter` is for high-volume events (guardrail decisions): a request only hands its events
  over; one thread writes them in batches, at ``interval_s`` (or sooner when ``max_batch`` are waiting), on
  :meth:`~BufferedWriter.flush` and on :meth:`~BufferedWriter.close`. An accepted event leaves the buffer only
  once its batch is written, so the writer thread dying mid-write loses nothing: the next ``submit`` starts
  a new thread, and ``close`` (or, if nobody closes it, the interpreter's exit) writes what is left on the
  caller's thread. What a *process* kill loses is the events of the last ``interval_s`` at most.
* :func:`query` (newest first) filters by trail, subject, actor, action, request id, time range and top-level
  ``details`` keys.

Retention (:class:`AuditRetention`, one per trail, configured in each feature's settings section) is applied
by :class:`Pruner`: on open and then every ``check_interval_s``, in batches of ``batch`` rows, each batch its
own short transaction, touching at most ``batch`` rows. It deletes a trail's oldest rows that are older than
``max_age_days``, and the oldest beyond its newest ``max_rows`` but never one younger than ``min_age_days``
(a flood of events cannot push the last day's out). Rows younger than the limits are never deleted. Rows are
taken oldest id first and a pass stops at the first row it must keep, so a row that arrived out of time order
(a buffered decision stamped before a later-written one) waits for the rows before it.

The schema is Alembic's (``app/core/audit_migrations``, version table ``alembic_version_audit``): a store
calls :func:`ensure_schema_sqlite` (or :func:`ensure_schema_postgres`) on its database *before* its own
migrations, so that a store revision may move its old audit rows into ``audit_events``.

Kernel module: the standard library, pydantic and :mod:`app.core.migrate` only.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from app.core.migrate import Migrations, upgrade_postgres, upgrade_sqlite

log = logging.getLogger("keel.audit")

# The advisory lock key (Postgres) of the audit schema's migrations: "keelau".
MIGRATIONS = Migrations(Path(__file__).with_name("audit_migrations"), "alembic_version_audit",
                        pg_lock_key=0x6B65656C_6175)

TABLE = "audit_events"
COLUMNS = ("id", "trail", "at", "actor", "action", "subject_kind", "subject", "subject_ref", "from_ref", "to_ref",
           "reason", "details", "request_id")
_INSERT_COLUMNS = COLUMNS[1:]
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}$")
_DETAIL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_QUERY_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited event. ``at`` 0 means "now" (stamped when appended); ``id`` is the table's, when read."""

    trail: str
    action: str
    subject_kind: str = ""
    subject: str = ""
    actor: str = ""
    subject_ref: str | None = None
    from_ref: str | None = None
    to_ref: str | None = None
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    at: float = 0.0
    id: int | None = None


# --- schema -------------------------------------------------------------------------------------------


def ensure_schema_sqlite(conn: sqlite3.Connection) -> bool:
    """Bring the audit table of the database behind ``conn`` to head (see :func:`app.core.migrate.upgrade_sqlite`:
    ``conn`` in autocommit mode, outside a transaction). True if anything had to run."""
    return upgrade_sqlite(conn, MIGRATIONS)


def ensure_schema_postgres(url: str, *, connect_timeout_s: float = 10.0) -> bool:
    """The same for a Postgres database (its own connection, under the audit schema's advisory lock)."""
    return upgrade_postgres(url, MIGRATIONS, connect_timeout_s=connect_timeout_s)


# --- append -------------------------------------------------------------------------------------------


def append(conn: Any, *events: AuditEvent, now: float | None = None) -> int:
    """Write ``events`` on ``conn`` (a sqlite3 or psycopg connection or cursor, or a store's transaction) in the
    transaction it holds; nothing is committed here. Returns the number written."""
    if not events:
        return 0
    conn = getattr(conn, "raw", conn)  # a store's PostgresTx (app.core.db): its psycopg connection
    stamp = time.time() if now is None else now
    rows = [_row(e, stamp) for e in events]
    sql = _INSERT_PG if _is_postgres(conn) else _INSERT_SQLITE
    if len(rows) == 1:
        conn.execute(sql, rows[0])
    elif hasattr(conn, "executemany"):
        conn.executemany(sql, rows)
    else:  # a psycopg connection: executemany lives on its cursors
        with conn.cursor() as cur:
            cur.executemany(sql, rows)
    return len(rows)


_INSERT = f"INSERT INTO {TABLE} ({', '.join(_INSERT_COLUMNS)}) VALUES "
_INSERT_SQLITE = _INSERT + f"({', '.join('?' * len(_INSERT_COLUMNS))})"
_INSERT_PG = _INSERT + f"({', '.join(['%s'] * (len(_INSERT_COLUMNS) - 2))}, %s::jsonb, %s)"


def _row(e: AuditEvent, now: float) -> tuple[Any, ...]:
    if not _NAME.match(e.trail or ""):
        raise ValueError(f"audit trail {e.trail!r} must be a short lower-case name")
    if not e.action:
        raise ValueError("an audit event needs an action")
    return (e.trail, e.at or now, e.actor or "", e.action, e.subject_kind or "", e.subject or "",
            _ref(e.subject_ref), _ref(e.from_ref), _ref(e.to_ref),
            (e.reason or "").replace("\x00", "\ufffd"),  # a tool's output, say: Postgres text holds no NUL
            json.dumps(dict(e.details or {}), sort_keys=True, default=str, separators=(",", ":")), e.request_id)


def _ref(value: Any) -> str | None:
    return None if value is None else str(value)


def _is_postgres(conn: Any) -> bool:
    if isinstance(conn, sqlite3.Connection | sqlite3.Cursor):
        return False
    return type(conn).__module__.split(".")[0] == "psycopg"


# --- query --------------------------------------------------------------------------------------------


def select(*, postgres: bool = False, trail: str | None = None, subject_kind: str | None = None,
           subject: str | None = None, subject_ref: str | None = None, actor: str | None = None,
           action: str | None = None, request_id: str | None = None, since: float | None = None,
           until: float | None = None, before_id: int | None = None, details: Mapping[str, Any] | None = None,
           limit: int = 100) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of :func:`query` (for a store that runs its reads through its own pool).

    Every filter is optional and exact; ``since`` and ``until`` bound ``at`` (unix seconds, inclusive);
    ``before_id`` pages (ids below it); ``details`` matches top-level keys of the details JSON."""
    mark = "%s" if postgres else "?"
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("trail", trail), ("subject_kind", subject_kind), ("subject", subject),
                          ("subject_ref", subject_ref), ("actor", actor), ("action", action),
                          ("request_id", request_id)):
        if value is not None:
            where.append(f"{column} = {mark}")
            args.append(str(value))
    for clause, value in ((f"at >= {mark}", since), (f"at <= {mark}", until), (f"id < {mark}", before_id)):
        if value is not None:
            where.append(clause)
            args.append(value)
    for key, value in (details or {}).items():
        if not _DETAIL_KEY.match(key):
            raise ValueError(f"details filter key {key!r} must be a plain identifier")
        if value is None:
            continue
        if postgres:
            where.append(f"details ->> {mark} = {mark}")
            args += [key, json.dumps(value) if isinstance(value, bool) else str(value)]
        else:
            where.append(f"json_extract(details, '$.{key}') = {mark}")
            args.append(int(value) if isinstance(value, bool) else value)
    sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return f"{sql} ORDER BY id DESC LIMIT {mark}", (*args, max(1, min(int(limit), MAX_QUERY_LIMIT)))


def query(conn: Any, **filters: Any) -> list[AuditEvent]:
    """Events on ``conn`` (sqlite3 or psycopg), newest first; the filters are :func:`select`'s."""
    sql, args = select(postgres=_is_postgres(conn), **filters)
    return [decode(r) for r in conn.execute(sql, args).fetchall()]


def decode(row: Sequence[Any]) -> AuditEvent:
    """A row of :data:`COLUMNS`, in that order, as an event."""
    details = row[11]
    if isinstance(details, str | bytes):
        details = json.loads(details) if details else {}
    return AuditEvent(id=row[0], trail=row[1], at=row[2], actor=row[3], action=row[4], subject_kind=row[5],
                      subject=row[6], subject_ref=row[7], from_ref=row[8], to_ref=row[9], reason=row[10] or "",
                      details=details or {}, request_id=row[12])


# --- retention ----------------------------------------------------------------------------------------


class AuditRetention(BaseModel):
    """How long one audit trail keeps its events (a field of each feature's settings section).

    Rows are deleted only when older than ``max_age_days``, or beyond the newest ``max_rows`` *and* older than
    ``min_age_days``; both unset keeps everything."""

    max_age_days: float | None = Field(default=None, gt=0, description="Delete events older than this; "
                                       "unset: no age limit.")
    max_rows: int | None = Field(default=None, ge=1, description="Keep about this many of the newest events "
                                 "(older ones beyond it go, once older than min_age_days); unset: no row limit.")
    min_age_days: float = Field(default=1.0, ge=0, description="max_rows never deletes an event younger than "
                                "this: a burst of events cannot push the last day's out of the trail.")
    check_interval_s: float = Field(default=3600.0, gt=0, description="How often a process applies the limits "
                                    "(and once when its store opens).")

    @property
    def keeps_everything(self) -> bool:
        return self.max_age_days is None and self.max_rows is None


@dataclass
class PruneResult:
    deleted: int = 0
    more: bool = False  # stopped at the batch bound with rows still over the limits


def prune(conn: Any, trail: str, retention: AuditRetention, *, now: float | None = None, batch: int = 5000,
          max_batches: int = 10, lock: threading.Lock | threading.RLock | None = None) -> PruneResult:
    """Apply ``retention`` to ``trail`` on ``conn`` (sqlite3 in autocommit mode, or a psycopg connection in
    autocommit mode): each batch is one short transaction of at most ``batch`` rows, oldest first, and at most
    ``max_batches`` run. ``lock`` (the store's connection lock) is taken per batch, not for the whole pass."""
    out = PruneResult()
    if retention.keeps_everything:
        return out
    now = time.time() if now is None else now
    pg = _is_postgres(conn)
    mark = "%s" if pg else "?"
    age_cut = now - retention.max_age_days * 86400 if retention.max_age_days is not None else None
    floor = now - retention.min_age_days * 86400
    held = lock or _NO_LOCK
    with held:  # the newest id beyond max_rows (ids only grow: "the oldest rows" are the lowest ids)
        beyond = _beyond_max_rows(conn, trail, retention.max_rows, mark) if retention.max_rows else None
    if age_cut is None and beyond is None:
        return out

    def doomed(rid: int, at: float) -> bool:
        return (age_cut is not None and at < age_cut) or (beyond is not None and rid <= beyond and at < floor)

    for _ in range(max_batches):
        with held:
            first = conn.execute(f"SELECT id, at FROM {TABLE} WHERE trail = {mark} ORDER BY id LIMIT 1",
                                 (trail,)).fetchone()
            if first is None or not doomed(*first):  # the common case: nothing over the limits, one row read
                return out
            rows = conn.execute(f"SELECT id, at FROM {TABLE} WHERE trail = {mark} ORDER BY id LIMIT {mark}",
                                (trail, batch)).fetchall()
            ids = []
            for rid, at in rows:
                if not doomed(rid, at):
                    break  # the first row to keep: the rest are younger (or within the cap); a later pass goes on
                ids.append(rid)
            _delete(conn, ids, pg)
        out.deleted += len(ids)
        if len(ids) < batch:
            return out
    out.more = True
    return out


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


def _beyond_max_rows(conn: Any, trail: str, max_rows: int, mark: str) -> int | None:
    # Cheap first: ids are dense within a trail of its own file, so a span within the cap means nothing to do.
    lo = conn.execute(f"SELECT min(id) FROM {TABLE} WHERE trail = {mark}", (trail,)).fetchone()[0]
    hi = conn.execute(f"SELECT max(id) FROM {TABLE} WHERE trail = {mark}", (trail,)).fetchone()[0]
    if lo is None or hi - lo + 1 <= max_rows:
        return None
    row = conn.execute(f"SELECT id FROM {TABLE} WHERE trail = {mark} ORDER BY id DESC LIMIT 1 OFFSET {mark}",
                       (trail, max_rows)).fetchone()
    return row[0] if row else None


def _delete(conn: Any, ids: list[int], pg: bool) -> None:
    if pg:
        with conn.transaction():
            conn.execute(f"DELETE FROM {TABLE} WHERE id = ANY(%s)", (ids,))
        return
    own_tx = not conn.in_transaction
    if own_tx:
        conn.execute("BEGIN IMMEDIATE")
    try:
        for i in range(0, len(ids), 500):  # bound the parameter count
            chunk = ids[i:i + 500]
            conn.execute(f"DELETE FROM {TABLE} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
    except BaseException:
        if own_tx:
            conn.execute("ROLLBACK")
        raise
    if own_tx:
        conn.execute("COMMIT")


class Pruner:
    """When to apply one trail's retention: :meth:`due` is one clock read, so stores call it after every write.
    The first call is due at once (on open); then every ``check_interval_s``, or after 1 s while a pass
    stopped at its batch bound with rows still to delete."""

    def __init__(self, trail: str, retention: AuditRetention | None) -> None:
        self.trail = trail
        self.retention = retention or AuditRetention()
        self._next = 0.0

    def due(self) -> bool:
        return not self.retention.keeps_everything and time.monotonic() >= self._next

    def run(self, conn: Any, *, lock: threading.Lock | threading.RLock | None = None,
            max_batches: int = 10) -> PruneResult:
        self._next = time.monotonic() + self.retention.check_interval_s  # a failed pass waits its turn too
        try:
            result = prune(conn, self.trail, self.retention, lock=lock, max_batches=max_batches)
        except Exception:  # retention must never fail a write; it runs again at the next check
            log.exception("could not apply the retention of the %s audit trail", self.trail)
            return PruneResult()
        if result.more:
            self._next = time.monotonic() + 1.0
        if result.deleted:
            log.info("audit retention: %d %s event(s) deleted%s", result.deleted, self.trail,
                     " (more to go)" if result.more else "")
        return result


# --- the buffered writer ------------------------------------------------------------------------------

T = TypeVar("T")

_LIVE: weakref.WeakSet[BufferedWriter[Any]] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    """A writer nobody closed still writes what it accepted before the interpreter (and its thread) goes."""
    for writer in list(_LIVE):
        try:
            writer.close(timeout=10.0)
        except Exception:  # exiting anyway; say what was lost
            log.exception("could not write the audit events left in %s at exit", writer.name)


class BufferedWriter(Generic[T]):
    """Hands items (audit events, or a feature's records) to ``sink`` in batches, on one background thread.

    ``submit`` only appends to a buffer (a lock and a list append; never I/O) and returns whether the items
    were *accepted*: it refuses (and counts in :attr:`refused`) only when ``max_pending`` items are already
    waiting, so a database that stopped answering costs bounded memory (after :meth:`close` it writes directly,
    once). Accepted items stay in the buffer until
    ``sink`` has returned for their batch; a batch whose ``sink`` raises is tried again after each of
    ``retry_delays_s``, then logged and dropped (counted in :attr:`dropped`): the audit never takes a request
    down. If the thread itself dies (anything that is not an ``Exception``), its batch is still buffered: the
    next ``submit`` or ``flush`` starts a new thread, ``close`` writes the rest itself.
    """

    def __init__(self, sink: Callable[[list[T]], object], *, interval_s: float = 0.1, max_batch: int = 2000,
                 max_pending: int = 200_000, retry_delays_s: Sequence[float] = (0.05, 0.25),
                 name: str = "keel-audit", what: str = "audit events") -> None:
        self._sink = sink
        self.interval_s = max(0.0, float(interval_s))
        self.max_batch = max(1, int(max_batch))
        self.max_pending = max(1, int(max_pending))
        self.retry_delays_s = tuple(retry_delays_s)
        self.name = name
        self._what = what
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  # one sink call at a time (the thread, or close() after it died)
        self._pending: list[T] = []
        self._oldest = 0.0  # monotonic time the oldest pending item arrived
        self._accepted = 0
        self._done = 0  # items written or dropped
        self._flush_upto = 0
        self._closing = False
        self._closed = False
        self.written = 0
        self.dropped = 0
        self.refused = 0
        self._thread: threading.Thread | None = None
        self._start()
        _LIVE.add(self)

    # -- the request side --------------------------------------------------------------------------

    def submit(self, items: Iterable[T]) -> bool:
        items = list(items)
        if not items:
            return True
        with self._cond:
            closed = self._closed or self._closing
        if closed:  # a request finishing during shutdown: one direct try, never an error for the request
            try:
                self._sink(items)
            except Exception as e:
                self.refused += len(items)
                log.error("%s is closed and could not write %d late %s (%s)", self.name, len(items), self._what, e)
                return False
            self.written += len(items)
            return True
        with self._cond:
            if len(self._pending) + len(items) > self.max_pending:
                first = self.refused == 0
                self.refused += len(items)
                if first or self.refused // 10_000 != (self.refused - len(items)) // 10_000:
                    log.error("%s: %d %s waiting, refusing more (%d refused so far): is the database writable?",
                              self.name, len(self._pending), self._what, self.refused)
                return False
            first = not self._pending
            if first:
                self._oldest = time.monotonic()
            self._pending.extend(items)
            self._accepted += len(items)
            if first or len(self._pending) >= self.max_batch:  # wake the writer: its interval starts now
                self._cond.notify_all()
            alive = self._thread is not None and self._thread.is_alive()
        if not alive:
            self._restart()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every item accepted so far is written (or dropped and logged); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._accepted
            if self._done >= target:
                return True
            self._flush_upto = max(self._flush_upto, target)
            self._cond.notify_all()
        if not (self._thread and self._thread.is_alive()):
            self._restart()
        with self._cond:
            while self._done < target:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
                if not (self._thread and self._thread.is_alive()) and self._done < target:
                    break  # died while we waited: write it here
        if self._done < target:
            self._drain_here()
        return True

    def close(self, timeout: float | None = None) -> None:
        """Write everything accepted, stop the thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if thread.is_alive():  # stuck in the sink: leave it the buffer rather than write twice at once
                log.error("%s: still writing after %.1fs at close; %d %s not confirmed written", self.name,
                          timeout or 0.0, self.pending, self._what)
                return
        self._drain_here()  # whatever a dead thread left behind
        with self._cond:
            self._closed = True
        _LIVE.discard(self)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- the writer side ---------------------------------------------------------------------------

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _restart(self) -> None:
        with self._cond:
            if self._closing or self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            log.error("%s: the writer thread died; starting a new one (%d %s waiting)", self.name,
                      len(self._pending), self._what)
            self._start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                while (self._pending and not self._closing and self._flush_upto <= self._done
                       and len(self._pending) < self.max_batch):
                    left = self._oldest + self.interval_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._pending:
                    return  # closing, and everything is written
            self._write_one_batch()

    def _write_one_batch(self) -> None:
        with self._write_lock:
            with self._cond:
                batch = self._pending[:self.max_batch]  # stays buffered until written
            if not batch:
                return
            ok = self._write(batch)
            with self._cond:
                del self._pending[:len(batch)]
                self._done += len(batch)
                if ok:
                    self.written += len(batch)
                else:
                    self.dropped += len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[T]) -> bool:
        for attempt in range(len(self.retry_delays_s) + 1):
            try:
                self._sink(batch)
                return True
            except Exception:
                if attempt == len(self.retry_delays_s):
                    log.exception("could not write %d %s", len(batch), self._what)
                    return False
                time.sleep(self.retry_delays_s[attempt])
        return False  # pragma: no cover - the loop returns

    def _drain_here(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    return
            self._write_one_batch()
