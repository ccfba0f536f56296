"""/v1/responses against a scripted backend, through the unchanged ``openai`` client (the real model answers in
tests/integration/test_chat_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from app.api.main import create_app
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather now in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
async def env(tmp_path: Path):
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}}, default_model="m",
        guardrails={"enabled": False},
    )
    fake = ScriptedBackend()
    container = await Container.build(settings, backends={"local": fake},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    app = create_app(container=container)
    _, key = container.keys.create("u", ["chat"])
    _, other = container.keys.create("v", ["chat"])
    transport = httpx.ASGITransport(app=app)

    def client(secret: str = key) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://keel/v1", api_key=secret, max_retries=0,
                                  http_client=httpx.AsyncClient(transport=transport))

    async with httpx.AsyncClient(transport=transport, base_url="http://keel",
                                 headers={"Authorization": f"Bearer {key}"}) as c:
        yield {"c": c, "fake": fake, "client": client, "other": other}
    await container.aclose()


async def test_a_text_response_and_its_continuation(env) -> None:
    client = env["client"]()
    first = await client.responses.create(model="m", input="What is the capital of France?",
                                          instructions="Answer briefly.", max_output_tokens=50)
    assert first.status == "completed" and first.output_text == "The capital of France is Paris."
    assert first.id.startswith("resp_") and first.object == "response"
    assert first.usage.output_tokens == 6 and first.output[0].role == "assistant"
    sent = env["fake"].requests[-1]
    assert [(m.role, m.content) for m in sent.messages] == [("system", "Answer briefly."),
                                                            ("user", "What is the capital of France?")]
    assert sent.params.max_tokens == 50
    env["fake"].reply = "About two million people."
    second = await client.responses.create(model="m", input="And its population?", previous_response_id=first.id)
    assert second.output_text == "About two million people." and second.previous_response_id == first.id
    # the stored conversation went before the new input; instructions are not carried over
    assert [(m.role, m.content) for m in env["fake"].requests[-1].messages] == [
        ("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris."),
        ("user", "And its population?")]
    assert (await client.responses.retrieve(second.id)).output_text == "About two million people."
    items = await client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message", "message", "message"]


async def test_streamed_events_add_up_to_the_response(env) -> None:
    client = env["client"]()
    async with client.responses.stream(model="m", input="What is the capital of France?") as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 6
    assert final.output_text == "The capital of France is Paris."
    r = await env["c"].post("/v1/responses", json={"model": "m", "input": "Hi", "stream": True})
    seqs = [json.loads(line[6:])["sequence_number"] for line in r.text.splitlines() if line.startswith("data: ")]
    assert seqs == list(range(len(seqs)))  # numbered from 0, as OpenAI does


async def test_a_function_call_and_its_output(env) -> None:
    client = env["client"]()
    env["fake"].call = ("get_weather", '{"city": "Paris"}')
    called = await client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER],
                                           tool_choice="required")
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == '{"city": "Paris"}'
    assert call.call_id and called.status == "completed"
    env["fake"].reply = "It is sunny."
    answer = await client.responses.create(
        model="m", previous_response_id=called.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C and sunny"}])
    assert answer.output_text == "It is sunny."
    seen = env["fake"].requests[-1].messages
    assert seen[1].tool_calls[0].id == call.call_id and seen[2].role == "tool" and seen[2].content == "21 C and sunny"
    # streamed: the call's item, its argument pieces, and the done events
    async with client.responses.stream(model="m", input="Weather in Paris?", tools=[WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"}) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert final.output[0].arguments == '{"city": "Paris"}'


async def test_a_stored_response_belongs_to_its_key(env) -> None:
    mine = await env["client"]().responses.create(model="m", input="Hi")
    theirs = env["client"](env["other"])
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError, match="no stored response"):
        await theirs.responses.create(model="m", input="go on", previous_response_id=mine.id)
    unstored = await env["client"]().responses.create(model="m", input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await env["client"]().responses.retrieve(unstored.id)
    await env["client"]().responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        await env["client"]().responses.retrieve(mine.id)


@pytest.mark.parametrize(("body", "param", "phrase"), [
    ({"input": "x", "frobnicate": 1}, "frobnicate", "unknown parameter"),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "1"}]}, "input[0].call_id",
     "no earlier function_call made"),
    ({"input": [{"type": "input_image", "image_url": "http://x"}]}, None, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, None, "tools"),
    ({"input": "x", "tools": [{**WEATHER, "parameters": {"type": "objekt"}}]}, "tools[0].parameters",
     "not a valid JSON Schema"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice",
     "not in tools"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id", "no stored response"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, None, "include"),
])
async def test_bad_input_gets_a_4xx_that_says_what_to_fix(env, body, param, phrase) -> None:
    r = await env["c"].post("/v1/responses", json={"model": "m", **body})
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert phrase in err["message"] and (param is None or err["param"] == param), err
    assert env["fake"].calls == 0
