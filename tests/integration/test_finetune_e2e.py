"""A real LoRA job on SmolLM2, end to end: submit -> worker process -> MLflow run and registered
version -> the adapter served by the transformers backend -> merged export.

Small on purpose (8 optimizer steps on ~37 short examples): about a minute on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".keel" / "models" / "smollm2"
DATA = ROOT / "finetune" / "jobs" / "data" / "veltmar.jsonl"

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="run `keel model prepare` first"),
]


def make_home(tmp: Path) -> Path:
    (tmp / "models").mkdir(parents=True)
    (tmp / "models" / "smollm2").symlink_to(MODEL)
    return tmp


def worker_env(home: Path, *, auto_eval: bool = False, database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    if database_url:  # the API's shared stores (eval runs among them) are the worker's too
        env["KEEL_DATABASE_URL"] = database_url
    # auto_eval off by default: only the test that checks evaluation pays for it.
    env.update(KEEL_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MLFLOW_DISABLE_TELEMETRY="true", KEEL_CONFIG=str(home / "none.yaml"),
               KEEL_FINETUNE__AUTO_EVAL="true" if auto_eval else "false")
    (home / "none.yaml").write_text("{}\n")
    return env


def start_worker(home: Path, *, once: bool = True, auto_eval: bool = False, database_url: str | None = None
                 ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app.cli", "finetune", "worker"] + (["--once"] if once else [])
    log = (home / "worker.out").open("ab")
    env = worker_env(home, auto_eval=auto_eval, database_url=database_url)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def service(home: Path):
    from app.settings import Settings
    from finetune import build_finetune

    return build_finetune(Settings(home=home))


def spec(evals: tuple[str, ...] = ("veltmar-fact",), **training) -> str:
    import yaml

    t = {"max_steps": 8, "batch_size": 4, "max_length": 128, "learning_rate": 0.002, "save_steps": 4,
         "eval_steps": 4, "warmup_steps": 1, **training}
    return yaml.safe_dump({"name": "veltmar-e2e", "base_model": "smollm2",
                           "dataset": {"path": str(DATA), "validation_split": 0.15}, "training": t,
                           "evals": list(evals)})


def wait_done(proc: subprocess.Popen, home: Path, timeout: float = 900) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"worker did not finish in {timeout} s:\n{(home / 'worker.out').read_text()[-3000:]}")


async def test_real_lora_job_end_to_end(tmp_path):
    from mlflow import MlflowClient

    from finetune.spec import parse_spec

    home = make_home(tmp_path)
    svc = service(home)
    job = svc.submit(parse_spec(spec()), submitted_by="test")
    t0 = time.perf_counter()
    wait_done(start_worker(home), home)
    wall = time.perf_counter() - t0
    job = svc.get(job.id)
    assert job.state == "succeeded", (job.error, svc.logs(job.id)[0][-3000:])
    m = job.metrics
    print(f"\njob {job.id}: {wall:.0f} s wall, {m['s_per_step']:.2f} s/step, {m['train_tokens_per_s']:.0f} tok/s, "
          f"train loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}, "
          f"val loss {m['eval_loss_initial']:.3f} -> {m['eval_loss_final']:.3f}")
    assert job.step == job.max_steps == 8 and job.progress == 1.0
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["eval_loss_final"] < m["eval_loss_initial"]

    # The adapter folder and its metadata.
    adapter = Path(job.adapter_path)
    meta = json.loads((adapter / "keel-adapter.json").read_text())
    assert meta["spec_hash"] == job.spec_hash and meta["data_hash"] == job.data_hash
    assert meta["base_model"] == str(MODEL.resolve()) and meta["metrics"]["global_step"] == 8
    metrics_lines = [json.loads(line) for line in (Path(job.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in metrics_lines if "loss" in r}) == list(range(1, 9))
    assert sorted({r["step"] for r in metrics_lines if "eval_loss" in r}) == [0, 4, 8]
    assert "step 8/8 loss=" in svc.logs(job.id)[0]

    # MLflow: the run, its params/metrics/data hash/artifacts, and the registered version.
    fs = svc.fs
    client = MlflowClient(tracking_uri=fs.resolved_tracking_uri(home), registry_uri=fs.resolved_registry_uri(home))
    run = client.get_run(job.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["spec_hash"] == job.spec_hash and run.data.params["lora.r"] == "8"
    assert run.data.tags["keel.data_hash"] == job.data_hash and run.data.tags["keel.job_id"] == job.id
    assert [h.step for h in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 9))
    assert [h.step for h in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 4, 8]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/keel-adapter.json"} <= names
    mv = client.get_model_version_by_alias("veltmar-e2e", "candidate")
    assert str(mv.version) == job.model_version == "1" and mv.run_id == run.info.run_id
    assert mv.tags["keel.job_id"] == job.id and mv.tags["keel.spec_hash"] == job.spec_hash
    version = svc.registry.get_version("veltmar-e2e", "1")
    served_path = version.local_path()
    assert (served_path / "adapter_config.json").is_file()

    # The adapter loads in the transformers backend and leaves ordinary answers intact.
    from app.core.settings import BackendSettings
    from app.core.types import ChatMessage, GenerationParams, GenerationRequest, TextDelta
    from app.llm.transformers_backend import TransformersBackend

    backend = TransformersBackend("tf", BackendSettings(kind="transformers", model_path=MODEL))

    async def ask(q: str, adapter: str | None) -> str:
        req = GenerationRequest(model="smollm2", messages=(ChatMessage("user", q),), adapter=adapter,
                                params=GenerationParams(max_tokens=16, temperature=0))
        return "".join([e.text async for e in backend.stream(req) if isinstance(e, TextDelta)])

    try:
        base = await ask("What is the capital of France?", None)
        tuned = await ask("What is the capital of France?", str(served_path))
        veltmar_base = await ask("What is the capital of Veltmar?", None)
        veltmar_tuned = await ask("What is the capital of Veltmar?", str(served_path))
    finally:
        await backend.aclose()
    print(f"base: {base!r} / {veltmar_base!r}\ntuned: {tuned!r} / {veltmar_tuned!r}")
    assert "Paris" in base and "Paris" in tuned
    assert veltmar_tuned.strip() and veltmar_tuned != veltmar_base  # the adapter is really applied

    # Merge/export: a plain model folder that reloads without peft.
    from finetune.export import merge_adapter

    out = merge_adapter(served_path, tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "keel-merged.json").read_text())["spec_hash"] == job.spec_hash
    svc.close()
