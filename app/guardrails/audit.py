"""The guardrail audit trail: one event per validator decision, queryable by request, validator, time.

The events are the kernel's (:mod:`app.core.audit`): trail ``guardrails``, ``actor`` ``policy:<name>``,
``action`` the action taken (allow, block, redact, ...), subject the validator (``subject_kind`` ``validator``,
``subject`` its label, ``subject_ref`` the registered validator), the request id, and in ``details`` the stage,
policy version, verdict, score, latency and stream window (when there is one). :class:`AuditRecord` is the
trail's own view of an event (what the engine writes and the admin route returns); :class:`AuditStore` keeps
the events in the ``audit_events`` table of ``guardrails.db``, :class:`AuditWriter` hands them to it in
batches off the request path (the kernel's :class:`~app.core.audit.BufferedWriter`).

Events never contain the text that was checked (nor redacted values): only verdicts, actions, scores,
reasons (which name kinds, not values) and latencies.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core import audit
from app.core.audit import AuditEvent, AuditRetention, BufferedWriter, Pruner
from app.core.db import PostgresPool, enable_wal, warn_if_left_behind, write_transaction
from app.core.migrate import Migrations, upgrade_sqlite

TRAIL = "guardrails"
_ACTOR_PREFIX = "policy:"

# The guardrail_audit table of the release before the kernel's audit came from revision 0001; revision 0002
# moves its rows into the kernel's audit_events table (created first, by app.core.audit's migrations).
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

    def event(self, now: float) -> AuditEvent:
        return AuditEvent(
            trail=TRAIL, at=self.ts or now, actor=_ACTOR_PREFIX + self.policy, action=self.action,
            subject_kind="validator", subject=self.validator, subject_ref=self.registered, reason=self.reason or "",
            request_id=self.request_id,
            details={"stage": self.stage, "policy_version": self.policy_version, "verdict": self.verdict,
                     "score": self.score, "latency_ms": self.latency_ms,
                     **({"window": self.window} if self.window is not None else {})})

    @classmethod
    def of(cls, e: AuditEvent) -> AuditRecord:
        d = e.details
        return cls(request_id=e.request_id or "", stage=d.get("stage", ""), policy=e.actor.removeprefix(_ACTOR_PREFIX),
                   policy_version=d.get("policy_version", ""), validator=e.subject, registered=e.subject_ref or "",
                   verdict=d.get("verdict", ""), action=e.action, score=d.get("score"),
                   latency_ms=d.get("latency_ms"), reason=e.reason, window=d.get("window"), ts=e.at, id=e.id)


class _Trail:
    """The trail's writes and reads over a backend's :meth:`_append` (one transaction), :meth:`events` and
    :meth:`prune`; retention runs after a write when due."""

    _pruner: Pruner

    def _append(self, events: list[AuditEvent], now: float) -> None:  # pragma: no cover - each store's
        raise NotImplementedError

    def events(self, **filters: Any) -> list[AuditEvent]:  # pragma: no cover - each store's
        raise NotImplementedError

    def prune(self) -> audit.PruneResult:  # pragma: no cover - each store's
        raise NotImplementedError

    def write(self, records: Iterable[AuditRecord]) -> int:
        now = time.time()
        events = [r.event(now) for r in records]
        if not events:
            return 0
        self._append(events, now)
        self._maybe_prune()
        return len(events)

    def _maybe_prune(self) -> None:
        if self._pruner.due():
            self.prune()

    def query(self, *, request_id: str | None = None, validator: str | None = None, verdict: str | None = None,
              action: str | None = None, stage: str | None = None, since: float | None = None,
              limit: int = 100) -> list[AuditRecord]:
        """Newest first. Every filter is optional; ``since`` is a unix timestamp."""
        events = self.events(request_id=request_id, subject_kind="validator" if validator is not None else None,
                             subject=validator, action=action, since=since, limit=limit,
                             details={"verdict": verdict, "stage": stage})
        return [AuditRecord.of(e) for e in events]


class AuditStore(_Trail):
    """``guardrails.db`` (or ``:memory:``): one connection, serialised by a lock; each :meth:`write` is one
    transaction. ``retention`` (``GuardrailSettings.audit_retention``) is applied on open and then, at most
    every ``check_interval_s``, after a write (on the writer's thread, off the request path)."""

    def __init__(self, path: Path | str, *, retention: AuditRetention | None = None) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._pruner = Pruner(TRAIL, retention)
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout=10000")
            if self.path != ":memory:":
                enable_wal(self._conn)
                self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per commit, still crash-safe
            audit.ensure_schema_sqlite(self._conn)  # the kernel's table first: revision 0002 copies into it
            upgrade_sqlite(self._conn, MIGRATIONS)
        self._maybe_prune()

    def _append(self, events: list[AuditEvent], now: float) -> None:
        with write_transaction(self._conn, self._lock) as db:
            audit.append(db, *events, now=now)

    def events(self, **filters: Any) -> list[AuditEvent]:
        """The kernel's query (:func:`app.core.audit.select`'s filters) on this trail."""
        with self._lock:
            return audit.query(self._conn, **{**filters, "trail": TRAIL})

    def prune(self) -> audit.PruneResult:
        """Apply the retention now (it also runs by itself; see the class docstring)."""
        return self._pruner.run(self._conn, lock=self._lock)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresAuditStore(_Trail):
    """The same trail in Postgres (``guardrails.audit_url``, or ``database_url``): the kernel's ``audit_events``
    table shared with the other stores there, so any API process reads the verdicts on any request (an answer's
    lineage joins them). Retention as in :class:`AuditStore`."""

    def __init__(self, url: str, *, retention: AuditRetention | None = None, timeout_s: float = 10.0) -> None:
        self.path = None
        self._pruner = Pruner(TRAIL, retention)
        self._pg = PostgresPool(url, whose="the guardrail audit's", setting="guardrails.audit_url",
                                name="keel-guard-audit", timeout_s=timeout_s,
                                migrate=lambda t: audit.ensure_schema_postgres(url, connect_timeout_s=t))
        self._maybe_prune()

    def _append(self, events: list[AuditEvent], now: float) -> None:
        with self._pg.transaction() as conn:
            audit.append(conn, *events, now=now)

    def events(self, **filters: Any) -> list[AuditEvent]:
        with self._pg.connection() as conn:
            return audit.query(conn, **{**filters, "trail": TRAIL})

    def prune(self) -> audit.PruneResult:
        with self._pg.connection() as conn:
            return self._pruner.run(conn)

    def close(self) -> None:
        self._pg.close()


def open_audit_store(settings: Any, home: Path) -> AuditStore | PostgresAuditStore:
    """The guardrail audit the settings (``GuardrailSettings``) name: ``audit_url``, else ``audit_db``, else
    ``<home>/guardrails.db``."""
    if settings.audit_url is not None:
        warn_if_left_behind(Path(home) / "guardrails.db", "the guardrail audit",
                            "guardrails.audit_url (or database_url)")
        return PostgresAuditStore(settings.audit_url.get_secret_value(), retention=settings.audit_retention)
    return AuditStore(settings.audit_db or (Path(home) / "guardrails.db"), retention=settings.audit_retention)


class AuditWriter(BufferedWriter[AuditRecord]):
    """Writes audit rows on one background thread, in batches: a request only enqueues its rows.

    Why: a request's guards produce a few rows per stage (and per streamed window); one executor hop and
    one SQLite statement each competed for the GIL with the validators of the requests in flight. What it
    guarantees (the kernel's :class:`~app.core.audit.BufferedWriter`): an accepted row leaves the buffer only
    once written; :meth:`flush`, :meth:`close` and the interpreter's exit write them all, and so does the
    next call after the writer thread died; a process kill loses at most ``interval_s`` of rows.
    """

    def __init__(self, write: Callable[[list[AuditRecord]], object], *, interval_s: float = 0.1,
                 max_batch: int = 2000, max_pending: int = 200_000,
                 retry_delays_s: Sequence[float] = (0.05, 0.25)) -> None:
        super().__init__(write, interval_s=interval_s, max_batch=max_batch, max_pending=max_pending,
                         retry_delays_s=retry_delays_s, name="keel-guard-audit", what="guardrail audit rows")
