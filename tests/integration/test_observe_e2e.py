"""Traces and lineage end to end: the real Keel API, vLLM server, SmolLM2 and MiniLM. One grounded (`rag:`) chat
request yields a trace with the expected span tree and a lineage record whose hashes and ids match the prompt
registry and the ingest snapshot."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOC = ("# Veltmar harbour\n\nThe Veltmar harbour light was first lit in 1871. Its keeper in the first winter was "
       "Ada Lorne, who kept a log of every ship that passed.\n")


def test_a_grounded_answer_has_a_trace_and_a_lineage_that_match_the_registry(keel_server: KeelServer) -> None:
    admin = keel_server.headers("admin")
    r = httpx.post(f"{keel_server.url}/v1/ingest", headers=admin, timeout=60, data={"collection": "observe"},
                   files=[("files", ("veltmar.md", DOC.encode(), "text/markdown"))])
    assert r.status_code == 202, r.text
    for _ in range(4):  # long-poll (at most 60 s a call) until the job is done
        job = httpx.get(f"{keel_server.url}/v1/ingest/jobs/{r.json()['id']}?wait_s=60", headers=admin,
                        timeout=90).json()
        if job.get("state") in ("succeeded", "failed", "cancelled"):
            break
    assert job["state"] == "succeeded", job
    r = httpx.post(f"{keel_server.url}/v1/chat/completions", headers=keel_server.headers("chat"), timeout=120, json={
        "model": "rag:observe", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "When was the Veltmar harbour light first lit?"}]})
    assert r.status_code == 200, r.text
    answer = r.json()

    rec = httpx.get(f"{keel_server.url}/v1/lineage/{answer['id']}", headers=keel_server.headers("chat"),
                    timeout=30).json()
    name, version = rec["prompt"]["ref"].split("@")
    registered = httpx.get(f"{keel_server.url}/v1/prompts/{name}/versions/{version}", headers=admin, timeout=30).json()
    assert rec["prompt"]["hash"] == registered["hash"] == answer["prompt"]["hash"]
    (passage,) = rec["retrieval"]
    assert passage["doc_id"] == "veltmar.md" and passage["snapshot_id"] == job["snapshot_id"]
    snapshot = httpx.get(f"{keel_server.url}/v1/snapshots/{job['snapshot_id']}", headers=admin, timeout=30)
    assert snapshot.status_code == 200 and "veltmar.md" in snapshot.text
    assert rec["route"]["alias"] == "smollm2" and rec["route"]["backend"] == "local"
    assert rec["guardrails"]["policy"].startswith("rag@") or rec["guardrails"]["policy"]
    assert {v["stage"] for v in rec["guardrail_verdicts"]} >= {"input", "output"}

    for _ in range(20):  # spans are exported in batches (the API flushes before reading; one retry for safety)
        t = httpx.get(f"{keel_server.url}/v1/traces/{rec['trace_id']}", headers=admin, timeout=30)
        if t.status_code == 200:
            break
        time.sleep(0.5)
    spans = t.json()["spans"]
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    (server,) = by_name["POST /v1/chat/completions"]
    (chat,) = by_name["keel.chat"]
    (retrieve,) = by_name["keel.rag.retrieve"]
    (model,) = by_name["chat smollm2"]
    guards = by_name["keel.guardrails.input"]
    (output,) = by_name["keel.guardrails.output"]
    assert server["parent_id"] is None and chat["parent_id"] == server["span_id"]
    assert all(s["parent_id"] == chat["span_id"] for s in (retrieve, model, output, *guards))
    assert {g["attributes"]["keel.guardrails.stage"] for g in guards} == {"question", "passages"}
    assert retrieve["attributes"]["keel.rag.chunk_ids"] == [passage["chunk_id"]]
    a = model["attributes"]
    assert model["kind"] == "CLIENT" and a["gen_ai.provider.name"] == "vllm"
    assert a["gen_ai.response.id"] == answer["id"] and a["gen_ai.request.max_tokens"] == 16
    assert a["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert chat["start_ns"] <= retrieve["start_ns"] < model["start_ns"] <= model["end_ns"] <= chat["end_ns"]
