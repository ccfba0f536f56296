"""A job whose heartbeat fails must never be trained by two workers at once (issue 14, g): the worker stops it
before its lease on the job queue lapses, and no worker changes the state of a job that is no longer its own."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.jobs.queue import SqliteJobQueue
from app.settings import Settings
from finetune import evaluate, train
from finetune import worker as worker_module
from finetune.dispatch import TRAIN, queue_evaluation, queue_training, reconcile
from finetune.jobs import JobOwnershipLost, JobStore
from finetune.train import TrainResult
from finetune.worker import Worker

SPEC = "name: demo\ndataset: {path: /x/d.jsonl}\ntraining: {max_steps: 100}\n"


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    yield s
    s.close()


def worker(tmp_path: Path, store: JobStore, *, lease_s: float = 0.2, **fs) -> Worker:
    settings = Settings(home=tmp_path, finetune={"tracking_enabled": False, "heartbeat_interval_s": 0.02, **fs})
    return Worker(settings, store=store, queue=SqliteJobQueue(tmp_path / "queue.db", lease_s=lease_s))


def broken(*args, **kwargs):
    raise sqlite3.OperationalError("database is locked")


def fake_training(steps: list[int], *, on_step=None, status: str = "cancelled"):
    """Steps until should_cancel() says stop (at most ~3 s), like the trainer's per-step check."""
    def run_training(spec, run_dir, *, models_dir, device, hooks):
        step = 0
        for step in range(1, 300):
            if on_step is not None:
                on_step(step)
            if status == "cancelled" and hooks.should_cancel():
                break
            time.sleep(0.01)
        steps.append(step)
        return TrainResult(status=status, run_dir=run_dir, adapter_dir=None, global_step=step, max_steps=300,
                           resumed_from=None)
    return run_training


def test_owned_transitions_know_whose_job_it_is(store):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    store.start(job.id, "here:1:a", attempt=1)
    store.start(job.id, "other:2:b", attempt=2)  # the queue gave the job to another worker
    with pytest.raises(JobOwnershipLost):
        store.transition(job.id, "queued", owner="here:1:a", worker=None)
    assert store.get(job.id).state == "running" and store.get(job.id).worker == "other:2:b"


def test_failing_heartbeats_stop_the_training_and_leave_the_job_to_recovery(tmp_path, store, monkeypatch, caplog):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store, max_attempts=1)
    queue_training(w.queue, job, max_attempts=1)
    monkeypatch.setattr(w.queue, "heartbeat", broken)
    steps: list[int] = []
    started: list[str] = []
    monkeypatch.setattr(train, "run_training", fake_training(steps, on_step=lambda step: started.append(
        store.get(job.id).state) if step == 1 else None))
    with caplog.at_level(logging.WARNING, logger="keel.jobs"):
        w.run(once=True)
    assert started == ["running"] and len(steps) == 1 and steps[0] < 299  # stopped early, at a step boundary
    assert any("heartbeat failed" in r.message and "database is locked" in r.message for r in caplog.records)
    assert any("stopping it before the queue gives it to another worker" in r.message for r in caplog.records)
    # Not requeued and not failed by this worker: the queue takes it back once its lease lapsed (or its worker is
    # gone), and only then may another worker train it; here no attempt is left, so that recovery fails it.
    log = store.read_log(job.id)[0]
    assert "let go of the job" in log and "requeued at step" not in log
    monkeypatch.undo()
    w.queue.recover_stale(now=time.time() + 1)  # (the worker's own last look may have done it already)
    reconcile(store, w.queue, max_attempts=1)
    after = store.get(job.id)
    assert after.state == "failed" and after.error_code == "worker_lost" and after.attempts == 1
    assert "its heartbeats failed" in after.error


