"""The job store's state machine, cancellation, crash recovery and logs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from finetune.errors import JobNotFound, JobStateConflict
from finetune.jobs import STATES, TERMINAL, TRANSITIONS, JobStore, pid_alive, worker_dead


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    yield s
    s.close()


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


def test_claim_is_fifo_and_exclusive(store):
    first, second = make(store, "a"), make(store, "b")
    got = store.claim_next("host:1")
    assert got.id == first.id and got.state == "running" and got.attempts == 1 and got.worker == "host:1"
    assert store.claim_next("host:2").id == second.id
    assert store.claim_next("host:3") is None


def test_concurrent_claims_never_share_a_job(tmp_path):
    main = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    ids = {make(main, f"j{i}").id for i in range(20)}
    claimed: list[str] = []

    def worker(n: int) -> None:
        s = JobStore(tmp_path / "jobs.db", tmp_path / "runs")  # its own connection, like another process
        while (job := s.claim_next(f"w:{n}")) is not None:
            claimed.append(job.id)
        s.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    main.close()


def test_transitions_follow_the_state_machine(store):
    assert set(TRANSITIONS) == set(STATES)
    job = make(store)
    with pytest.raises(JobStateConflict):
        store.transition(job.id, "succeeded")  # queued jobs must run first
    store.claim_next("h:1")
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
    assert store.claim_next("h:1") is None


def test_cancel_running_sets_the_flag_and_the_file(store):
    job = make(store)
    store.claim_next("h:1")
    job = store.request_cancel(job.id)
    assert job.state == "running" and job.cancel_requested
    assert (store.runs_dir / job.id / "CANCEL").exists()
    assert store.transition(job.id, "cancelled").state == "cancelled"


def test_cancel_finished_is_a_conflict(store):
    job = make(store)
    store.claim_next("h:1")
    store.transition(job.id, "failed", error="boom")
    with pytest.raises(JobStateConflict) as exc:
        store.request_cancel(job.id)
    assert exc.value.code == "finetune_job_state" and exc.value.status == 409


def test_progress_and_metrics(store):
    job = make(store)
    store.claim_next("h:1")
    store.update(job.id, step=3, max_steps=12)
    store.merge_metrics(job.id, {"last_loss": 2.0})
    store.merge_metrics(job.id, {"last_eval_loss": 1.5})
    job = store.get(job.id)
    assert job.progress == 0.25 and job.metrics == {"last_loss": 2.0, "last_eval_loss": 1.5}


def test_pid_liveness():
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())
    host = socket.gethostname()
    assert worker_dead(f"{host}:{dead_pid()}") and not worker_dead(f"{host}:{os.getpid()}")
    assert not worker_dead(f"other-host:{dead_pid()}")  # cannot tell for another machine: heartbeat decides


def test_zombie_counts_as_dead():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    time.sleep(0.5)  # exited but not reaped yet: a zombie
    assert not pid_alive(p.pid)
    p.wait()


def test_recovery_requeues_a_job_whose_worker_died(store):
    job = make(store)
    store.claim_next(f"{socket.gethostname()}:{dead_pid()}")
    moved = store.recover_stale(stale_after_s=3600, max_attempts=3)
    assert [j.id for j in moved] == [job.id] and moved[0].state == "queued" and moved[0].worker is None
    assert "requeued to resume" in store.read_log(job.id)[0]
    again = store.claim_next("h:2")
    assert again.id == job.id and again.attempts == 2


def test_recovery_leaves_live_workers_alone(store):
    make(store)
    store.claim_next(f"{socket.gethostname()}:{os.getpid()}")
    assert store.recover_stale(stale_after_s=3600, max_attempts=3) == []


def test_recovery_by_silent_heartbeat_on_another_host(store):
    job = make(store)
    store.claim_next("elsewhere:42")
    assert store.recover_stale(stale_after_s=60, max_attempts=3) == []
    moved = store.recover_stale(stale_after_s=60, max_attempts=3, now=store.get(job.id).heartbeat_at + 61)
    assert moved[0].state == "queued" and "silent" in store.read_log(job.id)[0]


def test_recovery_gives_up_after_max_attempts(store):
    job = make(store)
    for _ in range(2):
        store.claim_next(f"{socket.gethostname()}:{dead_pid()}")
        moved = store.recover_stale(stale_after_s=3600, max_attempts=2)
    assert moved[0].state == "failed" and moved[0].error_code == "worker_lost"
    assert store.get(job.id).attempts == 2


def test_recovery_of_a_job_asked_to_cancel_cancels_it(store):
    job = make(store)
    store.claim_next(f"{socket.gethostname()}:{dead_pid()}")
    store.request_cancel(job.id)
    assert store.recover_stale(stale_after_s=3600, max_attempts=3)[0].state == "cancelled"


def test_heartbeat_only_from_the_owning_worker(store):
    job = make(store)
    store.claim_next("h:1")
    before = store.get(job.id).heartbeat_at
    store.heartbeat(job.id, "h:2")
    assert store.get(job.id).heartbeat_at == before
    store.heartbeat(job.id, "h:1")
    assert store.get(job.id).heartbeat_at >= before


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
