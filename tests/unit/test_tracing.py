"""Traces through the API against a scripted backend: the span tree, the GenAI conventions, the trace context
reaching the model server, content capture with personal data masked, and export faults that never reach a
request."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes

from app.api.main import create_app
from app.container import Container
from app.core.metrics import Metrics
from app.core.settings import OtelSettings
from app.core.tracing import SpanStore, Tracing
from app.llm.clients import http_client
from app.llm.openai_backend import OpenAIBackend
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

GEN_AI = {v for k, v in vars(gen_ai_attributes).items() if k.startswith("GEN_AI_") and isinstance(v, str)}


async def _env(tmp_path: Path, **otel):
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}}, default_model="m", guardrails={"enabled": False},
        releases={"check_interval_s": 0}, auth={"default_rate_limit_per_minute": 10_000}, otel=otel)
    fake = ScriptedBackend(reply="Paris is the capital.")
    container = await Container.build(settings, backends={"local": fake},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    keys = {n: container.keys.create(n, s)[1] for n, s in {"chat": ["chat"], "admin": ["admin"]}.items()}
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                               base_url="http://keel")
    return {"c": client, "keys": keys, "container": container, "fake": fake}


@pytest.fixture
async def env(tmp_path: Path):
    e = await _env(tmp_path)
    yield e
    await e["c"].aclose()
    await e["container"].aclose()


def h(env, key: str) -> dict:
    return {"Authorization": f"Bearer {env['keys'][key]}"}


async def ask(env, content: str = "What is the capital of France?", **body) -> dict:
    r = await env["c"].post("/v1/chat/completions", headers=h(env, "chat"), json={
        "model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 20, **body})
    assert r.status_code == 200, r.text
    return r.json()


async def spans_of(env, completion_id: str) -> dict[str, dict]:
    rec = (await env["c"].get(f"/v1/lineage/{completion_id}", headers=h(env, "chat"))).json()
    r = await env["c"].get(f"/v1/traces/{rec['trace_id']}", headers=h(env, "admin"))
    assert r.status_code == 200, r.text
    return {s["name"]: s for s in r.json()["spans"]}


async def test_a_chat_request_is_one_trace_with_the_model_call_in_genai_terms(env) -> None:
    answer = await ask(env)
    spans = await spans_of(env, answer["id"])
    server, chat, model = spans["POST /v1/chat/completions"], spans["keel.chat"], spans["chat fake-model"]
    assert server["parent_id"] is None and server["kind"] == "SERVER"
    auth = spans["keel.auth"]  # the key's check and rate limit: the caller's key id, never the key
    assert auth["parent_id"] == server["span_id"] and auth["attributes"]["keel.auth.outcome"] == "ok"
    assert auth["attributes"]["keel.auth.key_id"] and env["keys"]["chat"] not in str(auth)
    # reading traces is not traced: it leaves no trace of its own, not even the key's check
    roots = {t["root"] for t in env["container"].tracing.store.traces()}
    assert "keel.auth" not in roots and not any(r.startswith("GET /v1/traces") for r in roots), roots
    assert chat["parent_id"] == server["span_id"] and model["parent_id"] == chat["span_id"]
    a = model["attributes"]
    assert model["kind"] == "CLIENT"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "fake-model" and a["gen_ai.request.max_tokens"] == 20
    assert a["gen_ai.response.id"] == answer["id"] and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert a["keel.ttft_ms"] > 0 and a["keel.model_alias"] == "m"
    assert "gen_ai.input.messages" not in a  # content capture is off by default
    used = {k for s in spans.values() for k in s["attributes"] if k.startswith("gen_ai.")}
    assert used <= GEN_AI, used - GEN_AI  # every gen_ai.* name is one the conventions define
    listed = (await env["c"].get("/v1/traces", params={"response_id": answer["id"]}, headers=h(env, "admin"))).json()
    rec = (await env["c"].get(f"/v1/lineage/{answer['id']}", headers=h(env, "chat"))).json()
    assert [t["trace_id"] for t in listed["data"]] == [rec["trace_id"]]
    assert listed["data"][0]["root"] == "POST /v1/chat/completions" and listed["data"][0]["spans"] == len(spans)
    assert (await env["c"].get("/v1/traces", headers=h(env, "chat"))).status_code == 403


async def test_the_trace_context_reaches_the_model_server_and_joins_the_callers_trace(env) -> None:
    caller = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = await env["c"].post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                     "content": "hi"}]},
                            headers={**h(env, "chat"), "traceparent": f"00-{caller}-00f067aa0ba902b7-01"})
    assert r.status_code == 200
    sent = dict(env["fake"].requests[-1].trace_headers)
    assert sent["traceparent"].split("-")[1] == caller  # vLLM's spans land in the same trace
    spans = await spans_of(env, r.json()["id"])
    model_span = spans["chat fake-model"]
    assert sent["traceparent"].split("-")[2] == model_span["span_id"]


async def test_each_request_to_the_model_server_is_an_http_client_span_of_the_httpx_instrumentation(
        tmp_path: Path) -> None:
    """The OpenAI-compatible backend over HTTP (a scripted server): the official httpx instrumentation makes each
    request a CLIENT span under the model call's span, and the server gets that span as its parent."""
    sent: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}]})
        sent.append(request)
        chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
                   "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": f}]}
                  for c, f in (("Paris", None), (".", "stop"))]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://vllm.test/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}}, default_model="m", guardrails={"enabled": False},
        auth={"default_rate_limit_per_minute": 10_000})
    metrics = Metrics()
    tracing = Tracing(settings.otel, settings.home, dropped=metrics.trace_dropped)
    backend = OpenAIBackend("local", settings.backends["local"], tracer_provider=tracing.provider)
    backend._client = http_client(settings.backends["local"], label="local", transport=httpx.MockTransport(server),
                                  tracer_provider=tracing.provider)  # the client the backend would build, scripted
    container = await Container.build(settings, backends={"local": backend}, metrics=metrics, tracing=tracing,
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    key = container.keys.create("chat", ["chat"])[1]
    admin = container.keys.create("admin", ["admin"])[1]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                 base_url="http://keel") as c:
        r = await c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Paris.", r.text
        rec = (await c.get(f"/v1/lineage/{r.json()['id']}", headers={"Authorization": f"Bearer {key}"})).json()
        spans = (await c.get(f"/v1/traces/{rec['trace_id']}", headers={"Authorization": f"Bearer {admin}"})
                 ).json()["spans"]
    assert await backend.models() == ["fake-model"]  # readiness polls and replica probes: no trace of their own
    container.tracing.flush()
    roots = {t["root"] for t in container.tracing.store.traces()}
    await container.aclose()
    assert "GET" not in roots, roots  # (the client span of a model-list poll is named "GET")
    by_name = {s["name"]: s for s in spans}
    model, http = by_name["chat fake-model"], by_name["POST"]
    assert http["kind"] == "CLIENT" and http["parent_id"] == model["span_id"]
    assert http["attributes"]["http.status_code"] == 200 and "vllm.test" in http["attributes"]["http.url"]
    _, trace_id, parent, _ = sent[0].headers["traceparent"].split("-")
    assert trace_id == rec["trace_id"] and parent == http["span_id"]  # vLLM's spans hang under the request


