"""The kernel's one audit trail (app.core.audit) and the three trails on it: guardrails, prompts, adapters.

Append inside the caller's transaction (an audited change and its event commit together or not at all), the
buffered writer (nothing accepted is lost on close, at exit, or when its thread dies), the query API,
retention (bounded, never deleting rows younger than the limits), and the move of the previous release's
audit tables into ``audit_events`` with their rows.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from app.core import audit
from app.core.audit import AuditEvent, AuditRetention, BufferedWriter, Pruner, prune
from tests.fakes.auth import FakeKeys, NoLimit

ROOT = Path(__file__).resolve().parents[2]
DAY = 86400.0


def _db(path: Path | str = ":memory:") -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    audit.ensure_schema_sqlite(conn)
    return conn


def _ev(i: int = 0, **kw: Any) -> AuditEvent:
    base = {"trail": "releases", "action": "canary.step", "subject_kind": "release", "subject": "chat",
            "actor": "ann", "from_ref": "10%", "to_ref": "50%", "reason": f"step {i}", "details": {"i": i}}
    return AuditEvent(**{**base, **kw})


def _count(path: Path, trail: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT count(*) FROM audit_events WHERE trail = ?", (trail,)).fetchone()[0]


# --- append and query ---------------------------------------------------------------------------------


def test_append_and_query_newest_first_with_every_filter():
    conn = _db()
    audit.append(conn, _ev(0, at=100.0), _ev(1, at=200.0, actor="bob", request_id="req-1"),
                 _ev(2, at=300.0, subject="search", details={"i": 2, "ok": True}))
    audit.append(conn, _ev(3, trail="prompts", action="label.move", subject_kind="prompt", subject="greet"))
    everything = audit.query(conn, trail="releases")
    assert [e.reason for e in everything] == ["step 2", "step 1", "step 0"]  # newest first
    first = everything[-1]
    assert (first.trail, first.actor, first.action, first.subject_kind, first.subject, first.from_ref,
            first.to_ref, first.details, first.at) == ("releases", "ann", "canary.step", "release", "chat", "10%",
                                                        "50%", {"i": 0}, 100.0)
    assert [e.reason for e in audit.query(conn, actor="bob")] == ["step 1"]
    assert [e.reason for e in audit.query(conn, request_id="req-1")] == ["step 1"]
    assert [e.reason for e in audit.query(conn, subject_kind="release", subject="chat")] == ["step 1", "step 0"]
    assert [e.reason for e in audit.query(conn, trail="releases", since=150, until=250)] == ["step 1"]
    assert [e.reason for e in audit.query(conn, details={"ok": True})] == ["step 2"]
    assert [e.reason for e in audit.query(conn, details={"i": 1})] == ["step 1"]
    assert [e.reason for e in audit.query(conn, trail="releases", limit=1)] == ["step 2"]
    assert [e.reason for e in audit.query(conn, trail="releases", before_id=everything[0].id)] == ["step 1", "step 0"]
    assert [e.action for e in audit.query(conn, trail="prompts")] == ["label.move"]
    assert audit.query(conn, trail="prompts")[0].at > time.time() - 60  # at 0 = stamped when appended
    with pytest.raises(ValueError, match="plain identifier"):
        audit.query(conn, details={"x') OR 1=1 --": 1})
    with pytest.raises(ValueError, match="short lower-case name"):
        audit.append(conn, _ev(trail="Bad Trail"))


def test_append_commits_and_rolls_back_with_the_callers_transaction(tmp_path):
    conn = _db(tmp_path / "a.db")
    conn.execute("CREATE TABLE things (name TEXT)")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO things VALUES ('x')")
    audit.append(conn, _ev())
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM things").fetchone()[0] == 0
    assert audit.query(conn) == []
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO things VALUES ('x')")
    audit.append(conn, _ev())
    conn.execute("COMMIT")
    assert len(audit.query(conn)) == 1 and _count(tmp_path / "a.db", "releases") == 1


def test_postgres_append_query_and_prune(postgres_url):
    import psycopg

    audit.ensure_schema_postgres(postgres_url)
    assert audit.ensure_schema_postgres(postgres_url) is False  # at head: nothing runs
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with conn.transaction(), conn.cursor() as cur:
            audit.append(cur, _ev(0, at=time.time() - 10 * DAY), _ev(1, details={"ok": True, "n": 2}))
        with pytest.raises(RuntimeError), conn.transaction():  # rolled back with the caller's transaction
            audit.append(conn, _ev(2))
            raise RuntimeError("the change failed")
        assert [e.reason for e in audit.query(conn, trail="releases")] == ["step 1", "step 0"]
        assert [e.reason for e in audit.query(conn, details={"ok": True})] == ["step 1"]
        assert [e.reason for e in audit.query(conn, details={"n": 2})] == ["step 1"]
        assert audit.query(conn, subject="chat")[0].details == {"ok": True, "n": 2}
        assert prune(conn, "releases", AuditRetention(max_age_days=1)).deleted == 1
        assert [e.reason for e in audit.query(conn)] == ["step 1"]


# --- retention ----------------------------------------------------------------------------------------


def test_max_age_deletes_only_older_rows_and_only_of_its_trail():
    conn = _db()
    now = time.time()
    audit.append(conn, *[_ev(i, at=now - (100 - i) * DAY) for i in range(10)])  # 100..91 days old
    audit.append(conn, *[_ev(i, at=now - i * 3600) for i in range(10, 20)])  # the last hours
    audit.append(conn, _ev(99, trail="prompts", at=now - 365 * DAY))
    result = prune(conn, "releases", AuditRetention(max_age_days=30), now=now)
    assert (result.deleted, result.more) == (10, False)
    assert sorted(e.details["i"] for e in audit.query(conn, trail="releases")) == list(range(10, 20))
    assert len(audit.query(conn, trail="prompts")) == 1  # another trail's retention is its own
    assert prune(conn, "releases", AuditRetention(max_age_days=30), now=now).deleted == 0


def test_the_age_boundary_keeps_a_row_exactly_at_the_limit():
    conn = _db()
    now = 1_000_000.0
    audit.append(conn, _ev(0, at=now - 30 * DAY - 0.001), _ev(1, at=now - 30 * DAY))
    assert prune(conn, "releases", AuditRetention(max_age_days=30), now=now).deleted == 1
    assert [e.details["i"] for e in audit.query(conn)] == [1]


def test_max_rows_keeps_the_newest_and_never_a_row_younger_than_min_age():
    conn = _db()
    now = time.time()
    audit.append(conn, *[_ev(i, at=now - (50 - i) * DAY) for i in range(40)])  # old
    audit.append(conn, *[_ev(i, at=now - 60) for i in range(40, 60)])  # a burst in the last minute
    result = prune(conn, "releases", AuditRetention(max_rows=10, min_age_days=1), now=now)
    # the cap would keep 10, but the burst is younger than a day: all of it stays; every old row goes
    assert result.deleted == 40
    assert sorted(e.details["i"] for e in audit.query(conn, limit=1000)) == list(range(40, 60))
    conn2 = _db()
    audit.append(conn2, *[_ev(i, at=now - (50 - i) * DAY) for i in range(40)])
    prune(conn2, "releases", AuditRetention(max_rows=15, min_age_days=1), now=now)
    assert sorted(e.details["i"] for e in audit.query(conn2, limit=1000)) == list(range(25, 40))


def test_prune_is_bounded_per_pass():
    conn = _db()
    now = time.time()
    audit.append(conn, *[_ev(i, at=now - 100 * DAY) for i in range(250)])
    first = prune(conn, "releases", AuditRetention(max_age_days=1), now=now, batch=50, max_batches=2)
    assert (first.deleted, first.more) == (100, True)
    rest = prune(conn, "releases", AuditRetention(max_age_days=1), now=now, batch=50, max_batches=10)
    assert (rest.deleted, rest.more) == (150, False)
    assert prune(conn, "releases", AuditRetention(), now=now).deleted == 0  # no limits: keeps everything


def test_pruner_runs_on_open_then_at_its_interval():
    conn = _db()
    audit.append(conn, _ev(0, at=time.time() - 10 * DAY))
    pruner = Pruner("releases", AuditRetention(max_age_days=1, check_interval_s=3600))
    assert pruner.due()
    assert pruner.run(conn).deleted == 1
    audit.append(conn, _ev(1, at=time.time() - 10 * DAY))
    assert not pruner.due()  # the next check is an hour away
    assert not Pruner("releases", AuditRetention()).due()  # nothing to apply: never due


# --- the buffered writer ------------------------------------------------------------------------------


def _guard_record(i: int, request_id: str = "req"):
    from app.guardrails.audit import AuditRecord

    return AuditRecord(f"{request_id}-{i}", "input", "default", "v1+abc", "pii", "keel/pii", "pass", "allow", 0.0,
                       0.1 * i, "", None)


def test_an_accepted_guardrail_record_is_on_disk_after_close(tmp_path):
    from app.guardrails.audit import AuditStore, AuditWriter

    path = tmp_path / "guardrails.db"
    store = AuditStore(path)
    writer = AuditWriter(store.write, interval_s=60)  # only close() writes
    assert writer.submit([_guard_record(i) for i in range(5)])
    assert _count(path, "guardrails") == 0
    writer.close()
    store.close()
    assert _count(path, "guardrails") == 5  # another connection (another process) sees them
    reopened = AuditStore(path)
    assert sorted(r.request_id for r in reopened.query()) == [f"req-{i}" for i in range(5)]
    reopened.close()


def test_the_writer_flushes_at_its_interval_without_being_asked(tmp_path):
    from app.guardrails.audit import AuditStore, AuditWriter

    path = tmp_path / "guardrails.db"
    store = AuditStore(path)
    writer = AuditWriter(store.write, interval_s=0.05)
    writer.submit([_guard_record(0)])
    deadline = time.monotonic() + 10
    while _count(path, "guardrails") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _count(path, "guardrails") == 1
    writer.close()
    store.close()


class _Crash(BaseException):
    """Not an Exception: what kills a thread (the writer does not catch it)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the simulated crash
