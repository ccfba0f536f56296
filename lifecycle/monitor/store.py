"""Where drift check results live: ``<home>/monitor.db`` (SQLite, WAL), one row per check, newest first.

A result and its audit event (trail ``monitor``) commit in one transaction. The schema is Alembic's
(``lifecycle/monitor/migrations``, version table ``alembic_version_monitor``), brought to head on open.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core import audit
from app.core.audit import AuditEvent
from app.core.db import enable_wal, write_transaction
from app.core.errors import InvalidRequest, StoreUnavailable
from app.core.migrate import Migrations, upgrade_sqlite

MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_monitor")
TRAIL = "monitor"
_ID = re.compile(r"^drift-[0-9a-f]{16}$")


def check_id(check: str) -> str:
    """A drift check id as :class:`~lifecycle.monitor.drift.DriftMonitor` makes them (``drift-`` and 16 hex
    digits); anything else is the caller's mistake (400), never a path."""
    if not isinstance(check, str) or not _ID.match(check):
        raise InvalidRequest(f"{str(check)[:80]!r} is not a drift check id: they look like drift-0123456789abcdef "
                             "(GET /v1/monitor/drift lists them)", param="id", code="invalid_drift_id")
    return check


class DriftStore:
    """Drift check results (JSON documents) with their audit trail."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        memory = self.path == ":memory:"
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._errors():
            if not memory:
                enable_wal(self._db)
            audit.ensure_schema_sqlite(self._db)
            upgrade_sqlite(self._db, MIGRATIONS)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"the drift monitor's store at {self.path} is unavailable ({e})") from None

    def add(self, result: Mapping[str, Any], event: AuditEvent | None = None) -> None:
        """Store one result (``DriftResult.public()``) and, in the same transaction, its audit event."""
        row = (result["id"], result["created"], result.get("actor") or "", result["verdict"],
               result.get("drift_share"), result["reference"]["kind"], int(result["current"]["rows"]),
               int(result["reference"]["rows"]),
               json.dumps(result, sort_keys=True, separators=(",", ":"), default=str))
        with self._errors(), write_transaction(self._db, self._lock) as db:
            db.execute("INSERT INTO drift_checks (id, created, actor, verdict, drift_share, reference_kind, "
                       "current_rows, reference_rows, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            if event is not None:
                audit.append(db, event)

    def get(self, check: str) -> dict[str, Any] | None:
        with self._errors(), self._lock:
            row = self._db.execute("SELECT result FROM drift_checks WHERE id = ?", (check,)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, *, limit: int = 50, before: float | None = None, verdict: str | None = None,
             reference_kind: str | None = None) -> list[dict[str, Any]]:
        """Results, newest first (``before``: created before that unix time, for paging back)."""
        where, args = ["1 = 1"], []
        for clause, value in (("created < ?", before), ("verdict = ?", verdict),
                              ("reference_kind = ?", reference_kind)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT result FROM drift_checks WHERE {' AND '.join(where)} ORDER BY created DESC, id DESC LIMIT ?"
        with self._errors(), self._lock:
            rows = self._db.execute(sql, (*args, int(limit))).fetchall()
        return [json.loads(r[0]) for r in rows]

    def audit_events(self, *, limit: int = 50) -> list[AuditEvent]:
        """This store's audit trail, newest first."""
        with self._errors(), self._lock:
            return audit.query(self._db, trail=TRAIL, limit=limit)

    def close(self) -> None:
        with self._lock:
            self._db.close()