async def test_prompt_rendering_and_release_assignment_are_spans(env) -> None:
    r = await env["c"].post("/v1/prompts", headers=h(env, "admin"), json={
        "name": "brief", "content": {"messages": [{"role": "system", "content": "Be brief."}]}})
    assert r.status_code == 201
    r = await env["c"].post("/v1/releases", headers=h(env, "admin"), json={
        "name": "support", "strategy": "ab", "weights": {"a": 100, "b": 0},
        "variants": [{"name": "a", "model": "m", "prompt": "brief@1"}, {"name": "b", "model": "m"}]})
    assert r.status_code == 201, r.text
    answer = await ask(env, model="support")
    spans = await spans_of(env, answer["id"])
    chat, render = spans["keel.chat"], spans["keel.prompt.render"]
    assert chat["attributes"]["keel.release"] == "support" and chat["attributes"]["keel.release.variant"] == "a"
    assert chat["parent_id"] == spans["POST /v1/chat/completions"]["span_id"]
    assert render["parent_id"] == chat["span_id"] and render["attributes"]["keel.prompt.hash"] == \
        answer["prompt"]["hash"]


async def test_content_capture_masks_personal_data(tmp_path: Path) -> None:
    env = await _env(tmp_path, capture_content=True)
    try:
        answer = await ask(env, "My email is jane.doe@example.com and my phone is +44 20 7946 0958. Hi!")
        a = (await spans_of(env, answer["id"]))["chat fake-model"]["attributes"]
        assert "Hi!" in a["gen_ai.input.messages"] and "Paris" in a["gen_ai.output.messages"]
        assert "jane.doe@example.com" not in a["gen_ai.input.messages"]
        assert "7946" not in a["gen_ai.input.messages"]
        raw = (tmp_path / "traces.db").read_bytes()
        assert b"jane.doe@example.com" not in raw
    finally:
        await env["c"].aclose()
        await env["container"].aclose()


