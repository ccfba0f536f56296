"""``input_overlap``: a policy whose input entries never change the input may let the model start while they judge
it. Nothing is shown before the verdict, and a refused request's generation is stopped; a policy that redacts its
input cannot ask for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from app.api.main import create_app
from app.container import Container
from app.guardrails.engine import GuardrailEngine
from app.guardrails.errors import GuardrailPolicyError
from app.guardrails.policy import parse_policy
from app.guardrails.settings import GuardrailSettings
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

SECRET = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z" * 2


def policy(overlap: bool | None) -> dict:
    entry = {"validator": "keel/secrets", "on_fail": "block"}  # a cheap check that blocks and never rewrites
    return {"version": "t1", "policies": {"default": {"input": [entry], "output": [],
                                                      **({"input_overlap": overlap} if overlap is not None else {})}}}


class Recorder(ScriptedBackend):
    """Notes when the model starts and stops, in one log with the input check's start and end."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(reply="Here is the answer you asked for.")
        self.log = log

    async def stream(self, request):
        self.log.append("model starts")
        try:
            async for event in super().stream(request):
                yield event
        finally:
            self.log.append("model stops")


@pytest.fixture(params=[True, False], ids=["overlap", "no-overlap"])
async def env(request, tmp_path: Path):
    log: list[str] = []
    settings = load_settings(home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1",
                                                                "retries": 0}},
                             models={"m": {"backend": "local", "model": "fake"}}, default_model="m")
    engine = GuardrailEngine(GuardrailSettings(), home=tmp_path, policy=parse_policy(policy(request.param)),
                             embedder=HashingEmbedder())
    engine.warm_up()
    check = engine.check_input

    async def slow_check(messages, context):  # the input stage takes a while, as the model classifiers do
        log.append("check starts")
        await asyncio.sleep(0.05)
        try:
            return await check(messages, context)
        finally:
            log.append("check ends")

    engine.check_input = slow_check
    fake = Recorder(log)
    container = await Container.build(settings, backends={"local": fake}, guards=engine,
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    _, key = container.keys.create("u", ["chat"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                 base_url="http://keel", headers={"Authorization": f"Bearer {key}"}) as c:
        c.keel = container  # the tests read its chat service's load count
        yield c, log, fake, request.param
    await container.aclose()


def ask(text: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


async def test_the_model_starts_during_the_check_only_when_the_policy_allows(env) -> None:
    c, log, _, overlap = env
    r = await c.post("/v1/chat/completions", json=ask("What is the capital of France?"))
    assert r.json()["choices"][0]["message"]["content"] == "Here is the answer you asked for."
    if overlap:
        assert log[:3] == ["check starts", "model starts", "check ends"], log
    else:
        assert log[:3] == ["check starts", "check ends", "model starts"], log
    chat = c.keel.chat
    assert chat.active == 0  # counted from the model's start to its end, once, overlap or not
    log.clear()
    async with c.stream("POST", "/v1/chat/completions", json=ask("And of Spain?", stream=True)) as s:
        text = [line async for line in s.aiter_lines() if line.startswith("data: {")]
    assert len(text) > 3 and log[-1] == "model stops"


async def test_a_client_leaving_during_the_check_stops_the_early_generation(env) -> None:
    c, log, _, overlap = env
    request = asyncio.create_task(c.post("/v1/chat/completions", json=ask("Hello there?")))
    for _ in range(500):
        if "check starts" in log:
            break
        await asyncio.sleep(0.005)
    request.cancel()  # the client gives up while the input stage still runs (in process: its task is cancelled)
    with pytest.raises(asyncio.CancelledError):
        await request
    for _ in range(100):  # the request's task is cancelled; the model's work is dropped in the background
        if "model stops" in log or not overlap:
            break
        await asyncio.sleep(0.02)
    if overlap:
        assert log[:2] == ["check starts", "model starts"] and "model stops" in log, log
    else:
        assert "model starts" not in log, log
    assert c.keel.chat.active == 0


async def test_a_refused_request_shows_nothing_and_its_generation_is_stopped(env) -> None:
    c, log, fake, overlap = env
    for stream in (False, True):
        log.clear()
        body = ask(f"Use this key for the call: {SECRET}", stream=stream)
        if stream:
            async with c.stream("POST", "/v1/chat/completions", json=body) as s:
                raw = "".join([line async for line in s.aiter_lines()])
            assert "content_filter" in raw and "Here is" not in raw and SECRET not in raw
        else:
            r = await c.post("/v1/chat/completions", json=body)
            assert r.json()["choices"][0]["finish_reason"] == "content_filter"
            assert "Here is" not in r.text
        if overlap:  # the model had started on it; its work was stopped, none of it sent anywhere
            assert log == ["check starts", "model starts", "check ends", "model stops"], log
            assert fake.closed_early >= 1
        else:  # refused before the model
            assert log == ["check starts", "check ends"], log
        assert c.keel.chat.active == 0


def test_a_policy_that_rewrites_its_input_cannot_overlap() -> None:
    data = policy(True)
    data["policies"]["default"]["input"] = [{"validator": "keel/pii", "on_fail": "redact"}]
    with pytest.raises(GuardrailPolicyError, match="input_overlap starts the model on the input as sent"):
        parse_policy(data)
    # ... through extends too, and a child may turn it off
    data = policy(True)
    data["policies"]["child"] = {"extends": "default", "input": [{"validator": "keel/pii", "on_fail": "redact"}]}
    with pytest.raises(GuardrailPolicyError, match="policy 'child': input_overlap"):
        parse_policy(data)
    data["policies"]["child"]["input_overlap"] = False
    loaded = parse_policy(data)
    assert loaded.file.resolve("default").input_overlap and not loaded.file.resolve("child").input_overlap
    # ... and a policy without the field keeps the hash the release before gave it (eval identities and caches
    # do not move): pinned, computed with that release's parse_policy
    assert parse_policy(policy(None)).content_hash == (
        "06864240cbd30372d964ce3f3d670471fc7b6db50d2861b253efc02cd689dd48")
    assert parse_policy(policy(True)).content_hash != parse_policy(policy(None)).content_hash
