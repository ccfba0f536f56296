"""The HTTP contract, against a scripted backend. The same checks run against real vLLM in
tests/integration/test_chat_e2e.py."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import openai
import pytest

from app.api.main import create_app
from app.container import Container
from app.core.errors import BackendError
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend


@pytest.fixture
async def env(tmp_path: Path):
    settings = load_settings(
        home=tmp_path,
        backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}},
        default_model="m",
        limits={"max_messages": 4, "max_input_chars": 1000, "max_tokens": 100, "max_body_bytes": 5000},
        auth={"default_rate_limit_per_minute": 1000}, guardrails={"enabled": False},
    )
    fake = ScriptedBackend()
    rag = build_rag(settings, embedder=HashingEmbedder())
    container = await Container.build(settings, backends={"local": fake}, rag=rag)
    app = create_app(container=container)
    _, admin = container.keys.create("admin", ["admin"])
    _, chat = container.keys.create("chat", ["chat"])
    _, prompts = container.keys.create("prompts", ["prompts:write"])
    _, slow = container.keys.create("slow", ["chat"], rate_limit_per_minute=2)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keel") as client:
        yield {"client": client, "fake": fake, "container": container, "transport": transport,
               "keys": {"admin": admin, "chat": chat, "prompts": prompts, "slow": slow}}
    await container.aclose()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BODY = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def _tool(name: str, parameters: dict | None = None) -> dict:
    parameters = parameters or {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    return {"type": "function", "function": {"name": name, "description": "Weather now in a city.",
                                             "parameters": parameters}}


async def post(env, body, key="chat", **kw) -> httpx.Response:
    return await env["client"].post("/v1/chat/completions", json=body, headers=auth(env["keys"][key]), **kw)


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


async def test_non_streaming_completion_has_the_openai_shape(env) -> None:
    r = await post(env, BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "The capital of France is Paris.",
                                              "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 6
    assert r.headers["x-request-id"]


async def test_streaming_wire_format(env) -> None:
    r = await post(env, {**BODY, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "The capital of France is Paris."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert "event:" not in r.text


async def test_usage_chunk_only_when_asked(env) -> None:
    r = await post(env, {**BODY, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(c["choices"] for c in chunks)


async def test_error_mid_stream_is_a_final_error_event(env) -> None:
    env["fake"].fail_after = 2
    env["fake"].error = BackendError("engine died", code="backend_disconnected")
    r = await post(env, {**BODY, "stream": True})
    events = sse_events(r.text)
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "backend_disconnected"
    assert len([e for e in events if '"content"' in e]) >= 2


async def test_openai_client_sync_shapes_through_asgi(env) -> None:
    client = openai.AsyncOpenAI(base_url="http://keel/v1", api_key=env["keys"]["chat"],
                                http_client=httpx.AsyncClient(transport=env["transport"]))
    got = await client.chat.completions.create(**BODY)
    assert got.choices[0].message.content.endswith("Paris.")
    stream = await client.chat.completions.create(**BODY, stream=True, stream_options={"include_usage": True})
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts).endswith("Paris.")
    models = await client.models.list()
    assert "m" in [m.id for m in models.data]


async def test_backend_down_before_first_token_is_an_http_503(env) -> None:
    env["fake"].fail_connect = 10
    r = await post(env, {**BODY, "stream": True})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "backend_unavailable"


@pytest.mark.parametrize(
    ("content", "status", "code", "phrase"),
    [
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (json.dumps({"model": "m", "messages": []}).encode(), 400, "invalid_request", "messages"),
        (json.dumps({"model": "m"}).encode(), 400, "invalid_request", "messages must not be empty"),
        (json.dumps({"model": "m", "messages": "hi"}).encode(), 400, "invalid_request", "messages"),
        (json.dumps({**BODY, "max_tokens": 0}).encode(), 400, "invalid_request", "max_tokens"),
        (json.dumps({**BODY, "max_tokens": "lots"}).encode(), 400, "invalid_request", "max_tokens"),
        (json.dumps({**BODY, "max_tokens": 101}).encode(), 400, "invalid_request", "at most 100"),
        (json.dumps({**BODY, "temperature": 5}).encode(), 400, "invalid_request", "temperature"),
        (json.dumps({**BODY, "model": "gpt-9"}).encode(), 404, "model_not_found", "available models: m"),
        (json.dumps({**BODY, "messages": [{"role": "user", "content": "x" * 1100}]}).encode(), 400,
         "context_length_exceeded", "limit is 1000"),
        (json.dumps({**BODY, "messages": [{"role": "user", "content": "x"}] * 5}).encode(), 400,
         "invalid_request", "too many messages"),
        (json.dumps({**BODY, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "invalid_request", "messages.0.role"),
        (json.dumps({**BODY, "tools": [{"type": "function"}]}).encode(), 400, "invalid_request", "tools.0.function"),
        (json.dumps({**BODY, "tools": [_tool("get weather")]}).encode(), 400, "invalid_request",
         "tools.0.function.name"),
        (json.dumps({**BODY, "tools": [_tool("f", {"type": "objekt"})]}).encode(), 400, "invalid_request",
         "tools[0] (f): parameters is not a valid JSON Schema at type"),
        (json.dumps({**BODY, "tools": [_tool("f"), _tool("f")]}).encode(), 400, "invalid_request",
         "a second function named 'f'"),
        (json.dumps({**BODY, "tools": [_tool("f")], "tool_choice": {"type": "function", "function": {"name": "g"}}}
                    ).encode(), 400, "invalid_request", "'g', which is not in tools (f)"),
        (json.dumps({**BODY, "tool_choice": "required"}).encode(), 400, "invalid_request", "tool_choice needs tools"),
        (json.dumps({**BODY, "messages": [*BODY["messages"], {"role": "tool", "content": "21 C"}]}).encode(), 400,
         "invalid_request", "tool message without tool_call_id"),
        (json.dumps({**BODY, "messages": [*BODY["messages"], {"role": "tool", "content": "21 C",
                                                                "tool_call_id": "call_9"}]}).encode(), 400,
         "invalid_request", "answers tool call 'call_9', which no earlier assistant message made"),
        (json.dumps({**BODY, "frobnicate": 1}).encode(), 400, "unsupported_parameter", "frobnicate"),
        (json.dumps({**BODY, "response_format": {"type": "json_schema"}}).encode(), 400, "invalid_request",
         "json_schema"),
        (json.dumps({**BODY, "messages": [{"role": "user", "content": "  "}]}).encode(), 400, "invalid_request",
         "empty"),
    ],
)
async def test_bad_input_gets_a_4xx_that_says_what_to_fix(env, content, status, code, phrase) -> None:
    r = await env["client"].post("/v1/chat/completions", content=content,
                                 headers={**auth(env["keys"]["chat"]), "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and phrase in err["message"], err
    assert "Traceback" not in r.text
    assert env["fake"].calls == 0  # nothing bad reaches the model


async def test_oversized_body_is_413(env) -> None:
    r = await post(env, {**BODY, "messages": [{"role": "user", "content": "x" * 6000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_auth_errors(env) -> None:
    c = env["client"]
    r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = await c.post("/v1/chat/completions", json=BODY, headers=auth("keel-nope"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await post(env, BODY, key="prompts")
    assert r.status_code == 403 and "'chat' scope" in r.json()["error"]["message"]
    r = await c.get("/v1/admin/keys", headers=auth(env["keys"]["chat"]))
    assert r.status_code == 403


async def test_rate_limit_429_with_retry_after(env) -> None:
    assert (await post(env, BODY, key="slow")).status_code == 200
    assert (await post(env, BODY, key="slow")).status_code == 200
    r = await post(env, BODY, key="slow")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_token_limit_refuses_a_key_whose_answers_used_its_tokens(env) -> None:
    """Each answer's usage (prompt + completion tokens) comes off the key's token budget; once spent, the key gets
    a 429 that says so, other keys are served. Streamed answers count too."""
    c, h = env["client"], auth(env["keys"]["admin"])
    made = await c.post("/v1/admin/keys", json={"name": "metered", "scopes": ["chat"], "tokens_per_minute": 20},
                        headers=h)
    assert made.status_code == 201 and made.json()["tokens_per_minute"] == 20, made.text
    metered = {"Authorization": f"Bearer {made.json()['key']}"}
    first = await c.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=metered)
    assert first.status_code == 200
    await env["container"].token_meter.drain()
    second = await c.post("/v1/chat/completions", json=BODY, headers=metered)  # 6 + 6 used of 20: served
    assert second.status_code == 200, second.text
    assert second.json()["usage"]["total_tokens"] == 12
    await env["container"].token_meter.drain()
    third = await c.post("/v1/chat/completions", json=BODY, headers=metered)  # 24 used: overdrawn
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert "token limit of 20 tokens per minute" in third.json()["error"]["message"]
    assert (await c.get("/v1/models", headers=metered)).status_code == 200  # routes that reach no model stay open
    assert (await post(env, BODY, key="chat")).status_code == 200  # a key without a token limit
    r = await c.post("/v1/admin/keys", json={"name": "bad", "scopes": ["chat"], "tokens_per_minute": 0}, headers=h)
    assert r.status_code == 400 and "tokens_per_minute" in r.json()["error"]["message"]


async def test_agent_runs_count_their_model_calls_against_the_keys_token_budget(env, monkeypatch) -> None:
    """An agent model on the chat route and a run on the agents API: every model call of the run is the key's."""
    c, h = env["client"], auth(env["keys"]["admin"])
    made = (await c.post("/v1/admin/keys", json={"name": "agentic", "scopes": ["chat"], "tokens_per_minute": 100_000},
                         headers=h)).json()
    metered = {"Authorization": f"Bearer {made['key']}"}
    spent: list[tuple[str, int, int]] = []

    async def spend(key_id: str, budget: int, tokens: int) -> None:
        spent.append((key_id, budget, tokens))

    monkeypatch.setattr(env["container"].rate_limiter, "aspend_tokens", spend)
    before = env["fake"].calls
    r = await c.post("/v1/chat/completions", json={"model": "agent:rag-qa", "messages": [
        {"role": "user", "content": "Where does Keel keep vectors?"}]}, headers=metered)
    assert r.status_code == 200, r.text
    await env["container"].token_meter.drain()
    calls = env["fake"].calls - before
    assert calls >= 1 and len(spent) == calls  # each model call of the run, once
    assert {(k, b) for k, b, _ in spent} == {(made["id"], 100_000)} and all(t > 0 for _, _, t in spent)
    r = await c.post("/v1/agents/rag-qa/runs", json={"input": "Where does Keel keep vectors?"}, headers=metered)
    assert r.status_code == 200, r.text
    await env["container"].token_meter.drain()
    assert len(spent) == env["fake"].calls - before
    spent.clear()
    assert (await post(env, BODY, key="chat")).status_code == 200  # a key without a budget: nothing counted
    await env["container"].token_meter.drain()
    assert spent == []


