"""Lineage records through the API, with a scripted model and a hashing embedder (the real parts:
tests/integration/test_releases_e2e.py and test_lineage_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.api.main import create_app
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

DOC = "# Lighthouses\n\nThe Eddystone lighthouse stands on rocks south of Plymouth. Its tower was completed in 1882.\n"


@pytest.fixture
async def env(tmp_path: Path):
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}, "m2": {"backend": "local", "model": "fake-2"}},
        default_model="m", guardrails={"enabled": False}, releases={"check_interval_s": 0},
        auth={"default_rate_limit_per_minute": 10_000},
    )
    fake = ScriptedBackend(reply="The tower was completed in 1882 [1].")
    container = await Container.build(settings, backends={"local": fake},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    keys = {name: container.keys.create(name, scopes)[1] for name, scopes in
            {"ingest": ["ingest"], "chat": ["chat"], "other": ["chat"], "admin": ["admin"]}.items()}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                 base_url="http://keel") as client:
        yield {"c": client, "keys": keys, "container": container}
    await container.aclose()


def h(env, key: str) -> dict:
    return {"Authorization": f"Bearer {env['keys'][key]}"}


async def chat(env, **body) -> dict:
    r = await env["c"].post("/v1/chat/completions", headers=h(env, "chat"), json={
        "messages": [{"role": "user", "content": "When was the Eddystone tower completed?"}], **body})
    assert r.status_code == 200, r.text
    return r.json()


async def lineage(env, completion_id: str, key: str = "chat") -> httpx.Response:
    return await env["c"].get(f"/v1/lineage/{completion_id}", headers=h(env, key))


async def test_a_plain_answer_names_its_route_and_only_its_key_reads_it(env) -> None:
    answer = await chat(env, model="m")
    r = await lineage(env, answer["id"])
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["id"] == answer["id"] and rec["model"] == "m"
    assert rec["route"] == {"alias": "m", "backend": "local", "model": "fake", "adapter": None, "owner": "config",
                            "revision": 0, "adapter_version": None}
    assert rec["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert rec["finish_reasons"] == {"0": "stop"} and rec["outcome"] == "ok"
    assert (await lineage(env, answer["id"], "other")).status_code == 404  # another key's answer
    assert (await lineage(env, answer["id"], "admin")).status_code == 200
    r = await lineage(env, "chatcmpl-nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "lineage_not_found"
    assert (await env["c"].get("/v1/lineage/bad%20id!", headers=h(env, "chat"))).status_code == 400


async def test_a_grounded_answer_names_its_passages_and_snapshot(env) -> None:
    files = [("files", ("lighthouse.md", DOC.encode(), "text/plain"))]
    r = await env["c"].post("/v1/ingest", files=files, data={"collection": "docs"}, headers=h(env, "ingest"))
    job = (await env["c"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=h(env, "ingest"))).json()
    assert job["state"] == "succeeded", job
    answer = await chat(env, model="rag:docs")
    rec = (await lineage(env, answer["id"])).json()
    assert rec["prompt"]["ref"].startswith("rag-answer@") and rec["prompt"]["hash"] == answer["prompt"]["hash"]
    assert rec["route"]["alias"] == "m"  # grounded answers are the default model's
    (passage,) = rec["retrieval"]
    cited = answer["citations"][0]
    assert passage["doc_id"] == cited["doc_id"] == "lighthouse.md" and passage["chunk_id"] == cited["chunk_id"]
    assert passage["snapshot_id"] == cited["snapshot_id"] and passage["snapshot_id"]
    assert passage["cited"] is True
    assert rec["prompt"]["eval_runs"] == []  # no suite has run on this version yet


async def test_a_release_answer_names_its_variant_route_and_feedback(env) -> None:
    r = await env["c"].post("/v1/releases", headers=h(env, "admin"), json={
        "name": "support", "strategy": "ab", "weights": {"a": 0, "b": 100},
        "variants": [{"name": "a", "model": "m"}, {"name": "b", "model": "m2"}]})
    assert r.status_code == 201, r.text
    answer = await chat(env, model="support")
    await env["c"].post("/v1/feedback", headers=h(env, "chat"), json={"id": answer["id"], "rating": "up"})
    rec = (await lineage(env, answer["id"])).json()
    assert rec["release"] == {"name": "support", "variant": "b"}
    assert rec["route"]["alias"] == "m2" and rec["route"]["model"] == "fake-2"
    assert [f["score"] for f in rec["feedback"]] == [1.0]


async def test_every_answer_leaves_drift_features_without_its_text(env) -> None:
    for question in ("When was the Eddystone tower completed?", "Who built it?"):
        r = await env["c"].post("/v1/chat/completions", headers=h(env, "chat"), json={
            "model": "m", "messages": [{"role": "user", "content": question}]})
        assert r.status_code == 200
    front = env["container"].front
    front.flush()
    rows = front.store.features()
    assert [f.question_chars for f in rows] == [39, 13]
    assert all(f.answer_chars == len("The tower was completed in 1882 [1].") for f in rows)
    assert all(f.vector() is not None and f.vector().shape == (env["container"].rag.embedder.dim,) for f in rows)
    assert all(not f.refused and not f.grounded and f.top_score is None and f.question is None for f in rows)
    raw = (env["container"].settings.home / "lineage.db").read_bytes()
    assert b"Eddystone" not in raw and b"Who built it" not in raw


async def test_an_adapter_answer_keeps_the_version_that_served_it_with_its_eval_runs(env, tmp_path: Path) -> None:
    from app.core.settings import ModelAlias
    from tests.unit.test_evals_gate import record as eval_run

    container = env["container"]
    finetune, routes = container.finetune, container.llm.routes
    v1, v2 = tmp_path / "adapters" / "1", tmp_path / "adapters" / "2"

    def deploy(version: str, folder: Path) -> None:  # what FinetuneService.deploy writes, on a vLLM-like route
        finetune.store.save_deployment(alias="tuned", model="support-lora", version=version, backend="local",
                                       served_name=f"support-lora-v{version}", adapter_path=str(folder))
        finetune._hashes[("support-lora", version)] = f"sha-{version}"  # the registry's keel.adapter_hash tag
        routes.set("tuned", ModelAlias(backend="local", model=f"support-lora-v{version}"),
                   owner="finetune:support-lora", actor="test")

    deploy("1", v1)
    on_v1 = eval_run(container.evals, "golden-rag", adapter=v1, passed=True, adapter_hash="sha-1")
    eval_run(container.evals, "golden-rag", adapter=v2, passed=False, adapter_hash="sha-2")
    eval_run(container.evals, "golden-rag", adapter=None, passed=True)  # the base model: other content
    answer = await chat(env, model="tuned")
    container.front.flush()
    deploy("2", v2)  # redeployed after the answer: its lineage still names v1
    rec = (await lineage(env, answer["id"])).json()
    version = rec["route"]["adapter_version"]
    assert rec["route"]["owner"] == "finetune:support-lora" and rec["route"]["model"] == "support-lora-v1"
    assert {k: version[k] for k in ("model", "version", "served_name", "path", "hash")} == {
        "model": "support-lora", "version": "1", "served_name": "support-lora-v1", "path": str(v1), "hash": "sha-1"}
    assert [r["id"] for r in version["eval_runs"]] == [on_v1] and version["eval_runs"][0]["passed"] is True
    later = (await lineage(env, (await chat(env, model="tuned"))["id"])).json()
    assert later["route"]["adapter_version"]["version"] == "2"
    assert [r["passed"] for r in later["route"]["adapter_version"]["eval_runs"]] == [False]