def test_nothing_accepted_is_lost_when_the_writer_thread_dies(tmp_path):
    from app.guardrails.audit import AuditStore, AuditWriter

    path = tmp_path / "guardrails.db"
    store = AuditStore(path)
    calls = []

    def crashing_write(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise _Crash  # the thread dies in the middle of its first batch
        return store.write(rows)

    writer = AuditWriter(crashing_write, interval_s=0.01)
    writer.submit([_guard_record(i) for i in range(3)])
    deadline = time.monotonic() + 10
    while writer._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not writer._thread.is_alive() and writer.pending == 3  # dead, its batch still buffered
    writer.submit([_guard_record(3)])  # a new thread takes over
    assert writer.flush(timeout=10)
    assert _count(path, "guardrails") == 4 and writer.written == 4 and writer.dropped == 0
    # and when it dies again with nobody submitting, close() writes the rest on the caller's thread
    calls.clear()
    writer.submit([_guard_record(i, "late") for i in range(2)])
    deadline = time.monotonic() + 10
    while writer._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.close()
    store.close()
    assert _count(path, "guardrails") == 6


def test_a_writer_nobody_closed_writes_what_it_accepted_at_exit(tmp_path):
    path = tmp_path / "guardrails.db"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from app.guardrails.audit import AuditRecord, AuditStore, AuditWriter
        store = AuditStore({str(path)!r})
        writer = AuditWriter(store.write, interval_s=3600)  # never on its own before the exit
        writer.submit([AuditRecord(f"r{{i}}", "input", "p", "v", "pii", "keel/pii", "pass", "allow", 0.0, 0.1)
                       for i in range(7)])
        print("exiting without close")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert _count(path, "guardrails") == 7


def test_a_full_buffer_refuses_instead_of_growing(caplog):
    gate = threading.Event()
    written: list[int] = []

    def slow(rows):
        gate.wait(10)
        written.append(len(rows))

    writer = BufferedWriter(slow, interval_s=0, max_batch=2, max_pending=4, what="test events")
    assert writer.submit([1, 2]) and writer.submit([3, 4])
    assert writer.submit([5]) is False and writer.refused == 1  # not accepted, and said so
    assert "refusing more" in caplog.text
    gate.set()
    writer.close()
    assert sum(written) == 4


def test_a_failing_sink_is_retried_then_dropped_and_logged(caplog):
    attempts: list[int] = []

    def flaky(rows):
        attempts.append(len(rows))
        if len(attempts) < 3:
            raise sqlite3.OperationalError("database is locked")

    writer = BufferedWriter(flaky, interval_s=0, retry_delays_s=(0.01, 0.01, 0.01))
    writer.submit(["a"])
    writer.flush(timeout=10)
    assert attempts == [1, 1, 1] and writer.written == 1 and writer.dropped == 0  # the third try went through

    def broken(rows):
        raise OSError("disk full")

    dropping = BufferedWriter(broken, interval_s=0, retry_delays_s=(0.01,), what="test events")
    dropping.submit(["b"])
    dropping.flush(timeout=10)
    assert dropping.dropped == 1 and "could not write 1 test events" in caplog.text
    dropping.close()
    writer.close()


# --- the three trails ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def open_guard_store(request, tmp_path):
    """Opens the guardrail trail (``retention=...``): ``<home>/guardrails.db`` or Postgres (``audit_url``)."""
    from app.guardrails.audit import open_audit_store
    from app.guardrails.settings import GuardrailSettings

    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    return lambda **kw: open_audit_store(GuardrailSettings(audit_url=url, **kw), tmp_path)


def test_guardrail_records_are_kernel_events(open_guard_store):
    store = open_guard_store()
    store.write([_guard_record(1), _guard_record(2)])
    [event] = store.events(request_id="req-2")
    assert (event.trail, event.actor, event.action, event.subject_kind, event.subject, event.subject_ref) == (
        "guardrails", "policy:default", "allow", "validator", "pii", "keel/pii")
    assert event.details["verdict"] == "pass" and event.details["stage"] == "input"
    record = store.query(request_id="req-2")[0]
    assert (record.policy, record.verdict, record.latency_ms, record.window) == ("default", "pass", 0.2, None)
    assert store.query(verdict="fail") == [] and len(store.query(stage="input", validator="pii")) == 2
    store.close()


def test_guardrail_retention_applies_on_open_and_keeps_young_rows(open_guard_store):
    from app.guardrails.audit import AuditRecord

    store = open_guard_store()
    old = AuditRecord("old", "input", "p", "v", "pii", "keel/pii", "pass", "allow", 0.0, 0.1,
                      ts=time.time() - 40 * DAY)
    store.write([old, _guard_record(0, "young")])
    store.close()
    again = open_guard_store(audit_retention=AuditRetention(max_age_days=30))
    assert [r.request_id for r in again.query()] == ["young-0"]
    again.close()


@pytest.fixture(params=["sqlite", "postgres"])
def prompt_store(request, tmp_path):
    if request.param == "sqlite":
        from prompts.store import SqlitePromptStore

        store = SqlitePromptStore(tmp_path / "prompts.db")
    else:
        from prompts.store_pg import PostgresPromptStore

        store = PostgresPromptStore(request.getfixturevalue("postgres_url"))
    yield store
    store.close()


def test_a_prompt_change_and_its_audit_row_roll_back_together(prompt_store, monkeypatch):
    from prompts import store as store_module
    from prompts.testing import content

    store = prompt_store
    store.save("greet", content("v1"), author="ann", message="first", base_version=None)
    revision = store.revision()
    real_append = store_module.audit.append

    def append_then_fail(db, *events, **kw):  # the audit row is written, then the transaction fails
        real_append(db, *events, **kw)
        raise RuntimeError("crash between the audit row and the commit")

    monkeypatch.setattr(store_module.audit, "append", append_then_fail)
    with pytest.raises(RuntimeError, match="crash"):
        store.save("greet", content("v2"), author="bob", message="second", base_version=1)

    def refuse(db, *events, **kw):  # the audit row cannot be written: the change does not happen either
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store_module.audit, "append", refuse)
    with pytest.raises(sqlite3.OperationalError):
        store.save("greet", content("v2"), author="bob", message="second", base_version=1)
    assert store.latest_version("greet") == 1
    assert store.revision() == revision
    assert [(e.action, e.actor) for e in store.audit_log(name="greet")] == [("version.create", "ann")]
    monkeypatch.setattr(store_module.audit, "append", real_append)
    store.save("greet", content("v2"), author="bob", message="second", base_version=1)
    event = store.audit_events(subject="greet")[0]
    assert (event.trail, event.subject_kind, event.subject, event.from_ref, event.to_ref, event.actor) == (
        "prompts", "prompt", "greet", "1", "2", "bob")


