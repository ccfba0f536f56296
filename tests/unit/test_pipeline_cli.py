"""`keel pipeline` against a real Keel API (uvicorn in a thread, scripted backends; tests/cli_server.py): list, start
and its refusals, runs, show with logs, reject of a waiting run, cancel, retry's refusal, and errors as one line."""

from __future__ import annotations

import time

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from app.cli import pipeline as cli
from app.cli.main import app as keel_app
from tests.cli_server import ApiServer, cli_env
from tests.fakes.llm import ScriptedBackend
from tests.unit.test_pipeline import write_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    defs = tmp_path_factory.mktemp("defs")
    write_pipeline(defs)  # "demo": a canary, approval required
    plain = yaml.safe_load((defs / "demo.yaml").read_text())
    plain.update(name="plain", canary=None)
    (defs / "plain.yaml").write_text(yaml.safe_dump(plain))
    s = ApiServer(tmp_path_factory.mktemp("keel-pipeline-cli"), settings=dict(
        backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
        auth={"default_rate_limit_per_minute": 100_000}, pipelines={"dirs": [str(defs)]}),
        backends={"local": ScriptedBackend()}, keys={"ops": ["finetune", "releases"], "ft": ["finetune"]}).start()
    yield s
    s.stop()


@pytest.fixture
def keel(server, tmp_path, monkeypatch):
    def run(*args: str, code: int = 0, key: str = "ops") -> str:
        cli_env(monkeypatch, tmp_path, server.keys[key])
        monkeypatch.setattr(cli, "console", Console(width=250, highlight=False))
        result = runner.invoke(keel_app, ["pipeline", *args, "--url", server.url])
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        return " ".join(result.output.split())

    return run


def seed_waiting(server) -> str:
    """A run waiting for approval (nothing trains in this test)."""
    c = server.container
    d = c.pipelines.definition("demo")
    run = c.pipelines.store.create(pipeline="demo", model=d.model, trigger={"kind": "manual", "reason": "seeded"},
                                   definition={"pipeline": d.spec.model_dump(mode="json"),
                                               "job": d.job.model_dump(mode="json"), "source": d.source},
                                   definition_hash=d.hash, actor="seed", skip=("canary",))
    for step in ("trigger", "dataset", "finetune", "evaluate"):
        c.pipelines.store.step_update(run.id, step, state="succeeded", finished=True, log=f"{step} done\n")
    c.pipelines.store.step_update(run.id, "finetune", artifacts={"job_id": "ft-1", "model": "veltmar-fact",
                                                                 "version": "1"})
    c.pipelines.store.step_update(run.id, "approval", state="waiting")
    c.pipelines.store.set_run(run.id, state="waiting")
    return run.id


def test_list_start_show_reject_and_the_refusals(keel, server) -> None:
    out = keel("list")
    assert "demo" in out and "plain" in out and "veltmar" in out and "(paused)" in out
    out = keel("start", "demo", key="ft", code=1)
    assert "'releases' scope too" in out  # it canaries: the key needs releases as well
    out = keel("start", "nope", code=1)
    assert "pipeline_not_found" in out

    run_id = seed_waiting(server)
    out = keel("start", "demo", code=1)
    assert "pipeline_run_open" in out and run_id in out
    out = keel("show", run_id, "--logs")
    assert "waiting for approval: keel pipeline approve " + run_id in out and "finetune done" in out
    assert "job_id=ft-1, model=veltmar-fact, version=1" in out
    assert run_id in keel("runs", "--pipeline", "demo")
    out = keel("retry", run_id, code=1)
    assert "pipeline_run_state" in out

    assert f"run {run_id} rejected" in keel("reject", run_id, "--reason", "not now")
    deadline = time.monotonic() + 20
    while server.container.pipelines.get(run_id).state != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    out = keel("show", run_id)
    assert "failed (rejected)" in out and "decision: rejected by ops" in out and "not now" in out


def wait_finished(server, run_id: str):
    deadline = time.monotonic() + 20
    while not (run := server.container.pipelines.get(run_id)).finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return run


def test_a_failed_run_shows_why_and_retries_then_cancel_and_a_bad_id(keel, server) -> None:
    out = keel("start", "plain", "--reason", "try")
    run_id = out.split("run ", 1)[1].split(" ", 1)[0]
    assert run_id.startswith("pr-")
    # this server has no base model prepared: the dataset step's contract check says so, and the run fails on it
    run = wait_finished(server, run_id)
    assert (run.state, run.outcome, run.current_step) == ("failed", "error", "dataset")
    out = keel("show", run_id)
    assert "failed (error)" in out and "dataset: " in out and "keel model prepare" in out
    assert "resumes at dataset" in keel("retry", run_id, "--reason", "prepared it")
    assert wait_finished(server, run_id).steps["dataset"].attempts == 2

    waiting = seed_waiting(server)
    out = keel("cancel", waiting, "--reason", "changed my mind")
    assert "cancelled (cancelled)" in out and "approval" in out
    out = keel("show", "../etc/passwd", code=1)
    assert "invalid_run_id" in out or "not_found" in out