def test_a_job_taken_by_another_worker_is_let_go(tmp_path, store, monkeypatch):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store, lease_s=60)
    queue_training(w.queue, job, max_attempts=3)

    def taken_over(step):
        if step == 3:  # this worker looked dead to another one, which took the job back and claimed it
            w.queue.recover_stale(now=time.time() + 120)
            task = w.queue.claim([TRAIN], "other:2:w")
            store.start(job.id, "other:2:w", attempt=task.attempts)

    steps: list[int] = []
    monkeypatch.setattr(train, "run_training", fake_training(steps, on_step=taken_over))
    w.run(once=True)
    assert steps[0] < 299
    after = store.get(job.id)
    assert after.state == "running" and after.worker == "other:2:w"  # not requeued under the other worker's feet
    assert "let go of the job" in store.read_log(job.id)[0]


def test_a_finished_run_does_not_overwrite_a_job_another_worker_holds(tmp_path, store, monkeypatch):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store, lease_s=60, heartbeat_interval_s=30)  # no beat notices it in time
    queue_training(w.queue, job, max_attempts=3)

    def taken_over(step):
        if step == 3:
            w.queue.recover_stale(now=time.time() + 120)
            task = w.queue.claim([TRAIN], "other:2:w")
            store.start(job.id, "other:2:w", attempt=task.attempts)

    monkeypatch.setattr(train, "run_training", fake_training([], on_step=taken_over, status="succeeded"))
    w.run(once=True)
    after = store.get(job.id)
    assert after.state == "running" and after.worker == "other:2:w"


def test_evals_stop_when_the_heartbeat_is_lost_and_leave_the_job_alone(tmp_path, store, monkeypatch, caplog):
    """The eval heartbeat gave up without stopping the evals: the job then turned stale and a second worker
    evaluated it beside the first."""
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store, max_attempts=1)
    store.start(job.id, "here:1:a", attempt=1)
    store.transition(job.id, "succeeded", owner="here:1:a", worker=None, model_name="demo", model_version="1")
    queue_evaluation(w.queue, store.queue_evals(job.id), max_attempts=1)
    w._tracker = SimpleNamespace(get_version=lambda name, version: SimpleNamespace(ref=f"{name}@{version}"))
    monkeypatch.setattr(worker_module, "resolve_base_model", lambda spec, models_dir: None)
    polls: list[int] = []

    async def evaluate_adapter(*args, should_stop, **kw):
        for i in range(500):  # ~5 s unless told to stop
            polls.append(i)
            if should_stop():
                raise evaluate.EvalInterrupted("stopped")
            await asyncio.sleep(0.01)
        raise AssertionError("the evals were never told to stop")

    monkeypatch.setattr(evaluate, "evaluate_adapter", evaluate_adapter)
    monkeypatch.setattr(w.queue, "heartbeat", broken)
    with caplog.at_level(logging.ERROR, logger="keel.finetune.worker"):
        w.run(once=True)
    assert polls and polls[-1] < 499
    assert any("no longer this worker's" in r.message for r in caplog.records)
    assert "interrupted by shutdown" not in store.read_log(job.id)[0]  # left to recovery, not re-queued here
    monkeypatch.undo()
    w.queue.recover_stale(now=time.time() + 1)
    reconcile(store, w.queue, max_attempts=1)
    ended = store.get(job.id)
    assert ended.evals_state == "error" and "its heartbeats failed" in ended.evals["error"]


def test_a_cancel_file_cancels_the_job_and_its_queue_job(tmp_path, store, monkeypatch):
    """The documented cancel by hand (a CANCEL file in the run folder) ends both records as cancelled: never a
    fine-tuning job back in 'queued' with its queue job 'succeeded', which nothing would run again."""
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store, lease_s=60)
    task = queue_training(w.queue, job, max_attempts=3)

    def run_training(spec, run_dir, *, models_dir, device, hooks):
        (run_dir / train.CANCEL_FILE).touch()  # what the trainer's per-step check stops on
        return TrainResult(status="cancelled", run_dir=run_dir, adapter_dir=None, global_step=3, max_steps=300,
                           resumed_from=None)

    monkeypatch.setattr(train, "run_training", run_training)
    w.run(once=True)
    assert store.get(job.id).state == "cancelled" and w.queue.get(task.id).state == "cancelled"
