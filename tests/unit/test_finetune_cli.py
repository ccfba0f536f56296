"""`keel finetune` commands on a temporary home (no training: the worker is not started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from finetune import cli
from finetune.cli import app

MODEL = Path(__file__).resolve().parents[2] / ".keel" / "models" / "smollm2"
pytestmark = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="SmolLM2 not prepared")
runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2").symlink_to(MODEL)
    rows = [{"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}."}]}
            for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": []}) + "\n")
    (tmp_path / "job.yaml").write_text("name: cli-demo\ndataset: {path: d.jsonl}\ntraining: {max_steps: 2}\n")
    (tmp_path / "bad.yaml").write_text("name: cli-bad\ndataset: {path: bad.jsonl, validation_split: 0}\n")
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
