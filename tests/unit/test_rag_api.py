"""Ingest jobs, retrieval and grounded chat through the API, with a scripted model and a hashing
embedder (the real model, embeddings and engine run in tests/integration/test_rag_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from app.api.main import create_app
from app.api.schemas import RagIn
from app.container import Container
from app.core.types import ChatMessage
from app.services.grounding import RagUse
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

DOCS = {
    "lighthouse.md": "# Lighthouses\n\nThe Eddystone lighthouse stands on rocks south of Plymouth. "
                     "Its current tower was completed in 1882.\n",
    "bees.txt": "Honey bees make honey from flower nectar. They store it in wax combs inside the hive.\n",
}


@pytest.fixture
async def env(tmp_path: Path):
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
    )
    fake = ScriptedBackend(reply="The tower was completed in 1882 [1].")
    container = await Container.build(settings, backends={"local": fake},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    keys = {name: container.keys.create(name, scopes)[1]
            for name, scopes in {"ingest": ["ingest"], "chat": ["chat"], "admin": ["admin"]}.items()}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                 base_url="http://keel") as client:
        yield {"c": client, "fake": fake, "keys": keys, "container": container, "home": tmp_path}
    await container.aclose()


def h(env, key: str) -> dict:
    return {"Authorization": f"Bearer {env['keys'][key]}"}


async def upload(env, collection: str = "docs") -> dict:
    files = [("files", (name, text.encode(), "text/plain")) for name, text in DOCS.items()]
    r = await env["c"].post("/v1/ingest", files=files, data={"collection": collection}, headers=h(env, "ingest"))
    assert r.status_code == 202, r.text
    job = (await env["c"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "ingest"))).json()
    assert job["state"] == "succeeded", job
    return job


async def test_upload_ingest_job_then_retrieve_with_citations(env) -> None:
    job = await upload(env)
    assert job["counts"]["added"] == 2 and job["snapshot_id"]
    again = await upload(env)  # same files: nothing rewritten
    assert again["counts"]["unchanged"] == 2 and again["counts"]["chunks_written"] == 0
    r = await env["c"].post("/v1/retrieve", json={"query": "When was the Eddystone tower completed?",
                                                  "collection": "docs", "top_k": 2}, headers=h(env, "chat"))
    assert r.status_code == 200
    top = r.json()["chunks"][0]
    assert "1882" in top["text"] and top["citation"]["source"].endswith("lighthouse.md")
    cols = (await env["c"].get("/v1/collections", headers=h(env, "chat"))).json()
    assert any(c.get("name") == "docs" for c in cols)
    snaps = (await env["c"].get("/v1/snapshots?collection=docs", headers=h(env, "ingest"))).json()
    assert len(snaps) == 2
    models = (await env["c"].get("/v1/models", headers=h(env, "chat"))).json()
    assert "rag:docs" in [m["id"] for m in models["data"]]


async def test_grounded_chat_streams_citations_before_done(env) -> None:
    await upload(env)
    body = {"model": "rag:docs", "stream": True,
            "messages": [{"role": "user", "content": "When was the Eddystone tower completed?"}]}
    r = await env["c"].post("/v1/chat/completions", json=body, headers=h(env, "chat"))
    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    cite_chunk = chunks[-1]
    assert cite_chunk["choices"] == [] and cite_chunk["object"] == "chat.completion.chunk"
    cites = cite_chunk["citations"]
    assert cites[0]["index"] == 1 and cites[0]["cited"] is True and "lighthouse.md" in cites[0]["source"]
    assert chunks[0]["prompt"]["ref"] == "rag-answer@1"
    sent = env["fake"].requests[-1]
    assert "[1]" in sent.messages[-1].content and "1882" in sent.messages[-1].content
    assert "Question: When was the Eddystone tower completed?" in sent.messages[-1].content
    assert sent.model == "fake"  # the default model answers for rag:<collection>


async def test_grounded_chat_non_streaming_with_the_rag_field(env) -> None:
    await upload(env)
    body = {"model": "m", "rag": {"collection": "docs", "top_k": 1},
            "messages": [{"role": "user", "content": "How do bees make honey?"}]}
    r = await env["c"].post("/v1/chat/completions", json=body, headers=h(env, "chat"))
    assert r.status_code == 200, r.text
    cites = r.json()["citations"]
    assert len(cites) == 1 and cites[0]["source"].endswith("bees.txt")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "rag:nope", "messages": [{"role": "user", "content": "q"}]}, 404, "collection_not_found"),
        ({"model": "rag:docs", "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request"),
        ({"model": "rag:docs", "rag": {"collection": "docs"}, "messages": [{"role": "user", "content": "q"}]},
         400, "invalid_request"),
        ({"model": "m", "rag": {"collection": "docs", "filters": {"page": {"near": 1}}},
          "messages": [{"role": "user", "content": "q"}]}, 400, "invalid_filter"),
        ({"model": "m", "rag": {"collection": "../etc"}, "messages": [{"role": "user", "content": "q"}]},
         400, "invalid_request"),
    ],
)
async def test_grounded_chat_bad_input(env, body, status, code) -> None:
    await upload(env)
    r = await env["c"].post("/v1/chat/completions", json=body, headers=h(env, "chat"))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert env["fake"].calls == 0


async def test_ingest_permissions_and_bad_uploads(env) -> None:
    c = env["c"]
    files = [("files", ("a.txt", b"text", "text/plain"))]
    assert (await c.post("/v1/ingest", files=files, headers=h(env, "chat"))).status_code == 403
    r = await c.post("/v1/ingest/paths", json={"paths": ["/etc"]}, headers=h(env, "ingest"))
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    r = await c.post("/v1/ingest", files=[("files", (".hidden", b"x", "text/plain"))], headers=h(env, "ingest"))
    assert r.status_code == 400
    r = await c.post("/v1/ingest", files=[("files", ("empty.txt", b"", "text/plain"))], headers=h(env, "ingest"))
    job = (await c.get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "ingest"))).json()
    assert job["state"] == "succeeded" and job["rejections"][0]["code"] == "empty"
    assert (await c.get("/v1/ingest/jobs/nope", headers=h(env, "ingest"))).status_code == 404
    r = await c.post("/v1/ingest/paths", json={"paths": [str(env["home"] / "missing")], "collection": "x"},
                     headers=h(env, "admin"))
    job = (await c.get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "admin"))).json()
    assert job["state"] == "succeeded" and job["rejections"][0]["code"] == "not_found"


async def test_agent_workflows_are_chat_models(env) -> None:
    await upload(env)
    models = [m["id"] for m in (await env["c"].get("/v1/models", headers=h(env, "chat"))).json()["data"]]
    assert {"agent:rag-qa", "agent:research"} <= set(models)
    env["fake"].reply = "The tower was completed in 1882 [1]."
    body = {"model": "agent:rag-qa", "messages": [{"role": "user", "content": "When was the tower completed?"}]}
    r = await env["c"].post("/v1/chat/completions", json=body, headers=h(env, "chat"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() and env["fake"].calls >= 1
    r = await env["c"].post("/v1/chat/completions", json=body | {"stream": True}, headers=h(env, "chat"))
    assert r.text.rstrip().endswith("data: [DONE]")
    r = await env["c"].post("/v1/chat/completions", json=body | {"model": "agent:nope"}, headers=h(env, "chat"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_group_by_document_counts_documents_not_chunks(env) -> None:
    manual = "# Manual\n\n" + "\n\n".join(
        f"## Lighthouse keeping, part {i}\n\n" + " ".join(
            f"Lighthouse keepers at Eddystone tended the lamp, note {i}.{j}." for j in range(25))
        for i in range(6))
    files = [("files", ("manual.md", manual.encode(), "text/markdown"))]
    r = await env["c"].post("/v1/ingest", files=files, data={"collection": "docs"}, headers=h(env, "ingest"))
    assert (await env["c"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "ingest"))
            ).json()["state"] == "succeeded"
    await upload(env)
    query = {"query": "Eddystone lighthouse keepers", "collection": "docs", "top_k": 3}
    chunks = (await env["c"].post("/v1/retrieve", json=query, headers=h(env, "chat"))).json()["chunks"]
    assert len(chunks) == 3 and len({c["citation"]["doc_id"] for c in chunks}) < 3  # the manual, twice or more
    r = await env["c"].post("/v1/retrieve", json=query | {"group_by": "document"}, headers=h(env, "chat"))
    assert r.status_code == 200, r.text
    grouped = r.json()["chunks"]
    assert len(grouped) == 3 and len({c["citation"]["doc_id"] for c in grouped}) == 3
    r = await env["c"].post("/v1/retrieve", json=query | {"group_by": "section"}, headers=h(env, "chat"))
    assert r.status_code == 400

    # the same option for grounded answers (the chat request's `rag` options carry it into RagUse)
    question = (ChatMessage("user", "Who tended the Eddystone lamp?"),)
    passages = await env["container"].chat.grounder.ground(question, RagUse("docs", top_k=3, group_by="document"))
    assert len({c.citation.doc_id for c in passages.chunks}) == 3
    assert RagIn(collection="docs", group_by="document").group_by == "document"
    body = {"model": "m", "rag": {"collection": "docs", "top_k": 3, "group_by": "document"},
            "messages": [{"role": "user", "content": "Who tended the Eddystone lamp?"}]}
    r = await env["c"].post("/v1/chat/completions", json=body, headers=h(env, "chat"))
    assert r.status_code == 200, r.text
    assert len({c["doc_id"] for c in r.json()["citations"]}) == 3, r.json()["citations"]


async def test_uploads_are_cited_by_their_name_never_by_a_server_path(env) -> None:
    home = str(env["home"])
    job = await upload(env)
    assert sorted(job["paths"]) == ["bees.txt", "lighthouse.md"] and home not in json.dumps(job)
    r = await env["c"].post("/v1/retrieve", json={"query": "When was the Eddystone tower completed?",
                                                  "collection": "docs", "top_k": 2}, headers=h(env, "chat"))
    assert home not in r.text
    top = r.json()["chunks"][0]["citation"]
    assert top["source"] == "lighthouse.md" and top["doc_id"] == "lighthouse.md" and top["title"] == "Lighthouses"
    body = {"model": "m", "rag": {"collection": "docs", "top_k": 2},
            "messages": [{"role": "user", "content": "When was the Eddystone tower completed?"}]}
    r = await env["c"].post("/v1/chat/completions", json=body, headers=h(env, "chat"))
    assert home not in json.dumps(r.json()["citations"])
    assert {c["source"] for c in r.json()["citations"]} <= {"lighthouse.md", "bees.txt"}
    snaps = await env["c"].get("/v1/snapshots?collection=docs", headers=h(env, "ingest"))
    snap = await env["c"].get(f"/v1/snapshots/{job['snapshot_id']}", headers=h(env, "ingest"))
    assert home not in snaps.text and home not in snap.text
    # a record of a JSONL upload: the file's name and the record's id
    files = [("files", ("faq.jsonl", b'{"id": "q1", "text": "Lighthouse lamps were once fuelled by whale oil."}\n',
                        "application/x-ndjson"))]
    r = await env["c"].post("/v1/ingest", files=files, data={"collection": "docs"}, headers=h(env, "ingest"))
    await env["c"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "ingest"))
    r = await env["c"].post("/v1/retrieve", json={"query": "whale oil lamps", "collection": "docs", "top_k": 1},
                            headers=h(env, "chat"))
    cited = r.json()["chunks"][0]["citation"]
    assert (cited["source"], cited["doc_id"]) == ("faq.jsonl", "faq.jsonl#q1")
    # the same name again replaces the document: its identity is the name, not where the server put it
    changed = {"lighthouse.md": DOCS["lighthouse.md"].replace("1882", "1883")}
    files = [("files", (n, t.encode(), "text/plain")) for n, t in changed.items()]
    r = await env["c"].post("/v1/ingest", files=files, data={"collection": "docs"}, headers=h(env, "ingest"))
    job = (await env["c"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "ingest"))).json()
    assert job["counts"]["updated"] == 1 and job["counts"]["documents_total"] == 3


async def test_uploads_have_their_own_limit_above_the_chat_body_limit(env) -> None:
    """The issue's case: a JSONL of 700 short documents over limits.max_body_bytes (1 MB) is accepted."""
    records = [json.dumps({"id": str(i), "text": f"Document {i} about lighthouse keeping. " + "Lamp care. " * 140})
               for i in range(700)]
    data = ("\n".join(records) + "\n").encode()
    assert len(data) > env["container"].settings.limits.max_body_bytes
    r = await env["c"].post("/v1/ingest", files=[("files", ("kb.jsonl", data, "application/x-ndjson"))],
                            data={"collection": "big"}, headers=h(env, "ingest"))
    assert r.status_code == 202, r.text
    job = (await env["c"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=60", headers=h(env, "ingest"))).json()
    assert job["state"] == "succeeded" and job["counts"]["added"] == 700, job
    assert (env["home"] / "uploads" / "big" / "kb.jsonl").read_bytes() == data
    # chat bodies keep the small limit
    big_chat = {"model": "m", "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    r = await env["c"].post("/v1/chat/completions", json=big_chat, headers=h(env, "chat"))
    assert r.status_code == 413 and "limits.max_body_bytes" in r.json()["error"]["message"]


async def test_an_upload_over_its_limit_is_413_and_leaves_no_file(env) -> None:
    env["container"].settings.limits.max_upload_bytes = 50_000
    uploads = env["home"] / "uploads"
    files = [("files", ("small.txt", b"Lighthouses guide ships.\n", "text/plain")),
             ("files", ("big.txt", b"Lamp care. " * 6000, "text/plain"))]
    r = await env["c"].post("/v1/ingest", files=files, data={"collection": "docs"}, headers=h(env, "ingest"))
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "payload_too_large" and "50000" in err["message"]
    assert "limits.max_upload_bytes" in err["message"]
    assert not [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else True

    # without a Content-Length (chunked), the limit is enforced while the body streams in
    request = env["c"].build_request("POST", "/v1/ingest", files=files, data={"collection": "docs"},
                                     headers=h(env, "ingest"))
    body, ctype = request.read(), request.headers["content-type"]

    async def chunked():
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    r = await env["c"].post("/v1/ingest", content=chunked(), headers={**h(env, "ingest"), "content-type": ctype})
    assert r.status_code == 413 and "limits.max_upload_bytes" in r.text
    assert not [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else True
    assert (await env["c"].get("/v1/ingest/jobs", headers=h(env, "ingest"))).json() == []

    # under the limit, as before; the same chunked body streams to disk intact
    env["container"].settings.limits.max_upload_bytes = 100_000
    r = await env["c"].post("/v1/ingest", content=chunked(), headers={**h(env, "ingest"), "content-type": ctype})
    assert r.status_code == 202, r.text
    assert (uploads / "docs" / "big.txt").read_bytes() == b"Lamp care. " * 6000
    assert sorted(p.name for p in uploads.rglob("*") if p.is_file()) == ["big.txt", "small.txt"]


async def test_a_cut_off_upload_is_refused_and_leaves_no_file(env) -> None:
    """The multipart parser's finalize() does not check for the closing boundary: a body cut short was ingested
    as if whole."""
    uploads = env["home"] / "uploads"
    files = [("files", ("guide.md", b"# Guide\n\nLighthouses guide ships at night.\n" * 50, "text/markdown"))]
    request = env["c"].build_request("POST", "/v1/ingest", files=files, data={"collection": "docs"},
                                     headers=h(env, "ingest"))
    body, ctype = request.read(), request.headers["content-type"]
    cut = body[: len(body) // 2]
    r = await env["c"].post("/v1/ingest", content=cut, headers={**h(env, "ingest"), "content-type": ctype})
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"], r.text
    assert not [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else True
    assert (await env["c"].get("/v1/ingest/jobs", headers=h(env, "ingest"))).json() == []


async def test_the_rag_prompt_asks_for_an_answer_that_fits_the_token_budget(env) -> None:
    """The shipped rag-answer asks for up to 150 words; a request with a small max_tokens got answers cut
    mid-sentence. The word limit the prompt states now follows the request's budget."""
    await upload(env)
    question = [{"role": "user", "content": "When was the Eddystone tower completed?"}]

    async def asked(**extra) -> str:
        r = await env["c"].post("/v1/chat/completions", json={"model": "rag:docs", "messages": question, **extra},
                                headers=h(env, "chat"))
        assert r.status_code == 200, r.text
        return next(m.content for m in env["fake"].requests[-1].messages if m.role == "system")

    assert "at most 150 words" in await asked()  # the template's own budget (512 tokens) fits 150 words
    assert "at most 28 words" in await asked(max_tokens=48)
    assert env["fake"].requests[-1].params.max_tokens == 48
