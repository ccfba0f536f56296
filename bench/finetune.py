"""Fine-tuning benchmark: training speed on this machine, and promote -> adapter answering.

    .venv/bin/python bench/finetune.py                      # train the example job, report s/step, tokens/s
    .venv/bin/python bench/finetune.py --vllm               # also: promote -> load into a running vLLM ->
                                                            #   first answer through Keel's chat API
    .venv/bin/python bench/finetune.py --spec my.yaml --max-steps 10

Training goes through the real path (job store -> worker -> MLflow run -> registered version) in a
temporary Keel home. With ``--vllm``, Keel's container starts a supervised vLLM server with LoRA
enabled (``--enforce-eager``), the adapter version is promoted (``force`` with a reason: the bench
has no eval gate), loaded at runtime and asked through ``POST /v1/chat/completions`` with its alias.
Writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/finetune.py` puts bench/ first on sys.path, where bench/guardrails.py would shadow the
# guardrails package that Keel's container imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(_k, _v)

MODEL = ROOT / ".keel" / "models" / "smollm2"
QUESTION = "What is the capital of Veltmar?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(home: Path, spec_path: Path, max_steps: int | None):
    from app.settings import Settings
    from finetune import build_finetune
    from finetune.spec import load_spec
    from finetune.worker import Worker

    settings = Settings(home=home, finetune={"auto_eval": False})  # training alone; bench/evals.py times evals
    svc = build_finetune(settings)
    spec = load_spec(spec_path)
    if max_steps:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"max_steps": max_steps})})
    for done in svc.list(state="succeeded"):
        if done.spec_hash == spec.spec_hash():  # --home with an earlier run of this spec: reuse it
            print(f"reusing {done.id} from {home}")
            return settings, svc, done, (done.finished_at or 0) - (done.started_at or 0)
    job = svc.submit(spec, submitted_by="bench")
    t0 = time.perf_counter()
    Worker(settings, store=svc.store).run(once=True)
    wall = time.perf_counter() - t0
    job = svc.get(job.id)
    if job.state != "succeeded":
        raise SystemExit(f"training failed: {job.error}\n{svc.logs(job.id)[0][-3000:]}")
    return settings, svc, job, wall


async def promote_and_ask(settings, svc, job, alias: str) -> dict:
    import httpx

    from app.api.main import create_app
    from app.container import Container
    from finetune.serving import deploy

    port = free_port()
    settings.backends["local"].managed.port = port
    settings.backends["local"].managed.enable_lora = True
    settings.backends["local"].managed.enforce_eager = True
    settings.backends["local"].managed.max_lora_rank = 8
    settings.backends["local"].managed.python = ROOT / ".venv-vllm" / "bin" / "python"
    settings.auth.enabled = False
    t_start = time.perf_counter()
    container = await Container.build(settings)
    try:
        backend = container.llm.backends["local"]
        deadline = time.monotonic() + 600
        while not await backend.ready():
            if time.monotonic() > deadline:
                raise SystemExit("vLLM did not become ready in 600 s")
            await asyncio.sleep(1)
        vllm_start = time.perf_counter() - t_start
        app = create_app(settings, container)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel", timeout=300) as client:

            async def ask(model: str) -> tuple[str, float]:
                t = time.perf_counter()
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 12, "temperature": 0})
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"], time.perf_counter() - t

            base_answer, base_s = await ask("smollm2")
            t0 = time.perf_counter()
            promotion = svc.promote(job.model_name, job.model_version, force=True, reason="benchmark (no eval gate)",
                                    actor="bench")
            t_promoted = time.perf_counter()
            version = svc.registry.get_version(job.model_name, promotion.to_version)
            dep = await deploy(settings, version, alias=alias, backend="local")
            t_loaded = time.perf_counter()
            tuned_answer, _ = await ask(alias)
            t_answer = time.perf_counter()
            again, again_s = await ask(alias)
        return {
            "vllm_start_s": round(vllm_start, 1), "base_answer": base_answer, "tuned_answer": tuned_answer,
            "tuned_answer_repeat": again, "served_name": dep.served_name, "base_request_s": round(base_s, 2),
            "promote_s": round(t_promoted - t0, 3), "load_adapter_s": round(t_loaded - t_promoted, 3),
            "first_answer_s": round(t_answer - t_loaded, 3), "promote_to_answer_s": round(t_answer - t0, 3),
            "tuned_request_warm_s": round(again_s, 2),
        }
    finally:
        await container.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", type=Path, default=ROOT / "finetune" / "jobs" / "veltmar-fact.yaml")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--vllm", action="store_true", help="Also measure promote -> answer through vLLM.")
    p.add_argument("--alias", default="veltmar")
    p.add_argument("--keep", action="store_true", help="Keep the temporary Keel home.")
    p.add_argument("--home", type=Path, default=None,
                   help="Use (and keep) this Keel home; a finished run of the same spec there is reused.")
    a = p.parse_args()
    if not (MODEL / "model.safetensors").is_file():
        raise SystemExit("run `keel model prepare` first")
    if a.home is not None:
        home, a.keep = a.home, True
        home.mkdir(parents=True, exist_ok=True)
    else:
        home = Path(tempfile.mkdtemp(prefix="keel-bench-ft-"))
    if not (home / "models" / "smollm2").exists():
        (home / "models").mkdir(exist_ok=True)
        (home / "models" / "smollm2").symlink_to(MODEL)
    settings, svc, job, wall = train(home, a.spec, a.max_steps)
    m = job.metrics
    result = {
        "bench": "finetune", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "spec": str(a.spec), "job": job.id, "steps": job.step, "wall_s": round(wall, 1),
        "s_per_step_median": round(m["s_per_step"], 3), "train_tokens_per_s": round(m["train_tokens_per_s"], 1),
        "train_loss_first": round(m["train_loss_first"], 4), "train_loss_last": round(m["train_loss_last"], 4),
        "eval_loss_initial": round(m.get("eval_loss_initial", float("nan")), 4),
        "eval_loss_final": round(m.get("eval_loss_final", float("nan")), 4),
        "model_version": f"{job.model_name}/{job.model_version}", "adapter": job.adapter_path,
    }
    print(json.dumps(result, indent=2))
    if a.vllm:
        result["serving"] = asyncio.run(promote_and_ask(settings, svc, job, a.alias))
        print(json.dumps(result["serving"], indent=2))
    out = ROOT / "bench" / "results" / f"finetune-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}" + ("" if a.keep else f" (temporary home {home} removed)"))
    svc.close()
    if not a.keep:
        import shutil

        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
