"""Runtime LoRA loading against vLLM's routes (a mock transport) and adapter aliases."""

from __future__ import annotations

import json

import httpx
import pytest

from app.core.errors import BackendUnavailable, InvalidRequest
from app.llm.routing import memory_table
from app.settings import Settings
from finetune import serving
from finetune.errors import AdapterServingError
from finetune.tracking import AdapterVersion


class FakeVLLM:
    """The three vLLM routes, with vLLM's answers (vllm/entrypoints/openai/models/serving.py)."""

    def __init__(self, lora_routes: bool = True) -> None:
        self.loaded: dict[str, str] = {}
        self.lora_routes = lora_routes
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content or b"{}")
        self.calls.append((path, body))
        if path == "/v1/models":
            data = [{"id": "smollm2"}] + [{"id": n, "parent": "smollm2"} for n in self.loaded]
            return httpx.Response(200, json={"object": "list", "data": data})
        if not self.lora_routes:
            return httpx.Response(404, json={"detail": "Not Found"})
        if path == "/v1/load_lora_adapter":
            name = body["lora_name"]
            if name in self.loaded and not body.get("load_inplace"):
                return httpx.Response(400, json={"error": {"message": f"The lora adapter '{name}' has already been "
                                                                      "loaded.", "code": 400}})
            if "missing" in body["lora_path"]:
                return httpx.Response(404, json={"error": {"message": "Loading lora failed: No adapter found",
                                                           "code": 404}})
            self.loaded[name] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            if body["lora_name"] not in self.loaded:
                return httpx.Response(404, json={"error": {"message": f"The lora adapter '{body['lora_name']}' "
                                                                      "cannot be found.", "code": 404}})
            del self.loaded[body["lora_name"]]
            return httpx.Response(200, text="Success")
        return httpx.Response(404, json={"detail": "Not Found"})


@pytest.fixture
def fake():
    return FakeVLLM()


def client_for(fake) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(fake))


async def test_load_list_unload(fake):
    async with client_for(fake) as c:
        assert await serving.load_adapter("http://v:8001/v1", "demo-v1", "/a/1", client=c)
        assert fake.calls[-1] == ("/v1/load_lora_adapter", {"lora_name": "demo-v1", "lora_path": "/a/1"})
        assert not await serving.load_adapter("http://v:8001", "demo-v1", "/a/1", client=c)  # idempotent
        assert await serving.load_adapter("http://v:8001", "demo-v1", "/a/2", replace=True, client=c)
        assert fake.loaded == {"demo-v1": "/a/2"}
        assert await serving.served_adapters("http://v:8001/v1", client=c) == {"demo-v1": "smollm2"}
        assert await serving.unload_adapter("http://v:8001/v1", "demo-v1", client=c)
        assert not await serving.unload_adapter("http://v:8001/v1", "demo-v1", client=c)


async def test_errors_say_what_to_fix():
    async with client_for(FakeVLLM(lora_routes=False)) as c:
        with pytest.raises(AdapterServingError, match="--enable-lora"):
            await serving.load_adapter("http://v:8001/v1", "x", "/a", client=c)
    async with client_for(FakeVLLM()) as c:
        with pytest.raises(AdapterServingError, match="No adapter found") as exc:
            await serving.load_adapter("http://v:8001/v1", "x", "/missing", client=c)
        assert exc.value.code == "adapter_serving_failed"
    with pytest.raises(BackendUnavailable):
        await serving.load_adapter("http://127.0.0.1:9/v1", "x", "/a", timeout=2)


def test_server_root():
    assert serving.server_root("http://h:1/v1/") == "http://h:1"
    assert serving.server_root("http://h:1") == "http://h:1"


def settings() -> Settings:
    return Settings(backends={"local": {"kind": "vllm", "managed": {"port": 8123}},
                              "tf": {"kind": "transformers", "model_path": "/m/smollm2"},
                              "cloud": {"kind": "openai", "base_url": "http://x/v1"}})


def test_alias_for_each_backend_kind():
    s = settings()
    vllm = serving.adapter_alias(s, "local", adapter_name="demo-v2", adapter_path="/a/2")
    assert (vllm.backend, vllm.model, vllm.adapter) == ("local", "demo-v2", None)
    tf = serving.adapter_alias(s, "tf", adapter_name="demo-v2", adapter_path="/a/2")
    assert (tf.backend, tf.model, str(tf.adapter)) == ("tf", "smollm2", "/a/2")
    with pytest.raises(InvalidRequest, match="openai"):
        serving.adapter_alias(s, "cloud", adapter_name="d", adapter_path="/a")
    with pytest.raises(InvalidRequest, match="unknown backend"):
        serving.adapter_alias(s, "nope", adapter_name="d", adapter_path="/a")
    assert serving.backend_url(s, "local") == "http://127.0.0.1:8123/v1"


