"""Where drift check results live: ``<home>/monitor.db`` (SQLite, WAL) or, for several API processes, Postgres
(``monitor.url``, or ``database_url``: beside the lineage and drift features); one row per check, newest first.

A result and its audit event (trail ``monitor``) commit in one transaction. The schema is Alembic's
(``lifecycle/monitor/migrations``, version table ``alembic_version_monitor``), brought to head on open.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.core import audit
from app.core.audit import AuditEvent
from app.core.db import StoreFile, open_store_file, store_file
from app.core.errors import InvalidRequest
from app.core.migrate import Migrations

MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_monitor",
                        pg_lock_key=0x6B65656C_6D6F)  # "keelmo"
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

    def __init__(self, where: Path | str | StoreFile) -> None:
        self._file = store_file(where, MIGRATIONS, what="the drift monitor's store", with_audit=True)
        self.path = self._file.path

    def add(self, result: Mapping[str, Any], event: AuditEvent | None = None) -> None:
        """Store one result (``DriftResult.public()``) and, in the same transaction, its audit event."""
        row = (result["id"], result["created"], result.get("actor") or "", result["verdict"],
               result.get("drift_share"), result["reference"]["kind"], int(result["current"]["rows"]),
               int(result["reference"]["rows"]),
               json.dumps(result, sort_keys=True, separators=(",", ":"), default=str))
        with self._file.tx() as db:
            db.execute("INSERT INTO drift_checks (id, created, actor, verdict, drift_share, reference_kind, "
                       "current_rows, reference_rows, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            if event is not None:
                audit.append(db, event)

    def get(self, check: str) -> dict[str, Any] | None:
        rows = self._file.read("SELECT result FROM drift_checks WHERE id = ?", (check,))
        return json.loads(rows[0][0]) if rows else None

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
        return [json.loads(r[0]) for r in self._file.read(sql, (*args, int(limit)))]

    def audit_events(self, *, limit: int = 50) -> list[AuditEvent]:
        """This store's audit trail, newest first."""
        return self._file.audit_events(trail=TRAIL, limit=limit)

    def close(self) -> None:
        self._file.close()


def open_drift_store(settings: Any) -> DriftStore:
    """The drift store the settings name (``monitor.url``, else ``<home>/monitor.db``)."""
    return DriftStore(open_store_file(settings.monitor.url, Path(settings.home) / "monitor.db", MIGRATIONS,
                                      what="the drift monitor's store", setting="monitor.url", name="keel-drift",
                                      with_audit=True))
