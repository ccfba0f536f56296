"""The worker's evaluation of a new adapter: a scripted model instead of SmolLM2, a stubbed training step,
real job store, real eval store and runner, real MLflow (SQLite), the real adapter gate."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.core.errors import InvalidRequest
from app.jobs.queue import SqliteJobQueue
from app.settings import Settings
from evals.store import EvalStore
from finetune import train
from finetune.dispatch import EVALS, queue_evaluation, reconcile
from finetune.errors import JobStateConflict
from finetune.gate import adapter_gate
from finetune.jobs import JobStore
from finetune.service import FinetuneService
from finetune.spec import parse_spec
from finetune.tracking import Tracker
from finetune.worker import Worker
from tests.fakes.llm import ScriptedBackend


def suite(name: str, question: str, word: str) -> dict:
    return {"name": name, "target": {"model": "smollm2", "params": {"max_tokens": 16}},
            "dataset": {"cases": [{"id": "q1", "input": question, "must_include": [word]}]},
            "metrics": [{"name": "must_include", "threshold": 1.0}], "gate": {"min_mean": {"must_include": 1.0}}}


@pytest.fixture
def home(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")  # never loaded: the backend is scripted
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "fact.yaml").write_text(yaml.safe_dump(suite("fact", "What is the capital of Veltmar?", "Quorra")))
    (suites / "smoke.yaml").write_text(yaml.safe_dump(suite("smoke", "What is the capital of France?", "Paris")))
    (suites / "rag.yaml").write_text(yaml.safe_dump({**suite("rag", "q?", "x"), "target": {"model": "rag:docs"}}))
    monkeypatch.setattr(train, "run_training", fake_training)
    return tmp_path


def fake_training(spec, run_dir: Path, *, models_dir, device, hooks):
    """Stands in for transformers + peft: writes a PEFT-shaped adapter folder and reports success."""
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": spec.lora.r}))
    (adapter / "adapter_model.safetensors").write_bytes(run_dir.name.encode())  # distinct bytes per job
    hooks.on_progress(3, 3)
    return train.TrainResult(status="succeeded", run_dir=run_dir, adapter_dir=adapter, global_step=3, max_steps=3,
                             resumed_from=None, metrics={"train_loss_last": 0.5}, spec_hash=spec.spec_hash(),
                             base_model=str(models_dir / "tiny"))


def settings_for(home: Path, **finetune) -> Settings:
    return Settings(home=home, evals={"suites_dir": str(home / "suites")}, finetune=finetune)


@pytest.fixture
def world(home):
    settings = settings_for(home)
    store = JobStore(home / "finetune" / "jobs.db", home / "finetune" / "runs")
    tracker = Tracker(settings.finetune, home)
    yield settings, store, tracker
    store.close()


def submit(store: JobStore, evals: list[str]) -> str:
    spec = parse_spec(yaml.safe_dump({"name": "veltmar", "base_model": "tiny", "dataset": {"path": "/x/d.jsonl"},
                                      "training": {"max_steps": 3}, "evals": evals}))
    return store.create(name=spec.name, spec_yaml=spec.to_yaml(), spec_hash=spec.spec_hash()).id


def test_a_new_adapter_is_evaluated_and_a_failing_suite_makes_it_unpromotable(world):
    settings, store, tracker = world
    backend = ScriptedBackend(reply="The capital of Veltmar is Quorra.")  # knows the fact, forgot France
    job_id = submit(store, ["fact", "smoke"])
    worker = Worker(settings, store=store, tracker=tracker, eval_backend=backend)
    assert worker.run(once=True) == 1

    job = store.get(job_id)
    assert job.state == "succeeded" and job.model_version == "1"  # a failing eval does not fail the training job
    assert job.evals_state == "failed" and job.evals["attempts"] == 1 and job.worker is None
    fact, smoke = job.evals["suites"]["fact"], job.evals["suites"]["smoke"]
    assert fact["passed"] and fact["metrics"] == {"must_include": 1.0}
    assert not smoke["passed"] and smoke["failing_metrics"] == ["must_include"]
    assert job.evals["alias"] == "veltmar-v1"
    # The model really answered through the runner, with the adapter under evaluation.
    assert [r.adapter for r in backend.requests] == [job.evals["adapter"]] * 2
    log = store.read_log(job_id)[0]
    assert "evals queued: fact, smoke" in log and "evals failed: fact: pass" in log and "smoke: FAIL" in log

    runs = EvalStore(settings.evals.db_path(settings.home))
    try:
        run = runs.get_run(smoke["run_id"])
        assert run.identity["model"]["adapter"] == job.evals["adapter"] and run.identity["guardrails"] is None
        version = tracker.get_version("veltmar", "1")
        verdict = adapter_gate(runs)(version)
        assert not verdict.passed and f"smoke ({smoke['run_id']}) failed: must_include" in verdict.reason
    finally:
        runs.close()

    mlflow_run = tracker.client.get_run(job.mlflow_run_id)
    assert mlflow_run.data.metrics["eval.fact.passed"] == 1.0 and mlflow_run.data.metrics["eval.smoke.passed"] == 0.0
    assert mlflow_run.data.metrics["eval.passed"] == 0.0
    assert mlflow_run.data.tags["keel.eval.smoke.verdict"] == "fail"
    assert version.tags["keel.evals.state"] == "failed"
    assert json.loads(version.tags["keel.eval.fact"])["run_id"] == fact["run_id"]


def test_passing_evals_open_the_gate_and_a_requeued_evaluation_runs_again(world):
    settings, store, tracker = world
    backend = ScriptedBackend(reply="Quorra, and Paris for France.")
    job_id = submit(store, ["fact", "smoke"])
    Worker(settings, store=store, tracker=tracker, eval_backend=backend).run(once=True)
    job = store.get(job_id)
    assert job.evals_state == "passed"
    runs = EvalStore(settings.evals.db_path(settings.home))
    try:
        assert adapter_gate(runs)(tracker.get_version("veltmar", "1")).passed
    finally:
        runs.close()

    svc = FinetuneService(settings, store)
    with pytest.raises(InvalidRequest, match="at least one suite"):
        svc.evaluate(job_id, suites=[], actor="me")
    queued = svc.evaluate(job_id, suites=["fact"], actor="me")
    assert queued.evals_state == "pending" and "suites" not in queued.evals
    assert store.audit_log()[0]["action"] == "job.evaluate"
    Worker(settings, store=store, tracker=tracker, eval_backend=backend).run(once=True)
    job = store.get(job_id)
    assert job.evals_state == "passed" and list(job.evals["suites"]) == ["fact"]


def test_a_suite_that_cannot_run_is_an_eval_error_not_a_failed_job(world):
    settings, store, tracker = world
    job_id = submit(store, ["fact", "nope", "rag"])
    Worker(settings, store=store, tracker=tracker, eval_backend=ScriptedBackend(reply="Quorra")).run(once=True)
    job = store.get(job_id)
    assert job.state == "succeeded" and job.evals_state == "error"
    suites = job.evals["suites"]
    assert suites["fact"]["passed"] and "no suite 'nope'" in suites["nope"]["error"]
    assert "an adapter is evaluated with a model or prompt target" in suites["rag"]["error"]


def test_a_worker_without_auto_eval_leaves_the_evals_pending(world):
    settings, store, tracker = world
    backend = ScriptedBackend(reply="Quorra")
    job_id = submit(store, ["fact"])
    Worker(settings_for(settings.home, auto_eval=False), store=store, tracker=tracker,
           eval_backend=backend).run(once=True)
    assert store.get(job_id).evals_state == "pending" and backend.calls == 0
    Worker(settings, store=store, tracker=tracker, eval_backend=backend).run(once=True)
    assert store.get(job_id).evals_state == "passed"


def test_shutdown_interrupts_the_evals_and_the_next_worker_resumes_them(world):
    settings, store, tracker = world
    job_id = submit(store, ["fact"])
    Worker(settings_for(settings.home, auto_eval=False), store=store, tracker=tracker).run(once=True)
    first = Worker(settings, store=store, tracker=tracker)

    class StopsTheWorker(ScriptedBackend):
        async def stream(self, request):
            first.shutdown.set()  # SIGTERM arrives while the model answers
            async for event in super().stream(request):
                yield event

    first.eval_backend = StopsTheWorker(reply="Quorra is the capital of Veltmar, " * 4, delay_s=0.5)
    first.run(once=True)
    job = store.get(job_id)
    assert job.evals_state == "pending" and "interrupted by shutdown" in store.read_log(job_id)[0]
    runs = EvalStore(settings.evals.db_path(settings.home))
    try:
        interrupted = runs.list_runs(suite="fact")[0]
        assert interrupted.status == "interrupted"
    finally:
        runs.close()

    Worker(settings, store=store, tracker=tracker, eval_backend=ScriptedBackend(reply="Quorra")).run(once=True)
    job = store.get(job_id)
    assert job.evals_state == "passed" and job.evals["attempts"] == 2
    assert job.evals["suites"]["fact"]["run_id"] == interrupted.id  # the same run, resumed


def test_evals_of_a_dead_worker_are_recovered_then_given_up(tmp_path):
    store = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    queue = SqliteJobQueue(tmp_path / "queue.db")
    try:
        job = store.create(name="j", spec_yaml="name: j\n", spec_hash="h" * 64)
        with pytest.raises(JobStateConflict, match="only a succeeded job"):
            store.queue_evals(job.id)
        store.start(job.id, "h:1:a", attempt=1)
        store.transition(job.id, "succeeded", worker=None, model_name="j", model_version="1")
        queue_evaluation(queue, store.queue_evals(job.id), max_attempts=2)
        for attempt in (1, 2):
            p = subprocess.Popen([sys.executable, "-c", "pass"])
            p.wait()
            dead = f"{socket.gethostname()}:{p.pid}:w"
            assert queue.claim([EVALS], dead).payload["job_id"] == job.id
            claimed = store.start_evals(job.id, dead)
            assert claimed.evals_state == "running" and claimed.evals["attempts"] == attempt
            with pytest.raises(JobStateConflict, match="running now"):
                store.queue_evals(job.id)
            assert [t.payload["job_id"] for t in queue.recover_stale()] == [job.id]
        moved = reconcile(store, queue, max_attempts=2)
        assert [j.id for j in moved] == [job.id] and moved[0].state == "succeeded"
        assert moved[0].evals_state == "error" and "2 of 2 attempts used" in moved[0].evals["error"]
        assert queue.claim([EVALS], "h:9:w") is None
    finally:
        store.close()
        queue.close()


def test_an_old_job_store_gains_the_eval_columns(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "jobs.db")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, spec_yaml TEXT NOT "
               "NULL, spec_hash TEXT NOT NULL, submitted_by TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, "
               "started_at REAL, finished_at REAL, updated_at REAL NOT NULL, step INTEGER NOT NULL DEFAULT 0, "
               "max_steps INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, "
               "heartbeat_at REAL, cancel_requested INTEGER NOT NULL DEFAULT 0, error TEXT, error_code TEXT, "
               "metrics TEXT NOT NULL DEFAULT '{}', data_report TEXT, data_hash TEXT, run_dir TEXT NOT NULL, "
               "adapter_path TEXT, mlflow_run_id TEXT, model_name TEXT, model_version TEXT)")
    db.execute("INSERT INTO jobs (id, name, state, spec_yaml, spec_hash, created_at, updated_at, run_dir) "
               "VALUES ('ft-old', 'old', 'succeeded', 'name: old', 'h', 0, 0, '/tmp')")
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    try:
        old = store.get("ft-old")
        assert old.evals_state is None and old.evals is None
    finally:
        store.close()


def test_a_jobs_training_and_evaluation_are_traces(world, tmp_path, monkeypatch):
    from app.core.metrics import Metrics
    from app.core.settings import OtelSettings
    from app.core.tracing import Tracing

    def talking_training(spec, run_dir, *, models_dir, device, hooks):  # reports as the real one does
        hooks.on_start({"data": {"data_hash": "d" * 64, "train_examples": 8, "validation_examples": 2}})
        hooks.on_log(1, {"loss": 0.9})
        hooks.on_log(3, {"loss": 0.5, "eval_loss": 0.6})
        return fake_training(spec, run_dir, models_dir=models_dir, device=device, hooks=hooks)

    monkeypatch.setattr(train, "run_training", talking_training)

    settings, store, tracker = world
    tracing = Tracing(OtelSettings(), tmp_path / "traces", dropped=Metrics().trace_dropped)
    job_id = submit(store, ["fact"])
    Worker(settings, store=store, tracker=tracker, eval_backend=ScriptedBackend(reply="Quorra"),
           tracer=tracing.tracer).run(once=True)
    tracing.flush()
    roots = {t["root"]: t for t in tracing.store.traces()}
    train_span = tracing.store.trace(roots["keel.finetune.train"]["trace_id"])[0]
    trained = train_span["attributes"]
    logged = [e for e in train_span["events"] if e["name"] == "keel.finetune.log"]  # the training's steps
    assert [(e["attributes"]["keel.finetune.step"], e["attributes"]["keel.finetune.loss"]) for e in logged] == [
        (1, 0.9), (3, 0.5)]
    assert trained["keel.finetune.train_examples"] == 8 and trained["keel.finetune.data_hash"] == "d" * 64
    assert trained["keel.finetune.last_step"] == 3 and trained["keel.finetune.last_eval_loss"] == 0.6
    assert trained["keel.finetune.version"] and trained["keel.finetune.model"]
    evaluation = tracing.store.trace(roots["keel.finetune.eval"]["trace_id"])[0]["attributes"]
    assert trained["keel.finetune.job_id"] == evaluation["keel.finetune.job_id"] == job_id
    assert trained["keel.finetune.state"] == "succeeded" and evaluation["keel.finetune.evals_state"] == "passed"
    tracing.close()
