"""A job whose heartbeat fails must never be trained by two workers at once (issue 14, g): the worker stops
it before the job turns stale, and no worker changes the state of a job that is no longer its own."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.settings import Settings
from finetune import evaluate, train
from finetune import worker as worker_module
from finetune.jobs import JobOwnershipLost, JobStore
from finetune.train import TrainResult
from finetune.worker import Worker

SPEC = "name: demo\ndataset: {path: /x/d.jsonl}\ntraining: {max_steps: 100}\n"


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    yield s
    s.close()


def worker(tmp_path: Path, store: JobStore, **fs) -> Worker:
    settings = Settings(home=tmp_path, finetune={"tracking_enabled": False, "heartbeat_interval_s": 0.02,
                                                 "stale_after_s": 0.2, **fs})
    return Worker(settings, store=store, worker_id="here:1")


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


def test_heartbeat_and_owned_transitions_know_whose_job_it_is(store):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    store.claim_next("here:1")
    assert store.heartbeat(job.id, "here:1") and not store.heartbeat(job.id, "other:2")
    store.recover_stale(stale_after_s=1, max_attempts=3, now=time.time() + 10)
    store.claim_next("other:2")
    assert not store.heartbeat(job.id, "here:1")
    with pytest.raises(JobOwnershipLost):
        store.transition(job.id, "queued", owner="here:1", worker=None)
    assert store.get(job.id).state == "running" and store.get(job.id).worker == "other:2"


def test_failing_heartbeats_stop_the_training_and_leave_the_job_to_recovery(tmp_path, store, monkeypatch, caplog):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store)
    claimed = store.claim_next(w.worker_id)

    def broken(job_id, worker_id):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "heartbeat", broken)
    steps: list[int] = []
    monkeypatch.setattr(train, "run_training", fake_training(steps))
    with caplog.at_level(logging.WARNING, logger="keel.finetune.worker"):
        after = w.run_job(claimed)
    assert steps and steps[0] < 299  # stopped early, at a step boundary
    assert any("heartbeat of job" in r.message and "database is locked" in r.message for r in caplog.records)
    assert any("stopping it before another worker recovers it" in r.message for r in caplog.records)
    # Not requeued and not failed by this worker: recovery requeues it once it is stale, and only then does
    # another worker train it (from the last checkpoint).
    assert after.state == "running" and after.worker == w.worker_id and after.attempts == 1
    assert store.get(job.id).state == "running"


def test_a_job_recovered_by_another_worker_is_let_go(tmp_path, store, monkeypatch):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store, stale_after_s=60)
    claimed = store.claim_next(w.worker_id)

    def taken_over(step):
        if step == 3:  # this worker looked dead to another one, which recovered and claimed the job
            store.recover_stale(stale_after_s=1, max_attempts=3, now=time.time() + 10)
            store.claim_next("other:2")

    steps: list[int] = []
    monkeypatch.setattr(train, "run_training", fake_training(steps, on_step=taken_over))
    after = w.run_job(claimed)
    assert steps[0] < 299
    assert after.state == "running" and after.worker == "other:2"  # not requeued under the other worker's feet
    assert "let go of the job" in store.read_log(job.id)[0]


def test_a_finished_run_does_not_overwrite_a_job_another_worker_holds(tmp_path, store, monkeypatch):
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store, heartbeat_interval_s=30, stale_after_s=60)  # no beat notices it in time

    def taken_over(step):
        if step == 3:
            store.recover_stale(stale_after_s=1, max_attempts=3, now=time.time() + 10)
            store.claim_next("other:2")

    monkeypatch.setattr(train, "run_training", fake_training([], on_step=taken_over, status="succeeded"))
    after = w.run_job(store.claim_next(w.worker_id))
    assert after.state == "running" and after.worker == "other:2"
    assert store.get(job.id).state == "running"


def test_evals_stop_when_the_heartbeat_is_lost_and_leave_the_job_alone(tmp_path, store, monkeypatch, caplog):
    """The eval heartbeat gave up without stopping the evals: the job then turned stale and a second worker
    evaluated it beside the first."""
    job = store.create(name="demo", spec_yaml=SPEC, spec_hash="h" * 64)
    w = worker(tmp_path, store)
    store.claim_next(w.worker_id)
    store.transition(job.id, "succeeded", owner=w.worker_id, worker=None, model_name="demo", model_version="1")
    store.queue_evals(job.id)
    claimed = store.claim_evals(w.worker_id)
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

    def broken(job_id, worker_id):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "heartbeat", broken)
    with caplog.at_level(logging.ERROR, logger="keel.finetune.worker"):
        after = w.run_evals(claimed)
    assert polls and polls[-1] < 499
    assert after.evals_state == "running" and after.worker == w.worker_id  # left to recovery, not re-queued here
    assert any("no longer this worker's" in r.message for r in caplog.records)
