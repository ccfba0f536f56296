"""Contract tests of the job queue (app.jobs.queue): every implementation passes the same suite.

SQLite (a file per test) and Postgres (a fresh database per test on a real server, tests/postgres.py; where
none can be had, these tests fail rather than skip). Each test opens independent connections to one queue,
like two API processes, through ``open_queue``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core.errors import Conflict, NotFound
from app.core.migrate import upgrade_postgres, upgrade_sqlite
from app.jobs.queue import (
    MIGRATIONS,
    JobQueue,
    LeaseLost,
    PostgresJobQueue,
    SqliteJobQueue,
    new_worker_id,
    retire_worker,
)

ROOT = Path(__file__).resolve().parents[2]
QueueFactory = Callable[..., JobQueue]


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Callable[..., JobQueue]]:
    path = tmp_path / "jobs.db"
    return str(path), lambda **kw: SqliteJobQueue(path, **kw)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Callable[..., JobQueue]]:
    url = request.getfixturevalue("postgres_url")
    return url, lambda **kw: PostgresJobQueue(url, **kw)


QUEUES = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=sorted(QUEUES))
def open_queue(request, tmp_path) -> Iterator[QueueFactory]:
    target, factory = QUEUES[request.param](request, tmp_path)
    opened: list[JobQueue] = []

    def make(**kw) -> JobQueue:
        q = factory(**{"retry_backoff_s": 0.0, **kw})
        opened.append(q)
        return q

    make.target = target  # type: ignore[attr-defined]
    yield make
    for q in opened:
        q.close()


@pytest.fixture
def queue(open_queue) -> JobQueue:
    return open_queue()


def test_enqueue_claim_complete(queue) -> None:
    job = queue.enqueue("ingest", {"paths": ["a"], "n": 1}, owner="k1")
    assert (job.state, job.attempts, job.owner, job.payload) == ("queued", 0, "k1", {"paths": ["a"], "n": 1})
    assert queue.get(job.id) == job
    assert queue.claim(["eval"], "w1") is None  # another kind
    claimed = queue.claim(["eval", "ingest"], "w1")
    assert claimed is not None and claimed.id == job.id
    assert (claimed.state, claimed.attempts, claimed.claimed_by) == ("running", 1, "w1")
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    assert queue.claim(["ingest"], "w2") is None  # nothing left
    done = queue.complete(job.id, "w1", {"snapshot_id": "s1"})
    assert done.state == "succeeded" and done.result == {"snapshot_id": "s1"} and done.finished_at
    assert queue.get(job.id) == done
    public = done.public()
    assert public["state"] == "succeeded" and "claimed_by" not in public
    with pytest.raises(ValueError):
        queue.enqueue("Bad Kind", {})
    with pytest.raises(ValueError):
        queue.enqueue("ingest", {"x": object()})


def test_claims_are_fifo(queue) -> None:
    ids = [queue.enqueue("ingest", {"i": i}).id for i in range(3)]
    assert [queue.claim(["ingest"], "w").id for _ in range(3)] == ids


def test_each_job_is_claimed_exactly_once_by_racing_threads(open_queue) -> None:
    first = open_queue()
    ids = {first.enqueue("ingest", {"i": i}).id for i in range(60)}
    queues = [open_queue() for _ in range(6)]  # six connections, like six processes
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(queues))

    def work(q: JobQueue, worker: str) -> None:
        start.wait()
        while (job := q.claim(["ingest"], worker)) is not None:
            with lock:
                claimed.append((job.id, worker))
            q.complete(job.id, worker)
            time.sleep(0.001)  # some work: lets the others in

    threads = [threading.Thread(target=work, args=(q, f"w{i}")) for i, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = [job_id for job_id, _ in claimed]
    assert sorted(got) == sorted(ids)  # every job once, none twice
    assert {j.state for j in first.list(limit=100)} == {"succeeded"}


CLAIMER = textwrap.dedent("""
    import json, sys
    from app.jobs.queue import PostgresJobQueue, SqliteJobQueue
    target, worker, out = sys.argv[1], sys.argv[2], sys.argv[3]
    q = PostgresJobQueue(target) if target.startswith("postgresql") else SqliteJobQueue(target)
    got = []
    while (job := q.claim(["ingest"], worker)) is not None:
        got.append(job.id)
        q.complete(job.id, worker)
    q.close()
    open(out, "w").write(json.dumps(got))