def test_a_label_move_and_its_audit_row_roll_back_together(tmp_path, monkeypatch):
    """Labels live in the routing table: a move and its audit row (trail routing) commit together or not at all."""
    from app.llm import routing
    from app.llm.routing import Label, RoutingTable, SqliteRoutingStore

    table = RoutingTable({}, {}, SqliteRoutingStore(tmp_path / "routing.db"), check_interval_s=0.0)
    revision = table.revision
    real_append = routing.audit.append

    def append_then_fail(db, *events, **kw):
        real_append(db, *events, **kw)
        raise RuntimeError("crash between the audit row and the commit")

    monkeypatch.setattr(routing.audit, "append", append_then_fail)
    with pytest.raises(RuntimeError, match="crash"):
        table.set_label(Label("prompt", "greet", "production", 1, actor="bob"))
    assert table.labels("prompt", "greet") == {} and table.revision == revision
    assert table.store.audit_events() == []
    monkeypatch.setattr(routing.audit, "append", real_append)
    table.set_label(Label("prompt", "greet", "production", 1, ref="h1", actor="bob"), reason="launch")
    [event] = table.label_events("prompt", subject="greet")
    assert (event.trail, event.subject_kind, event.subject, event.subject_ref, event.from_ref, event.to_ref,
            event.reason, event.details["ref"]) == (
        "routing", "prompt_label", "greet", "production", None, "1", "launch", "h1")
    table.close()


