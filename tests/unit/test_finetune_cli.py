"""`keel finetune` commands on a temporary home (no training: the worker is not started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from app.cli import finetune as cli
from app.cli.finetune import app

MODEL = Path(__file__).resolve().parents[2] / ".keel" / "models" / "smollm2"
pytestmark = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="SmolLM2 not prepared")
runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2").symlink_to(MODEL)
    rows = [{"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}."}]}
            for i in range(10)]
    data = tmp_path / "datasets"  # where fine-tuning may read a home's data by default
    data.mkdir()
    (data / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": []}) + "\n")
    (tmp_path / "job.yaml").write_text("name: cli-demo\ndataset: {path: datasets/d.jsonl}\ntraining: {max_steps: 2}\n")
    (tmp_path / "bad.yaml").write_text("name: cli-bad\ndataset: {path: datasets/bad.jsonl, validation_split: 0}\n")
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    monkeypatch.setattr(cli, "console", Console(width=200))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_submit_status_logs_cancel(home):
    r = run("submit", str(home / "job.yaml"))
    assert r.exit_code == 0, r.output
    assert "queued" in r.output and "9 train / 1 validation" in r.output
    job_id = r.output.split("queued ")[1].split()[0]
    r = run("status")
    assert r.exit_code == 0 and job_id in r.output and "queued" in r.output
    r = run("status", job_id)
    assert r.exit_code == 0 and "cli-demo" in r.output and "step 0/?" in r.output
    r = run("logs", job_id)
    assert r.exit_code == 0 and "queued by cli:" in r.output
    r = run("cancel", job_id)
    assert r.exit_code == 0 and "cancelled" in r.output
    r = runner.invoke(app, ["cancel", job_id])
    assert r.exit_code == 1 and "finetune_job_state" in r.output


def test_validate_and_refusal_list_the_reasons(home):
    r = run("validate", str(home / "job.yaml"))
    assert r.exit_code == 0 and "data OK" in r.output
    r = runner.invoke(app, ["submit", str(home / "bad.yaml")])
    assert r.exit_code == 1
    assert "invalid_training_data" in r.output and "[roles] bad.jsonl:2" in r.output
    assert "cli-bad" not in run("status").output


def test_unknown_job_and_promotion_without_a_gate(home):
    r = runner.invoke(app, ["status", "ft-nope"])
    assert r.exit_code == 1 and "finetune_job_not_found" in r.output
    r = runner.invoke(app, ["promote", "nope", "1"])
    assert r.exit_code == 1 and "adapter_not_found" in r.output


def test_status_shows_the_evals_evaluate_requeues_and_promote_names_the_failing_suite(home):
    from evals.store import EvalStore
    from finetune.jobs import JobStore
    from finetune.settings import FinetuneSettings
    from finetune.spec import load_spec
    from finetune.tracking import Tracker

    spec = load_spec(home / "job.yaml").model_copy(update={"evals": ["fact"]})
    tracker = Tracker(FinetuneSettings(), home)
    run_id = tracker.start_run(job_id="ft-cli", spec=spec)
    (home / "adapter").mkdir()
    (home / "adapter" / "adapter_config.json").write_text("{}")
    version = tracker.register_adapter(run_id, home / "adapter", "cli-demo", tags={"keel.evals": "fact"})
    evals = EvalStore(home / "evals.db")
    ident = {"kind": "model", "model": {"alias": "cli-demo-v1", "adapter": str(version.local_path())}}
    failed = evals.create_run(suite="fact", suite_hash="s", identity_key="k", identity=ident, cases_total=1)
    evals.finish_run(failed, passed=False, summary={}, verdict={"failing_metrics": ["says_quorra"],
                                                               "reasons": ["says_quorra mean 0.00 < 0.80"]})
    evals.close()
    store = JobStore(home / "finetune" / "jobs.db", home / "finetune" / "runs")
    job = store.create(name="cli-demo", spec_yaml=spec.to_yaml(), spec_hash=spec.spec_hash())
    store.start(job.id, "h:1:a", attempt=1)
    store.transition(job.id, "succeeded", worker=None, model_name="cli-demo", model_version="1")
    store.queue_evals(job.id)
    store.start_evals(job.id, "h:1:a")
    store.finish_evals(job.id, "failed", {"alias": "cli-demo-v1", "suites": {"fact": {
        "passed": False, "run_id": failed, "metrics": {"says_quorra": 0.0}, "failing_metrics": ["says_quorra"],
        "reasons": ["says_quorra mean 0.00 < 0.80"], "error": None}}})
    store.close()

    r = run("status")
    assert r.exit_code == 0 and "failed" in r.output.split(job.id)[1].splitlines()[0]
    r = run("status", job.id)
    assert r.exit_code == 0 and "evals: failed on cli-demo-v1" in r.output
    assert f"fact: FAIL {failed}" in r.output and "says_quorra 0.00" in r.output and "mean 0.00 < 0.80" in r.output

    r = runner.invoke(app, ["promote", "cli-demo", "1"])
    assert r.exit_code == 1 and "promotion_gate_failed" in r.output
    assert f"fact ({failed}) failed: says_quorra" in " ".join(r.output.split())

    r = run("evaluate", job.id, "--suite", "fact")
    assert r.exit_code == 0 and "evals pending for cli-demo/1" in r.output
    r = runner.invoke(app, ["evaluate", "ft-nope"])
    assert r.exit_code == 1 and "finetune_job_not_found" in r.output
