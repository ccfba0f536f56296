"""Continuous-training pipelines: the run's steps on the real job runner, pipeline store and release service, with
a scripted fine-tuning service (tests/integration/test_pipeline_e2e.py trains, evaluates and canaries for real).

Covered: a run from trigger to promotion with a person's approval; each way a run stops (contract, gate, canary
rollback, rejection, an error) and what it leaves; resume after a restart without submitting twice; retry of an
error; cancel; one open run per pipeline; triggers (drift, feedback, eval regression, schedule) with cooldown.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.jobs.queue import SqliteJobQueue
from app.jobs.runner import JobRunner
from finetune.data import InvalidTrainingData
from lifecycle.pipeline.service import PipelineDeps, PipelineService
from lifecycle.pipeline.settings import PipelineSettings
from lifecycle.pipeline.spec import InvalidPipeline, load_pipeline, seconds
from lifecycle.pipeline.store import PipelineStore
from lifecycle.releases import controller
from lifecycle.releases.service import ReleaseService
from lifecycle.releases.store import SqliteReleaseStore

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "finetune" / "jobs" / "data" / "veltmar.jsonl"


# -- a scripted fine-tuning service: jobs advance one state per read ----------------------------------------


@dataclass
class FakeJob:
    id: str
    submitted_by: str
    spec: Any
    state: str = "queued"
    evals_state: str | None = None
    error: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    adapter_path: str | None = None
    mlflow_run_id: str | None = None
    metrics: dict = field(default_factory=dict)
    evals: dict | None = None
    progress: float = 0.0


class FakeFinetune:
    def __init__(self) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.contract_ok = True
        self.train_ok = True
        self.evals_pass = True
        self.hold_training = False  # a job stays running until released (to stop the server mid-step)
        self.die_after_submit = False
        self.lora_backend_problem = ""
        self.undeployed: list[str] = []
        self.deployed: list[tuple[str, str, str]] = []
        self.promoted: list[tuple[str, str, str]] = []
        self.cancelled: list[str] = []
        self.validated: list[Path] = []
        self.routes = SimpleNamespace(get=lambda alias: alias if any(a == alias for _, _, a in self.deployed) else None)
        self.registry = SimpleNamespace(get_version=self._version, run_gate=self._gate, by_alias=self._by_alias)
        self.production: str | None = None

    def check_data_location(self, spec) -> None:
        pass

    def adapter_backend(self, backend: str | None, rank: int) -> str:
        if self.lora_backend_problem:
            raise InvalidRequest(self.lora_backend_problem, param="backend")
        return backend or "local"

    def validate(self, spec) -> dict:
        self.validated.append(Path(spec.dataset.path))
        if not self.contract_ok:
            raise InvalidTrainingData("line 3: a record has no assistant turn")
        rows = Path(spec.dataset.path).read_text().splitlines()
        return {"ok": True, "train_examples": len(rows), "validation_examples": 0, "data_hash": "h"}

    def submit(self, spec, *, submitted_by: str, validate_data: bool = True) -> FakeJob:
        job = FakeJob(f"ft-{len(self.jobs) + 1}", submitted_by, spec)
        self.jobs[job.id] = job
        if self.die_after_submit:  # the job exists, the process "dies" before the run records it
            self.die_after_submit = False
            raise RuntimeError("the process died")
        return job

    def evaluate(self, job_id: str, *, actor: str = "") -> FakeJob:
        self.jobs[job_id].evals_state = "pending"
        return self.jobs[job_id]

    def get(self, job_id: str) -> FakeJob:
        job = self.jobs[job_id]
        if job.state == "queued":
            job.state = "running"
        elif job.state == "running" and not self.hold_training:
            if self.train_ok:
                job.state, job.model_name, job.model_version = "succeeded", job.spec.model_name, str(len(self.jobs))
                job.evals_state, job.adapter_path = "pending", f"/runs/{job.id}/adapter"
            else:
                job.state, job.error = "failed", "CUDA out of memory"
        elif job.evals_state == "pending":
            job.evals_state = "passed" if self.evals_pass else "failed"
            job.evals = {"suites": {"veltmar-fact": {"passed": self.evals_pass, "metrics": {"says_quorra": 0.9},
                                                     "run_id": "run-1"}}}
        return job

    def list(self, *, state: str | None = None, limit: int = 50) -> list[FakeJob]:
        return list(self.jobs.values())[::-1][:limit]

    def cancel(self, job_id: str, *, actor: str = "") -> FakeJob:
        self.cancelled.append(job_id)
        self.jobs[job_id].state = "cancelled"
        return self.jobs[job_id]

    def _version(self, model: str, version: str) -> Any:
        return SimpleNamespace(model=model, version=version, ref=f"{model}/{version}")

    def _gate(self, version: Any) -> Any:
        ok = self.evals_pass
        return SimpleNamespace(passed=ok, reason="veltmar-fact passed" if ok else "veltmar-fact failed: says_quorra")

    def _by_alias(self, model: str, alias: str) -> Any:
        return SimpleNamespace(version=self.production) if self.production else None

    async def deploy(self, model: str, version: str, *, alias: str, backend: str | None = None,
                     actor: str = "") -> None:
        self.deployed.append((model, version, alias))

    async def undeploy(self, alias: str, *, model: str, actor: str = "", reason: str = "") -> bool:
        gone = [d for d in self.deployed if d[2] == alias]
        self.deployed = [d for d in self.deployed if d[2] != alias]
        self.undeployed.append(alias)
        return bool(gone)

    def promote(self, model: str, version: str, *, actor: str = "", reason: str = "") -> Any:
        before, self.production = self.production, version
        self.promoted.append((model, version, actor))
        return SimpleNamespace(from_version=before, changed=before != version)


class FakeSpans:
    """Two traced answers with their content, one without."""

    def traces(self, *, response_id: str | None = None, limit: int = 50, **_: Any) -> list[dict]:
        return [{"trace_id": f"t-{response_id}"}]

    def trace(self, trace_id: str) -> list[dict]:
        if trace_id == "t-chatcmpl-nocontent":
            return [{"attributes": {}}]
        q = [{"role": "user", "content": f"question {trace_id}"}]
        if trace_id == "t-chatcmpl-known":  # asks what the job's data already answers, differently
            q = [m for m in json.loads(DATA.read_text().splitlines()[0])["messages"] if m["role"] != "assistant"]
        a = [{"role": "assistant", "content": f"answer {trace_id}"}]
        return [{"attributes": {"gen_ai.input.messages": json.dumps(q), "gen_ai.output.messages": json.dumps(a)}}]


# -- fixtures ------------------------------------------------------------------------------------------------


def write_pipeline(folder: Path, name: str = "demo", **overrides: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    job = yaml.safe_load((ROOT / "finetune" / "jobs" / "veltmar-fact.yaml").read_text())
    job["dataset"]["path"] = str(DATA)
    (folder / "jobs").mkdir(exist_ok=True)  # a pipelines folder holds pipelines only: every *.yaml is one
    (folder / "jobs" / "job.yaml").write_text(yaml.safe_dump(job))
    doc = {"name": name, "job": "jobs/job.yaml", "poll_interval": 0.02, "cooldown": "1h",
           "dataset": {"feedback": {"min_score": 1}, "min_examples": 5},
           "canary": {"endpoint": name, "steps": [50, 100], "min_requests": 5, "min_duration": 0},
           "promote": {"approval": "required"}, **overrides}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Env:
    def __init__(self, tmp: Path, ft: FakeFinetune | None = None) -> None:
        self.tmp, self.ft = tmp, ft or FakeFinetune()
        self.drift: list[dict] = []
        self.eval_runs: list[Any] = []

    async def open(self) -> PipelineService:
        self.releases = ReleaseService(SqliteReleaseStore(self.tmp / "releases.db"), check_interval_s=0)
        self.runner = JobRunner(SqliteJobQueue(self.tmp / "jobs.db"), poll_s=0.02, heartbeat_s=0.2,
                                shutdown_grace_s=0.5)
        deps = PipelineDeps(finetune=self.ft, default_model="smollm2", releases=self.releases, spans=FakeSpans(),
                            drift_results=lambda verdict=None, limit=20: [d for d in self.drift][:limit],
                            eval_runs=lambda suite=None, limit=10: self.eval_runs[:limit])
        self.svc = PipelineService(PipelineStore(self.tmp / "pipelines.db"), self.runner,
                                   PipelineSettings(dirs=[self.tmp / "defs"], check_interval_s=0.05), deps,
                                   home=self.tmp)
        self.svc.register(self.runner)
        await self.runner.start()
        return self.svc

    async def close(self) -> None:
        await self.runner.aclose()
        self.svc.store.close()
        self.releases.close()

    async def until(self, run_id: str, check, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            run = self.svc.get(run_id)
            if check(run):
                return run
            assert time.monotonic() < deadline, f"run stuck: {run.public()}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def env(tmp_path: Path):
    write_pipeline(tmp_path / "defs")
    e = Env(tmp_path)
    await e.open()
    yield e
    await e.close()


def snapshot_files(path: Path) -> tuple[list[str], dict]:
    return path.read_text().splitlines(), json.loads((path.parent / "manifest.json").read_text())


def rate(env: Env, *ids: str, score: float = 1.0) -> None:
    for i in ids:
        env.releases.store.feedback(i, "key-1", score)


# -- a whole run ------------------------------------------------------------------------------------------------


async def test_a_run_goes_from_trigger_to_promotion_once_a_person_approves(env: Env) -> None:
    rate(env, "chatcmpl-a", "chatcmpl-b", "chatcmpl-nocontent", "chatcmpl-known")
    rate(env, "chatcmpl-bad", score=0.0)  # a thumbs-down never becomes a training example
    run = await env.svc.start("demo", actor="alice [k1]", reason="new data")
    assert run.state == "queued"  # its job claims it when it starts (job_id)

    # the canary starts, and holds ready at its last step (manual promotion): the run waits for nobody yet
    run = await env.until(run.id, lambda r: r.steps["canary"].state == "running" and r.steps["canary"].artifacts.get(
        "release_id"))
    release = env.releases.get("demo")
    assert release.spec.canary.promotion == "manual" and release.spec.variant("stable").model == "smollm2"
    assert release.spec.variant("canary").model == "veltmar-fact-v1"
    env.releases.store.note(release, controller.READY + "step 1/2 at 50% passed")
    run = await env.until(run.id, lambda r: r.state == "waiting")
    assert run.current_step == "approval" and env.ft.promoted == []

    # the dataset: the job's data plus the two rated answers whose traces hold their content
    snap = run.steps["dataset"].artifacts["snapshot"]
    base = len(DATA.read_text().splitlines())
    fb = snap["sources"]["feedback"]
    assert snap["records"] == base + 2 and (fb["without_content"], fb["already_covered"]) == (1, 1)
    lines, manifest = snapshot_files(Path(snap["path"]))
    assert json.loads(lines[-1])["messages"][-1]["role"] == "assistant" and manifest["sha256"] == snap["sha256"]
    job = env.ft.jobs[run.steps["finetune"].artifacts["job_id"]]
    assert job.spec.dataset.path == Path(snap["path"]) and job.spec.tags["pipeline_run"] == run.id
    assert job.submitted_by == f"pipeline:demo/{run.id}"
    assert run.steps["evaluate"].artifacts["gate"]["passed"] is True

    run = await env.svc.decide(run.id, approve=True, actor="bob [k2]", reason="numbers look fine")
    run = await env.until(run.id, lambda r: r.finished)
    assert (run.state, run.outcome) == ("succeeded", "promoted"), run.public()
    assert env.releases.get("demo").status == "promoted" and env.ft.undeployed == []  # it serves now
    assert env.ft.promoted == [("veltmar-fact", "1", "bob [k2]")]
    actions = [e.action for e in env.svc.store.audit_events(subject_ref=run.id)]
    assert actions[::-1] == ["run.start", "run.approve", "run.succeeded"]
    assert "approved by bob [k2]: numbers look fine" in env.svc.get(run.id).steps["approval"].log


async def test_the_next_run_canaries_against_the_version_promoted_before(env: Env) -> None:
    env.ft.production = "1"
    env.ft.deployed.append(("veltmar-fact", "1", "veltmar-fact-v1"))
    run = await env.svc.start("demo", actor="alice")
    await env.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
    assert env.releases.get("demo").spec.variant("stable").model == "veltmar-fact-v1"


# -- how a run stops ------------------------------------------------------------------------------------------


async def test_a_dataset_that_fails_its_contract_stops_the_run_before_training(env: Env) -> None:
    env.ft.contract_ok = False
    run = await env.svc.start("demo", actor="alice")
    run = await env.until(run.id, lambda r: r.finished)
    assert (run.state, run.outcome) == ("failed", "contract_failed")
    assert "no assistant turn" in run.error and run.steps["dataset"].state == "failed"
    assert run.steps["finetune"].state == "pending" and env.ft.jobs == {}


async def test_too_few_examples_stop_the_run(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "defs", dataset={"include_job_data": False, "min_examples": 3})
    e = Env(tmp_path)
    await e.open()
    try:
        run = await e.svc.start("demo", actor="alice")
        run = await e.until(run.id, lambda r: r.finished)
        assert run.outcome == "contract_failed" and "has 0 examples" in run.error
    finally:
        await e.close()


async def test_a_failed_gate_stops_the_run_and_releases_nothing(env: Env) -> None:
    env.ft.evals_pass = False
    run = await env.svc.start("demo", actor="alice")
    run = await env.until(run.id, lambda r: r.finished)
    assert (run.state, run.outcome) == ("failed", "gate_failed") and "says_quorra" in run.error
    with pytest.raises(NotFound):
        env.releases.get("demo")
    # a decision stands: retry is refused with what to do instead
    with pytest.raises(Conflict, match="start a new run"):
        await env.svc.retry(run.id, actor="alice")


async def test_a_canary_rolled_back_by_its_numbers_ends_the_run(env: Env) -> None:
    run = await env.svc.start("demo", actor="alice")
    await env.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
    env.releases.rollback("demo", actor="controller", reason="errors 12% worse")
    run = await env.until(run.id, lambda r: r.finished)
    assert (run.state, run.outcome) == ("failed", "rolled_back") and "errors 12% worse" in run.error
    assert env.ft.promoted == [] and env.ft.undeployed == ["veltmar-fact-v1"]  # not reachable by name any more


async def test_a_rejected_run_rolls_its_canary_back(env: Env) -> None:
    run = await env.svc.start("demo", actor="alice")
    await env.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
    env.releases.store.note(env.releases.get("demo"), controller.READY + "passed")
    run = await env.until(run.id, lambda r: r.state == "waiting")
    with pytest.raises(Conflict, match="only a run that failed on an error"):
        await env.svc.retry(run.id, actor="x")
    await env.svc.decide(run.id, approve=False, actor="bob", reason="answers got longer")
    run = await env.until(run.id, lambda r: r.finished)
    assert (run.state, run.outcome) == ("failed", "rejected") and "answers got longer" in run.error
    assert env.releases.get("demo").status == "rolled_back" and env.ft.promoted == []
    assert env.ft.undeployed == ["veltmar-fact-v1"]
    with pytest.raises(Conflict, match="waiting"):
        await env.svc.decide(run.id, approve=True, actor="bob")


async def test_a_failed_job_is_an_error_a_person_can_retry_at_its_step(env: Env) -> None:
    env.ft.train_ok = False
    run = await env.svc.start("demo", actor="alice")
    run = await env.until(run.id, lambda r: r.finished)
    assert (run.outcome, run.steps["finetune"].state) == ("error", "failed") and "CUDA out of memory" in run.error
    env.ft.train_ok = True
    run = await env.svc.retry(run.id, actor="alice", reason="freed the GPU")
    run = await env.until(run.id, lambda r: r.steps["finetune"].state == "succeeded")
    assert run.steps["dataset"].attempts == 1 and run.steps["finetune"].attempts == 2
    assert len(env.ft.jobs) == 2  # the failed job is not reattached: the retry trains again
    await env.svc.cancel(run.id, actor="alice")


# -- durability ------------------------------------------------------------------------------------------------


async def test_a_restart_mid_training_resumes_the_step_and_reattaches_to_its_job(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "defs")
    ft = FakeFinetune()
    ft.hold_training = True
    first = Env(tmp_path, ft)
    await first.open()
    run = await first.svc.start("demo", actor="alice")
    run = await first.until(run.id, lambda r: r.steps["finetune"].artifacts.get("job_id"))
    await first.close()  # the server stops: the pipeline job goes back to the queue
    assert first.svc.store is not None

    ft.hold_training = False
    second = Env(tmp_path, ft)
    await second.open()
    try:
        run = await second.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
        assert len(ft.jobs) == 1 and run.steps["finetune"].attempts == 2  # resumed, not submitted again
        assert run.steps["dataset"].attempts == 1
    finally:
        await second.close()


async def test_cancel_stops_the_run_its_training_and_its_canary(env: Env) -> None:
    env.ft.hold_training = True
    run = await env.svc.start("demo", actor="alice")
    run = await env.until(run.id, lambda r: r.steps["finetune"].artifacts.get("job_id"))
    run = await env.svc.cancel(run.id, actor="alice", reason="wrong data")
    assert (run.state, run.outcome) == ("cancelled", "cancelled")
    assert env.ft.cancelled == [run.steps["finetune"].artifacts["job_id"]]
    assert run.steps["finetune"].state == "cancelled" and run.steps["promote"].state == "cancelled"
    with pytest.raises(Conflict):
        await env.svc.cancel(run.id, actor="alice")


# -- one at a time, triggers -------------------------------------------------------------------------------------


async def test_one_open_run_per_pipeline(env: Env) -> None:
    env.ft.hold_training = True
    run = await env.svc.start("demo", actor="alice")
    with pytest.raises(Conflict, match="already has an open run") as e:
        await env.svc.start("demo", actor="bob")
    assert e.value.code == "pipeline_run_open"
    await env.svc.cancel(run.id, actor="alice")
    second = await env.svc.start("demo", actor="bob")  # a finished run frees the slot
    await env.svc.cancel(second.id, actor="bob")


async def test_triggers_fire_on_what_happened_since_the_last_run_and_respect_the_cooldown(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "defs", triggers=[{"kind": "drift", "checks": ["topic_mix"]},
                                                {"kind": "feedback", "min_new": 3, "min_score": 1},
                                                {"kind": "eval_regression", "suite": "veltmar-fact"}],
                   cooldown="1h")
    e = Env(tmp_path)
    svc = await e.open()
    try:
        d = svc.definition("demo")
        now = time.time() - 1000
        assert svc.due(d, now=now) is None  # armed then: nothing happened since
        e.drift = [{"id": "drift-1", "created": now + 1, "drifted_checks": ["answer_length"]}]
        assert svc.due(d, now=now + 2) is None  # not a check this pipeline listens to
        e.drift.insert(0, {"id": "drift-2", "created": now + 3, "drifted_checks": ["topic_mix", "input_embedding"]})
        fired = svc.due(d, now=now + 4)
        assert fired["kind"] == "drift" and fired["drift_check"] == "drift-2"

        e.ft.hold_training = True
        started = await svc.check_triggers()
        assert [r.trigger["kind"] for r in started] == ["drift"] and started[0].created_by == "trigger:drift"
        assert await svc.check_triggers() == []  # open run
        await svc.cancel(started[0].id, actor="t")
        assert svc.due(d, now=time.time() + 10) is None  # cooldown, and the drift was before this run
        later = time.time() + 3601
        assert svc.due(d, now=later) is None

        rate(e, "r1", "r2")
        rate(e, "r0", score=0.0)
        assert svc.due(d, now=later) is None
        rate(e, "r3")
        assert svc.due(d, now=later)["kind"] == "feedback"

        e.eval_runs = [SimpleNamespace(id="b", passed=False, started_at=time.time() + 5),
                       SimpleNamespace(id="a", passed=True, started_at=time.time())]
        trigger = next(t for t in d.spec.triggers if t.kind == "eval_regression")
        assert svc._fired(trigger, since=time.time() - 1, now=later)["eval_run"] == "b"
    finally:
        await e.close()


async def test_a_schedule_counts_from_when_the_pipeline_was_first_seen(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "defs", triggers=[{"kind": "schedule", "every": "2h"}], cooldown=0)
    e = Env(tmp_path)
    svc = await e.open()
    try:
        d = svc.definition("demo")
        now = time.time()
        assert svc.due(d, now=now) is None
        assert svc.due(d, now=now + 7200)["kind"] == "schedule"
    finally:
        await e.close()


# -- definitions --------------------------------------------------------------------------------------------------


def test_durations_and_bad_definitions_say_what_to_fix(tmp_path: Path) -> None:
    assert seconds("7d") == 604800 and seconds("90") == 90 and seconds(15) == 15
    with pytest.raises(ValueError, match="not a duration"):
        seconds("soon")
    write_pipeline(tmp_path, canary={"endpoint": "x", "steps": [50, 40]})
    with pytest.raises(InvalidPipeline, match="canary steps must end at 100"):
        load_pipeline(tmp_path / "demo.yaml")
    write_pipeline(tmp_path, triggers=[{"kind": "moon_phase"}])
    with pytest.raises(InvalidPipeline, match=r"triggers\.0"):
        load_pipeline(tmp_path / "demo.yaml")
    job = yaml.safe_load((tmp_path / "jobs" / "job.yaml").read_text())
    job["evals"] = []
    write_pipeline(tmp_path)
    (tmp_path / "jobs" / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(InvalidPipeline, match="names no eval suites"):
        load_pipeline(tmp_path / "demo.yaml")


def test_the_shipped_pipeline_loads_paused() -> None:
    """An example must not retrain anything on its own on a user's server: its triggers wait to be unpaused."""
    d = load_pipeline(ROOT / "finetune" / "pipelines" / "veltmar.yaml")
    assert d.model == "veltmar-fact" and d.spec.canary.endpoint == "veltmar" and d.job.evals
    assert d.spec.paused and {t.kind for t in d.spec.triggers} == {"drift", "feedback", "eval_regression"}