def test_prompt_retention_runs_after_writes_and_keeps_young_rows(tmp_path):
    from prompts.store import SqlitePromptStore
    from prompts.testing import content

    path = tmp_path / "prompts.db"
    store = SqlitePromptStore(path)
    store.save("greet", content("v1"), author="ann", message="", base_version=None)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE audit_events SET at = at - 400 * 86400")  # a year and more ago
    store.save("greet", content("v2"), author="ann", message="", base_version=1)
    store.close()
    store = SqlitePromptStore(path, audit_retention=AuditRetention(max_age_days=365))
    assert [e.to_version for e in store.audit_log(name="greet")] == [2]
    store.close()


def test_adapter_audit_events_and_their_old_shape(tmp_path):
    from finetune.jobs import JobStore

    store = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    store.audit(actor="ann", action="promote", model="m", version="3", reason="ok",
                details={"from": "2", "alias": "production"})
    store.audit(actor="ann", action="job.cancel", job_id="ft-1")
    promote, cancel = store.audit_events(action="promote")[0], store.audit_events(action="job.cancel")[0]
    assert (promote.subject_kind, promote.subject, promote.from_ref, promote.to_ref) == ("adapter", "m", "2", "3")
    assert (cancel.subject_kind, cancel.subject, cancel.subject_ref) == ("job", "ft-1", "ft-1")
    log = store.audit_log()
    assert [set(e) for e in log] == [{"id", "at", "actor", "action", "model", "version", "job_id", "reason",
                                      "details"}] * 2
    assert (log[0]["model"], log[0]["job_id"], log[0]["version"]) == (None, "ft-1", None)
    assert (log[1]["model"], log[1]["version"], log[1]["details"]) == ("m", "3", {"from": "2", "alias": "production"})
    assert [e["action"] for e in store.audit_log(model="m")] == ["promote"]
    store.close()


