"""Continuous training end to end on the real parts: a drift event starts a pipeline run, which builds a dataset
from the shipped fine-tuning data plus answers a user rated well (read back from their traces), trains a LoRA
adapter in a real fine-tuning worker process, gates it on a real eval suite run by that worker, releases it as
a canary on the real model (transformers backend, both arms answering), waits for a person, and promotes it.

The API process is stopped while the worker trains and started again on the same home: the run resumes at its
fine-tuning step and reattaches to the job it submitted (one job, two attempts of the step), as a restart or a
crash would leave it. The drift *result* is seeded (tests/integration/test_drift_real.py measures real drift);
what is under test is what a drift event sets in motion.

About 2 minutes on 2 cores (6 training steps, one 4-case suite, ~46 canary requests of 8 tokens): measured 122 s.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.test_finetune_e2e import DATA, MODEL, make_home, start_worker

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="run `keel model prepare` first"),
]


def write_definitions(folder: Path) -> None:
    (folder / "jobs").mkdir(parents=True)
    job = yaml.safe_load((ROOT / "finetune" / "jobs" / "veltmar-fact.yaml").read_text())
    job.update(name="veltmar-ct", evals=["smoke-general"])
    job["dataset"] = {"path": str(DATA), "validation_split": 0.15}
    job["training"] = {"max_steps": 6, "batch_size": 4, "max_length": 128, "learning_rate": 0.001, "save_steps": 3,
                       "eval_steps": 3, "warmup_steps": 1}
    (folder / "jobs" / "job.yaml").write_text(yaml.safe_dump(job))
    (folder / "ct.yaml").write_text(yaml.safe_dump({
        "name": "ct", "job": "jobs/job.yaml", "poll_interval": 0.5, "cooldown": "1h",
        "triggers": [{"kind": "drift", "checks": ["input_embedding"]}],
        "dataset": {"include_job_data": True, "feedback": {"min_score": 1}, "min_examples": 10},
        "canary": {"endpoint": "ct", "steps": [50, 100], "min_requests": 20, "min_duration": 0,
                   "max_duration": "15m", "unit": "request", "metrics": [{"name": "errors", "margin": 0.3}]},
        "promote": {"approval": "required"}}))


def settings_for(home: Path, defs: Path):
    from app.settings import Settings

    return Settings(
        home=home, auth={"enabled": False}, guardrails={"enabled": False},
        backends={"local": {"kind": "transformers", "model_path": str(MODEL)}},
        otel={"capture_content": True},  # the rated answers' text, for the dataset
        monitor={"interval_s": 0},  # the drift result below is this test's
        releases={"decide_interval_s": 0.5, "check_interval_s": 0.2},
        pipelines={"dirs": [str(defs)], "check_interval_s": 1})


def last_line(path: Path) -> str:
    return path.read_text().splitlines()[-1]


async def wait_for(what: str, check, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        await asyncio.sleep(poll)


async def test_a_drift_event_retrains_gates_canaries_and_promotes_an_adapter_across_a_restart(tmp_path):
    from app.api.main import create_app
    from app.container import Container

    home, defs = make_home(tmp_path / "home"), tmp_path / "defs"
    write_definitions(defs)
    settings = settings_for(home, defs)
    worker = start_worker(home, once=False, auto_eval=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    container = await Container.build(settings)
    app = create_app(settings, container)
    lifespan = app.router.lifespan_context(app)  # the job runner, the release controller, the trigger loop
    await lifespan.__aenter__()
    try:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel", timeout=300)

        # Triggers count what happens after a home first sees a pipeline (the loop's first round would do it)
        container.pipelines.store.arm("ct")

        # Production traffic: three answers a user rates up (their traces hold the text), one rated down; one of
        # the three asks what the job's data already answers (it keeps its curated answer).
        ids = []
        for q in ("Name a primary colour.", "Name a fruit.", "What is the capital of France?", "What is two plus two?"):
            r = await client.post("/v1/chat/completions", json={
                "model": "smollm2", "messages": [{"role": "user", "content": q}], "max_tokens": 12,
                "temperature": 0})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        for i, rating in zip(ids, ("up", "up", "up", "down"), strict=True):
            assert (await client.post("/v1/feedback", json={"id": i, "rating": rating})).status_code == 201
        container.tracing.flush()

        # The drift event.
        container.monitor.store.add({
            "id": f"drift-{secrets.token_hex(8)}", "created": time.time(), "actor": "scheduler", "verdict": "drift",
            "drift_share": 0.5, "reference": {"kind": "window", "rows": 200}, "current": {"rows": 200},
            "drifted_checks": ["input_embedding", "topic_mix"], "checks": []})

        async def started():
            runs = container.pipelines.list(pipeline="ct")
            return runs[0] if runs else None

        run = await wait_for("the drift trigger", started, 30)
        assert run.created_by == "trigger:drift" and run.trigger["kind"] == "drift"

        async def training():
            r = container.pipelines.get(run.id)
            job_id = r.steps["finetune"].artifacts.get("job_id")
            return job_id if job_id and container.finetune.get(job_id).state == "running" else None

        job_id = await wait_for("the worker to start training", training, 300)
        timings["trigger to training"] = time.perf_counter() - t0
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
        await container.aclose()  # the API stops mid-step; the worker trains on

    container = await Container.build(settings)  # ... and starts again on the same home
    app = create_app(settings, container)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel", timeout=300)

        async def canary():
            r = container.pipelines.get(run.id)
            assert not r.finished, (r.public(), (home / "worker.out").read_text()[-3000:])
            return r if r.steps["canary"].artifacts.get("release_id") else None

        resumed = await wait_for("train, evaluate and start the canary", canary, 900, poll=1)
        timings["to canary"] = time.perf_counter() - t0
        assert resumed.steps["finetune"].artifacts["job_id"] == job_id and resumed.steps["finetune"].attempts == 2
        assert [j.id for j in container.finetune.list()] == [job_id]  # reattached, not submitted again
        assert resumed.steps["evaluate"].artifacts["gate"]["passed"] is True

        # Traffic on the canary endpoint: both arms answer with the real model until the analysis passes.
        sent = 0
        while container.pipelines.get(run.id).state != "waiting":
            assert sent < 200, container.releases.report("ct")
            r = await client.post("/v1/chat/completions", json={
                "model": "ct", "messages": [{"role": "user", "content": f"Say a word. ({sent})"}], "max_tokens": 8,
                "temperature": 0})
            assert r.status_code == 200, r.text
            sent += 1
            if sent % 10 == 0:
                await asyncio.sleep(1.0)  # the controller's turn
        timings["canary"] = time.perf_counter() - t0
        report = container.releases.report("ct")
        assert report["ready"] and report["weights"] == {"stable": 50.0, "canary": 50.0}, report

        r = await client.post(f"/v1/pipelines/runs/{run.id}/approve", json={"reason": "canary clean"})
        assert r.status_code == 200, r.text

        async def finished():
            r = container.pipelines.get(run.id)
            return r if r.finished else None

        done = await wait_for("the promotion", finished, 120)
        timings["total"] = time.perf_counter() - t0
        assert (done.state, done.outcome) == ("succeeded", "promoted"), done.public()
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
        await container.aclose()
        worker.terminate()
        worker.wait(timeout=60)

    trained = done.steps["finetune"].artifacts
    model, version = trained["model"], trained["version"]
    print(f"\npipeline run {run.id}: {sent} canary requests; " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                            timings.items()))
    for step in done.steps.values():
        print(f"--- {step.name} ({step.state}, {step.attempts} attempt(s))\n{step.log.rstrip()}")

    # what each step left
    snap = done.steps["dataset"].artifacts["snapshot"]
    base = len([x for x in DATA.read_text().splitlines() if x.strip()])
    fb = snap["sources"]["feedback"]
    assert (fb["rated"], fb["used"], fb["already_covered"]) == (3, 2, 1) and snap["records"] == base + 2, snap
    last = json.loads(last_line(Path(snap["path"])))
    assert last["messages"][-1]["role"] == "assistant" and last["messages"][-1]["content"].strip()
    assert done.steps["canary"].artifacts["candidate"] == f"{model}-v{version}"
    assert done.steps["promote"].artifacts["production"] == version

    from app.settings import Settings
    from finetune import build_finetune

    svc = build_finetune(Settings(home=home))
    try:
        assert svc.registry.by_alias(model, "production").version == version
        assert yaml.safe_load(svc.get(job_id).spec_yaml)["tags"]["pipeline_run"] == run.id
    finally:
        svc.close()
    from lifecycle.pipeline.store import PipelineStore
    from lifecycle.releases.store import SqliteReleaseStore

    releases = SqliteReleaseStore(home / "releases.db")
    try:
        assert releases.get("ct").status == "promoted"
    finally:
        releases.close()
    store = PipelineStore(home / "pipelines.db")
    try:
        actions = [e.action for e in store.audit_events(subject_ref=run.id)][::-1]
        assert actions == ["run.start", "run.approve", "run.succeeded"], actions
    finally:
        store.close()