async def test_a_broken_definition_file_is_reported_not_fatal(env: Env) -> None:
    (env.tmp / "defs" / "broken.yaml").write_text("name: [unclosed\n")
    names = env.svc.definitions()
    assert "demo" in names and "veltmar" in names
    assert any("broken.yaml" in p and "not valid YAML" in m for p, m in env.svc.errors.items())
    with pytest.raises(NotFound, match="no pipeline 'nope'"):
        env.svc.definition("nope")


# -- through the API -------------------------------------------------------------------------------------------


async def test_the_api_scopes_refusals_and_a_waiting_run_a_person_rejects(tmp_path: Path) -> None:
    import httpx

    from app.api.main import create_app
    from app.container import Container
    from app.settings import load_settings
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder
    from tests.fakes.llm import ScriptedBackend

    write_pipeline(tmp_path / "defs")
    settings = load_settings(home=tmp_path / "home", backends={"local": {"kind": "openai", "base_url": "http://x/v1"}},
                             models={"m": {"backend": "local", "model": "fake"}}, default_model="m",
                             guardrails={"enabled": False}, pipelines={"dirs": [str(tmp_path / "defs")]},
                             auth={"default_rate_limit_per_minute": 10_000})
    container = await Container.build(settings, backends={"local": ScriptedBackend()},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    keys = {n: container.keys.create(n, s)[1] for n, s in [("ft", ["finetune"]), ("ops", ["finetune", "releases"]),
                                                             ("chat", ["chat"])]}
    h = {n: {"Authorization": f"Bearer {k}"} for n, k in keys.items()}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                     base_url="http://keel") as c:
            r = await c.get("/v1/pipelines", headers=h["chat"])
            assert r.status_code == 403 and "finetune" in r.json()["error"]["message"]
            body = (await c.get("/v1/pipelines", headers=h["ft"])).json()
            assert {p["name"] for p in body["data"]} >= {"demo", "veltmar"} and body["errors"] == {}
            r = await c.post("/v1/pipelines/nope/runs", json={}, headers=h["ft"])
            assert r.status_code == 404 and r.json()["error"]["code"] == "pipeline_not_found"
            r = await c.get("/v1/pipelines/runs/../../etc", headers=h["ft"])
            assert r.status_code in (400, 404)
            r = await c.get("/v1/pipelines/runs/pr-nothere", headers=h["ft"])
            assert r.status_code == 404 and r.json()["error"]["code"] == "pipeline_run_not_found"

            # a run that waits for approval (seeded: nothing trains here)
            store, d = container.pipelines.store, container.pipelines.definition("demo")
            run = store.create(pipeline="demo", model=d.model, trigger={"kind": "manual"}, definition={
                "pipeline": d.spec.model_dump(mode="json"), "job": d.job.model_dump(mode="json"), "source": d.source},
                definition_hash=d.hash, actor="seed", skip=("canary",))
            for step in ("trigger", "dataset", "finetune", "evaluate"):
                store.step_update(run.id, step, state="succeeded", finished=True)
            store.step_update(run.id, "finetune", artifacts={"model": "veltmar-fact", "version": "1"})
            store.set_run(run.id, state="waiting")
            store.step_update(run.id, "approval", state="waiting")

            r = await c.post("/v1/pipelines/demo/runs", json={"reason": "again"}, headers=h["ft"])
            assert r.status_code == 403 and "'releases' scope too" in r.json()["error"]["message"]  # it canaries
            r = await c.post("/v1/pipelines/demo/runs", json={"reason": "again"}, headers=h["ops"])
            assert r.status_code == 409 and r.json()["error"]["code"] == "pipeline_run_open"
            r = await c.post(f"/v1/pipelines/runs/{run.id}/reject", json={"reason": "no"}, headers=h["ft"])
            assert r.status_code == 403 and "releases" in r.json()["error"]["message"]
            r = await c.post(f"/v1/pipelines/runs/{run.id}/retry", json={}, headers=h["ops"])
            assert r.status_code == 409 and r.json()["error"]["code"] == "pipeline_run_state"
            r = await c.post(f"/v1/pipelines/runs/{run.id}/reject", json={"reason": "too slow"}, headers=h["ops"])
            assert r.status_code == 200, r.text
            deadline, url = time.monotonic() + 20, f"/v1/pipelines/runs/{run.id}"
            while (run := (await c.get(url, headers=h["ft"])).json())["state"] != "failed":
                assert time.monotonic() < deadline, run
                await asyncio.sleep(0.05)
            assert run["outcome"] == "rejected" and "too slow" in run["error"]
            assert [e["action"] for e in run["audit"]][::-1] == ["run.start", "run.reject", "run.failed"]
            r = await c.get("/v1/admin/audit", params={"trail": "pipelines"}, headers=h["ft"])
            assert r.status_code == 403
            r = await c.post(f"/v1/pipelines/runs/{run['id']}/approve", json={}, headers=h["ops"])
            assert r.status_code == 409 and "is failed" in r.json()["error"]["message"]
    finally:
        await container.aclose()