async def test_admin_can_manage_keys_over_the_api(env) -> None:
    c, h = env["client"], auth(env["keys"]["admin"])
    r = await c.post("/v1/admin/keys", json={"name": "svc", "scopes": ["chat"]}, headers=h)
    assert r.status_code == 201 and r.json()["key"].startswith("keel-")
    new_key, key_id = r.json()["key"], r.json()["id"]
    assert (await post(env, BODY, key="chat")).status_code == 200
    assert (await c.post("/v1/chat/completions", json=BODY, headers=auth(new_key))).status_code == 200
    assert "key" not in (await c.get("/v1/admin/keys", headers=h)).json()[0]
    assert (await c.delete(f"/v1/admin/keys/{key_id}", headers=h)).status_code == 200
    env["container"].keys._cache.clear()
    assert (await c.post("/v1/chat/completions", json=BODY, headers=auth(new_key))).status_code == 401
    r = await c.post("/v1/admin/keys", json={"name": "bad", "scopes": ["root"]}, headers=h)
    assert r.status_code == 400 and "unknown scope" in r.json()["error"]["message"]


async def test_health_ready_metrics_and_unknown_routes(env) -> None:
    c = env["client"]
    assert (await c.get("/healthz")).json()["status"] == "ok"
    r = await c.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    env["fake"].is_ready = False
    assert (await c.get("/readyz")).status_code == 503
    await post(env, BODY)
    text = (await c.get("/metrics")).text
    assert 'keel_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "keel_chat_time_to_first_token_seconds_bucket" in text
    assert 'keel_chat_tokens_total{kind="completion",model="m"}' in text
    r = await c.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_dev_mode_disables_auth_loudly(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, auth={"enabled": False}, guardrails={"enabled": False},
                             backends={"local": {"kind": "openai", "base_url": "http://unused/v1"}},
                             models={"m": {"backend": "local", "model": "x"}}, default_model="m")
    container = await Container.build(settings, backends={"local": ScriptedBackend()},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    app = create_app(container=container)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://k") as c:
        assert (await c.post("/v1/chat/completions", json=BODY | {"model": "m"})).status_code == 200
        assert "DISABLED" in (await c.get("/healthz")).json()["auth"]
    await container.aclose()


async def test_chat_can_name_a_prompt_and_the_response_records_its_version(env) -> None:
    body = {"model": "m", "prompt": {"ref": "summarize@production",
                                     "variables": {"text": "Paris is the capital of France.", "max_words": 10}}}
    r = await post(env, body)
    assert r.status_code == 200, r.text
    info = r.json()["prompt"]
    assert info["ref"] == "summarize@1" and info["hash"].startswith("sha256:")
    sent = env["fake"].requests[-1]
    assert sent.messages[0].role == "system" and "at most 10 words" in sent.messages[1].content
    assert sent.params.temperature == 0.2  # the template's parameters...
    assert sent.params.max_tokens == 100  # ...its max_tokens (400) capped by this server's limit

    r = await post(env, {**body, "stream": True, "temperature": 0.9, "max_tokens": 7})
    first = json.loads(sse_events(r.text)[0])
    assert first["prompt"]["ref"] == "summarize@1"
    assert all("prompt" not in json.loads(e) for e in sse_events(r.text)[1:-1])
    assert env["fake"].requests[-1].params.temperature == 0.9  # the request overrides the template
    assert env["fake"].requests[-1].params.max_tokens == 7


@pytest.mark.parametrize(
    ("prompt", "code", "phrase"),
    [
        ({"ref": "summarize", "variables": {}}, "invalid_variable", "text"),
        ({"ref": "summarize", "variables": {"text": "x", "max_words": "many"}}, "invalid_variable", "max_words"),
        ({"ref": "no-such-template"}, "not_found", "no-such-template"),
        ({"ref": "summarize@99", "variables": {"text": "x"}}, "not_found", "99"),
    ],
)
async def test_bad_prompt_references_are_4xx(env, prompt, code, phrase) -> None:
    r = await post(env, {"model": "m", "prompt": prompt})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["code"] == code and phrase in r.json()["error"]["message"]
    assert env["fake"].calls == 0


async def test_client_disconnect_on_a_non_streaming_request_is_a_499_without_a_traceback(env, caplog) -> None:
    """The client leaves while the model is still generating: the handler must answer 499 (for the access log
    and the metrics), cancel the generation and log no traceback (it used to raise a TypeError: a 500)."""
    env["fake"].delay_s = 0.2
    app = env["transport"].app
    body = json.dumps({**BODY, "max_tokens": 50}).encode()
    sent: list[dict] = []
    delivered = False
    hang_up_at = asyncio.get_running_loop().time() + 0.3  # the client waits a moment, then hangs up

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        # like a server's queue: nothing to read until the client leaves, then the disconnect at once
        wait = hang_up_at - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "server": ("keel", 80), "client": ("127.0.0.1", 1234),
             "headers": [(b"host", b"keel"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         (b"authorization", f"Bearer {env['keys']['chat']}".encode())]}
    with caplog.at_level(logging.INFO):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499
    error = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))["error"]
    assert error["code"] == "client_closed_request" and error["message"]
    assert "generation cancelled" in caplog.text  # not run to the end for no one (vLLM's side: integration)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    metrics = (await env["client"].get("/metrics")).text
    assert 'keel_errors_total{code="client_closed_request"} 1.0' in metrics


