"""Crash and cancel with real worker processes: SIGKILL mid-training, then resume from the last
checkpoint in a new worker; and cancel a running job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.test_finetune_e2e import MODEL, make_home, service, spec, start_worker, wait_done

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="run `keel model prepare` first"),
]


def wait_for(predicate, timeout: float, what: str, proc=None, home: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = (home / "worker.out").read_text()[-3000:] if home else ""
            pytest.fail(f"worker exited (code {proc.returncode}) before {what}:\n{out}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    from finetune.spec import parse_spec

    home = make_home(tmp_path)
    svc = service(home)
    job = svc.submit(parse_spec(spec(max_steps=8, batch_size=2, save_steps=2, eval_steps=4, max_length=96)))
    ckpt = Path(job.run_dir) / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    proc = start_worker(home)
    wait_for(ckpt.is_file, 600, "checkpoint-4", proc, home)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: like a power cut or the OOM killer
    proc.wait()
    killed = svc.get(job.id)
    assert killed.state == "running" and killed.step >= 4  # the store still thinks it runs
    first_run = killed.mlflow_run_id

    wait_done(start_worker(home), home)
    job = svc.get(job.id)
    log = svc.logs(job.id)[0]
    assert job.state == "succeeded", (job.error, log[-3000:])
    assert job.attempts == 2 and job.step == 8
    assert "is gone; requeued to resume from its last checkpoint" in log
    resumed_at = int(log.split("resuming from checkpoint-")[1].split()[0].rstrip(","))
    assert resumed_at >= 4
    assert f"training loop starts at step {resumed_at} of 8" in log
    assert job.mlflow_run_id == first_run  # the same MLflow run continues
    assert job.metrics["train_loss_last"] < job.metrics["eval_loss_initial"] + 1.0
    assert Path(job.adapter_path, "adapter_model.safetensors").is_file()
    svc.close()


def test_cancel_a_running_job(tmp_path):
    from mlflow import MlflowClient

    from finetune.spec import parse_spec

    home = make_home(tmp_path)
    svc = service(home)
    job = svc.submit(parse_spec(spec(max_steps=200, batch_size=2, save_steps=100, eval_steps=100, max_length=96)))
    proc = start_worker(home)
    wait_for(lambda: svc.get(job.id).step >= 1, 600, "the first step", proc, home)
    assert svc.cancel(job.id, actor="test").state == "running"  # requested; the worker stops at the next step
    wait_done(proc, home, timeout=120)
    job = svc.get(job.id)
    assert job.state == "cancelled" and job.step < 200 and job.adapter_path is None
    assert "cancelled at step" in svc.logs(job.id)[0]
    client = MlflowClient(tracking_uri=svc.fs.resolved_tracking_uri(home))
    assert client.get_run(job.mlflow_run_id).info.status == "KILLED"
    svc.close()
