"""TransformersBackend against the real SmolLM2 model on CPU (loaded once for the module)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import BackendError, ContextLengthExceeded, UnsupportedParameter
from app.core.settings import BackendSettings
from app.core.types import (
    ChatMessage,
    Finished,
    GenerationParams,
    GenerationRequest,
    LLMEvent,
    ResponseFormat,
    TextDelta,
    ToolChoice,
    ToolSpec,
    Usage,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / Path(os.environ.get("KEEL_HOME", ".keel")) / "models" / "smollm2"
QUESTION = "What is the capital of France?"


def request(content: str = QUESTION, adapter: str | None = None, **params: Any) -> GenerationRequest:
    return GenerationRequest(
        model="smollm2", messages=(ChatMessage("user", content),), params=GenerationParams(**params),
        adapter=adapter,
    )


async def collect(backend: Any, req: GenerationRequest) -> tuple[str, list[LLMEvent]]:
    events = [e async for e in backend.stream(req)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("keel-generate-") and t.is_alive()]


async def wait_threads_gone(timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while generation_threads():
        assert time.monotonic() - start < timeout_s, "generation thread still running after the stream ended"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[Any]:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"prepared SmolLM2 folder not found at {MODEL_DIR} (the project's test command creates it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from app.llm.transformers_backend import TransformersBackend

    b = TransformersBackend("local", BackendSettings(kind="transformers", model_path=MODEL_DIR))
    assert not await b.ready()
    await b.start()
    await b.start()  # idempotent
    yield b
    await b.aclose()
    assert not await b.ready()


async def test_ready_and_models(backend: Any) -> None:
    assert await backend.ready()
    assert await backend.models() == ["smollm2"]


async def test_greedy_answer(backend: Any) -> None:
    text, _ = await collect(backend, request(temperature=0, max_tokens=30))
    assert "Paris" in text


async def test_stream_shape_and_usage(backend: Any) -> None:
    _, events = await collect(backend, request(max_tokens=40))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 3
    assert isinstance(events[-2], Finished) and events[-2].index == 0
    assert isinstance(events[-1], Usage)
    assert all(isinstance(e, TextDelta) for e in events[:-2])
    usage = events[-1]
    assert 15 <= usage.prompt_tokens <= 60  # question plus SmolLM2's default system prompt
    assert len(deltas) <= usage.completion_tokens <= 40


async def test_max_tokens_gives_length(backend: Any) -> None:
    _, events = await collect(backend, request(max_tokens=5))
    assert events[-2] == Finished("length", 0)
    assert events[-1].completion_tokens == 5


async def test_stop_string_truncates(backend: Any) -> None:
    full, _ = await collect(backend, request(max_tokens=30))
    # A stop string taken from inside the greedy answer: the same answer must end just before it.
    stop = full[len(full) // 2: len(full) // 2 + 3]
    text, events = await collect(backend, request(max_tokens=30, stop=(stop,)))
    assert text == full[: full.find(stop)]
    assert stop not in text
    finished = [e for e in events if isinstance(e, Finished)]
    assert finished == [Finished("stop", 0)]
    assert events[-1].completion_tokens < 30


async def test_break_stops_generation_thread(backend: Any) -> None:
    # `break` alone leaves an async generator open until it is garbage-collected; callers that stop
    # early close it (as Keel's resilience layer does), and closing must stop the thread.
    seen = 0
    async with contextlib.aclosing(
        backend.stream(request("Write a very long story about a dragon.", max_tokens=2000))
    ) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                seen += 1
                if seen == 2:
                    break
    await wait_threads_gone()
    assert not backend._gen_lock.locked()
    _, events = await collect(backend, request(max_tokens=5))
    assert events[-1].completion_tokens == 5


async def test_cancelled_requests_release_the_lock(backend: Any) -> None:
    first_delta = asyncio.Event()

    async def consume(req: GenerationRequest) -> None:
        async for event in backend.stream(req):
            if isinstance(event, TextDelta):
                first_delta.set()

    running = asyncio.create_task(consume(request("Tell me a long story.", max_tokens=2000)))
    await asyncio.wait_for(first_delta.wait(), 30)
    waiting = asyncio.create_task(consume(request(max_tokens=5)))
    await asyncio.sleep(0.1)  # let it queue on the lock
    waiting.cancel()
    running.cancel()
    for task in (waiting, running):
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_threads_gone()
    assert not backend._gen_lock.locked()
    text, _ = await collect(backend, request(max_tokens=30))
    assert "Paris" in text


async def test_n_choices_with_seed(backend: Any) -> None:
    req = request(max_tokens=8, n=2, temperature=0.9, top_p=0.95, seed=7)
    _, first = await collect(backend, req)
    _, again = await collect(backend, req)
    assert [e.index for e in first if isinstance(e, Finished)] == [0, 1]
    assert {e.index for e in first if isinstance(e, TextDelta)} == {0, 1}
    assert first == again  # a seed makes sampling reproducible
    assert 2 <= first[-1].completion_tokens <= 16  # summed over both choices


async def test_context_length_exceeded(backend: Any) -> None:
    with pytest.raises(ContextLengthExceeded, match="8192"):
        await collect(backend, request(max_tokens=8192))
    with pytest.raises(ContextLengthExceeded, match="maximum context length"):
        await collect(backend, request("word " * 9000))


async def test_json_schema_is_unsupported(backend: Any) -> None:
    fmt = ResponseFormat(type="json_schema", schema={"type": "object"})
    with pytest.raises(UnsupportedParameter, match="vLLM"):
        await collect(backend, request(response_format=fmt))


async def test_tool_calls_are_unsupported_unless_tool_choice_is_none(backend: Any) -> None:
    tools = (ToolSpec("weather", parameters={"type": "object"}),)
    with pytest.raises(UnsupportedParameter, match="route this model to a vLLM backend") as err:
        await collect(backend, request(tools=tools))
    assert err.value.param == "tools"
    text, _ = await collect(backend, request(tools=tools, tool_choice=ToolChoice("none"), max_tokens=4))
    assert text


async def test_missing_adapter_is_backend_error(backend: Any, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="adapter"):
        await collect(backend, request(max_tokens=5, adapter=str(tmp_path / "nope")))
    assert not backend._gen_lock.locked()


async def test_generation_failure_is_backend_error(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(**kwargs: Any) -> None:
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(backend._loaded.model, "generate", boom)
    with pytest.raises(BackendError, match="simulated out of memory"):
        await asyncio.wait_for(collect(backend, request(max_tokens=5)), 10)  # must not hang either
    monkeypatch.undo()
    await wait_threads_gone()
    assert not backend._gen_lock.locked()


async def test_lora_adapter(backend: Any, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_text, _ = await collect(backend, request(max_tokens=12))
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    # init_lora_weights=False: random A and B, so the adapter really changes the output.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "lora")

    _, events = await collect(backend, request(max_tokens=12, adapter=str(tmp_path / "lora")))
    assert isinstance(events[-2], Finished) and isinstance(events[-1], Usage)
    assert events[-1].completion_tokens >= 1
    # The base model must be unaffected once an adapter has been injected.
    after, _ = await collect(backend, request(max_tokens=12))
    assert after == base_text