async def test_content_capture_never_writes_a_credential(tmp_path: Path) -> None:
    env = await _env(tmp_path, capture_content=True)
    try:
        answer = await ask(env, "Use sk-proj-AbCdEfGhIjKlMnOpQrStUvWx123456 with password: Xk9$mQ2#vL7pR4tZ now.")
        a = (await spans_of(env, answer["id"]))["chat fake-model"]["attributes"]
        assert "<SECRET:OPENAI_KEY>" in a["gen_ai.input.messages"] and "now." in a["gen_ai.input.messages"]
        raw = (tmp_path / "traces.db").read_bytes()
        assert b"AbCdEfGhIjKlMnOp" not in raw and b"Xk9$mQ2#vL7pR4tZ" not in raw
    finally:
        await env["c"].aclose()
        await env["container"].aclose()


async def test_an_ingest_job_is_a_trace_with_its_steps(tmp_path: Path) -> None:
    env = await _env(tmp_path)
    try:
        doc = b"# Lighthouses\n\nThe Eddystone lighthouse stands on rocks south of Plymouth.\n"
        r = await env["c"].post("/v1/ingest", files=[("files", ("light.md", doc, "text/plain"))],
                                data={"collection": "docs"}, headers=h(env, "admin"))
        job = (await env["c"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "admin"))).json()
        assert job["state"] == "succeeded", job
        tracing = env["container"].tracing
        tracing.flush()
        (root,) = [t for t in tracing.store.traces() if t["root"] == "keel.job ingest"]
        spans = {s["name"]: s for s in tracing.store.trace(root["trace_id"])}
        job_span, discover, batch = spans["keel.job ingest"], spans["keel.ingest.discover"], spans["keel.ingest.batch"]
        assert discover["parent_id"] == batch["parent_id"] == job_span["span_id"]
        assert discover["attributes"]["keel.ingest.files"] == 1 and discover["attributes"]["keel.ingest.rejected"] == 0
        assert batch["attributes"]["keel.ingest.documents"] == 1 and batch["attributes"]["keel.ingest.chunks"] >= 1
        assert batch["attributes"]["keel.ingest.embedded"] == batch["attributes"]["keel.ingest.chunks"]
    finally:
        await env["c"].aclose()
        await env["container"].aclose()


class _BrokenStore(SpanStore):
    def write(self, spans) -> None:
        raise OSError("disk full")


def test_a_failing_store_drops_counted_spans_and_never_raises(tmp_path: Path) -> None:
    metrics = Metrics()
    tracing = Tracing(OtelSettings(), tmp_path, dropped=metrics.trace_dropped)
    tracing.store.close()
    broken = _BrokenStore(tmp_path / "broken.db")
    tracing.provider._active_span_processor._span_processors[0].inner._batch_processor._exporter.store = broken
    for _ in range(5):
        tracing.tracer.start_span("x").end()
    assert tracing.flush(5)
    assert metrics.trace_dropped.labels("store")._value.get() == 5
    tracing.close()