# --- the previous release's audit tables move in, rows and ids kept ----------------------------------------


def _legacy(path: Path, ddl: str, rows: list[tuple[str, tuple[Any, ...]]]) -> None:
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(ddl)
        for sql, args in rows:
            conn.execute(sql, args)


def test_previous_release_audit_rows_move_in_unchanged(tmp_path):
    from finetune.jobs import JobStore
    from prompts.store import SqlitePromptStore
    from prompts.testing import content
    from tests.unit.test_migrations import AUDIT_0, FINETUNE_0, PROMPTS_0

    c = content("Hello")
    _legacy(tmp_path / "prompts.db", PROMPTS_0, [
        ("INSERT INTO prompt_templates VALUES ('greet', 1, '', '2025-01-01', '2025-01-01')", ()),
        ("INSERT INTO prompt_versions VALUES ('greet', 1, ?, ?, NULL, 'ann', 'm', '2025-01-01')",
         (c.canonical_json(), c.content_hash())),
        *[("INSERT INTO prompt_audit (at, actor, action, name, label, from_version, to_version, reason, details)"
           " VALUES (?, 'ann', ?, 'greet', ?, ?, 1, 'r', ?)",
           (f"2025-01-0{i + 1}T12:00:00.12{i}+00:00", "label.move" if i else "version.create",
            "production" if i else None, None, json.dumps({"n": i}))) for i in range(3)]])
    store = SqlitePromptStore(tmp_path / "prompts.db")
    log = store.audit_log(name="greet")
    assert [(e.id, e.at, e.action, e.label, e.to_version, e.details) for e in log] == [
        (3, "2025-01-03T12:00:00.122+00:00", "label.move", "production", 1, {"n": 2}),
        (2, "2025-01-02T12:00:00.121+00:00", "label.move", "production", 1, {"n": 1}),
        (1, "2025-01-01T12:00:00.120+00:00", "version.create", None, 1, {"n": 0})]
    store.save("greet", c.model_copy(update={"description": "x"}), author="bob", message="", base_version=1)
    assert store.audit_log(name="greet")[0].id == 4  # ids go on from the old ones
    store.close()

    _legacy(tmp_path / "jobs.db", FINETUNE_0, [
        ("INSERT INTO audit (at, actor, action, model, version, job_id, reason, details) VALUES"
         " (1.5, 'ann', 'promote', 'm', '2', NULL, 'ok', '{\"from\": \"1\"}')", ()),
        ("INSERT INTO audit (at, actor, action, job_id) VALUES (2.5, 'bob', 'job.cancel', 'ft-9')", ())])
    jobs = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    assert jobs.audit_log() == [
        {"id": 2, "at": 2.5, "actor": "bob", "action": "job.cancel", "model": None, "version": None,
         "job_id": "ft-9", "reason": "", "details": {}},
        {"id": 1, "at": 1.5, "actor": "ann", "action": "promote", "model": "m", "version": "2", "job_id": None,
         "reason": "ok", "details": {"from": "1"}}]
    assert jobs.audit_events(action="promote")[0].from_ref == "1"
    jobs.close()

    _legacy(tmp_path / "guardrails.db", AUDIT_0, [
        ("INSERT INTO guardrail_audit (ts, request_id, stage, policy, policy_version, validator, registered,"
         " verdict, action, score, latency_ms, reason, window) VALUES (5.0, 'req-old', 'output', 'default', '1',"
         " 'toxicity', 'keel/toxicity', 'fail', 'block', 0.9, 2.5, NULL, 3)", ())])
    from app.guardrails.audit import AuditRecord, AuditStore

    guards = AuditStore(tmp_path / "guardrails.db")
    assert guards.query() == [AuditRecord("req-old", "output", "default", "1", "toxicity", "keel/toxicity", "fail",
                                          "block", 0.9, 2.5, "", 3, ts=5.0, id=1)]
    assert guards.query(verdict="fail", stage="output")[0].request_id == "req-old"
    guards.close()