async def test_an_alias_routed_at_run_time_is_listed_and_answers_by_another_process(env) -> None:
    """A route written through the routing table by another process (a deploy elsewhere, a release): this
    process lists it in /v1/models and answers it on the route's backend model, and the settings stay as set."""
    from app.core.settings import ModelAlias
    from app.llm.routing import RoutingTable, SqliteRoutingStore

    container = env["container"]
    other = RoutingTable(container.settings.models, container.settings.backends,
                         SqliteRoutingStore(container.settings.home / "routing.db"))
    other.set("tuned", ModelAlias(backend="local", model="fake-model-lora", description="LoRA v2"),
              owner="finetune:m", actor="elsewhere")
    other.close()
    container.llm.routes.refresh(force=True)  # what the next check (<= routing.check_interval_s) does
    r = await env["client"].get("/v1/models", headers=auth(env["keys"]["chat"]))
    assert {"id": "tuned", "description": "LoRA v2"}.items() <= next(
        m for m in r.json()["data"] if m["id"] == "tuned").items()
    r = await post(env, {**BODY, "model": "tuned"})
    assert r.status_code == 200 and r.json()["model"] == "tuned"
    assert env["fake"].requests[-1].model == "fake-model-lora"
    assert "tuned" not in container.settings.models


# -- tool calling -------------------------------------------------------------------------------------------

