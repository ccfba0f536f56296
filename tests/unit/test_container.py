"""The composition root: what the API process builds once."""

from __future__ import annotations

from pathlib import Path

from app.container import Container
from app.guardrails.embeddings import SharedEmbedder
from app.settings import Settings


async def test_one_embedding_model_serves_rag_and_guardrails(tmp_path: Path) -> None:
    c = await Container.build(Settings(home=tmp_path), start_backends=False)
    try:
        assert isinstance(c.rag.embedder, SharedEmbedder)
        assert c.guards is not None and c.guards.embedder is c.rag.embedder
        assert c.rag.retriever.embedder is c.rag.embedder and c.rag.pipeline.embedder is c.rag.embedder
    finally:
        await c.aclose()
    assert c.rag.embedder._worker is None or c.rag.embedder._worker._shutdown


async def test_a_different_guardrail_model_gets_its_own_embedder(tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    c = await Container.build(Settings(home=tmp_path, guardrails={"embedding_model": str(other)}),
                              start_backends=False)
    try:
        assert c.guards is not None and c.guards.embedder is not c.rag.embedder
        assert c.guards.embedder.model_path == other
    finally:
        await c.aclose()


async def test_waiting_for_managed_backends(tmp_path: Path) -> None:
    c = await Container.build(Settings(home=tmp_path, guardrails={"enabled": False}), start_backends=False)
    answers = iter([{"local": {"ready": False, "server": {}}, "remote": {"ready": False}},
                    {"local": {"ready": False, "server": {}}, "remote": {"ready": False}},
                    {"local": {"ready": True, "server": {}}, "remote": {"ready": False}}])
    calls = []

    async def readiness():
        calls.append(1)
        return next(answers)

    c.llm.readiness = readiness  # type: ignore[method-assign]
    try:
        # a remote backend is never waited for; the managed one is, until it answers
        assert await c.wait_for_managed_backends(timeout_s=60, poll_s=0) == [] and len(calls) == 3

        async def never():
            return {"local": {"ready": False, "server": {}}}

        c.llm.readiness = never  # type: ignore[method-assign]
        assert await c.wait_for_managed_backends(timeout_s=0, poll_s=0) == ["local"]
    finally:
        await c.aclose()


async def test_shutdown_closes_every_store_even_when_one_fails(tmp_path: Path, caplog) -> None:
    """A store that fails to close (the embedded engine's flush at Ctrl-C) must not leave the ones after it
    open; the failure is logged with its step, not raised into uvicorn's lifespan."""
    c = await Container.build(Settings(home=tmp_path, guardrails={"enabled": False}), start_backends=False)
    closed: list[str] = []

    def boom() -> None:
        raise RuntimeError("Failed to flush vector_storage: tracker_journal.dat is shorter than expected")

    agents_close = c.agents.aclose
    c.agents.aclose = boom  # type: ignore[method-assign]  # an early step fails
    keys_close, prompts_close = c.keys.close, c.prompts.close
    c.keys.close = lambda: (closed.append("keys"), keys_close())  # type: ignore[method-assign]
    c.prompts.close = lambda: (closed.append("prompts"), prompts_close())  # type: ignore[method-assign]
    try:
        await c.aclose()
    finally:
        await agents_close()  # its checkpointer's aiosqlite thread is not a daemon: left open, pytest never exits
    assert closed == ["prompts", "keys"]
    assert "closing the agents failed" in caplog.text and "shorter than expected" in caplog.text