def test_trails_sharing_one_file_keep_apart(tmp_path):
    from app.guardrails.audit import AuditStore
    from finetune.jobs import JobStore
    from prompts.store import SqlitePromptStore
    from prompts.testing import content

    path = tmp_path / "keel.db"
    guards, prompts, jobs = AuditStore(path), SqlitePromptStore(path), JobStore(path, tmp_path / "runs")
    guards.write([_guard_record(0)])
    prompts.save("greet", content("v1"), author="ann", message="", base_version=None)
    jobs.audit(actor="ann", action="deploy", model="m", version="1")
    assert [len(guards.query()), len(prompts.audit_log()), len(jobs.audit_log())] == [1, 1, 1]
    with closing(sqlite3.connect(path)) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT trail FROM audit_events")) == [
            "adapters", "guardrails", "prompts"]
    for s in (guards, prompts, jobs):
        s.close()


def test_a_late_submit_after_close_is_written_directly_and_never_raises(tmp_path):
    from app.guardrails.audit import AuditStore, AuditWriter

    store = AuditStore(tmp_path / "guardrails.db")
    writer = AuditWriter(store.write)
    writer.close()
    assert writer.submit([_guard_record(0)]) is True and len(store.query()) == 1
    store.close()
    assert writer.submit([_guard_record(1)]) is False and writer.refused == 1  # the store is gone: said, not raised


