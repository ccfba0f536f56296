"""The stores that moved onto the shared database, on both backends: SQLite under the home (the embedded default)
and Postgres (``database_url``), where every API process (or machine) reads what another wrote. Each test opens two
handles on one store, as two processes would."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.tools import ToolContext, ToolObservation
from app.core import db as db_module
from app.core.audit import AuditEvent
from app.core.db import PostgresFile, SqliteFile, postgres_sql
from app.core.errors import Conflict, StoreUnavailable
from app.services.response_store import ResponseStore, StoredResponse
from app.settings import Settings
from ingest import manifest
from ingest.manifest import STALE_AFTER_S, FileEntry, SnapshotStore
from lifecycle.batch import store as batch_store
from lifecycle.batch.store import BatchStore
from lifecycle.monitor.store import MIGRATIONS as DRIFT_MIGRATIONS
from lifecycle.monitor.store import DriftStore, open_drift_store
from lifecycle.pipeline.store import MIGRATIONS as PIPELINE_MIGRATIONS
from lifecycle.pipeline.store import PipelineStore, open_pipeline_store
from lifecycle.tools import open_tool_audit
from tests.postgres import store_handles


def handles(request, tmp_path: Path, sqlite: Callable[[Path], Any], postgres: Callable[[Path, str], Any]
            ) -> Iterator[Callable[[], Any]]:
    """Handles on one store; on Postgres each handle has a home of its own (another machine)."""
    homes = iter(tmp_path / f"host{i}" for i in range(100))
    yield from store_handles(request, lambda: sqlite(tmp_path), lambda url: postgres(next(homes), url))


@pytest.fixture(params=["sqlite", "postgres"])
def drift(request, tmp_path: Path):
    yield from handles(request, tmp_path, lambda home: DriftStore(home / "monitor.db"), lambda home, url: DriftStore(
        PostgresFile(url, DRIFT_MIGRATIONS, what="the drift monitor's store", setting="monitor.url", name="t",
                     with_audit=True)))


@pytest.fixture(params=["sqlite", "postgres"])
def pipelines(request, tmp_path: Path):
    yield from handles(request, tmp_path, lambda home: PipelineStore(home / "pipelines.db"),
                       lambda home, url: PipelineStore(PostgresFile(
                           url, PIPELINE_MIGRATIONS, what="the pipeline store", setting="pipelines.url", name="t",
                           with_audit=True)))


@pytest.fixture(params=["sqlite", "postgres"])
def snapshots(request, tmp_path: Path):
    yield from handles(request, tmp_path, lambda home: SnapshotStore(home / "rag.db"),
                       lambda home, url: SnapshotStore(home / "rag.db", url=Settings(database_url=url).database_url))


@pytest.fixture(params=["sqlite", "postgres"])
def batches(request, tmp_path: Path):
    yield from handles(request, tmp_path, lambda home: BatchStore(home),
                       lambda home, url: BatchStore(home, url=Settings(database_url=url).database_url))


@pytest.fixture(params=["sqlite", "postgres"])
def tool_audits(request, tmp_path: Path):
    yield from handles(request, tmp_path, lambda home: open_tool_audit(home),
                       lambda home, url: open_tool_audit(home, Settings(database_url=url).database_url))


@pytest.fixture(params=["sqlite", "postgres"])
def responses(request, tmp_path: Path):
    yield from handles(request, tmp_path, lambda home: ResponseStore(home),
                       lambda home, url: ResponseStore(home, url=Settings(database_url=url).database_url))


def result(i: int, verdict: str = "ok", at: float = 1000.0) -> dict[str, Any]:
    return {"id": f"drift-{i:016x}", "created": at + i + 0.123456, "actor": "k", "verdict": verdict,
            "drift_share": 0.25, "reference": {"kind": "window", "rows": 10}, "current": {"rows": 20}}


def test_drift_results_and_their_audit_are_seen_by_every_process(drift) -> None:
    a, b = drift(), drift()
    a.add(result(1), AuditEvent(trail="monitor", action="drift.check", subject="drift-1"))
    a.add(result(2, "drift"))
    assert b.get(result(1)["id"])["created"] == pytest.approx(1001.123456, abs=1e-6)  # microseconds survive
    assert [r["id"] for r in b.list()] == [result(2)["id"], result(1)["id"]]
    assert [r["id"] for r in b.list(verdict="drift")] == [result(2)["id"]]
    assert [r["id"] for r in b.list(before=1002.0)] == [result(1)["id"]]
    assert [e.action for e in b.audit_events()] == ["drift.check"]
    assert b.get("drift-ffffffffffffffff") is None


def test_pipeline_runs_one_open_run_and_retries_across_processes(pipelines) -> None:
    a, b = pipelines(), pipelines()
    armed = a.arm("p", now=1234.5)
    assert b.arm("p", now=9999.0) == armed  # the first arming holds
    run = a.create(pipeline="p", model="m", trigger={"kind": "manual"}, definition={"x": 1}, definition_hash="h",
                   actor="alice", skip=("canary",))
    with pytest.raises(Conflict) as e:  # one open run per pipeline, whichever process starts the second
        b.create(pipeline="p", model="m", trigger={"kind": "drift"}, definition={}, definition_hash="h", actor="bob")
    assert e.value.code == "pipeline_run_open"
    assert b.open_run("p").id == run.id
    b.step_started(run.id, "dataset")
    a.step_update(run.id, "dataset", artifacts={"rows": 5}, log="built\n")
    b.step_update(run.id, "dataset", artifacts={"hash": "d"}, state="failed", error="boom", finished=True)
    b.finish(run.id, "failed", outcome="error", error="boom")
    got = a.get(run.id)
    assert (got.state, got.outcome) == ("failed", "error")
    step = got.steps["dataset"]
    assert step.artifacts == {"rows": 5, "hash": "d"} and step.attempts == 1 and "built" in step.log
    assert got.steps["canary"].state == "skipped"

    results: list[str] = []

    def retry(store: PipelineStore) -> None:
        try:
            store.reopen(run.id, actor="x", reason="again")
            results.append("reopened")
        except Conflict as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=retry, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["pipeline_run_state", "reopened"]  # two retries at once resume it once
    assert [e.action for e in b.audit_events(subject_ref=run.id)] == ["run.retry", "run.failed", "run.start"]


def test_a_check_then_write_is_not_raced_by_another_process(pipelines) -> None:
    """``set_run(expect=...)`` reads the state and then writes: writers take turns, so of two processes moving
    the same run from 'queued' only one passes the check."""
    a, b = pipelines(), pipelines()
    run = a.create(pipeline="p", model="m", trigger={}, definition={}, definition_hash="h", actor="alice")
    outcomes: list[str] = []

    def move(store: PipelineStore, to: str) -> None:
        try:
            store.set_run(run.id, state=to, expect=frozenset({"queued"}))
            outcomes.append(to)
        except Conflict as exc:
            outcomes.append(exc.code)

    for _ in range(5):
        outcomes.clear()
        a.set_run(run.id, state="queued")
        threads = [threading.Thread(target=move, args=(s, to)) for s, to in ((a, "running"), (b, "waiting"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("pipeline_run_state") == 1, outcomes


def test_ingest_snapshots_are_shared_and_only_dead_runs_are_failed(snapshots, monkeypatch) -> None:
    a, b = snapshots(), snapshots()
    done = a.start("kb", embedding_model="m", sparse_encoder="s", chunker_config={"t": 1}, paths=["/d"], prune=True)
    a.finish(done, files=[FileEntry(doc_id="d1", source="/d/1.md", source_sha256="x", version="v1", chunks=2)],
             counts={"files": 1, "seconds": 0.5}, rejections=[])
    running = a.start("kb", embedding_model="m", sparse_encoder="s", chunker_config={}, paths=["/d"], prune=False)
    got = b.get(done)
    assert got.status == "completed" and got.prune and got.files[0].chunks == 2 and got.counts["seconds"] == 0.5
    assert b.latest("kb").id == done and {s.id for s in b.list("kb")} == {running, done}
    assert b.get(done, with_files=False).files is None
    # Another live process's run (here: this process, as its own) is left alone ...
    assert b.mark_interrupted("kb") == 0 and a.get(running).status == "running"
    # ... until it has made no progress for STALE_AFTER_S: then it is a dead process's.
    a.beat(running)
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + STALE_AFTER_S + 1)
    assert b.mark_interrupted("kb") == 1
    got = a.get(running)
    assert got.status == "failed" and "interrupted" in got.error


def test_batch_files_and_results_are_read_through_any_process(batches) -> None:
    a, b = batches(), batches()
    row = {"id": "file-1", "owner": "k1", "filename": "in.jsonl", "purpose": "batch", "bytes": 0, "created_at": 5}
    data = b"".join(b'{"custom_id": "%d"}\n' % i for i in range(3000))  # more than one chunk below
    row["bytes"] = len(data)
    old = batch_store.CHUNK_BYTES
    batch_store.CHUNK_BYTES = 10_000
    try:
        a.add_file(row, data)
    finally:
        batch_store.CHUNK_BYTES = old
    seen = b.get_file("file-1")
    assert b.content(seen).read_bytes() == data  # on Postgres: from the database, on another machine's disk
    assert [f["id"] for f in b.list_files(owner="k1", purpose="batch", limit=10)] == ["file-1"]
    batch = {"id": "batch_1", "status": "in_progress", "created_at": 6}
    a.put_batch(batch, owner="k1", job_id="j1")
    a.add_results("batch_1", [(0, "a", True, {"n": 0}), (1, "b", False, {"n": 1})])
    b.add_results("batch_1", [(1, "b", True, {"n": 1, "again": True})])  # a line answered again replaces
    assert b.counts("batch_1") == (2, 0) and b.done_lines("batch_1") == {0, 1}
    assert [r[2] for r in a.results("batch_1")] == [{"n": 0}, {"n": 1, "again": True}]
    assert b.put_batch({**batch, "status": "cancelling"}, owner="k1")
    assert a.status("batch_1") == "cancelling" and a.get_batch("batch_1")[2] == "j1"  # the job id is kept
    # A cancel and the runner's own writes cross between processes: neither undoes the other.
    assert not a.put_batch({**batch, "status": "in_progress"}, owner="k1")  # a cancelled batch does not restart
    assert a.put_batch({**batch, "status": "completed"}, owner="k1")
    assert not b.put_batch({**batch, "status": "cancelling"}, owner="k1")  # nor does a finished one reopen
    assert a.status("batch_1") == "completed"
    # Processes (threads here) fetching one file at once each get all of it.
    got: list[bytes] = []
    c = batches()
    threads = [threading.Thread(target=lambda: got.append(c.content(seen).read_bytes())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [data] * 6
    b.delete_file(seen)
    assert a.get_file("file-1") is None and b.content(seen) is None


def test_a_stored_response_goes_on_through_another_process(responses) -> None:
    a, b = responses(), responses()
    a.put(StoredResponse("resp_1", "k1", {"id": "resp_1", "created_at": 7}, [{"role": "user", "content": "hi"}]))
    assert b.get("resp_1", "k1").conversation == [{"role": "user", "content": "hi"}]
    assert b.get("resp_1", "k2") is None  # another key's response is as absent as an unknown one
    assert not b.delete("resp_1", "k2") and b.delete("resp_1", "k1") and a.get("resp_1", "k1") is None


def test_every_process_s_tool_calls_are_read_together(tool_audits) -> None:
    a, b = tool_audits(), tool_audits()
    ctx = ToolContext(principal="key-1", run_id="run-1", request_id="req-1")
    a.record(ctx, ToolObservation(tool="registry_list", args={"x": 1}, ok=True, output="[]", call_id="c1"))
    b.record(ctx, ToolObservation(tool="eval_run", args={}, ok=False, output="denied\x00", call_id="c2",
                                  error_code="tool_scope_denied"))  # Postgres text holds no NUL: kept, replaced
    a.flush()
    events = b.events()
    assert [(e.action, e.subject) for e in events] == [("tool.denied", "eval_run"), ("tool.call", "registry_list")]
    assert events[1].details["args"] == '{"x": 1}' and events[0].actor == "key-1"


def test_a_writer_stuck_elsewhere_is_a_503_after_the_lock_timeout(postgres_url: str, monkeypatch) -> None:
    monkeypatch.setattr(db_module, "LOCK_TIMEOUT_S", 0.3)
    a, b = (PipelineStore(PostgresFile(postgres_url, PIPELINE_MIGRATIONS, what="the pipeline store",
                                       setting="pipelines.url", name="t", with_audit=True)) for _ in range(2))
    try:
        # another process's writer, holding the store's turn
        with a._file.tx(), pytest.raises(StoreUnavailable, match=r"pipelines\.url"):
            b.arm("p")
        assert b.arm("p") > 0  # and once it is done, writes go through
    finally:
        a.close()
        b.close()


def test_a_run_of_an_earlier_process_with_the_same_pid_is_dead() -> None:
    host, now = socket.gethostname(), time.time()
    assert not manifest._gone(manifest._RUNNER, now)  # this process's own
    assert manifest._gone(f"{host}:{os.getpid()}:0ther", now)  # a restarted container: pid 1 again
    assert not manifest._gone(f"elsewhere:{os.getpid()}:0ther", now)  # another machine's, beating
    assert manifest._gone(f"elsewhere:{os.getpid()}:0ther", now - STALE_AFTER_S - 1)  # ... silent too long


def test_database_url_moves_every_store_and_sqlite_stays_the_default(tmp_path: Path, postgres_url: str) -> None:
    shared = Settings(home=tmp_path, database_url=postgres_url)
    names = {name for name, url in shared.store_urls().items() if url}
    assert {"monitor.url", "batch.url", "rag.snapshots_url"} <= names
    # The job queue is shared on purpose only (jobs read files under the home); the stores of the work on it,
    # pipeline runs and fine-tuning jobs, follow it.
    assert not {"jobs.url", "pipelines.url", "finetune.url"} & names
    queued = Settings(home=tmp_path, database_url=postgres_url, jobs={"url": postgres_url})
    assert {"jobs.url", "pipelines.url", "finetune.url"} <= {n for n, url in queued.store_urls().items() if url}
    for store in (open_drift_store(shared), open_pipeline_store(queued)):
        assert isinstance(store._file, PostgresFile)
        store.close()
    assert not any(tmp_path.glob("*.db"))
    local = Settings(home=tmp_path)
    for store in (open_drift_store(local), open_pipeline_store(local)):
        assert isinstance(store._file, SqliteFile)
        store.close()
    with pytest.raises(ValueError, match=r"batch\.url must be a postgresql:// URL"):
        Settings(batch={"url": "sqlite:///x"})


def test_sql_is_written_once_for_both() -> None:
    assert postgres_sql("SELECT a FROM t WHERE b LIKE 'x%' AND c = ?") == (
        "SELECT a FROM t WHERE b LIKE 'x%%' AND c = %s")