""")


def test_each_job_is_claimed_exactly_once_by_two_processes(open_queue, tmp_path: Path) -> None:
    q = open_queue()
    ids = {q.enqueue("ingest", {"i": i}).id for i in range(150)}
    script = tmp_path / "claimer.py"
    script.write_text(CLAIMER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), open_queue.target, f"p{i}", str(tmp_path / f"p{i}.json")],
                              env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read() if p.stderr else ""
    got = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert sorted(got[0] + got[1]) == sorted(ids)


def test_heartbeat_progress_and_lease_loss(open_queue) -> None:
    q = open_queue(lease_s=30)
    other = open_queue(lease_s=30)  # another process's connection
    job = q.enqueue("ingest", {})
    q.claim(["ingest"], "w1")
    assert q.heartbeat(job.id, "w1") is False
    assert q.progress(job.id, "w1", {"files_done": 2}) is False
    assert other.get(job.id).progress == {"files_done": 2}
    with pytest.raises(LeaseLost):
        q.heartbeat(job.id, "w2")  # not its job
    # w1 falls silent past the lease: another process takes the job back and another worker claims it
    moved = other.recover_stale(now=time.time() + 31)
    assert [(j.id, j.state, j.error["code"]) for j in moved] == [(job.id, "queued", "worker_lost")]
    again = other.claim(["ingest"], "w2")
    assert again.id == job.id and again.attempts == 2 and again.progress == {"files_done": 2}
    for call in (lambda: q.heartbeat(job.id, "w1"), lambda: q.progress(job.id, "w1", {"files_done": 3}),
                 lambda: q.complete(job.id, "w1"), lambda: q.fail(job.id, "w1", "x"),
                 lambda: q.release(job.id, "w1"), lambda: q.confirm_cancel(job.id, "w1")):
        with pytest.raises(LeaseLost):
            call()
    assert other.get(job.id).progress == {"files_done": 2}  # the old worker wrote nothing
    assert other.complete(job.id, "w2").state == "succeeded"
    with pytest.raises(LeaseLost):
        other.heartbeat(job.id, "w2")  # finished: no lease any more


def test_recover_stale_keeps_live_workers_and_takes_back_dead_ones(queue) -> None:
    live = new_worker_id()
    dead = new_worker_id()
    retire_worker(dead)  # as if its process had exited
    a = queue.enqueue("ingest", {"a": 1})
    b = queue.enqueue("ingest", {"b": 1})
    queue.claim(["ingest"], live)
    queue.claim(["ingest"], dead)
    try:
        moved = queue.recover_stale()  # nobody is silent yet: only the dead worker's job moves, at once
        assert [j.id for j in moved] == [b.id] and queue.get(b.id).state == "queued"
        assert queue.get(a.id).state == "running"
        # a worker of a process of this host that exited (its pid is gone)
        proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = f"{live.split(':')[0]}:{proc.stdout.strip()}:abcd"
        queue.claim(["ingest"], gone)
        assert [j.id for j in queue.recover_stale()] == [b.id]
        # a worker of another host is judged by its heartbeat alone
        queue.claim(["ingest"], "elsewhere:1:abcd")
        assert queue.recover_stale() == []
        # past the lease, every silent worker loses its job, live or not
        assert {j.id for j in queue.recover_stale(now=time.time() + queue.lease_s + 1)} == {a.id, b.id}
    finally:
        retire_worker(live)


def test_recover_stale_fails_a_job_out_of_attempts_and_cancels_a_cancelled_one(open_queue) -> None:
    q = open_queue(max_attempts=2, lease_s=10)
    job = q.enqueue("ingest", {})
    later = time.time() + 11
    q.claim(["ingest"], "elsewhere:1:a")
    assert q.recover_stale(now=later)[0].state == "queued"
    q.claim(["ingest"], "elsewhere:1:b")
    failed = q.recover_stale(now=later + 100)[0]
    assert failed.state == "failed" and failed.error["code"] == "worker_lost" and "2 of 2" in failed.error["message"]
    other = q.enqueue("ingest", {"x": 1})
    q.claim(["ingest"], "elsewhere:1:c")
    q.cancel(other.id)
    assert q.recover_stale(now=later + 200)[0].state == "cancelled"
    assert q.get(job.id).state == "failed"


def test_failures_retry_with_backoff_until_max_attempts(open_queue) -> None:
    q = open_queue(max_attempts=3, retry_backoff_s=60)
    job = q.enqueue("ingest", {})
    q.claim(["ingest"], "w")
    before = time.time()
    retried = q.fail(job.id, "w", {"code": "backend_error", "message": "boom"})
    assert retried.state == "queued" and retried.claimed_by is None and retried.error["message"] == "boom"
    assert 59 <= retried.run_after - before <= 61
    assert q.claim(["ingest"], "w") is None  # not before its backoff
    assert q.backoff(1) == 60 and q.backoff(2) == 120 and q.backoff(20) == 300

    fast = open_queue(max_attempts=3)  # no backoff
    job = fast.enqueue("ingest", {})
    for attempt in (1, 2, 3):
        claimed = fast.claim(["ingest"], "w")
        assert claimed.id == job.id and claimed.attempts == attempt
        after = fast.fail(job.id, "w", RuntimeError("disk full"))
    assert after.state == "failed" and after.error == {"code": "internal_error", "message": "RuntimeError: disk full"}
    assert after.finished_at is not None
    # a refused request is not retried
    job = fast.enqueue("ingest", {"bad": True})
    fast.claim(["ingest"], "w")
    assert fast.fail(job.id, "w", {"code": "invalid_request", "message": "no"}, retry=False).state == "failed"


def test_release_requeues_without_counting_the_attempt(queue) -> None:
    job = queue.enqueue("ingest", {})
    queue.claim(["ingest"], "w")
    queue.progress(job.id, "w", {"files_done": 1})
    released = queue.release(job.id, "w")
    assert (released.state, released.attempts, released.claimed_by) == ("queued", 0, None)
    again = queue.claim(["ingest"], "w2")
    assert again.id == job.id and again.attempts == 1 and again.progress == {"files_done": 1}


def test_cancel_queued_and_running(open_queue) -> None:
    q, other = open_queue(), open_queue()
    queued = q.enqueue("ingest", {"q": 1})
    cancelled = q.cancel(queued.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert q.claim(["ingest"], "w") is None
    assert q.cancel(queued.id).state == "cancelled"  # again: unchanged

    running = q.enqueue("ingest", {"r": 1}, owner="alice")
    q.claim(["ingest"], "w")
    asked = other.cancel(running.id, actor="admin-key", request_id="req-9")
    assert asked.state == "running" and asked.cancel_requested
    assert other.cancel(running.id, actor="admin-key").cancel_requested  # again: unchanged, not audited twice
    assert q.heartbeat(running.id, "w") is True  # the worker learns it at its next beat
    assert q.progress(running.id, "w", {"files_done": 1}) is True
    done = q.confirm_cancel(running.id, "w")
    assert done.state == "cancelled" and done.progress == {"files_done": 1}

    # a failed run of a job asked to cancel is not retried; a release of one ends it
    for end in (lambda job_id: q.fail(job_id, "w", "boom"), lambda job_id: q.release(job_id, "w")):
        job = q.enqueue("ingest", {"end": str(end)})
        q.claim(["ingest"], "w")
        q.cancel(job.id)
        assert end(job.id).state == "cancelled"

    finished = q.enqueue("ingest", {"f": 1})
    q.claim(["ingest"], "w")
    q.complete(finished.id, "w")
    with pytest.raises(Conflict) as e:
        q.cancel(finished.id)
    assert e.value.code == "job_finished"
    with pytest.raises(NotFound):
        q.cancel("nope")

    # every cancel is audited (trail 'jobs'), in the cancel's own transaction
    (event,) = q.history(running.id)
    assert (event.trail, event.action, event.subject_kind, event.actor, event.request_id) == (
        "jobs", "job.cancel", "ingest", "admin-key", "req-9")
    assert (event.from_ref, event.to_ref, event.details["owner"]) == ("running", "cancel_requested", "alice")
    assert q.history(queued.id)[0].to_ref == "cancelled"
    assert len(q.history()) == 4  # queued, running, and the two cancelled before they ended


def test_idempotency_key(open_queue) -> None:
    q = open_queue()
    first = q.enqueue("ingest", {"paths": ["a"]}, owner="k1", idempotency_key="req-1")
    assert q.enqueue("ingest", {"paths": ["a"]}, owner="k1", idempotency_key="req-1") == first
    assert q.enqueue("ingest", {"paths": ["a"]}, owner="k2", idempotency_key="req-1").id != first.id  # per owner
    with pytest.raises(Conflict) as e:
        q.enqueue("ingest", {"paths": ["b"]}, owner="k1", idempotency_key="req-1")
    assert e.value.code == "idempotency_key_reused"
    with pytest.raises(Conflict):
        q.enqueue("eval", {"paths": ["a"]}, owner="k1", idempotency_key="req-1")
    # no key: every enqueue is a new job
    assert q.enqueue("ingest", {}, owner="k1").id != q.enqueue("ingest", {}, owner="k1").id

    # racing requests with one key (two connections): one job
    queues = [open_queue() for _ in range(4)]
    got: list[str] = []
    start = threading.Barrier(len(queues))

    def send(qq: JobQueue) -> None:
        start.wait()
        got.append(qq.enqueue("eval", {"suite": "s"}, owner="k3", idempotency_key="race").id)

    threads = [threading.Thread(target=send, args=(qq,)) for qq in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 4 and len(set(got)) == 1
    assert len(q.list(owner="k3")) == 1


def test_owner_kind_and_state_filters(queue) -> None:
    a = queue.enqueue("ingest", {"n": 1}, owner="alice")
    b = queue.enqueue("eval", {"n": 2}, owner="bob")
    c = queue.enqueue("ingest", {"n": 3}, owner="bob")
    assert [j.id for j in queue.list()] == [c.id, b.id, a.id]  # newest first
    assert [j.id for j in queue.list(owner="bob")] == [c.id, b.id]
    assert [j.id for j in queue.list(kinds=["ingest"])] == [c.id, a.id]
    assert [j.id for j in queue.list(kinds=["ingest"], owner="bob")] == [c.id]
    assert queue.list(kinds=[]) == []
    queue.claim(["ingest"], "w")  # a: the oldest
    assert [j.id for j in queue.list(states=["running"])] == [a.id]
    assert [j.id for j in queue.list(limit=1)] == [c.id]
    assert queue.get(a.id, owner="alice").id == a.id
    with pytest.raises(NotFound):
        queue.get(a.id, owner="bob")  # another owner's job does not exist for bob
    with pytest.raises(NotFound):
        queue.get(b.id, kinds=["ingest"])
    with pytest.raises(NotFound):
        queue.cancel(a.id, owner="bob")
    assert queue.get(a.id).state == "running"


def test_prune_deletes_old_finished_jobs_only(queue) -> None:
    old = queue.enqueue("ingest", {"o": 1})
    queue.claim(["ingest"], "w")
    queue.complete(old.id, "w")
    waiting = queue.enqueue("ingest", {"w": 1})
    assert queue.prune(older_than_s=3600) == 0
    assert queue.prune(older_than_s=3600, now=time.time() + 7200) == 1
    assert [j.id for j in queue.list()] == [waiting.id]


def test_reopening_keeps_jobs_and_runs_no_migration(open_queue) -> None:
    q = open_queue()
    job = q.enqueue("ingest", {"keep": True})
    q.close()
    again = open_queue()
    assert again.get(job.id).payload == {"keep": True}
    if isinstance(again, SqliteJobQueue):
        assert upgrade_sqlite(again._db, MIGRATIONS) is False  # at head: one read of the version table
    else:
        assert upgrade_postgres(open_queue.target, MIGRATIONS) is False


def test_migrations_follow_the_naming_convention() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS.location))
    assert script.get_heads() == [MIGRATIONS.head]
    for rev in script.walk_revisions():
        assert Path(rev.path).name.startswith(rev.revision + "_"), rev.path
    assert (MIGRATIONS.location / "__init__.py").exists()
    assert (MIGRATIONS.location / "versions" / "__init__.py").exists()


OPENER = textwrap.dedent("""
    import sys
    from app.jobs.queue import SqliteJobQueue
    q = SqliteJobQueue(sys.argv[1])
    q.enqueue("ingest", {"by": sys.argv[2]})
    q.close()
""")


def test_processes_opening_one_new_queue_at_once(tmp_path: Path) -> None:
    """The API and a CLI open a new jobs.db together: one migrates, the other waits and finds it at head."""
    script = tmp_path / "opener.py"
    script.write_text(OPENER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "jobs.db"), str(i)], env=env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read() if p.stderr else ""
    q = SqliteJobQueue(tmp_path / "jobs.db")
    try:
        assert sorted(j.payload["by"] for j in q.list()) == ["0", "1", "2"]
    finally:
        q.close()