WEATHER = {**BODY, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
           "tools": [_tool("weather")]}


async def test_a_tool_call_comes_back_in_openais_shape_and_the_result_goes_to_the_model(env) -> None:
    env["fake"].call = ("weather", '{"city": "Paris"}')
    r = await post(env, {**WEATHER, "tool_choice": "required", "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"] and call["function"] == {"name": "weather",
                                                                               "arguments": '{"city": "Paris"}'}
    sent = env["fake"].requests[-1].params
    assert [t.name for t in sent.tools] == ["weather"] and sent.tool_choice.mode == "required"
    assert sent.parallel_tool_calls is False
    # the call and its result go back in the history: the model gets both and answers in words
    history = [*WEATHER["messages"], choice["message"],
               {"role": "tool", "tool_call_id": call["id"], "content": "21 C and sunny"}]
    r = await post(env, {**WEATHER, "messages": history, "tool_choice": "none"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
    seen = env["fake"].requests[-1].messages
    assert seen[1].tool_calls[0].name == "weather" and seen[1].content == ""
    assert seen[2].role == "tool" and seen[2].tool_call_id == call["id"] and seen[2].content == "21 C and sunny"


async def test_the_openai_client_accumulates_streamed_tool_calls(env) -> None:
    env["fake"].call = ("weather", '{"city": "Paris"}')
    client = openai.AsyncOpenAI(base_url="http://keel/v1", api_key=env["keys"]["chat"],
                                http_client=httpx.AsyncClient(transport=env["transport"]))
    stream = await client.chat.completions.create(
        model="m", messages=WEATHER["messages"], tools=WEATHER["tools"], stream=True,
        tool_choice={"type": "function", "function": {"name": "weather"}})
    chunks = [c async for c in stream]
    pieces = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or ())]
    assert pieces[0].id and pieces[0].function.name == "weather" and pieces[0].type == "function"
    assert "".join(p.function.arguments or "" for p in pieces) == '{"city": "Paris"}'
    assert {p.index for p in pieces} == {0}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the SDK's own accumulator agrees (its helper takes strict tools only, and parses their arguments)
    strict = _tool("weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False})
    strict["function"]["strict"] = True
    async with client.chat.completions.stream(model="m", messages=WEATHER["messages"], tools=[strict],
                                              tool_choice="required") as s:
        final = await s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == {"city": "Paris"}



async def test_a_405_says_every_method_the_path_answers(env) -> None:
    """Allow used to list only the first route of the path: PUT /v1/responses/x said GET, not DELETE."""
    r = await env["client"].put("/v1/responses/resp_1", headers=auth(env["keys"]["chat"]))
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed" and "allowed: DELETE, GET, HEAD" in r.text
    r = await env["client"].delete("/v1/chat/completions", headers=auth(env["keys"]["chat"]))
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_logprobs_pass_through_where_no_output_guard_reads_the_answer(env) -> None:
    r = await post(env, {**BODY, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == "The capital of France is Paris."
    assert env["fake"].requests[-1].params.top_logprobs == 2
    r = await post(env, {**BODY, "logprobs": True, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    streamed = [t for c in chunks for ch in c["choices"] for t in (ch.get("logprobs") or {}).get("content") or ()]
    assert len(streamed) == 6
    r = await post(env, {**BODY, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
