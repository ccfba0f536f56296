"""The job store's state machine, cancellation, crash recovery (through the job queue) and logs."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from app.jobs.queue import SqliteJobQueue, new_worker_id, worker_gone
from finetune.dispatch import TRAIN, queue_training, reconcile
from finetune.errors import JobNotFound, JobStateConflict
from finetune.jobs import STATES, TERMINAL, TRANSITIONS, JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    yield s
    s.close()


@pytest.fixture
def queue(tmp_path):
    q = SqliteJobQueue(tmp_path / "queue.db", lease_s=60)
    yield q
    q.close()


def make(store: JobStore, name: str = "demo"):
    return store.create(name=name, spec_yaml=f"name: {name}\n", spec_hash="h" * 64, submitted_by="tester")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_submit_queues_with_a_run_folder_and_a_log(store):
    job = make(store)
    assert job.state == "queued" and job.id.startswith("ft-") and job.progress == 0.0
    assert store.log_path(job.id).is_file()
    assert "queued by tester" in store.read_log(job.id)[0]
    assert [j.id for j in store.list()] == [job.id]
    assert store.list(state="running") == []


def test_start_counts_the_attempt_and_refuses_an_ended_job(store):
    job = make(store)
    got = store.start(job.id, "host:1:a", attempt=1)
    assert got.state == "running" and got.attempts == 1 and got.worker == "host:1:a"
    again = store.start(job.id, "host:2:b", attempt=2, note="recovery: its worker host:1:a is gone")
    assert again.attempts == 2 and again.worker == "host:2:b" and again.started_at == got.started_at
    assert "recovery: its worker host:1:a is gone" in store.read_log(job.id)[0]
    store.transition(job.id, "failed", error="boom")
    with pytest.raises(JobStateConflict, match="cannot run"):
        store.start(job.id, "host:3:c", attempt=3)


def test_transitions_follow_the_state_machine(store):
    assert set(TRANSITIONS) == set(STATES)
    job = make(store)
    with pytest.raises(JobStateConflict):
        store.transition(job.id, "succeeded")  # queued jobs must run first
    store.start(job.id, "h:1:a", attempt=1)
    done = store.transition(job.id, "succeeded", adapter_path="/x")
    assert done.state == "succeeded" and done.finished_at and done.progress == 1.0
    for state in STATES:
        with pytest.raises(JobStateConflict, match="succeeded"):
            store.transition(job.id, state)
    assert all(not TRANSITIONS[s] for s in TERMINAL)


def test_unknown_job_is_404(store):
    with pytest.raises(JobNotFound) as exc:
        store.get("ft-nope")
    assert exc.value.status == 404
    for call in (lambda: store.transition("ft-nope", "running"), lambda: store.request_cancel("ft-nope"),
                 lambda: store.read_log("ft-nope")):
        with pytest.raises(JobNotFound):
            call()


def test_cancel_queued_is_immediate(store):
    job = store.request_cancel(make(store).id)
    assert job.state == "cancelled" and job.cancel_requested
    with pytest.raises(JobStateConflict):
        store.start(job.id, "h:1:a", attempt=1)


def test_cancel_running_sets_the_flag_and_the_file(store):
    job = make(store)
    store.start(job.id, "h:1:a", attempt=1)
    job = store.request_cancel(job.id)
    assert job.state == "running" and job.cancel_requested
    assert (store.runs_dir / job.id / "CANCEL").exists()
    assert store.transition(job.id, "cancelled").state == "cancelled"


def test_cancel_finished_is_a_conflict(store):
    job = make(store)
    store.start(job.id, "h:1:a", attempt=1)
    store.transition(job.id, "failed", error="boom")
    with pytest.raises(JobStateConflict) as exc:
        store.request_cancel(job.id)
    assert exc.value.code == "finetune_job_state" and exc.value.status == 409


def test_progress_and_metrics(store):
    job = make(store)
    store.start(job.id, "h:1:a", attempt=1)
    store.update(job.id, step=3, max_steps=12)
    store.merge_metrics(job.id, {"last_loss": 2.0})
    store.merge_metrics(job.id, {"last_eval_loss": 1.5})
    job = store.get(job.id)
    assert job.progress == 0.25 and job.metrics == {"last_loss": 2.0, "last_eval_loss": 1.5}


def test_a_zombie_worker_counts_as_gone():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.5)  # exited but not reaped yet (the API's fine-tuning worker child): a zombie
    assert worker_gone(f"{socket.gethostname()}:{p.pid}:w")
    p.wait()


def claim_as_dead_worker(store: JobStore, queue: SqliteJobQueue, job_id: str) -> str:
    dead = f"{socket.gethostname()}:{dead_pid()}:w"
    task = queue.claim([TRAIN], dead)
    assert task.payload["job_id"] == job_id
    store.start(job_id, dead, attempt=task.attempts)
    return dead


def test_a_dead_workers_job_goes_back_to_the_queue_and_the_next_run_counts(store, queue):
    job = make(store)
    queue_training(queue, job, max_attempts=3)
    claim_as_dead_worker(store, queue, job.id)
    assert reconcile(store, queue, max_attempts=3) == []  # the queue still holds it: nothing to record yet
    moved = queue.recover_stale()
    assert [t.payload["job_id"] for t in moved] == [job.id] and moved[0].state == "queued"
    again = queue.claim([TRAIN], "h:2:b")
    assert again.attempts == 2 and again.error["code"] == "worker_lost" and "is gone" in again.error["message"]
    assert store.start(job.id, "h:2:b", attempt=again.attempts).attempts == 2


def test_recovery_leaves_live_workers_alone(store, queue):
    job = make(store)
    queue_training(queue, job, max_attempts=3)
    queue.claim([TRAIN], new_worker_id())
    assert queue.recover_stale() == []


def test_recovery_by_silent_heartbeat_on_another_host(store, queue):
    job = make(store)
    queue_training(queue, job, max_attempts=3)
    task = queue.claim([TRAIN], "elsewhere:42:w")
    assert queue.recover_stale() == []
    moved = queue.recover_stale(now=task.heartbeat_at + 61)
    assert moved[0].state == "queued" and "silent" in moved[0].error["message"]


def test_recovery_gives_up_after_max_attempts(store, queue):
    job = make(store)
    queue_training(queue, job, max_attempts=2)
    for _ in range(2):
        claim_as_dead_worker(store, queue, job.id)
        queue.recover_stale()
    [failed] = reconcile(store, queue, max_attempts=2)
    assert failed.state == "failed" and failed.error_code == "worker_lost" and "2 of 2 attempts" in failed.error
    assert store.get(job.id).attempts == 2
    assert "recovery: " in store.read_log(job.id)[0]


def test_recovery_of_a_job_asked_to_cancel_cancels_it(store, queue):
    job = make(store)
    task = queue_training(queue, job, max_attempts=3)
    claim_as_dead_worker(store, queue, job.id)
    store.request_cancel(job.id)
    queue.cancel(task.id)
    assert queue.recover_stale()[0].state == "cancelled"
    assert reconcile(store, queue, max_attempts=3)[0].state == "cancelled"


def test_a_job_a_worker_of_the_release_before_the_queue_still_trains_is_left_to_it(store, queue):
    job = make(store)
    store.start(job.id, "oldhost:4242", attempt=1)  # the old worker's id; it beat the job a moment ago
    assert reconcile(store, queue, max_attempts=3) == [] and queue.list(kinds=[TRAIN]) == []
    assert reconcile(store, queue, max_attempts=3, now=time.time() + 121) == []  # silent since: queued to resume
    assert [t.payload["job_id"] for t in queue.list(kinds=[TRAIN])] == [job.id]


def test_reconcile_queues_jobs_nobody_queued(store, queue):
    """A job written before fine-tuning ran on the queue (or whose queueing failed) is queued by the next worker."""
    job = make(store)
    assert queue.list(kinds=[TRAIN]) == []
    assert reconcile(store, queue, max_attempts=3) == []
    [task] = queue.list(kinds=[TRAIN])
    assert task.payload == {"job_id": job.id} and task.state == "queued"
    reconcile(store, queue, max_attempts=3)
    assert len(queue.list(kinds=[TRAIN])) == 1  # queued once, whoever reconciles


def test_logs_follow_by_offset(store):
    job = make(store)
    _text, off = store.read_log(job.id)
    store.append_log(job.id, "step 1/4 loss=2.0")
    more, off2 = store.read_log(job.id, off)
    assert "step 1/4" in more and "queued" not in more and off2 > off
    assert store.read_log(job.id, off2) == ("", off2)


def test_audit_log(store):
    store.audit(actor="me", action="promote", model="m", version="2", reason="ok", details={"x": 1})
    entries = store.audit_log(model="m")
    assert entries[0]["action"] == "promote" and entries[0]["details"] == {"x": 1}


def test_worker_process_runs_and_stops(tmp_path):
    from app.settings import Settings
    from finetune.worker import WorkerProcess

    settings = Settings(home=tmp_path)
    once = WorkerProcess(settings, once=True)  # empty queue: starts, finds nothing, exits 0
    once.start()
    once.proc.wait(timeout=120)
    assert once.proc.returncode == 0 and "exits after 0 job(s)" in once.log_path.read_text()
    forever = WorkerProcess(settings)
    forever.start()
    import time

    deadline = time.monotonic() + 120  # wait until it polls (its SIGTERM handler is installed by then)
    while forever.log_path.read_text().count("started (store") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert forever.alive
    assert forever.stop(timeout=60) == 0 and not forever.alive
    assert (tmp_path / "finetune" / "jobs.db").is_file()