def test_the_admin_route_queries_each_trail(tmp_path):
    import types

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.api.errors import install_error_handlers
    from app.api.routes.admin import router
    from app.core.metrics import Metrics
    from app.core.settings import BackendSettings, ModelAlias
    from app.guardrails.audit import AuditStore
    from app.llm.routing import memory_table
    from app.security.keys import ApiKey
    from app.settings import Settings
    from finetune.jobs import JobStore
    from prompts.registry import PromptRegistry
    from prompts.settings import PromptSettings
    from prompts.store import SqlitePromptStore
    from prompts.testing import content

    keys = {k: ApiKey(id=k, name=k, scopes=frozenset({k}), rate_limit_per_minute=None, created_at="")
            for k in ("admin", "chat")}
    routes = memory_table({}, {"local": BackendSettings(kind="openai", base_url="http://127.0.0.1:9/v1")})
    registry = PromptRegistry(SqlitePromptStore(tmp_path / "p.db"), PromptSettings(seed_library=False),
                              routes=routes)
    registry.store.save("greet", content("v1"), author="ann", message="first", base_version=None)
    jobs = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    jobs.audit(actor="bob", action="promote", model="m", version="2", details={"from": "1"})
    store = AuditStore(tmp_path / "g.db")
    store.write([_guard_record(0), _guard_record(1)])
    routes.set("tuned", ModelAlias(backend="local", model="m-v2"), owner="finetune:m", actor="carl")
    registry.move_label("greet", "production", 1, actor="dana")

    async def flush() -> None:
        return None

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.keel = types.SimpleNamespace(
        settings=Settings(auth={"enabled": True}), prompts=registry, finetune=types.SimpleNamespace(store=jobs),
        guards=types.SimpleNamespace(audit=store, flush=flush), llm=types.SimpleNamespace(routes=routes),
        keys=FakeKeys(keys), rate_limiter=NoLimit(),
        metrics=Metrics())
    admin = {"Authorization": "Bearer admin"}
    with TestClient(app) as client:
        prompts = client.get("/v1/admin/audit", params={"trail": "prompts"}, headers=admin).json()
        assert [(e["trail"], e["actor"], e["action"], e["subject"], e["to_ref"]) for e in prompts] == [
            ("prompts", "ann", "version.create", "greet", "1")]
        adapters = client.get("/v1/admin/audit", params={"trail": "adapters", "subject": "m"}, headers=admin).json()
        assert [(e["action"], e["from_ref"], e["to_ref"]) for e in adapters] == [("promote", "1", "2")]
        guards = client.get("/v1/admin/audit", params={"trail": "guardrails", "limit": 1}, headers=admin).json()
        assert [(e["request_id"], e["details"]["verdict"]) for e in guards] == [("req-1", "pass")]
        routed = client.get("/v1/admin/audit", params={"trail": "routing"}, headers=admin).json()
        assert [(e["actor"], e["action"], e["subject"], e["subject_ref"], e["to_ref"]) for e in routed] == [
            ("dana", "label.move", "greet", "production", "1"), ("carl", "route.set", "tuned", "finetune:m", "m-v2")]
        serving = client.get("/v1/admin/routing", headers=admin).json()
        assert serving["revision"] == routes.revision and serving["releases"] == [] and serving["splits"] == []
        assert [(r["alias"], r["owner"], r["model"]) for r in serving["routes"]] == [("tuned", "finetune:m", "m-v2")]
        assert [(x["kind"], x["subject"], x["label"], x["version"], x["actor"]) for x in serving["labels"]] == [
            ("prompt", "greet", "production", 1, "dana")]
        assert client.get("/v1/admin/audit", params={"trail": "nope"}, headers=admin).status_code == 400
        assert client.get("/v1/admin/audit", params={"trail": "prompts"},
                          headers={"Authorization": "Bearer chat"}).status_code == 403
    registry.close()
    jobs.close()
    store.close()
