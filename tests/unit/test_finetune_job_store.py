"""The fine-tuning job store's contract on both backends: SQLite (``<home>/finetune/jobs.db``) and Postgres
(``finetune.url``, or ``jobs.url``: a shared job queue), where every API process and worker sees the same jobs.
Each test opens two handles on one store, as two processes would, and reads through the other what one wrote."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core import migrate
from app.core.db import PostgresFile
from app.settings import Settings
from finetune.errors import JobNotFound, JobStateConflict
from finetune.jobs import MIGRATIONS, WHAT, JobOwnershipLost, JobStore, open_job_store
from tests.postgres import store_handles

Open = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path: Path) -> Iterator[Open]:
    """Opens independent handles on one store (like another API process or a worker); the runs folder is shared,
    as the home volume is."""
    runs = tmp_path / "runs"

    def postgres(url: str) -> JobStore:
        return JobStore(PostgresFile(url, MIGRATIONS, what=WHAT, setting="finetune.url", name="keel-finetune-test",
                                     with_audit=True), runs)

    yield from store_handles(request, lambda: JobStore(tmp_path / "jobs.db", runs), postgres)


def make(store: JobStore, name: str = "demo", **kw):
    return store.create(name=name, spec_yaml=f"name: {name}\n", spec_hash="h" * 64, submitted_by="tester", **kw)


def succeeded(store: JobStore, version: str = "1") -> str:
    job = make(store)
    store.start(job.id, "w1", attempt=1)
    store.transition(job.id, "succeeded", owner="w1", worker=None, model_name="m", model_version=version,
                     adapter_path="/a")
    return job.id


def test_create_get_list_across_handles(open_store: Open) -> None:
    a, b = open_store(), open_store()
    first = make(a, "one", data_report={"data_hash": "dh", "rows": 3})
    second = make(a, "two")
    got = b.get(first.id)
    assert (got.name, got.state, got.submitted_by, got.data_hash) == ("one", "queued", "tester", "dh")
    assert got.data_report == {"data_hash": "dh", "rows": 3} and got.metrics == {} and got.evals is None
    assert got.cancel_requested is False and got.created_at == pytest.approx(first.created_at, abs=1e-6)
    assert [j.id for j in b.list()] == [second.id, first.id]  # newest first
    assert [j.id for j in b.list(limit=1)] == [second.id]
    assert b.list(state="running") == []
    assert [j.id for j in b.unfinished()] == [first.id, second.id]  # oldest first
    with pytest.raises(JobNotFound):
        b.get("ft-nope")
    assert "queued by tester" in b.read_log(first.id)[0]  # the log is a file under the shared runs folder


def test_times_keep_sub_second_precision(open_store: Open) -> None:
    """Unix times are 8-byte floats on both (a Postgres REAL would round today's to about 2 minutes)."""
    store = open_store()
    job = make(store)
    store.update(job.id, heartbeat_at=1_750_000_000.123456)
    assert store.get(job.id).heartbeat_at == pytest.approx(1_750_000_000.123456, abs=1e-5)


def test_transitions_and_the_owner_check(open_store: Open) -> None:
    a, b = open_store(), open_store()
    job = make(a)
    with pytest.raises(JobStateConflict, match="cannot become succeeded"):
        a.transition(job.id, "succeeded")
    started = b.start(job.id, "w1", attempt=1)
    assert (started.state, started.worker, started.attempts) == ("running", "w1", 1)
    again = a.start(job.id, "w2", attempt=2, note="its worker w1 is gone")  # recovered by another worker
    assert (again.worker, again.attempts, again.started_at) == ("w2", 2, started.started_at)
    with pytest.raises(JobOwnershipLost, match="no longer worker w1's"):
        b.transition(job.id, "failed", owner="w1", error="late")
    assert a.get(job.id).state == "running"  # nothing changed
    a.update(job.id, step=5, max_steps=10)
    a.merge_metrics(job.id, {"loss": 1.5})
    b.merge_metrics(job.id, {"lr": 0.1}, step=6)
    done = b.transition(job.id, "succeeded", owner="w2", worker=None, adapter_path="/a", model_name="m",
                        model_version="3")
    assert (done.state, done.worker, done.step, done.progress) == ("succeeded", None, 6, 1.0)
    assert done.metrics == {"loss": 1.5, "lr": 0.1} and done.finished_at is not None
    assert a.find_by_model_version("m", "3").id == job.id and a.find_by_model_version("m", "4") is None
    with pytest.raises(JobStateConflict, match="cannot run"):
        a.start(job.id, "w3", attempt=3)
    with pytest.raises(JobNotFound):
        a.transition("ft-nope", "running")


def test_evals_queue_start_finish(open_store: Open) -> None:
    a, b = open_store(), open_store()
    queued = make(a)
    with pytest.raises(JobStateConflict, match="no registered adapter"):
        a.queue_evals(queued.id)
    job_id = succeeded(a)
    first = b.queue_evals(job_id, suites=["smoke"])
    assert first.evals_state == "pending" and first.evals["seq"] == 1 and first.evals["suites_requested"] == ["smoke"]
    assert [j.id for j in a.unfinished()] == [queued.id, job_id]
    running = a.start_evals(job_id, "w9")
    assert (running.evals_state, running.worker, running.evals["attempts"]) == ("running", "w9", 1)
    with pytest.raises(JobStateConflict, match="running now"):
        b.queue_evals(job_id)
    assert b.start_evals(job_id, "w10").evals["attempts"] == 2  # its worker was lost: evaluated again
    done = b.finish_evals(job_id, "passed", {"verdicts": {"smoke": True}})
    assert (done.evals_state, done.worker, done.state) == ("passed", None, "succeeded")
    assert done.evals["verdicts"] == {"smoke": True} and done.evals["seq"] == 1
    with pytest.raises(JobStateConflict, match="no evaluation waiting"):
        a.start_evals(job_id, "w9")
    assert a.queue_evals(job_id).evals == {"attempts": 0, "queued_at": pytest.approx(a.get(job_id).evals["queued_at"]),
                                          "suites_requested": None, "seq": 2}
    with pytest.raises(ValueError):
        a.finish_evals(job_id, "running", {})


def test_request_cancel(open_store: Open) -> None:
    a, b = open_store(), open_store()
    queued = make(a)
    cancelled = b.request_cancel(queued.id)
    assert (cancelled.state, cancelled.cancel_requested) == ("cancelled", True) and cancelled.finished_at
    running = make(a)
    a.start(running.id, "w1", attempt=1)
    flagged = b.request_cancel(running.id)
    assert (flagged.state, flagged.cancel_requested) == ("running", True)
    assert (Path(running.run_dir) / "CANCEL").is_file()  # a worker that only watches its run folder stops too
    assert a.get(running.id).cancel_requested is True  # the worker's handle sees the flag
    with pytest.raises(JobStateConflict, match="nothing to cancel"):
        a.request_cancel(queued.id)


def test_fail_lost(open_store: Open) -> None:
    a, b = open_store(), open_store()
    lost = make(a)
    a.start(lost.id, "w1", attempt=3)
    failed = b.fail_lost(lost.id, "its workers were lost 3 times")
    assert (failed.state, failed.error_code, failed.worker) == ("failed", "worker_lost", None)
    assert b.fail_lost(lost.id, "again") is None  # ended already
    asked = make(a)
    a.request_cancel(asked.id)  # queued: cancelled at once
    flagged = make(a)
    a.start(flagged.id, "w1", attempt=1)
    a.request_cancel(flagged.id)
    assert b.fail_lost(flagged.id, "gone").state == "cancelled"  # it was asked to stop: cancelled, not failed
    assert b.fail_lost("ft-nope", "gone") is None
    job_id = succeeded(a)
    a.queue_evals(job_id)
    assert b.fail_lost(job_id, "stale", evals_seq=0) is None  # another evaluation's: left alone
    after = b.fail_lost(job_id, "evals lost", evals_seq=1)
    assert (after.state, after.evals_state, after.evals["error"]) == ("succeeded", "error", "evals lost")


def test_deployments_upsert_list_delete(open_store: Open) -> None:
    a, b = open_store(), open_store()
    a.save_deployment(alias="tuned", model="m", version="1", backend="vllm", served_name="m-v1", adapter_path="/a1",
                      actor="alice")
    a.save_deployment(alias="Another", model="n", version="2", backend="local", served_name="n-v2",
                      adapter_path="/n2")
    b.save_deployment(alias="tuned", model="m", version="2", backend="vllm", served_name="m-v2", adapter_path="/a2",
                      fallback="m-v1", actor="bob")  # the same alias again: replaced
    got = a.deployments()
    assert [d["alias"] for d in got] == ["Another", "tuned"]  # byte order on both backends
    tuned = got[1]
    assert {k: v for k, v in tuned.items() if k != "updated_at"} == {
        "alias": "tuned", "model": "m", "version": "2", "backend": "vllm", "served_name": "m-v2",
        "adapter_path": "/a2", "fallback": "m-v1", "actor": "bob"}
    assert isinstance(tuned["updated_at"], float)
    assert b.delete_deployment("tuned") is True and b.delete_deployment("tuned") is False
    assert [d["alias"] for d in a.deployments()] == ["Another"]


def test_audit_events_across_handles(open_store: Open) -> None:
    a, b = open_store(), open_store()
    a.audit(actor="alice", action="promote", model="m", version="3", job_id="ft-1", reason="better",
            details={"from": "2"}, request_id="req-1")
    a.audit(actor="bob", action="cancel", job_id="ft-2")
    events = b.audit_events()
    assert [e.action for e in events] == ["cancel", "promote"]  # newest first
    promote = events[1]
    assert (promote.trail, promote.subject_kind, promote.subject, promote.subject_ref, promote.from_ref,
            promote.to_ref, promote.request_id) == ("adapters", "adapter", "m", "ft-1", "2", "3", "req-1")
    assert b.audit_log(model="m") == [{"id": promote.id, "at": promote.at, "actor": "alice", "action": "promote",
                                        "model": "m", "version": "3", "job_id": "ft-1", "reason": "better",
                                        "details": {"from": "2"}}]
    assert b.audit_log()[0]["model"] is None and b.audit_log()[0]["job_id"] == "ft-2"


def test_racing_writers_do_not_lose_updates(open_store: Open, monkeypatch) -> None:
    """merge_metrics reads, then writes: two processes doing it at once must both land (writers take turns: the
    file's write lock on SQLite, the store's advisory lock on Postgres). The read is slowed down to make them meet."""
    read = JobStore._row

    def slow(db, columns, job_id):
        row = read(db, columns, job_id)
        time.sleep(0.01)
        return row

    monkeypatch.setattr(JobStore, "_row", staticmethod(slow))
    stores = [open_store(), open_store()]
    job = make(stores[0])
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def merge(i: int) -> None:
        barrier.wait()
        try:
            for n in range(10):
                stores[i].merge_metrics(job.id, {f"k{i}_{n}": n})
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=merge, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(stores[1].get(job.id).metrics) == 20


def test_a_shared_job_queue_puts_the_store_in_postgres(tmp_path: Path, postgres_url: str) -> None:
    # database_url alone does not: the jobs run on each home's own queue, on that home's files
    assert Settings(home=tmp_path, database_url=postgres_url).finetune.url is None
    settings = Settings(home=tmp_path, jobs={"url": postgres_url})
    assert settings.finetune.url is not None
    store = open_job_store(settings)
    try:
        assert store.postgres and store.path is None
        job = make(store)
        assert store.get(job.id).state == "queued"
    finally:
        store.close()
    assert not settings.finetune.resolved_jobs_db(tmp_path).exists()  # no SQLite file made beside it
    assert (settings.finetune.resolved_runs_dir(tmp_path) / job.id / "job.log").is_file()  # logs: the home's files
    local = open_job_store(Settings(home=tmp_path))
    try:
        assert not local.postgres and local.path == settings.finetune.resolved_jobs_db(tmp_path)
    finally:
        local.close()


def test_finetune_url_must_be_postgres(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"finetune\.url must be a postgresql:// URL"):
        Settings(home=tmp_path, finetune={"url": "sqlite:///x.db"})


def test_postgres_schema_times_and_downgrade(postgres_url: str, tmp_path: Path, monkeypatch) -> None:
    """The migrations on Postgres: 8-byte times, no audit table of the store's own (its events are the kernel's),
    at head a reopen migrates nothing, and down to base and up again works."""
    import psycopg
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    def opened() -> JobStore:
        return JobStore(PostgresFile(postgres_url, MIGRATIONS, what=WHAT, setting="finetune.url", name="t",
                                     with_audit=True), tmp_path / "runs")

    store = opened()
    store.audit(actor="alice", action="deploy", model="m", version="1")
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        types = dict(conn.execute("SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                                  "WHERE table_name IN ('jobs', 'deployments') AND column_name LIKE '%_at'"))
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert set(types.values()) == {"double precision"} and "jobs.heartbeat_at" in types
    assert "audit" not in tables and {"jobs", "deployments", "audit_events"} <= tables
    with monkeypatch.context() as m:
        m.setattr(migrate, "_upgrade", lambda *a, **k: pytest.fail("a store at head ran a migration"))
        opened().close()

    engine = create_engine("postgresql+psycopg://", poolclass=NullPool, creator=lambda: psycopg.connect(postgres_url))
    try:
        with engine.begin() as bind:
            command.downgrade(migrate.alembic_config(bind, MIGRATIONS), "base")
    finally:
        engine.dispose()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert not tables & {"jobs", "deployments", "audit"}
    again = opened()
    try:
        assert make(again).state == "queued"
        assert [e.action for e in again.audit_events()] == ["deploy"]  # the kernel's table kept its events
    finally:
        again.close()


def test_a_foreign_jobs_table_is_refused_not_altered(postgres_url: str, tmp_path: Path) -> None:
    """MLflow keeps a table named jobs too: in a database shared with it the store refuses to start rather than add
    its columns to MLflow's table."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT)")
    with pytest.raises(RuntimeError, match="not Keel's fine-tuning jobs"):
        JobStore(PostgresFile(postgres_url, MIGRATIONS, what=WHAT, setting="finetune.url", name="t"), tmp_path)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        columns = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                              "WHERE table_name = 'jobs'")}
    assert columns == {"id", "status"}
