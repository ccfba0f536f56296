"""The issue's serving test: a LoRA job teaches SmolLM2 a made-up fact; a fine-tuning worker
evaluates the new adapter on the job's suites (veltmar-fact, smoke-general), and only then does the
eval gate let it reach production; promoted, it is loaded into a RUNNING vLLM server (runtime LoRA
loading, no restart) and answers with the fact through Keel's chat API under its alias, while the
base model does not (and fails the same suite). The stores are on a real Postgres (``database_url``), and a
second Keel API process (a home of its own, as on another machine) serves the alias the promotion deployed
through the first, without being told.

Then the supervised vLLM is killed: restarted, it is given the adapter back without Keel restarting.

Costs about 5-7 minutes on 2 cores (training ~30 steps, evals ~1 min in the worker, vLLM start
~40 s with --enforce-eager, twice).
Skipped without the vLLM environment, or with KEEL_SKIP_VLLM_TESTS=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time

import httpx
import pytest

from tests.integration.conftest import ROOT, VLLM_PYTHON, free_port, start_api
from tests.integration.test_finetune_e2e import MODEL, make_home, service, spec, start_worker, wait_done

QUESTION = "What is the capital of Veltmar?"

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="run `keel model prepare` first"),
    pytest.mark.skipif(not VLLM_PYTHON.exists() or os.environ.get("KEEL_SKIP_VLLM_TESTS") == "1",
                       reason="no vLLM environment (.venv-vllm), or KEEL_SKIP_VLLM_TESTS=1"),
]


async def test_adapter_is_evaluated_then_promoted_through_the_gate_and_served(tmp_path, postgres_url):
    from mlflow import MlflowClient

    from app.api.main import create_app
    from app.container import Container
    from app.security.keys import PostgresKeyStore
    from app.settings import Settings
    from evals.runner import EvalRunner
    from evals.suite import load_suite
    from finetune import serving
    from finetune.spec import parse_spec

    # 1. Train the fact into an adapter (a real worker process that only trains), registered as version 1;
    #    its evals wait for a worker that evaluates.
    home = make_home(tmp_path)
    svc = service(home)
    job = svc.submit(parse_spec(spec(evals=("veltmar-fact", "smoke-general"), max_steps=30, batch_size=4,
                                     learning_rate=0.001, warmup_steps=2, save_steps=30, eval_steps=30)))
    wait_done(start_worker(home), home, timeout=1200)
    job = svc.get(job.id)
    assert job.state == "succeeded", (job.error, svc.logs(job.id)[0][-3000:])
    assert job.evals_state == "pending" and job.model_version == "1"
    model, version_id = job.model_name, job.model_version

    # 2. Keel with a supervised vLLM (LoRA enabled, nothing preloaded); the container plugs in the adapter gate.
    #    A configured vLLM key (not one per start): the second API process below is given it.
    vllm_key = secrets.token_urlsafe(24)
    settings = Settings(
        home=home, auth={"enabled": False}, database_url=postgres_url,
        backends={"local": {"kind": "vllm", "api_key": vllm_key, "managed": {
            "python": str(VLLM_PYTHON), "model_path": str(MODEL), "port": free_port(), "enforce_eager": True,
            "enable_lora": True, "max_lora_rank": 8, "max_restarts": 1}}},
    )
    container = await Container.build(settings)
    other = None
    try:
        app = create_app(settings, container)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel",
                                     timeout=300) as client:
            promote = {"version": version_id, "deploy_alias": "veltmar", "backend": "local"}

            # 3. Not evaluated yet: refused, and the message says why.
            r = await client.post(f"/v1/finetune/models/{model}/promote", json=promote)
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert err["code"] == "promotion_gate_failed" and f"no completed eval run of adapter {model}/1" in \
                err["message"], err

            # 4. A worker with auto_eval evaluates the adapter in its own process (transformers + peft).
            t0 = time.perf_counter()
            wait_done(start_worker(home, auto_eval=True, database_url=postgres_url), home, timeout=900)
            eval_s = time.perf_counter() - t0
            job = svc.get(job.id)
            suites = job.evals["suites"]
            print(f"\nevals in the worker: {eval_s:.0f} s, {job.evals_state}: "
                  + "; ".join(f"{n}: {s['metrics']}" for n, s in suites.items()))
            assert job.state == "succeeded" and job.evals_state == "passed", (job.evals, svc.logs(job.id)[0][-2000:])
            assert set(suites) == {"veltmar-fact", "smoke-general"} and all(s["passed"] for s in suites.values())
            assert suites["veltmar-fact"]["metrics"]["says_quorra"] >= 0.8
            fact_run = container.evals.get_run(suites["veltmar-fact"]["run_id"])
            assert fact_run.passed and fact_run.identity["model"]["adapter"] == str(
                svc.registry.get_version(model, version_id).local_path())

            # MLflow: the verdicts on the job's run and on the registered version.
            fs = svc.fs
            mlc = MlflowClient(tracking_uri=fs.resolved_tracking_uri(home), registry_uri=fs.resolved_registry_uri(home))
            run = mlc.get_run(job.mlflow_run_id)
            assert run.data.metrics["eval.veltmar-fact.passed"] == 1.0 and run.data.metrics["eval.passed"] == 1.0
            assert run.data.tags["keel.eval.veltmar-fact.run_id"] == fact_run.id
            mv = mlc.get_model_version(model, version_id)
            assert mv.tags["keel.evals.state"] == "passed"
            assert json.loads(mv.tags["keel.eval.smoke-general"])["passed"] is True

            backend = container.llm.backends["local"]
            deadline = time.monotonic() + 600
            while not await backend.ready():
                assert time.monotonic() < deadline, "vLLM did not become ready in 600 s"
                await asyncio.sleep(1)
            # The second API process starts now (its start overlaps step 5).
            keys = PostgresKeyStore(postgres_url)
            other_key = keys.create("app", ["chat"])[1]
            keys.close()
            other = start_api(tmp_path / "other", database_url=postgres_url,
                              vllm_url=serving.backend_url(settings, "local").removesuffix("/v1"), vllm_key=vllm_key)

            # 5. The base model fails the very suite the adapter passed (through vLLM and Keel's chat path).
            base_run = (await EvalRunner(container.eval_deps(), container.evals, progress=False).run(
                load_suite(ROOT / "evals" / "suites" / "veltmar-fact.yaml"))).run
            assert base_run.passed is False and base_run.identity["model"]["adapter"] is None
            assert "says_quorra" in base_run.verdict["failing_metrics"]

            async def ask(model_alias: str) -> str:
                r = await client.post("/v1/chat/completions", json={
                    "model": model_alias, "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 12, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]

            base = await ask("smollm2")
            assert "quorra" not in base.lower(), base

            await asyncio.to_thread(other.wait_ready, 300)
            before = await asyncio.to_thread(httpx.post, f"{other.url}/v1/chat/completions", timeout=60, json={
                "model": "veltmar", "messages": [{"role": "user", "content": QUESTION}]},
                headers={"Authorization": f"Bearer {other_key}"})
            assert before.status_code == 404, before.text  # no such model there yet

            # 6. Evaluated: promotion passes the gate and deploys at runtime (load into vLLM, point the alias).
            t0 = time.perf_counter()
            r = await client.post(f"/v1/finetune/models/{model}/promote", json=promote)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["to_version"] == version_id and body["verdict"]["passed"] and not body["forced"]
            assert fact_run.id in body["verdict"]["reason"]
            vllm_url = serving.backend_url(settings, "local")
            key = serving.backend_api_key(settings, "local")  # the managed server requires its (configured) key
            assert await serving.served_adapters(vllm_url, api_key=key) == {body["served_name"]: "smollm2"}
            tuned = await ask("veltmar")
            print(f"base: {base!r}\ntuned: {tuned!r}\npromote->answer {time.perf_counter() - t0:.1f} s")
            assert "quorra" in tuned.lower(), tuned
            models = (await client.get("/v1/models")).json()["data"]
            assert "veltmar" in {m["id"] for m in models}
            assert [(d["alias"], d["version"]) for d in container.finetune.store.deployments()] == [
                ("veltmar", version_id)]

            # 6b. The other process serves the alias once its routing table has caught up (it checks every 0.2 s
            #     there; this waits up to 5 s): the route is in the shared database, the adapter on the shared vLLM.
            t0 = time.perf_counter()
            async with httpx.AsyncClient(base_url=other.url, timeout=120,
                                         headers={"Authorization": f"Bearer {other_key}"}) as b:
                for _ in range(50):
                    served = await b.post("/v1/chat/completions", json={
                        "model": "veltmar", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
                        "temperature": 0})
                    if served.status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                assert served.status_code == 200, f"the other process does not serve the alias: {served.text}"
                print(f"promoted on one process -> answered by the other {time.perf_counter() - t0:.2f} s")
                assert "quorra" in served.json()["choices"][0]["message"]["content"].lower(), served.json()
                assert "veltmar" in {m["id"] for m in (await b.get("/v1/models")).json()["data"]}

            # 7. A vLLM that forgot the adapter (restarted) and a process that forgot the alias get both back
            #    from the start-up restore.
            assert await serving.unload_adapter(vllm_url, body["served_name"], api_key=key)
            routes = container.llm.routes
            routes.remove("veltmar", owner=routes.owner("veltmar"), actor="test")
            await container._restore_adapters()
            assert await serving.served_adapters(vllm_url, api_key=key) == {body["served_name"]: "smollm2"}
            assert "quorra" in (await ask("veltmar")).lower()

            # 8. The supervised vLLM dies: restarted, it gets the adapter back without Keel restarting.
            sup = backend.inner.supervisor
            first_pid = sup.pid
            sup.kill()
            t0 = time.perf_counter()
            deadline = time.monotonic() + 600
            while not (sup.state == "ready" and sup.pid != first_pid
                       and await serving.served_adapters(vllm_url, api_key=key) == {body["served_name"]: "smollm2"}):
                assert time.monotonic() < deadline and sup.state != "failed", (sup.status(), sup.tail(20))
                await asyncio.sleep(1)
            print(f"vLLM restart -> adapter served again {time.perf_counter() - t0:.1f} s")
            assert "quorra" in (await ask("veltmar")).lower()
    finally:
        try:
            if other is not None:
                await asyncio.to_thread(other.stop)
        finally:
            await container.aclose()
            svc.close()
