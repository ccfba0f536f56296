"""Agents end to end with the REAL parts: SmolLM2 on a real vLLM server (guided decoding for the
decisions), the embedded Qdrant engine with the real MiniLM embedder, the SQLite checkpointer
and the prompt registry's starter templates. Few runs, short answers: the machine has 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents import build_agents
from agents.events import ErrorEvent, Final, InterruptEvent, NodeFinished, RunStarted, Token, ToolResult, to_wire
from agents.schemas import validate_event
from app.core.metrics import Metrics
from app.llm.router import ModelRouter
from app.settings import load_settings
from ingest import build_rag
from prompts.factory import build_registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCS = {
    "keel-ports.md": "# Keel networking\n\nThe Keel API listens on port 8000 by default. The vLLM server that Keel "
                     "supervises listens on port 8001.\n",
    "keel-memory.md": "# Agent memory\n\nKeel agents keep long-term memories in a Qdrant collection named "
                      "agent-memory, separate from the document collections.\n",
    "zebras.md": "# Zebras\n\nZebras are African equines with black and white stripes.\n",
}


@pytest.fixture(scope="module")
async def real(keel_server, tmp_path_factory):
    home: Path = tmp_path_factory.mktemp("agents-home")
    docs = home / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    settings = load_settings(
        home=home,
        # base_url: connect to the session's vLLM server (this replaces the default managed backend)
        backends={"local": {"kind": "vllm", "base_url": keel_server.vllm_url + "/v1", "read_timeout_s": 120,
                            "api_key": keel_server.vllm_api_key}},
        models={"smollm2": {"backend": "local", "model": "smollm2", "defaults": {"temperature": 0.0}}},
        default_model="smollm2",
        agents={"answer_max_tokens": 60, "decision_max_tokens": 40, "max_rounds": 2, "max_steps": 4,
                "node_timeout_s": 120},
    )
    router = ModelRouter(settings, Metrics())
    await router.start()
    rag = build_rag(settings)
    rag.pipeline.run([docs], settings.rag.collection)
    assert rag.store.count(settings.rag.collection) >= len(DOCS)
    prompts = build_registry(settings)
    svc = build_agents(settings, router, rag, prompts)
    await svc.start()
    yield svc
    await svc.aclose()
    await router.aclose()
    rag.close()
    prompts.close()


async def test_rag_qa_end_to_end_with_the_real_model(real) -> None:
    events = [e async for e in real.run("rag-qa", "Which port does the Keel API listen on?", user="it")]
    for i, e in enumerate(events):
        validate_event(to_wire(e, i))
    assert isinstance(events[0], RunStarted)
    assert not any(isinstance(e, ErrorEvent) for e in events), events[-1]
    final = events[-1]
    assert isinstance(final, Final) and final.status == "completed"
    assert any(isinstance(e, Token) for e in events)  # the answer streamed token by token
    retrieved = [e for e in events if isinstance(e, ToolResult) and e.tool == "retrieve"]
    assert retrieved and retrieved[0].ok and "8000" in retrieved[0].output  # the ports document was found
    run = await real.get_run(final.run_id)
    verdict = run["state"]["verdict"]
    # guided decoding made the 135M model's verdict valid JSON: a boolean, not an unreadable fallback
    assert verdict["model"] in (True, False)
    if final.grounded:
        assert final.citations and final.answer != "I don't know based on the provided documents."
    else:
        assert final.answer == "I don't know based on the provided documents." and final.citations == []
    assert [s["node"] for s in run["steps"]][:3] == ["retrieve", "answer", "verify"]
    assert (real.db_path).is_file()


async def test_research_end_to_end_with_the_real_model(real) -> None:
    events = [e async for e in real.run("research", "What is the agent memory collection called?", user="it",
                                        max_steps=4)]
    for i, e in enumerate(events):
        validate_event(to_wire(e, i))
    assert not any(isinstance(e, ErrorEvent) for e in events), events[-1]
    last = events[-1]
    if isinstance(last, InterruptEvent):  # the model chose to remember a fact: memory_write needs approval
        assert last.tool == "memory_write"
        events = [e async for e in real.resume(last.run_id, "reject", reason="not now")]
        last = events[-1]
    assert isinstance(last, Final) and last.status in ("completed", "step_limit")
    supervisor_steps = [e for e in events if isinstance(e, NodeFinished) and e.node == "supervisor"]
    assert 1 <= len(supervisor_steps) <= 5  # budget of 4 decisions (+ the final check)
