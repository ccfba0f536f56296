"""The ops agent and the MCP endpoint end to end: the real ``keel serve`` process, the real vLLM server and
SmolLM2, the real stores (lineage and drift, releases, prompts and their eval gate), the real guardrails.

Two scripted situations, as an on-call engineer meets them:
* a drifted week while a canary runs: "why did grounded answers drop this week?" -> the agent runs a drift check,
  reads traces, eval runs and releases, explains, and proposes rolling the canary back; nothing changes until
  the engineer approves through the API, then the release is rolled back (its audit names the agent's key);
* a prompt version with no passing eval run: "is prompt X v2 ready?" -> the gate's refusal, explained, and no
  proposal.
And an MCP client (the SDK's own) lists and calls Keel's tools over streamable HTTP with the engineer's key.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import httpx2
import numpy as np
import pytest
import yaml
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from ingest.embedding import SentenceTransformerEmbedder
from lifecycle.lineage import Features, LineageStore
from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTIONS = yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "drift" / "questions.yaml").read_text())
DAY = 86_400.0
STABLE = {"messages": [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]}
TERSE = {"messages": [{"role": "system", "content": "You are a terse assistant. Reply in a few words."}]}


def _features(questions: list[str], since: float, until: float, grounded_rate: float, seed: int,
              embedder: SentenceTransformerEmbedder) -> list[Features]:
    rng = np.random.default_rng(seed)
    vectors = embedder.embed_documents(questions)
    step = (until - since) / len(questions)
    out = []
    for i, (q, v) in enumerate(zip(questions, vectors, strict=True)):
        grounded = bool(rng.random() < grounded_rate)
        out.append(Features(
            id=f"seed-{seed}-{i}", at=since + i * step, owner="k", model="smollm2", release=None, variant=None,
            question_chars=len(q), input_chars=len(q) + 120, answer_chars=int(rng.normal(420, 90)),
            prompt_tokens=int(rng.integers(300, 600)), completion_tokens=int(rng.normal(95, 20)),
            top_score=float(rng.uniform(0.014, 0.033)) if grounded else None, grounded=grounded,
            refused=False, validators="", outcome="ok",
            embedding=np.asarray(v, dtype=np.float32).astype(np.float16).tobytes()))
    return out


def _seed_a_drifted_week(home: Path) -> None:
    """Last week users asked about the shipped corpus and were grounded 85% of the time; this week they ask
    about something else and are grounded 30% of the time."""
    embedder = SentenceTransformerEmbedder()
    embedder.warm_up()
    now = time.time()
    store = LineageStore(home / "lineage.db")
    try:
        store.write([], _features(QUESTIONS["corpus"][:80], now - 14 * DAY, now - 7 * DAY - 60, 0.85, 1, embedder))
        store.write([], _features(QUESTIONS["pydocs"][:80], now - 7 * DAY + 60, now - 120, 0.30, 2, embedder))
    finally:
        store.close()


def _post(server: KeelServer, path: str, body: dict, key: str = "ops") -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, headers=server.headers(key), timeout=600)
    assert r.status_code in (200, 201), r.text
    return r.json()


def _ask_ops(server: KeelServer, question: str) -> dict:
    return _post(server, "/v1/agents/ops/runs", {"input": question, "stream": False})


def _tools(run: dict) -> list[str]:
    return [e["tool"] for e in run["events"] if e["type"] == "tool.call"]


def test_a_drifted_week_during_a_canary_is_explained_and_the_rollback_waits_for_approval(
        keel_server: KeelServer) -> None:
    _seed_a_drifted_week(keel_server.home)
    _post(keel_server, "/v1/prompts", {"name": "ops-canary", "content": STABLE}, key="admin")
    _post(keel_server, "/v1/prompts/ops-canary/versions", {"content": TERSE, "base_version": 1}, key="admin")
    _post(keel_server, "/v1/releases", {
        "name": "ops-support", "strategy": "canary", "unit": "request",
        "variants": [{"name": "stable", "prompt": "ops-canary@1"}, {"name": "canary", "prompt": "ops-canary@2"}],
        "canary": {"steps": [25, 50, 100], "min_requests": 1000, "min_duration_s": 0, "max_duration_s": 86_400},
        "override_reason": "test release: the situation under investigation"}, key="admin")

    run = _ask_ops(keel_server, "Why did grounded answers drop this week?")
    print("ops answer:", run.get("answer") or run.get("interrupt"))
    assert run["status"] == "interrupted", run
    used = _tools(run)
    assert used[:4] == ["drift_check", "traces_search", "eval_results", "release_list"], used
    results = [e for e in run["events"] if e["type"] == "tool.result"]
    assert all(r["ok"] for r in results[:4]), results
    pending = run["interrupt"]
    assert pending["tool"] == "release_rollback" and pending["args"]["name"] == "ops-support"
    assert "drift" in pending["reason"]
    written = "".join(e.get("text", "") for e in run["events"] if e["type"] == "token")
    assert written.strip(), "the model wrote no analysis"
    status = httpx.get(f"{keel_server.url}/v1/releases/ops-support", headers=keel_server.headers("ops"),
                       timeout=30).json()
    assert status["status"] == "running"  # nothing changed before the approval

    done = _post(keel_server, f"/v1/agents/runs/{run['run_id']}/resume", {"action": "approve", "stream": False})
    print("after approval:", done["answer"])
    assert done["status"] == "completed", done
    assert "Findings:\n[1] Drift check" in done["answer"] and "DRIFT" in done["answer"]
    assert "approved and done" in done["answer"]
    status = httpx.get(f"{keel_server.url}/v1/releases/ops-support", headers=keel_server.headers("ops"),
                       timeout=30).json()
    assert status["status"] == "rolled_back" and "ops agent" in status["decision"]["reason"]
    trail = httpx.get(f"{keel_server.url}/v1/admin/audit", params={"trail": "tools", "subject": "release_rollback"},
                      headers=keel_server.headers("admin"), timeout=30).json()
    assert trail and trail[0]["details"]["ok"] is True and trail[0]["details"]["run_id"] == run["run_id"]


def test_a_prompt_version_without_a_passing_eval_is_not_ready(keel_server: KeelServer) -> None:
    _post(keel_server, "/v1/prompts", {"name": "ops-gated", "content": STABLE}, key="admin")
    _post(keel_server, "/v1/prompts/ops-gated/versions", {"content": TERSE, "base_version": 1}, key="admin")
    run = _ask_ops(keel_server, "Is prompt ops-gated v2 ready for production?")
    print("ops answer:", run.get("answer"))
    assert run["status"] == "completed", run
    assert _tools(run)[:3] == ["prompt_list", "prompt_versions", "prompt_gate"]
    assert "REFUSES ops-gated v2" in run["answer"] and "Proposed" not in run["answer"]


async def test_an_mcp_client_calls_keel_tools_with_the_engineers_key(keel_server: KeelServer) -> None:
    headers = keel_server.headers("ops")
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, \
            streamable_http_client(f"{keel_server.url}/mcp", http_client=http) as (read, write, *_), \
            ClientSession(read, write) as session:
        await session.initialize()
        names = {t.name for t in (await session.list_tools()).tools}
        assert {"release_status", "drift_reports", "prompt_diff", "model_versions", "retrieve"} <= names
        reports = await session.call_tool("drift_reports", {"limit": 2})
        assert not reports.is_error, reports.content
        refused = await session.call_tool("release_start", {"spec": {"name": "x"}})
        assert refused.is_error and "release spec" in refused.content[0].text
    async with httpx2.AsyncClient(headers=keel_server.headers("chat"), timeout=60) as http, \
            streamable_http_client(f"{keel_server.url}/mcp", http_client=http) as (read, write, *_), \
            ClientSession(read, write) as session:
        await session.initialize()
        assert {t.name for t in (await session.list_tools()).tools} == {"retrieve", "memory_search"}
