"""Durable jobs through the API: ingest jobs and API-started eval runs survive a restart (the container built
twice on one home, the second started through the API lifespan), and the job routes check scopes and owners
and cancel."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.api.main import create_app
from app.container import Container
from app.settings import Settings, load_settings
from evals.store import EvalStore
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

SUITE = {
    "name": "jobs-unit",
    "target": {"model": "m", "params": {"temperature": 0, "max_tokens": 32}},
    "dataset": {"cases": [
        {"id": f"c{i}", "input": f"Capital of France? ({i})", "reference": "The capital of France is Paris."}
        for i in range(4)]},
    "metrics": [{"name": "fuzzy_match", "threshold": 0.5}],
    "gate": {"min_mean": {"fuzzy_match": 0.5}},
}


class GatedEmbedder(HashingEmbedder):
    """Embeds one batch, then waits until the test lets it go on: an ingest is mid-run for certain."""

    def __init__(self) -> None:
        super().__init__(64)
        self.batches = 0
        self.first_batch_done = threading.Event()
        self.go_on = threading.Event()

    def embed_documents(self, texts):
        self.batches += 1
        if self.batches == 2:
            self.first_batch_done.set()
            self.go_on.wait(30)
        return super().embed_documents(texts)


def settings_for(home: Path) -> Settings:
    suites = home / "suites"
    suites.mkdir(parents=True, exist_ok=True)
    (suites / "jobs-unit.yaml").write_text(yaml.safe_dump(SUITE))
    return load_settings(
        home=home, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
        rag={"chunker": {"max_tokens": 40, "overlap_tokens": 8}}, evals={"suites_dir": str(suites), "concurrency": 1},
    )


@asynccontextmanager
async def serve(home: Path, *, embedder: HashingEmbedder | None = None, backend: ScriptedBackend | None = None,
                batch_chunks: int | None = None) -> AsyncIterator[dict[str, Any]]:
    """One server process: a container on ``home`` behind the app, its lifespan run (which starts the jobs)."""
    settings = settings_for(home)
    rag = build_rag(settings, embedder=embedder or HashingEmbedder(64))
    if batch_chunks:
        rag.pipeline.batch_chunks = batch_chunks
    fake = backend or ScriptedBackend(reply="The capital of France is Paris.")
    container = await Container.build(settings, backends={"local": fake}, rag=rag)
    app = create_app(container=container)
    closed = False

    async def stop() -> None:  # what uvicorn's shutdown does: the lifespan's end closes the container
        nonlocal closed
        if not closed:
            closed = True
            await container.aclose()

    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://keel") as client:
            yield {"c": client, "container": container, "fake": fake, "stop": stop}
    finally:
        await stop()


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def write_docs(folder: Path, n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for i in range(n):
        body = " ".join(f"Document {i} sentence {j} is about topic {i % 5}." for j in range(20))
        files.append(("files", (f"doc{i:02d}.md", f"# Doc {i}\n\n{body}\n".encode(), "text/markdown")))
    return files


async def poll(c: httpx.AsyncClient, path: str, headers: dict[str, str], until, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = await c.get(path, headers=headers)
        assert r.status_code == 200, r.text
        if until(r.json()):
            return r.json()
        assert time.monotonic() < deadline, f"{path}: {r.json()}"
        await asyncio.sleep(0.05)


async def test_an_ingest_job_interrupted_by_a_restart_finishes_after_it(tmp_path: Path) -> None:
    embedder = GatedEmbedder()
    async with serve(tmp_path, embedder=embedder, batch_chunks=4) as s:
        raw = s["container"].keys.create("ingester", ["ingest"])[1]
        r = await s["c"].post("/v1/ingest", files=write_docs(tmp_path, 12), data={"collection": "kb"},
                              headers=bearer(raw))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert await asyncio.to_thread(embedder.first_batch_done.wait, 10)
        running = (await s["c"].get(f"/v1/ingest/jobs/{job_id}", headers=bearer(raw))).json()
        assert running["state"] == "running" and running["paths"] == [f"doc{i:02d}.md" for i in range(12)]
        # the process stops mid-ingest
        closing = asyncio.create_task(s["stop"]())
        await asyncio.sleep(0.1)
        embedder.go_on.set()
        await asyncio.wait_for(closing, 30)
    uploads = sorted(p.name for p in (tmp_path / "uploads" / "kb").iterdir())
    assert uploads == [f"doc{i:02d}.md" for i in range(12)]  # kept for the job's next run

    async with serve(tmp_path) as s:  # the next start, same home
        done = (await s["c"].get(f"/v1/ingest/jobs/{job_id}?wait_s=30", headers=bearer(raw))).json()
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 1 and done["counts"]["documents_total"] == 12
        assert done["counts"]["unchanged"] > 0  # what the first run wrote was not written again
        assert done["paths"] == [f"doc{i:02d}.md" for i in range(12)]  # names, never the server's folders
        listed = (await s["c"].get("/v1/ingest/jobs", headers=bearer(raw))).json()
        assert [j["id"] for j in listed] == [job_id]


async def test_an_eval_run_interrupted_by_a_restart_resumes_its_run_after_it(tmp_path: Path) -> None:
    slow = ScriptedBackend(reply="The capital of France is Paris.", delay_s=0.2)
    async with serve(tmp_path, backend=slow) as s:
        raw = s["container"].keys.create("evaluator", ["evals"])[1]
        r = await s["c"].post("/v1/evals/runs", json={"suite": "jobs-unit"}, headers=bearer(raw))
        assert r.status_code == 202, r.text
        started = r.json()
        assert started["status"] == "started" and started["cases"] == 4 and started["job"]["state"] == "queued"
        job_id = started["job_id"]
        job = await poll(s["c"], f"/v1/evals/jobs/{job_id}", bearer(raw),
                         lambda j: j["progress"].get("cases_done", 0) >= 1)
        run_id = job["progress"]["run_id"]
        assert job["state"] == "running" and job["progress"]["cases_total"] == 4
        await s["stop"]()  # stop mid-run: the run's task is cancelled, the job goes back to the queue
    store = EvalStore(tmp_path / "evals.db")
    try:
        interrupted = store.get_run(run_id)
        kept = len(store.done_cases(run_id))
    finally:
        store.close()
    assert interrupted.status == "interrupted" and 1 <= kept < 4

    async with serve(tmp_path) as s:
        done = (await s["c"].get(f"/v1/evals/jobs/{job_id}?wait_s=30", headers=bearer(raw))).json()
        assert done["state"] == "succeeded", done
        assert done["result"]["run_id"] == run_id  # the same run, resumed
        assert done["result"]["skipped"] == kept and done["result"]["passed"] is True
        runs = (await s["c"].get("/v1/evals/runs?suite=jobs-unit", headers=bearer(raw))).json()
        assert [(r["id"], r["status"]) for r in runs] == [(run_id, "completed")]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    async with serve(tmp_path, backend=ScriptedBackend(reply="The capital of France is Paris.", delay_s=0.05)) as s:
        keys = s["container"].keys
        s["keys"] = {name: keys.create(name, scopes)[1] for name, scopes in {
            "alice": ["ingest"], "bob": ["ingest"], "evals": ["evals"], "evals2": ["evals"], "admin": ["admin"],
            "chat": ["chat"]}.items()}
        yield s


async def test_job_routes_show_each_owner_its_own_jobs_and_check_scopes(server) -> None:
    c, k = server["c"], server["keys"]
    files = [("files", ("a.txt", b"Bees make honey from nectar.", "text/plain"))]
    r = await c.post("/v1/ingest", files=files, data={"collection": "docs"}, headers=bearer(k["alice"]))
    job_id = r.json()["id"]
    done = (await c.get(f"/v1/ingest/jobs/{job_id}?wait_s=30", headers=bearer(k["alice"]))).json()
    assert done["state"] == "succeeded"
    # bob (ingest scope too) neither sees nor cancels alice's job; an admin does
    assert (await c.get(f"/v1/ingest/jobs/{job_id}", headers=bearer(k["bob"]))).status_code == 404
    assert (await c.get("/v1/ingest/jobs", headers=bearer(k["bob"]))).json() == []
    assert (await c.post(f"/v1/ingest/jobs/{job_id}/cancel", headers=bearer(k["bob"]))).status_code == 404
    assert [j["id"] for j in (await c.get("/v1/ingest/jobs", headers=bearer(k["admin"]))).json()] == [job_id]
    r = await c.post(f"/v1/ingest/jobs/{job_id}/cancel", headers=bearer(k["admin"]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    # scopes: ingest jobs need 'ingest', eval jobs 'evals'; an ingest job is not an eval job
    assert (await c.get("/v1/ingest/jobs", headers=bearer(k["evals"]))).status_code == 403
    assert (await c.get("/v1/evals/jobs", headers=bearer(k["alice"]))).status_code == 403
    assert (await c.post(f"/v1/evals/jobs/{job_id}/cancel", headers=bearer(k["chat"]))).status_code == 403
    assert (await c.get(f"/v1/evals/jobs/{job_id}", headers=bearer(k["admin"]))).status_code == 404

    r = await c.post("/v1/evals/runs", json={"suite": "jobs-unit"}, headers=bearer(k["evals"]))
    eval_id = r.json()["job_id"]
    assert [j["id"] for j in (await c.get("/v1/evals/jobs", headers=bearer(k["evals"]))).json()] == [eval_id]
    assert (await c.get("/v1/evals/jobs", headers=bearer(k["evals2"]))).json() == []
    assert (await c.get(f"/v1/evals/jobs/{eval_id}", headers=bearer(k["evals2"]))).status_code == 404
    assert (await c.get(f"/v1/ingest/jobs/{eval_id}", headers=bearer(k["admin"]))).status_code == 404
    done = (await c.get(f"/v1/evals/jobs/{eval_id}?wait_s=30", headers=bearer(k["evals"]))).json()
    assert done["state"] == "succeeded" and done["kind"] == "eval" and done["result"]["passed"] is True
    assert done["payload"] == {"suite": "jobs-unit", "baseline": None, "use_cache": True}


async def test_an_eval_job_is_a_trace_with_a_span_per_case(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        c = s["c"]
        _, raw = s["container"].keys.create("admin", ["admin"])
        job_id = (await c.post("/v1/evals/runs", json={"suite": "jobs-unit"}, headers=bearer(raw))).json()["job_id"]
        done = (await c.get(f"/v1/evals/jobs/{job_id}?wait_s=30", headers=bearer(raw))).json()
        assert done["state"] == "succeeded", done
        tracing = s["container"].tracing
        tracing.flush()
        (root,) = [t for t in tracing.store.traces() if t["root"] == "keel.job eval"]
        spans = tracing.store.trace(root["trace_id"])
        job = next(x for x in spans if x["name"] == "keel.job eval")
        cases = [x for x in spans if x["name"] == "keel.eval.case"]
        assert sorted(x["attributes"]["keel.eval.case"] for x in cases) == ["c0", "c1", "c2", "c3"]
        assert all(x["parent_id"] == job["span_id"] for x in cases)
        a = cases[0]["attributes"]
        assert a["keel.eval.suite"] == "jobs-unit" and a["keel.eval.run_id"] == done["progress"]["run_id"]
        assert a["keel.eval.cached"] is False and 0.5 <= a["keel.eval.score.fuzzy_match"] <= 1.0
        # each case's answer is the chat path's own trace inside it (the model call, in GenAI terms)
        models = [x for x in spans if x["name"] == "keel.chat"]
        assert {x["parent_id"] for x in models} == {x["span_id"] for x in cases}


async def test_cancel_a_running_eval_job_and_a_running_ingest_job(tmp_path: Path) -> None:
    embedder = GatedEmbedder()
    slow = ScriptedBackend(reply="The capital of France is Paris.", delay_s=0.2)
    async with serve(tmp_path, embedder=embedder, backend=slow, batch_chunks=4) as s:
        c = s["c"]
        key, raw = s["container"].keys.create("admin", ["admin"])
        r = await c.post("/v1/evals/runs", json={"suite": "jobs-unit"}, headers=bearer(raw))
        job_id = r.json()["job_id"]
        job = await poll(c, f"/v1/evals/jobs/{job_id}", bearer(raw), lambda j: "run_id" in j["progress"])
        r = await c.post(f"/v1/evals/jobs/{job_id}/cancel", headers=bearer(raw))
        assert r.status_code == 200 and r.json()["cancel_requested"]
        done = await poll(c, f"/v1/evals/jobs/{job_id}", bearer(raw), lambda j: j["state"] != "running")
        assert done["state"] == "cancelled"
        run = (await c.get(f"/v1/evals/runs/{job['progress']['run_id']}", headers=bearer(raw))).json()
        assert run["status"] == "interrupted"  # its answered cases are kept
        assert (await c.post(f"/v1/evals/jobs/{job_id}/cancel", headers=bearer(raw))).json()["state"] == "cancelled"
        (event,) = s["container"].jobs.queue.history(job_id)  # who cancelled it, audited
        assert (event.action, event.actor, event.subject_kind, event.to_ref) == (
            "job.cancel", key.id, "eval", "cancel_requested")

        r = await c.post("/v1/ingest", files=write_docs(tmp_path, 12), data={"collection": "kb"}, headers=bearer(raw))
        ingest_id = r.json()["id"]
        assert await asyncio.to_thread(embedder.first_batch_done.wait, 10)
        r = await c.post(f"/v1/ingest/jobs/{ingest_id}/cancel", headers=bearer(raw))
        assert r.status_code == 200 and r.json()["state"] == "running" and r.json()["cancel_requested"]
        embedder.go_on.set()  # the pipeline reaches its next batch boundary and stops there
        done = (await c.get(f"/v1/ingest/jobs/{ingest_id}?wait_s=30", headers=bearer(raw))).json()
        assert done["state"] == "cancelled" and done["chunks_written"] > 0
        docs = s["container"].rag.store.documents("kb")
        assert 0 < len(docs) < 12 and all(d.clean and d.live for d in docs.values())  # whole documents only


async def test_an_idempotency_key_makes_a_retried_request_return_the_first_job(server) -> None:
    c, k = server["c"], server["keys"]
    headers = {**bearer(k["evals"]), "Idempotency-Key": "nightly-2024-06-01"}
    first = (await c.post("/v1/evals/runs", json={"suite": "jobs-unit"}, headers=headers)).json()
    again = (await c.post("/v1/evals/runs", json={"suite": "jobs-unit"}, headers=headers)).json()
    assert again["job_id"] == first["job_id"]
    r = await c.post("/v1/evals/runs", json={"suite": "jobs-unit", "use_cache": False}, headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    headers = {**bearer(k["admin"]), "Idempotency-Key": "load-1"}
    docs = server["container"].settings.home / "server-docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nAlpha.\n")
    one = (await c.post("/v1/ingest/paths", json={"paths": [str(docs)]}, headers=headers)).json()
    two = (await c.post("/v1/ingest/paths", json={"paths": [str(docs)]}, headers=headers)).json()
    assert one["id"] == two["id"]