def test_the_kubernetes_worker_job_runs_a_real_keel_command() -> None:
    """The documented distributed seam: the manifest's command is the CLI's, with options it has."""
    from typer.testing import CliRunner

    from app.cli.main import app

    job = yaml.safe_load((ROOT / "infra" / "k8s" / "finetune-worker-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[0].endswith("keel") and command[1:3] == ["finetune", "worker"]
    assert {e["name"] for e in container["env"]} >= {"KEEL_HOME", "KEEL_FINETUNE__AUTO_EVAL"}
    out = CliRunner().invoke(app, [*command[1:3], "--help"])
    assert out.exit_code == 0 and all(opt in out.output for opt in command[3:])


# -- the review's cases: crash windows, races, strays ----------------------------------------------------------


async def test_a_job_submitted_but_not_recorded_is_found_again_not_submitted_twice(env: Env) -> None:
    env.ft.die_after_submit = True
    run = await env.svc.start("demo", actor="alice")
    run = await env.until(run.id, lambda r: r.finished)
    assert run.outcome == "error" and "the process died" in run.error and len(env.ft.jobs) == 1
    run = await env.svc.retry(run.id, actor="alice")
    run = await env.until(run.id, lambda r: r.steps["finetune"].state == "succeeded")
    assert len(env.ft.jobs) == 1 and "reattached to fine-tuning job ft-1" in run.steps["finetune"].log
    await env.svc.cancel(run.id, actor="alice")


async def test_a_release_created_but_not_recorded_is_found_again_not_created_twice(env: Env) -> None:
    real = env.releases.create

    def create_then_die(spec, **kw):
        real(spec, **kw)
        env.releases.create = real
        raise RuntimeError("the process died")

    env.releases.create = create_then_die
    run = await env.svc.start("demo", actor="alice")
    run = await env.until(run.id, lambda r: r.finished)
    assert run.outcome == "error" and run.steps["canary"].state == "failed"
    run = await env.svc.retry(run.id, actor="alice")
    run = await env.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
    assert len(env.releases.store.history("demo")) == 1  # reattached by who created it
    await env.svc.cancel(run.id, actor="alice")


async def test_two_retries_at_once_resume_the_run_once(env: Env) -> None:
    env.ft.train_ok = False
    run = await env.svc.start("demo", actor="alice")
    await env.until(run.id, lambda r: r.finished)
    env.ft.train_ok, env.ft.hold_training = True, True
    results = await asyncio.gather(env.svc.retry(run.id, actor="a"), env.svc.retry(run.id, actor="b"),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "Run"]
    await env.until(run.id, lambda r: r.steps["finetune"].artifacts.get("job_id"))
    await asyncio.sleep(0.2)
    assert len([j for j in env.ft.jobs.values() if j.state != "failed"]) == 1
    await env.svc.cancel(run.id, actor="alice")


async def test_an_open_run_nobody_drives_is_queued_again(env: Env) -> None:
    d = env.svc.definition("demo")
    run = env.svc.store.create(pipeline="demo", model=d.model, trigger={"kind": "manual"}, definition={
        "pipeline": d.spec.model_dump(mode="json"), "job": d.job.model_dump(mode="json"), "source": d.source},
        definition_hash=d.hash, actor="crashed-before-queueing")
    assert await env.svc.reconcile(grace_s=60) == []  # it may still be on its way to the queue
    assert await env.svc.reconcile(grace_s=0) == [run.id]
    run = await env.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
    assert run.job_id is not None
    assert await env.svc.reconcile(grace_s=0) == []  # driven now
    await env.svc.cancel(run.id, actor="alice")


async def test_cancel_during_the_canary_rolls_it_back(env: Env) -> None:
    run = await env.svc.start("demo", actor="alice")
    await env.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
    run = await env.svc.cancel(run.id, actor="alice", reason="wrong base model")
    assert run.state == "cancelled" and env.releases.get("demo").status == "rolled_back"
    assert env.ft.undeployed == ["veltmar-fact-v1"] and env.ft.deployed == []
    assert "wrong base model" in env.releases.get("demo").decision.reason


async def test_auto_approval_promotes_when_the_canary_passes(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "defs", promote={"approval": "auto"})
    e = Env(tmp_path)
    await e.open()
    try:
        run = await e.svc.start("demo", actor="alice")
        await e.until(run.id, lambda r: r.steps["canary"].artifacts.get("release_id"))
        assert e.releases.get("demo").spec.canary.promotion == "auto"
        e.releases.promote("demo", actor="controller", reason="step 2/2 passed")  # what the controller does
        run = await e.until(run.id, lambda r: r.finished)
        assert (run.state, run.outcome) == ("succeeded", "promoted") and run.decision is None
        assert e.ft.promoted == [("veltmar-fact", "1", "auto")]
    finally:
        await e.close()


async def test_a_start_that_would_fail_late_is_refused_now(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "defs")
    e = Env(tmp_path)
    await e.open()
    try:
        e.releases.name_taken = lambda name: name == "demo"
        with pytest.raises(InvalidPipeline, match="already a model name"):
            await e.svc.start("demo", actor="alice")
        e.releases.name_taken = lambda name: False
        e.ft.lora_backend_problem = "backend 'local' is a vLLM server started without LoRA support"
        with pytest.raises(InvalidPipeline, match="serves its adapter, but backend 'local' is a vLLM server"):
            await e.svc.start("demo", actor="alice")
        assert e.svc.store.list() == []
    finally:
        await e.close()


async def test_malformed_job_data_is_a_contract_failure_naming_the_line(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path / "defs")
    bad = tmp_path / "defs" / "jobs" / "bad.jsonl"
    bad.write_text(DATA.read_text().splitlines()[0] + "\n{not json\n")
    job = yaml.safe_load((path.parent / "jobs" / "job.yaml").read_text())
    job["dataset"]["path"] = str(bad)
    (path.parent / "jobs" / "job.yaml").write_text(yaml.safe_dump(job))
    e = Env(tmp_path)
    await e.open()
    try:
        run = await e.svc.start("demo", actor="alice")
        run = await e.until(run.id, lambda r: r.finished)
        assert run.outcome == "contract_failed" and "bad.jsonl:2: not JSON" in run.error
    finally:
        await e.close()


def test_the_backend_that_would_serve_an_adapter_is_checked_before_training(tmp_path: Path) -> None:
    from app.settings import Settings
    from finetune import build_finetune

    vllm = Settings(home=tmp_path / "a")  # the default: a managed vLLM, LoRA off
    svc = build_finetune(vllm)
    try:
        with pytest.raises(InvalidRequest, match=r"managed.enable_lora: true \(and max_lora_rank >= 8\)"):
            svc.adapter_backend(None, 8)
    finally:
        svc.close()
    lora = Settings(home=tmp_path / "b", backends={"local": {"kind": "vllm", "managed": {"enable_lora": True}}})
    svc = build_finetune(lora)
    try:
        assert svc.adapter_backend(None, 8) == "local"
        with pytest.raises(InvalidRequest, match="up to 8; this adapter has r=16"):
            svc.adapter_backend("local", 16)
        with pytest.raises(InvalidRequest, match="no backend 'gpu'"):
            svc.adapter_backend("gpu", 8)
    finally:
        svc.close()


async def test_undeploy_removes_a_models_alias_and_its_record_and_refuses_anothers(tmp_path: Path) -> None:
    from app.settings import Settings
    from finetune import build_finetune
    from finetune.service import route_owner
    from finetune.serving import adapter_alias

    settings = Settings(home=tmp_path, backends={"local": {"kind": "transformers", "model_path": str(tmp_path)}})
    svc = build_finetune(settings)
    try:
        spec = adapter_alias(settings, "local", adapter_name="m-v1", adapter_path=tmp_path / "a", fallback=None,
                             description="LoRA m/1")
        svc.routes.set("m-v1", spec, owner=route_owner("m"), actor="t")
        svc.store.save_deployment(alias="m-v1", model="m", version="1", backend="local", served_name="m-v1",
                                  adapter_path=str(tmp_path / "a"), fallback=None, actor="t")
        with pytest.raises(Conflict):
            await svc.undeploy("m-v1", model="other", actor="t")  # not its alias
        assert await svc.undeploy("m-v1", model="m", actor="pipeline", reason="rolled back") is True
        assert svc.routes.get("m-v1") is None and svc.store.deployments() == []
        assert [e.action for e in svc.store.audit_events()][:1] == ["undeploy"]
        assert await svc.undeploy("m-v1", model="m", actor="pipeline") is False
    finally:
        svc.close()
