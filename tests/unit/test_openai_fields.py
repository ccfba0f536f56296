"""The chat completion and chunk objects carry every field the OpenAI spec marks required (``logprobs``,
``message.refusal`` and ``finish_reason``: required, nullable), checked against a JSON schema of the spec's
shapes written out below (strict where the spec is: required keys, types, enums, nulls), and parsed by the plain
``openai`` client; Keel's own fields (``prompt``, ``release``, ``citations``, ``guardrails``...) stay as they were,
absent when unset."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from app.api.main import create_app
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

NULLABLE_STRING = {"type": ["string", "null"]}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
LOGPROBS = {"type": ["object", "null"], "required": ["content", "refusal"],
            "properties": {"content": {"type": ["array", "null"]}, "refusal": {"type": ["array", "null"]}}}
SERVICE_TIER = {"enum": ["auto", "default", "flex", "scale", "priority", None]}

# OpenAI's CreateChatCompletionResponse
CHAT_COMPLETION = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "system_fingerprint": {"type": "string"}, "service_tier": SERVICE_TIER,
        "usage": USAGE,
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["finish_reason", "index", "message", "logprobs"],
            "properties": {
                "index": {"type": "integer"}, "logprobs": LOGPROBS,
                "finish_reason": {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call"]},
                "message": {"type": "object", "required": ["content", "refusal", "role"], "properties": {
                    "role": {"const": "assistant"}, "content": NULLABLE_STRING, "refusal": NULLABLE_STRING,
                    "tool_calls": {"type": "array"}}},
            }}},
    },
}

# OpenAI's CreateChatCompletionStreamResponse
CHAT_COMPLETION_CHUNK = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "system_fingerprint": {"type": "string"}, "service_tier": SERVICE_TIER,
        "usage": {"anyOf": [USAGE, {"type": "null"}]},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["delta", "finish_reason", "index"],
            "properties": {
                "index": {"type": "integer"}, "logprobs": LOGPROBS,
                "finish_reason": {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call", None]},
                "delta": {"type": "object", "properties": {
                    "role": {"enum": ["developer", "system", "user", "assistant", "tool"]},
                    "content": NULLABLE_STRING, "refusal": NULLABLE_STRING, "tool_calls": {"type": "array"}}},
            }}},
    },
}

KEEL_FIELDS = ("prompt", "release", "citations", "grounding", "guardrails", "guardrail_events", "guardrail")


@pytest.fixture
async def env(tmp_path: Path):
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
        auth={"default_rate_limit_per_minute": 10_000},
    )
    container = await Container.build(settings, backends={"local": ScriptedBackend()},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    _, key = container.keys.create("chat", ["chat"])
    transport = httpx.ASGITransport(app=create_app(container=container))
    async with httpx.AsyncClient(transport=transport, base_url="http://keel",
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        yield {"c": client, "key": key, "transport": transport}
    await container.aclose()


BODY = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


async def complete(env, **extra) -> dict:
    r = await env["c"].post("/v1/chat/completions", json={**BODY, **extra})
    assert r.status_code == 200, r.text
    return r.json()


async def chunks(env, **extra) -> list[dict]:
    r = await env["c"].post("/v1/chat/completions", json={**BODY, "stream": True, **extra})
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"max_tokens": 2}], ids=["one", "n=2", "length"])
async def test_a_completion_has_every_required_field(env, extra) -> None:
    body = await complete(env, **extra)
    jsonschema.validate(body, CHAT_COMPLETION)
    for choice in body["choices"]:
        assert choice["logprobs"] is None and choice["message"]["refusal"] is None
        assert choice["message"]["content"]
    assert body["choices"][-1]["finish_reason"] == ("length" if extra.get("max_tokens") else "stop")
    # optional fields with nothing to say stay out, and so do Keel's when unset
    assert not {"system_fingerprint", "service_tier", *KEEL_FIELDS} & body.keys()


@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"stream_options": {"include_usage": True}}],
                         ids=["one", "n=2", "usage"])
async def test_every_chunk_has_every_required_field(env, extra) -> None:
    got = await chunks(env, **extra)
    for chunk in got:
        jsonschema.validate(chunk, CHAT_COMPLETION_CHUNK)
        for choice in chunk["choices"]:
            assert "finish_reason" in choice and choice["logprobs"] is None
    n = extra.get("n", 1)
    assert got[0]["choices"] == [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                  "logprobs": None} for i in range(n)]
    for i in range(n):  # null until each choice's last chunk
        reasons = [c["finish_reason"] for chunk in got for c in chunk["choices"] if c["index"] == i]
        assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    if extra.get("stream_options"):
        assert got[-1]["choices"] == [] and got[-1]["usage"]["total_tokens"] > 0


async def test_service_tier_is_accepted_and_answered_with_keels_one_tier(env) -> None:
    body = await complete(env, service_tier="auto")
    jsonschema.validate(body, CHAT_COMPLETION)
    assert body["service_tier"] == "default"
    got = await chunks(env, service_tier="priority")
    assert {c.get("service_tier") for c in got} == {"default"}
    r = await env["c"].post("/v1/chat/completions", json={**BODY, "service_tier": "premium"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"


async def test_keels_own_fields_are_unchanged(env) -> None:
    """A prompt-rendered answer still names its prompt (on the role chunk when streamed), next to the spec's fields."""
    prompt = {"ref": "summarize@production", "variables": {"text": "Paris is the capital of France."}}
    body = await complete(env, prompt=prompt)
    jsonschema.validate(body, CHAT_COMPLETION)
    assert body["prompt"]["ref"] == "summarize@1" and body["prompt"]["hash"].startswith("sha256:")
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "prompt"}
    assert set(body["choices"][0]) == {"index", "message", "finish_reason", "logprobs"}
    assert set(body["choices"][0]["message"]) == {"role", "content", "refusal"}
    got = await chunks(env, prompt=prompt)
    for chunk in got:
        jsonschema.validate(chunk, CHAT_COMPLETION_CHUNK)
    assert got[0]["prompt"]["ref"] == "summarize@1" and all("prompt" not in c for c in got[1:])


async def test_the_plain_openai_client_parses_both(env) -> None:
    client = openai.AsyncOpenAI(base_url="http://keel/v1", api_key=env["key"],
                                http_client=httpx.AsyncClient(transport=env["transport"]))
    got = await client.chat.completions.create(**BODY, n=2)
    assert [c.logprobs for c in got.choices] == [None, None]
    assert [c.message.refusal for c in got.choices] == [None, None]
    assert got.choices[0].message.content.endswith("Paris.") and got.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(**BODY, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    async for chunk in stream:
        for c in chunk.choices:
            assert c.logprobs is None
            text += c.delta.content or ""
            finish = c.finish_reason or finish
        usage = chunk.usage or usage
    assert text.endswith("Paris.") and finish == "stop" and usage.total_tokens > 0


def test_the_published_schema_says_they_are_required(tmp_path: Path) -> None:
    app = create_app(settings=load_settings(home=tmp_path, guardrails={"enabled": False}))
    schemas = app.openapi()["components"]["schemas"]
    assert {"finish_reason", "logprobs", "message", "index"} <= set(schemas["Choice"]["required"])
    assert {"role", "content", "refusal"} <= set(schemas["AssistantMessage"]["required"])
    assert {"id", "object", "created", "model", "choices"} <= set(schemas["ChatCompletion"]["required"])
