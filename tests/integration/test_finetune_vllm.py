"""The issue's serving test: a LoRA job teaches SmolLM2 a made-up fact; after promotion through the
eval gate, the adapter is loaded into a RUNNING vLLM server (runtime LoRA loading, no restart) and
answers with the fact through Keel's chat API under its alias, while the base model does not.

Costs about 3-5 minutes on 2 cores (training ~30 steps, vLLM start ~40 s with --enforce-eager).
Skipped without the vLLM environment, or with KEEL_SKIP_VLLM_TESTS=1.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_finetune_e2e import MODEL, make_home, service, spec, start_worker, wait_done

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
QUESTION = "What is the capital of Veltmar?"

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="run `keel model prepare` first"),
    pytest.mark.skipif(not VLLM_PYTHON.exists() or os.environ.get("KEEL_SKIP_VLLM_TESTS") == "1",
                       reason="no vLLM environment (.venv-vllm), or KEEL_SKIP_VLLM_TESTS=1"),
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_promoted_adapter_answers_through_vllm_and_keel(tmp_path):
    from app.api.main import create_app
    from app.core.settings import Settings
    from app.services.container import Container
    from finetune import serving
    from finetune.errors import PromotionRefused
    from finetune.spec import parse_spec
    from prompts.registry import GateVerdict

    # 1. Train the fact into an adapter (a real worker process), registered as version 1.
    home = make_home(tmp_path)
    svc = service(home)
    job = svc.submit(parse_spec(spec(max_steps=30, batch_size=4, learning_rate=0.001, warmup_steps=2,
                                     save_steps=30, eval_steps=30)))
    wait_done(start_worker(home), home, timeout=1200)
    job = svc.get(job.id)
    assert job.state == "succeeded", (job.error, svc.logs(job.id)[0][-3000:])

    # 2. Promotion goes through the gate: refused without one, accepted by a passing gate.
    with pytest.raises(PromotionRefused, match="no eval gate configured"):
        svc.promote(job.model_name, job.model_version, actor="test")
    gated: list[str] = []

    def gate(version):
        gated.append(version.ref)
        return GateVerdict(passed=True, reason="bound suite passed (test gate)")

    svc.set_gate(gate)
    promotion = svc.promote(job.model_name, job.model_version, actor="test")
    assert promotion.to_version == job.model_version and gated == [f"{job.model_name}/{job.model_version}"]
    version = svc.registry.by_alias(job.model_name, "production")
    assert version is not None and version.version == job.model_version

    # 3. Keel with a supervised vLLM (LoRA enabled, nothing preloaded).
    settings = Settings(
        home=home, auth={"enabled": False},
        backends={"local": {"kind": "vllm", "managed": {
            "python": str(VLLM_PYTHON), "model_path": str(MODEL), "port": free_port(), "enforce_eager": True,
            "enable_lora": True, "max_lora_rank": 8, "restart_on_exit": False}}},
    )
    container = await Container.build(settings)
    try:
        backend = container.llm.backends["local"]
        deadline = time.monotonic() + 600
        while not await backend.ready():
            assert time.monotonic() < deadline, "vLLM did not become ready in 600 s"
            await asyncio.sleep(1)
        app = create_app(settings, container)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel",
                                     timeout=300) as client:

            async def ask(model: str) -> str:
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 12, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]

            base = await ask("smollm2")
            assert "quorra" not in base.lower(), base

            # 4. Deploy the production version at runtime: load into vLLM, point the alias at it.
            t0 = time.perf_counter()
            dep = await serving.deploy(settings, version, alias="veltmar", backend="local", fallback="smollm2")
            vllm_url = serving.backend_url(settings, "local")
            assert await serving.served_adapters(vllm_url) == {dep.served_name: "smollm2"}
            tuned = await ask("veltmar")
            print(f"\nbase: {base!r}\ntuned: {tuned!r}\npromote->answer {time.perf_counter() - t0:.1f} s")
            assert "quorra" in tuned.lower(), tuned
            models = (await client.get("/v1/models")).json()["data"]
            assert "veltmar" in {m["id"] for m in models}

            # 5. Unloading takes it away again (rollback of a deployment).
            assert await serving.unload_adapter(vllm_url, dep.served_name)
            assert await serving.served_adapters(vllm_url) == {}
    finally:
        await container.aclose()
        svc.close()