def test_a_full_export_queue_drops_and_counts(tmp_path: Path) -> None:
    metrics = Metrics()
    tracing = Tracing(OtelSettings(queue_size=64), tmp_path, dropped=metrics.trace_dropped)
    for _ in range(2000):  # far faster than the 200 ms export interval drains
        tracing.tracer.start_span("x").end()
    tracing.flush(10)
    dropped = metrics.trace_dropped.labels("store")._value.get()
    kept = sum(t["spans"] for t in tracing.store.traces(limit=5000))
    assert dropped > 0 and kept + dropped == 2000
    tracing.close()


async def test_json_log_lines_carry_the_request_and_trace_ids(env) -> None:
    import io
    import json
    import logging

    from app.core.logs import JsonFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("keel.chat")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        r = await env["c"].post("/v1/prompts", headers=h(env, "admin"), json={
            "name": "brief", "content": {"messages": [{"role": "system", "content": "Be brief."}]}})
        assert r.status_code == 201
        r = await env["c"].post("/v1/chat/completions", headers=h(env, "chat"), json={
            "model": "m", "prompt": {"ref": "brief@1"}, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    line = next(json.loads(x) for x in out.getvalue().splitlines() if "uses prompt" in x)
    rec = (await env["c"].get(f"/v1/lineage/{r.json()['id']}", headers=h(env, "chat"))).json()
    assert line["request_id"] == r.headers["x-request-id"] == rec["request_id"]
    assert line["trace_id"] == rec["trace_id"] and line["level"] == "INFO" and line["logger"] == "keel.chat"


async def test_an_agent_run_is_a_trace_with_a_span_per_node_and_tool_call(tmp_path: Path) -> None:
    from agents.service import AgentService
    from agents.settings import AgentSettings
    from agents.testing import KeywordRetriever, ScriptedLLM, schema_kind
    from agents.tools import ToolRegistry, builtin_tools
    from agents.workflows.common import Deps

    def responder(messages, schema):
        kind = schema_kind(schema)
        if kind == "next":
            progress = messages[-1].content.split("Progress:")[-1]
            for node in ("researcher", "writer", "critic"):
                if node not in progress:
                    return {"next": node, "reason": "next"}
            return {"next": "FINISH", "reason": "done"}
        return {"text": "Keel stores vectors in Qdrant [1].", "supported": {"supported": True},
                "accepted": {"accepted": True, "feedback": "ok"}, "tool": {"tool": "calculator", "args": {}},
                "worth_keeping": {"worth_keeping": False, "fact": ""}}[kind]

    metrics = Metrics()
    tracing = Tracing(OtelSettings(), tmp_path, dropped=metrics.trace_dropped)
    deps = Deps(llm=ScriptedLLM(responder=responder), tools=ToolRegistry(builtin_tools()), settings=AgentSettings(),
                retriever=KeywordRetriever({"q": "Keel stores vectors in Qdrant."}))
    svc = AgentService(deps, db_path=tmp_path / "agents.db", tracer=tracing.tracer)
    try:
        events = await svc.collect(svc.run("research", "Where does Keel store vectors?"))
        tracing.flush()
        (listed,) = tracing.store.traces(name="invoke_agent")
        spans = tracing.store.trace(listed["trace_id"])
        root = next(s for s in spans if s["parent_id"] is None)
        assert root["name"] == "invoke_agent research"
        assert root["attributes"]["keel.agent.run_id"] == events[0].run_id
        assert root["attributes"]["keel.agent.status"] == events[-1].status
        nodes = [s for s in spans if s["name"].startswith("keel.agent.node ")]
        started = [e.node for e in events if type(e).__name__ == "NodeStarted"]
        assert [s["attributes"]["keel.agent.node"] for s in sorted(nodes, key=lambda s: s["start_ns"])] == started
        assert all(s["parent_id"] == root["span_id"] for s in nodes)
        tools = [s for s in spans if s["name"].startswith("execute_tool ")]
        calls = [e for e in events if type(e).__name__ == "ToolCall"]
        assert calls and len(tools) == len(calls)
        assert tools[0]["attributes"]["gen_ai.tool.name"] == calls[0].tool
        assert all(s["attributes"]["gen_ai.operation.name"] == "execute_tool" for s in tools)
        used = {k for s in spans for k in s["attributes"] if k.startswith("gen_ai.")}
        assert used <= GEN_AI, used - GEN_AI
    finally:
        await svc.aclose()
        tracing.close()
