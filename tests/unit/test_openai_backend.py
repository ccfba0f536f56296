"""The OpenAI-compatible client's parsing and error mapping, against httpx's mock transport."""

from __future__ import annotations

import json

import httpx
import pytest

from app.core.errors import (
    BackendError,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
)
from app.core.settings import BackendSettings
from app.core.types import (
    ChatMessage,
    Finished,
    GenerationParams,
    GenerationRequest,
    ResponseFormat,
    TextDelta,
    TokenLogprobs,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    Usage,
)
from app.llm.openai_backend import OpenAIBackend, build_payload

REQ = GenerationRequest(model="m", messages=(ChatMessage("user", "hi"),), request_id="rid-1")


def sse(*events: dict | str) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


def chunk(content=None, finish=None, index=0, usage=None, role=None) -> dict:
    delta = {k: v for k, v in {"role": role, "content": content}.items() if v is not None}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["choices"] = []
        body["usage"] = usage
    return body


def backend(handler) -> OpenAIBackend:
    b = OpenAIBackend("t", BackendSettings(kind="openai", base_url="http://up/v1"))
    b._client = httpx.AsyncClient(base_url="http://up/v1", transport=httpx.MockTransport(handler))
    return b


async def collect(b: OpenAIBackend, req: GenerationRequest = REQ) -> list:
    return [e async for e in b.stream(req)]


async def test_parses_a_stream_and_sends_the_request_id() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        seen["rid"] = request.headers.get("x-request-id")
        return httpx.Response(200, content=sse(
            chunk(role="assistant", content=""), chunk("Hel"), chunk("lo"), chunk(finish="stop"),
            chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}), "[DONE]"))

    events = await collect(backend(handler))
    assert events == [TextDelta("Hel"), TextDelta("lo"), Finished("stop"), Usage(3, 2)]
    assert seen["rid"] == "rid-1"
    assert seen["body"]["stream"] is True and seen["body"]["stream_options"] == {"include_usage": True}


def test_payload_maps_json_schema_to_guided_decoding() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    req = GenerationRequest(model="m", messages=REQ.messages, params=GenerationParams(
        max_tokens=5, temperature=0, stop=("\n",), n=2,
        response_format=ResponseFormat(type="json_schema", schema=schema, name="x")))
    body = build_payload(req)
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert body["max_tokens"] == 5 and body["temperature"] == 0 and body["stop"] == ["\n"] and body["n"] == 2
    assert "top_p" not in body and "seed" not in body


def test_payload_carries_tools_the_choice_and_the_calls_in_the_history() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    history = (ChatMessage("user", "Weather in Paris?"),
               ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "weather", '{"city": "Paris"}'),)),
               ChatMessage("tool", "21 C", tool_call_id="c1"))
    req = GenerationRequest(model="m", messages=history, params=GenerationParams(
        tools=(ToolSpec("weather", "Weather now.", params),), tool_choice=ToolChoice("function", "weather"),
        parallel_tool_calls=False))
    body = build_payload(req)
    assert body["tools"] == [{"type": "function", "function": {"name": "weather", "description": "Weather now.",
                                                               "parameters": params}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}
    assert body["messages"][2] == {"role": "tool", "content": "21 C", "tool_call_id": "c1"}
    assert "tools" not in build_payload(REQ) and "tool_choice" not in build_payload(REQ)


async def test_logprobs_are_asked_for_and_passed_on() -> None:
    entry = {"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108], "top_logprobs": []}
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        body = chunk("Hel")
        body["choices"][0]["logprobs"] = {"content": [entry]}
        return httpx.Response(200, content=sse(body, chunk(finish="stop"), "[DONE]"))

    req = GenerationRequest(model="m", messages=REQ.messages, params=GenerationParams(logprobs=True, top_logprobs=3))
    events = await collect(backend(handler), req)
    assert events == [TextDelta("Hel"), TokenLogprobs((entry,)), Finished("stop")]
    assert seen["body"]["logprobs"] is True and seen["body"]["top_logprobs"] == 3


async def test_streamed_tool_call_deltas_become_events() -> None:
    def call(**piece) -> dict:
        return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
            {"index": 0, "delta": {"content": None, "tool_calls": [piece]}, "finish_reason": None}]}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(
            chunk(role="assistant", content=""),
            call(index=0, id="call_1", type="function", function={"name": "weather"}),
            call(index=0, function={"arguments": '{"city": '}), call(index=0, function={"arguments": '"Paris"}'}),
            chunk(finish="tool_calls"), "[DONE]"))

    events = await collect(backend(handler))
    assert events == [ToolCallDelta(0, "call_1", "weather", ""), ToolCallDelta(0, None, None, '{"city": '),
                      ToolCallDelta(0, None, None, '"Paris"}'), Finished("tool_calls")]


@pytest.mark.parametrize(
    ("status", "payload", "error", "text"),
    [
        (400, {"error": {"message": "This model's maximum context length is 2048 tokens."}},
         ContextLengthExceeded, "2048"),
        (400, {"error": {"message": "temperature must be >= 0"}}, InvalidRequest, "temperature"),
        (404, {"error": {"message": "The model `x` does not exist."}}, ModelNotFound, "does not exist"),
        (503, {"detail": "overloaded"}, BackendUnavailable, "unavailable"),
        (500, "boom", BackendError, "HTTP 500"),
    ],
)
async def test_upstream_http_errors_are_mapped(status, payload, error, text) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(payload, str):
            return httpx.Response(status, text=payload)
        return httpx.Response(status, json=payload)

    with pytest.raises(error, match=text):
        await collect(backend(handler))


async def test_connection_refused_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(BackendUnavailable, match="unreachable"):
        await collect(backend(handler))
    assert not await backend(handler).ready()


async def test_error_event_mid_stream_and_malformed_events() -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(chunk("a"), {"error": {"message": "engine dead"}}))

    with pytest.raises(BackendError, match="engine dead"):
        await collect(backend(failing))

    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"data: {not json\n\n")

    with pytest.raises(BackendError, match="malformed"):
        await collect(backend(garbage))


async def test_models_lists_ids() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"object": "list", "data": [{"id": "smollm2"}]})

    assert await backend(handler).models() == ["smollm2"]


async def test_the_bearer_key_is_read_per_request() -> None:
    """A managed vLLM server gets a new key each time Keel starts it: the client must follow it."""
    from pathlib import Path

    from pydantic import SecretStr

    from app.core.settings import ManagedVLLM
    from app.llm.vllm_backend import VLLMBackend

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})

    remote = OpenAIBackend("r", BackendSettings(kind="openai", base_url="http://up/v1", api_key=SecretStr("sk-r")))
    assert remote.api_key() == "sk-r"
    managed = VLLMBackend("v", BackendSettings(kind="vllm", api_key=SecretStr("configured"), managed=ManagedVLLM()),
                          Path("/tmp"))
    for b in (remote, managed):
        await OpenAIBackend.start(b)  # the client only: no server is started
        b.client._transport = httpx.MockTransport(handler)
    await remote.models()
    managed.supervisor.api_key = "first"
    await managed.models()
    managed.supervisor.api_key = "second"
    await managed.models()
    assert seen == ["Bearer sk-r", "Bearer first", "Bearer second"]
    for b in (remote, managed):
        await b.aclose()
