"""One contract every LLMBackend implementation passes: the scripted test double, the
OpenAI-compatible client against the real vLLM server, a replica set over it (two URLs of the real server and one
where nothing listens), and in-process transformers."""

from __future__ import annotations

import pytest

from app.core.metrics import Metrics
from app.core.settings import BackendSettings
from app.core.types import ChatMessage, Finished, GenerationParams, GenerationRequest, TextDelta, Usage
from app.llm.base import LLMBackend
from app.llm.replicas import ReplicaSet
from app.llm.router import build_backend
from app.settings import Settings
from tests.fakes.llm import ScriptedBackend
from tests.integration.conftest import MODEL, KeelServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = (ChatMessage("user", "Name three colours."),)


@pytest.fixture(scope="module", params=["scripted", "vllm", "replicas", "transformers"])
async def backend(request: pytest.FixtureRequest) -> LLMBackend:
    kind = request.param
    if kind == "scripted":
        b: LLMBackend = ScriptedBackend(reply="red green blue and many more colours exist in the world")
    elif kind == "vllm":
        from app.llm.openai_backend import OpenAIBackend

        server: KeelServer = request.getfixturevalue("keel_server")
        b = OpenAIBackend("vllm", BackendSettings(kind="openai", base_url=f"{server.vllm_url}/v1",
                                                  api_key=server.vllm_api_key))
    elif kind == "replicas":
        b = replica_set(request.getfixturevalue("keel_server"))
    else:
        from app.llm.transformers_backend import TransformersBackend

        b = TransformersBackend("transformers", BackendSettings(kind="transformers", model_path=MODEL))
    await b.start()
    yield b
    await b.aclose()


def replica_set(server: KeelServer) -> LLMBackend:
    """The real vLLM server behind two URLs, and a server that is not there."""
    cfg = BackendSettings(kind="openai", base_url=f"{server.vllm_url}/v1", api_key=server.vllm_api_key,
                          replicas=[f"{server.vllm_url.replace('127.0.0.1', 'localhost')}/v1",
                                    f"http://127.0.0.1:{free_port()}/v1"], replica_check_s=0)
    return build_backend("replicas", cfg, Settings(backends={"replicas": cfg}), Metrics())


def req(**params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    return GenerationRequest(model="smollm2", messages=MESSAGES, params=GenerationParams(**params))


async def test_stream_is_deltas_then_finish_then_usage(backend: LLMBackend) -> None:
    events = [e async for e in backend.stream(req(max_tokens=12))]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert deltas and "".join(d.text for d in deltas).strip()
    kinds = [type(e) for e in events]
    assert kinds.index(Finished) > kinds.index(TextDelta)
    assert isinstance(events[-1], Usage) and events[-1].completion_tokens > 0


async def test_max_tokens_ends_with_length(backend: LLMBackend) -> None:
    events = [e async for e in backend.stream(req(max_tokens=3))]
    finished = [e for e in events if isinstance(e, Finished)]
    assert [f.reason for f in finished] == ["length"]
    assert events[-1].completion_tokens == 3


async def test_closing_early_then_serving_again(backend: LLMBackend) -> None:
    gen = backend.stream(req(max_tokens=200))
    assert isinstance(await anext(gen), TextDelta)
    await gen.aclose()
    events = [e async for e in backend.stream(req(max_tokens=4))]
    assert isinstance(events[-1], Usage)


async def test_several_choices_are_indexed(backend: LLMBackend) -> None:
    # Sampling, not greedy: vLLM refuses n > 1 with temperature 0.
    events = [e async for e in backend.stream(req(max_tokens=4, n=2, temperature=0.7, seed=1))]
    assert sorted(e.index for e in events if isinstance(e, Finished)) == [0, 1]
    assert {e.index for e in events if isinstance(e, TextDelta)} == {0, 1}


async def test_models_and_ready(backend: LLMBackend) -> None:
    assert await backend.ready()
    assert await backend.models()


async def test_a_replica_set_drains_the_dead_server_and_spreads_the_rest(keel_server: KeelServer) -> None:
    backend = replica_set(keel_server)
    assert isinstance(backend, ReplicaSet)
    await backend.start()
    try:
        answers = [[e async for e in backend.stream(req(max_tokens=4))] for _ in range(6)]
        assert all(isinstance(a[-1], Usage) for a in answers)  # every request answered, none lost to the dead one
        assert [r.up for r in backend.replicas] == [True, True, False]
        assert await backend.check()  # the probe agrees: the real server's two URLs up, the dead one down
        assert [r.up for r in backend.replicas] == [True, True, False]
        assert backend.replicas[0].served == backend.replicas[1].served >= {"smollm2"}
    finally:
        await backend.aclose()
