"""Keel's chat API through a real vLLM server and the real SmolLM2 model."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(server: KeelServer, key: str = "chat") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys[key], max_retries=0)


def test_non_streaming_answer_from_the_real_model(keel_server: KeelServer) -> None:
    got = client(keel_server).chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=30
    )
    assert "Paris" in got.choices[0].message.content
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.prompt_tokens > 5 and 0 < got.usage.completion_tokens <= 30


def test_streaming_wire_format_over_http(keel_server: KeelServer) -> None:
    body = {"model": "smollm2", "messages": QUESTION, "temperature": 0, "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{keel_server.url}/v1/chat/completions", json=body,
                      headers=keel_server.headers(), timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines[:3]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    assert [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_a_guarded_stream_shows_words_as_they_come(keel_server: KeelServer) -> None:
    """Issue 21: under the default policy the text checks run word by word before release, so a guarded
    stream arrives in word-sized pieces (not one per sentence) and says exactly what the non-streamed answer
    says (temperature 0)."""
    messages = [{"role": "user", "content": "Describe the water cycle step by step."}]
    body = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{keel_server.url}/v1/chat/completions", json=body,
                      headers=keel_server.headers(), timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["guardrails"].startswith("default@")  # the default policy guarded it
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks
              if c.get("choices") and c["choices"][0]["delta"].get("content")]
    whole = client(keel_server).chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                                        max_tokens=60).choices[0].message.content
    assert "".join(pieces) == whole
    sentences = max(1, sum(whole.count(p) for p in ".!?"))
    assert len(pieces) >= 3 * sentences, pieces


def test_openai_client_sync_stream_and_stream_helper(keel_server: KeelServer) -> None:
    c = client(keel_server)
    stream = c.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20,
                                       stream=True)
    assert "Paris" in "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    with c.chat.completions.stream(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert "Paris" in final.choices[0].message.content
    assert [m.id for m in c.models.list().data][:1] == ["smollm2"]


async def test_openai_async_client(keel_server: KeelServer) -> None:
    c = openai.AsyncOpenAI(base_url=f"{keel_server.url}/v1", api_key=keel_server.keys["chat"], max_retries=0)
    got = await c.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in got.choices[0].message.content
    stream = await c.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20,
                                             stream=True, stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens > 0
    await c.close()


def test_langchain_chat_openai(keel_server: KeelServer) -> None:
    llm = ChatOpenAI(base_url=f"{keel_server.url}/v1", api_key=keel_server.keys["chat"], model="smollm2",
                     temperature=0, max_tokens=20, max_retries=0)
    assert "Paris" in llm.invoke("What is the capital of France?").content
    chunks = list(llm.stream("What is the capital of France?"))
    assert len(chunks) > 2 and "Paris" in "".join(c.content for c in chunks)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name."}},
                   "required": ["city"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@tool
def get_weather(city: str) -> str:
    """The weather now in a city."""
    return f"It is 21 C and sunny in {city}."


def test_langchain_bind_tools_gets_a_call_then_answers_from_the_result(keel_server: KeelServer) -> None:
    llm = ChatOpenAI(base_url=f"{keel_server.url}/v1", api_key=keel_server.keys["chat"], model="smollm2",
                     temperature=0, max_tokens=60, max_retries=0)
    # a named tool choice is guided decoding on vLLM: arguments valid for the schema, even from a 135M model (Keel's
    # --tool-strict-level parameter holds them to it although the tool is not strict)
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(ASK_WEATHER[0]["content"])
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]
    result = get_weather.invoke(call)  # a ToolMessage answering the call
    answer = llm.bind_tools([get_weather], tool_choice="none").invoke(
        [HumanMessage(ASK_WEATHER[0]["content"]), called, result])
    assert answer.content.strip() and not answer.tool_calls


def test_a_langchain_agent_runs_on_keel(keel_server: KeelServer) -> None:
    """A new user's tool-calling agent, unchanged: LangChain's agent (LangGraph's ReAct loop) binds its tools with
    tool_choice auto."""
    llm = ChatOpenAI(base_url=f"{keel_server.url}/v1", api_key=keel_server.keys["chat"], model="smollm2",
                     temperature=0, max_tokens=60, max_retries=0)
    agent = create_agent(llm, [get_weather])
    out = agent.invoke({"messages": [("user", ASK_WEATHER[0]["content"])]}, {"recursion_limit": 8})
    last = out["messages"][-1]
    assert isinstance(last, AIMessage) and last.content.strip() and not last.tool_calls


def test_streamed_tool_calls_accumulate_with_the_openai_client(keel_server: KeelServer) -> None:
    stream = client(keel_server).chat.completions.create(
        model="smollm2", messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required", stream=True,
        temperature=0, max_tokens=60)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert pieces and pieces[0].id and pieces[0].function.name == "get_weather"
    arguments = json.loads("".join(p.function.arguments or "" for p in pieces))
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    assert finish in ("tool_calls", "stop")


def test_responses_api_runs_a_tool_using_turn(keel_server: KeelServer) -> None:
    """The Responses API (what the OpenAI Agents SDK and new OpenAI clients default to) on the real model: a named
    function call, its output sent back by previous_response_id, then an answer in words; streamed too."""
    c = client(keel_server)
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    called = c.responses.create(model="smollm2", input=ASK_WEATHER[0]["content"], tools=[tool], temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    answer = c.responses.create(model="smollm2", previous_response_id=called.id, tools=[tool], tool_choice="none",
                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                        "output": "It is 21 C and sunny in Paris."}],
                                temperature=0, max_output_tokens=40)
    assert answer.output_text.strip() and answer.status in ("completed", "incomplete")
    with c.responses.stream(model="smollm2", input="What is the capital of France?", temperature=0,
                            max_output_tokens=20) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.output_text.delta" in kinds and "Paris" in final.output_text


def test_auto_tool_choice_reaches_the_models_parser(keel_server: KeelServer) -> None:
    """'auto' needs vLLM's tool-call parser (hermes, with Keel's SmolLM2 template): the model decides."""
    got = client(keel_server).chat.completions.create(
        model="smollm2", messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="auto", temperature=0,
        max_tokens=60)
    message = got.choices[0].message
    assert message.content or message.tool_calls
    for call in message.tool_calls or ():
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)


async def test_eight_concurrent_streams(keel_server: KeelServer) -> None:
    c = openai.AsyncOpenAI(base_url=f"{keel_server.url}/v1", api_key=keel_server.keys["chat"], max_retries=0)

    async def one(i: int) -> tuple[str, int]:
        stream = await c.chat.completions.create(
            model="smollm2", max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
        )
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    results = await asyncio.gather(*(one(i) for i in range(8)))
    await c.close()
    assert all(text and tokens > 0 for text, tokens in results)


def test_structured_output_is_valid_json_for_the_schema(keel_server: KeelServer) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    got = client(keel_server).chat.completions.create(
        model="smollm2", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Give the capital of France as JSON with city and country."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    data = json.loads(got.choices[0].message.content)
    assert set(data) == {"city", "country"} and all(isinstance(v, str) for v in data.values())


def test_client_disconnect_aborts_the_upstream_request(keel_server: KeelServer) -> None:
    body = {"model": "smollm2", "max_tokens": 1500, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]}
    before = keel_server.vllm_metric("vllm:generation_tokens_total")
    with httpx.stream("POST", f"{keel_server.url}/v1/chat/completions", json=body,
                      headers=keel_server.headers(), timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert keel_server.vllm_metric("vllm:num_requests_running") == 1
    left = time.monotonic()
    at_leave = keel_server.vllm_metric("vllm:generation_tokens_total") - before
    # The client is gone: vLLM must stop generating within moments, far short of 1500 tokens.
    deadline = left + 10
    while keel_server.vllm_metric("vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped_after = time.monotonic() - left
    assert keel_server.vllm_metric("vllm:num_requests_running") == 0
    generated = keel_server.vllm_metric("vllm:generation_tokens_total") - before
    time.sleep(1.0)
    assert keel_server.vllm_metric("vllm:generation_tokens_total") - before == generated
    # Diagnostics for a failure: how long the abort took and what Keel logged about the request.
    assert generated < 300, (
        f"vLLM generated {generated - at_leave:.0f} tokens after the client left ({at_leave:.0f} before); "
        f"it stopped {stopped_after:.1f} s later. Keel's log ends:\n"
        + "\n".join(keel_server.log.read_text(errors="replace").splitlines()[-15:])
    )


def test_fallback_alias_answers_when_its_primary_is_down(keel_server: KeelServer) -> None:
    got = client(keel_server).chat.completions.create(model="flaky", messages=QUESTION, temperature=0,
                                                      max_tokens=20)
    assert "Paris" in got.choices[0].message.content
    metrics = httpx.get(f"{keel_server.url}/metrics").text
    assert 'keel_fallback_total{fallback="smollm2",model="flaky"}' in metrics


def test_auth_and_rate_limits(keel_server: KeelServer) -> None:
    url = f"{keel_server.url}/v1/chat/completions"
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer keel-wrong"}).status_code == 401
    r = httpx.post(url, json=body, headers=keel_server.headers("prompts"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    codes = [httpx.post(url, json=body, headers=keel_server.headers("limited"), timeout=60).status_code
             for _ in range(4)]
    assert codes[:3] == [200, 200, 200] and codes[3] == 429
    with pytest.raises(openai.RateLimitError):
        client(keel_server, "limited").chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "smollm2", "messages": []}, 400, "invalid_request"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request"),
        ({"model": "nope", "messages": QUESTION}, 404, "model_not_found"),
        ({"model": "smollm2", "messages": QUESTION, "max_tokens": -1}, 400, "invalid_request"),
        # Fits Keel's character limit but not the model's 2048-token context: vLLM's own check.
        ({"model": "smollm2", "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 10},
         400, "context_length_exceeded"),
    ],
)
def test_bad_input_through_the_real_stack(keel_server: KeelServer, body, status, code) -> None:
    r = httpx.post(f"{keel_server.url}/v1/chat/completions", json=body, headers=keel_server.headers(), timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]


def test_malformed_json_through_the_real_stack(keel_server: KeelServer) -> None:
    r = httpx.post(f"{keel_server.url}/v1/chat/completions", content=b'{"model": ',
                   headers={**keel_server.headers(), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_admin_sees_backend_state_and_vllm_logs(keel_server: KeelServer) -> None:
    h = keel_server.headers("admin")
    state = httpx.get(f"{keel_server.url}/v1/admin/backends", headers=h).json()
    assert state["local"]["server"]["state"] == "ready" and state["dead"]["ready"] is False
    logs = httpx.get(f"{keel_server.url}/v1/admin/backends/local/logs?lines=500", headers=h).json()
    assert any("vllm" in line.lower() for line in logs["lines"])
    assert httpx.get(f"{keel_server.url}/v1/admin/backends", headers=keel_server.headers()).status_code == 403


def test_client_disconnect_aborts_a_non_streaming_request(keel_server: KeelServer) -> None:
    body = {"model": "smollm2", "max_tokens": 1500, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about a whale and a sailor."}]}
    before = keel_server.vllm_metric("vllm:generation_tokens_total")
    log_start = keel_server.log.stat().st_size
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes the connection
        httpx.post(f"{keel_server.url}/v1/chat/completions", json=body, headers=keel_server.headers(), timeout=2.0)
    deadline = time.monotonic() + 4
    while keel_server.vllm_metric("vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert keel_server.vllm_metric("vllm:num_requests_running") == 0
    generated = keel_server.vllm_metric("vllm:generation_tokens_total") - before
    assert generated < 250, f"vLLM generated {generated} tokens for a client that left after 2 s"
    # Answered 499 for the access log and metrics; no traceback (it used to be a TypeError and a 500).
    deadline = time.monotonic() + 5
    while 'status="499"' not in httpx.get(f"{keel_server.url}/metrics").text and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 'route="/v1/chat/completions",status="499"' in httpx.get(f"{keel_server.url}/metrics").text
    with keel_server.log.open("rb") as f:
        f.seek(log_start)
        tail = f.read().decode(errors="replace")
    assert "Traceback" not in tail and "status=500" not in tail, tail[-3000:]