async def test_deploy_loads_then_points_the_alias(tmp_path, monkeypatch, fake):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    version = AdapterVersion(model="demo", version="3", source=str(adapter), run_id="r")
    s = settings()
    real = serving.load_adapter

    async def via_fake(*args, **kw):
        async with client_for(fake) as c:
            return await real(*args, client=c, **kw)

    monkeypatch.setattr(serving, "load_adapter", via_fake)
    routes = memory_table(s.models, s.backends)
    on = {"routes": routes, "owner": "finetune:demo", "actor": "t"}
    d = await serving.deploy(s, version, alias="demo", backend="local", fallback="smollm2", **on)
    assert d.served_name == "demo-v3" and fake.loaded == {"demo-v3": str(adapter)}
    assert routes.get("demo").model == "demo-v3" and routes.get("demo").fallback == "smollm2"
    d = await serving.deploy(s, version, alias="demo-tf", backend="tf", **on)
    assert routes.get("demo-tf").adapter == adapter and len(fake.loaded) == 1
    assert "demo" not in s.models and "demo-tf" not in s.models  # the settings are never changed at run time
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterServingError, match="not a PEFT adapter"):
        await serving.deploy(s, version, alias="demo", backend="local", **on)


async def test_container_start_up_restores_deployed_adapters_and_plugs_in_the_adapter_gate(tmp_path):
    """A restarted API process: the deployment remembered in the job store is served again as its alias
    (through the real router and chat service; a scripted model stands in for the backend), and promotion
    goes through the eval gate."""
    import asyncio

    from app.container import Container
    from app.core.types import ChatMessage, GenerationParams
    from app.services.chat import ChatRequest
    from finetune.errors import PromotionRefused
    from finetune.jobs import JobStore
    from finetune.settings import FinetuneSettings
    from finetune.spec import parse_spec
    from finetune.tracking import Tracker
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder
    from tests.fakes.llm import ScriptedBackend

    (tmp_path / "base").mkdir()
    tracker = Tracker(FinetuneSettings(), tmp_path)
    spec = parse_spec("name: tuned\ndataset: {path: /x/d.jsonl}\ntraining: {max_steps: 1}\nevals: [veltmar-fact]\n")
    run_id = tracker.start_run(job_id="ft-1", spec=spec)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    version = tracker.register_adapter(run_id, adapter, "tuned", tags={"keel.evals": "veltmar-fact"})
    jobs = JobStore(tmp_path / "finetune" / "jobs.db", tmp_path / "finetune" / "runs")
    jobs.save_deployment(alias="tuned-prod", model="tuned", version=version.version, backend="tf",
                         served_name="tuned-v1", adapter_path=str(version.local_path()))
    jobs.close()

    settings = Settings(home=tmp_path, guardrails={"enabled": False}, default_model="m",
                        backends={"tf": {"kind": "transformers", "model_path": str(tmp_path / "base")}},
                        models={"m": {"backend": "tf", "model": "base"}})
    fake = ScriptedBackend(reply="Quorra.")
    # Settings keep the default managed vLLM backend too: a scripted one stands in so nothing is started.
    others = {name: ScriptedBackend() for name in settings.backends if name != "tf"}
    container = await Container.build(settings, backends={"tf": fake, **others},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    try:
        await asyncio.gather(*list(container._tasks))  # the start-up restore runs in the background
        assert container.llm.routes.get("tuned-prod").adapter == version.local_path()
        result = await container.chat.complete(ChatRequest(model="tuned-prod", params=GenerationParams(max_tokens=4),
                                                           messages=(ChatMessage("user", "Capital of Veltmar?"),)))
        assert "".join(result.texts[0]) == "Quorra." and fake.requests[-1].adapter == str(version.local_path())
        with pytest.raises(PromotionRefused, match="no completed eval run of adapter tuned/1"):
            container.finetune.promote("tuned", version.version, actor="t")
    finally:
        await container.aclose()


async def test_adapters_load_with_the_managed_servers_key(tmp_path, monkeypatch, fake):
    """A server Keel runs refuses /v1 requests without its per-start key: LoRA loading sends it."""
    from pydantic import SecretStr

    from app.llm import vllm_server

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    version = AdapterVersion(model="demo", version="4", source=str(adapter), run_id="r")
    s = settings()
    s.backends["local"].api_key = SecretStr("configured-for-a-remote-server")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return fake(request)

    real = serving.load_adapter

    async def via_fake(*args, **kw):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await real(*args, client=c, **kw)

    monkeypatch.setattr(serving, "load_adapter", via_fake)
    monkeypatch.setitem(vllm_server._API_KEYS, "http://127.0.0.1:8123", "per-start-key")
    await serving.deploy(s, version, alias="demo", backend="local", routes=memory_table(s.models, s.backends),
                         owner="finetune:demo", actor="t")
    assert seen == ["Bearer per-start-key"]
    # A server this process did not start (a restarted API, another host): the configured key.
    monkeypatch.delitem(vllm_server._API_KEYS, "http://127.0.0.1:8123")
    assert serving.backend_api_key(s, "local") == "configured-for-a-remote-server"
