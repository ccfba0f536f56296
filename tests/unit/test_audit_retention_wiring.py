"""Each feature's audit_retention setting reaches the store its factory opens: an event older than the limit is
gone once the store opens, a young one stays."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from app.core import audit
from app.core.audit import AuditEvent
from app.settings import Settings

OLD = time.time() - 10 * 86400  # ten days ago
RETAIN = {"audit_retention": {"max_age_days": 2}}


def _plant(db: Path, trail: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        audit.ensure_schema_sqlite(conn)
        audit.append(conn, AuditEvent(trail=trail, action="old", subject="x", at=OLD))
        audit.append(conn, AuditEvent(trail=trail, action="young", subject="x"))
    finally:
        conn.close()


def _actions(events) -> set[str]:
    return {e.action for e in events}


def test_prompts_audit_retention_reaches_the_registry_store(tmp_path):
    from prompts.factory import build_registry

    settings = Settings(home=tmp_path, prompts={"seed_library": False, **RETAIN})
    build_registry(settings).close()  # creates the database
    _plant(settings.prompts.resolved_db_path(tmp_path), "prompts")
    registry = build_registry(settings)
    try:
        assert _actions(registry.store.audit_events()) == {"young"}
    finally:
        registry.close()


def test_finetune_audit_retention_reaches_the_job_store(tmp_path):
    from finetune.jobs import open_job_store

    settings = Settings(home=tmp_path, finetune=RETAIN)
    open_job_store(settings).close()
    _plant(settings.finetune.resolved_jobs_db(tmp_path), "adapters")
    store = open_job_store(settings)
    try:
        assert _actions(store.audit_events()) == {"young"}
    finally:
        store.close()


def test_guardrails_audit_retention_reaches_the_engines_store(tmp_path):
    from app.container import build_guards
    from app.core.metrics import Metrics

    settings = Settings(home=tmp_path, guardrails=RETAIN)
    engine = build_guards(settings, Metrics())
    path = settings.guardrails.audit_db or tmp_path / "guardrails.db"
    engine.audit.close()
    _plant(path, "guardrails")
    engine = build_guards(settings, Metrics())
    try:
        assert _actions(engine.audit.events()) == {"young"}
    finally:
        engine.audit.close()
