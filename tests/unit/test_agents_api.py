"""The /v1/agents HTTP contract: SSE event schema, approvals, resume, runs and memories (fake model)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from agents.memory import QdrantMemoryStore
from agents.schemas import validate_event
from agents.service import AgentService
from agents.settings import AgentSettings
from agents.testing import KeywordRetriever, ScriptedLLM, SideEffectTool, schema_kind
from agents.tools import ToolRegistry, builtin_tools
from agents.workflows.common import Deps
from app.api.errors import install_error_handlers
from app.api.routes.agents import router
from app.core.metrics import Metrics
from app.security.keys import KeyStore
from app.security.ratelimit import RateLimiter
from app.settings import load_settings
from ingest.embedding import HashingEmbedder
from ingest.store.edge import EdgeStore

ANSWER = "Keel stores document vectors in Qdrant [1]."
DOCS = {"qdrant": "Keel stores document vectors in Qdrant, an embedded vector engine."}


def responder(messages, schema):
    kind = schema_kind(schema)
    task = messages[-1].content
    if kind == "next":
        progress = task.split("Progress:")[-1]
        if "Send" in task and "analyst" not in progress:
            return {"next": "analyst", "reason": "send it"}
        if "researcher" not in progress:
            return {"next": "researcher", "reason": "facts"}
        if "writer" not in progress:
            return {"next": "writer", "reason": "draft"}
        if "critic" not in progress:
            return {"next": "critic", "reason": "check"}
        return {"next": "FINISH", "reason": "done"}
    return {"text": ANSWER, "supported": {"supported": True}, "accepted": {"accepted": True, "feedback": "ok"},
            "tool": {"tool": "send_report", "args": {"to": "ops"}},
            "worth_keeping": {"worth_keeping": False, "fact": ""}}[kind]


@pytest.fixture
async def env(tmp_path: Path):
    settings = load_settings(home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1"}},
                             models={"m": {"backend": "local", "model": "m"}}, default_model="m")
    store = EdgeStore(tmp_path / "qdrant")
    memory = QdrantMemoryStore(store, HashingEmbedder(64), collection="mem")
    tools = ToolRegistry(builtin_tools())
    tool = SideEffectTool()
    tools.register(tool)
    deps = Deps(llm=ScriptedLLM(responder=responder), tools=tools, settings=AgentSettings(),
                retriever=KeywordRetriever(DOCS), memory=memory)
    svc = AgentService(deps, db_path=tmp_path / "agents.db")
    keys = KeyStore(tmp_path / "keel.db")
    _, admin = keys.create("admin", ["admin"])
    chat_key, chat = keys.create("chat", ["chat"])
    _, other = keys.create("other", ["chat"])
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.keel = SimpleNamespace(settings=settings, keys=keys, rate_limiter=RateLimiter(), agents=svc,
                                     metrics=Metrics())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel") as client:
        yield SimpleNamespace(client=client, svc=svc, tool=tool, memory=memory, chat_id=chat_key.id,
                              keys={"admin": admin, "chat": chat, "other": other}, svc_keys=keys)
    await svc.aclose()
    keys.close()
    store.close()


def auth(env, key: str = "chat") -> dict[str, str]:
    return {"Authorization": f"Bearer {env.keys[key]}"}


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Every event: `event:` equals the JSON type, `id:` equals seq, and the JSON validates."""
    out, event, ident = [], None, None
    for line in text.splitlines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            ident = line[3:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:].strip())
            validate_event(data)
            assert data["type"] == event and str(data["seq"]) == ident
            out.append(data)
    return out


async def test_workflows_and_auth(env) -> None:
    r = await env.client.get("/v1/agents/workflows", headers=auth(env))
    assert r.status_code == 200
    assert {w["name"] for w in r.json()["data"]} == {"ops", "rag-qa", "research"}
    assert (await env.client.get("/v1/agents/workflows")).status_code == 401


async def test_run_streams_schema_valid_events(env) -> None:
    r = await env.client.post("/v1/agents/rag-qa/runs", json={"input": "Where does Keel store vectors?"},
                              headers=auth(env))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    types = [e["type"] for e in events]
    assert types[0] == "run.started" and types[-1] == "final" and types.count("final") == 1
    assert {"node.started", "node.finished", "tool.call", "tool.result", "token"} <= set(types)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["answer"] == ANSWER and events[-1]["citations"][0]["title"] == "qdrant"
    run_id = events[0]["run_id"]
    assert r.headers["x-run-id"] == run_id
    run = (await env.client.get(f"/v1/agents/runs/{run_id}", headers=auth(env))).json()
    assert run["status"] == "completed" and run["state"]["answer"] == ANSWER and len(run["steps"]) == 4
    listed = (await env.client.get("/v1/agents/runs", headers=auth(env))).json()["data"]
    assert [x["run_id"] for x in listed] == [run_id]
    # other keys cannot see it; admin can
    assert (await env.client.get(f"/v1/agents/runs/{run_id}", headers=auth(env, "other"))).status_code == 404
    assert (await env.client.get("/v1/agents/runs", headers=auth(env, "other"))).json()["data"] == []
    assert (await env.client.get(f"/v1/agents/runs/{run_id}", headers=auth(env, "admin"))).status_code == 200


async def test_errors_before_the_stream_are_http_errors(env) -> None:
    r = await env.client.post("/v1/agents/nope/runs", json={"input": "q"}, headers=auth(env))
    assert r.status_code == 404 and r.json()["error"]["code"] == "workflow_not_found"
    r = await env.client.post("/v1/agents/rag-qa/runs", json={"input": ""}, headers=auth(env))
    assert r.status_code in (400, 422)
    r = await env.client.post("/v1/agents/runs/run-nope/resume", json={"action": "approve"}, headers=auth(env))
    assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"


async def test_interrupt_approvals_and_resume_over_http(env) -> None:
    r = await env.client.post("/v1/agents/research/runs", json={"input": "Send the vector report"},
                              headers=auth(env))
    events = parse_sse(r.text)
    assert events[-1]["type"] == "interrupt" and events[-1]["tool"] == "send_report"
    run_id = events[-1]["run_id"]
    assert env.tool.executed == []
    pending = (await env.client.get("/v1/agents/approvals", headers=auth(env))).json()["data"]
    assert [p["run_id"] for p in pending] == [run_id] and pending[0]["args"] == {"to": "ops"}
    assert (await env.client.get("/v1/agents/approvals", headers=auth(env, "other"))).json()["data"] == []
    r = await env.client.post(f"/v1/agents/runs/{run_id}/resume", json={"action": "edit", "args": {"to": "lead"}},
                              headers=auth(env))
    resumed = parse_sse(r.text)
    assert resumed[0]["type"] == "run.started" and resumed[0]["resumed"] is True
    assert resumed[-1]["type"] == "final" and resumed[-1]["status"] == "completed"
    assert env.tool.executed == [{"to": "lead"}]
    r = await env.client.post(f"/v1/agents/runs/{run_id}/resume", json={"action": "approve"}, headers=auth(env))
    assert r.status_code == 409 and r.json()["error"]["code"] == "run_not_resumable"
    assert env.tool.executed == [{"to": "lead"}]


async def test_non_streaming_run_returns_the_result(env) -> None:
    r = await env.client.post("/v1/agents/rag-qa/runs", json={"input": "Where does Keel store vectors?",
                                                              "stream": False}, headers=auth(env))
    body = r.json()
    assert r.status_code == 200 and body["status"] == "completed" and body["answer"] == ANSWER
    for e in body["events"]:
        validate_event(e)


async def test_memories_list_and_delete(env) -> None:
    ns = ("users", env.chat_id)
    env.memory.put(ns, "fact-1", {"text": "The staging cluster is called kestrel", "source_run": "run-x"})
    r = await env.client.get("/v1/agents/memories", headers=auth(env))
    data = r.json()["data"]
    assert r.status_code == 200 and [m["key"] for m in data] == ["fact-1"] and data[0]["value"]["source_run"]
    r = await env.client.get("/v1/agents/memories", params={"query": "staging cluster"}, headers=auth(env))
    assert r.json()["data"][0]["score"] is not None
    r = await env.client.get("/v1/agents/memories", params={"namespace": "users/someone-else"}, headers=auth(env))
    assert r.status_code == 403
    r = await env.client.delete("/v1/agents/memories", params={"namespace": f"users/{env.chat_id}",
                                                               "key": "fact-1"}, headers=auth(env))
    assert r.status_code == 200 and r.json()["deleted"]
    r = await env.client.delete("/v1/agents/memories", params={"namespace": f"users/{env.chat_id}",
                                                               "key": "fact-1"}, headers=auth(env))
    assert r.status_code == 404


async def test_the_memory_namespace_comes_from_the_key_not_the_body(env) -> None:
    """Issue 14: any chat key could read and write another user's memory by naming them in 'user'."""
    body = {"input": "Where does Keel store vectors?", "stream": False}
    other_id = next(k.id for k in env.svc_keys.list() if k.name == "other")
    r = await env.client.post("/v1/agents/rag-qa/runs", json={**body, "user": other_id}, headers=auth(env))
    assert r.status_code == 403 and r.json()["error"]["param"] == "user"
    assert "comes from the API key" in r.json()["error"]["message"]
    assert (await env.client.get("/v1/agents/runs", headers=auth(env))).json()["data"] == []  # nothing ran
    r = await env.client.post("/v1/agents/rag-qa/runs", json=body, headers=auth(env))
    run = (await env.client.get(f"/v1/agents/runs/{r.json()['run_id']}", headers=auth(env))).json()
    assert run["namespace"] == f"users/{env.chat_id}" and run["owner"] == env.chat_id
    # its own id is accepted; an admin may act for a user (logged)
    r = await env.client.post("/v1/agents/rag-qa/runs", json={**body, "user": env.chat_id}, headers=auth(env))
    assert r.status_code == 200
    r = await env.client.post("/v1/agents/rag-qa/runs", json={**body, "user": "alice"}, headers=auth(env, "admin"))
    run = (await env.client.get(f"/v1/agents/runs/{r.json()['run_id']}", headers=auth(env, "admin"))).json()
    assert r.status_code == 200 and run["namespace"] == "users/alice"
    # nor through the memories API
    env.memory.put(("users", other_id), "fact-1", {"text": "other's secret"})
    r = await env.client.get("/v1/agents/memories", params={"namespace": f"users/{other_id}"}, headers=auth(env))
    assert r.status_code == 403
    r = await env.client.delete("/v1/agents/memories", params={"namespace": f"users/{other_id}", "key": "fact-1"},
                                headers=auth(env))
    assert r.status_code == 403 and env.memory.get(("users", other_id), "fact-1") is not None


async def test_team_memories_are_their_members_only(env) -> None:
    """Issue 14: any chat key could read, search and delete any team's memories (teams/* was open to all)."""
    _, member = env.svc_keys.create("member", ["chat"], teams=["ml"])
    env.memory.put(("teams", "ml"), "fact-1", {"text": "the ml team's staging cluster is kube-ml-2"})
    env.memory.put(("teams", "ops"), "fact-1", {"text": "ops' pager rota"})
    as_member = {"Authorization": f"Bearer {member}"}
    r = await env.client.get("/v1/agents/memories", params={"namespace": "teams/ml"}, headers=as_member)
    assert r.status_code == 200 and [m["key"] for m in r.json()["data"]] == ["fact-1"]
    for ns in ("teams/ops", "teams"):
        r = await env.client.get("/v1/agents/memories", params={"namespace": ns}, headers=as_member)
        assert r.status_code == 403 and "teams/ml" in r.json()["error"]["message"]
    r = await env.client.get("/v1/agents/memories", params={"namespace": "teams/ml"}, headers=auth(env))
    assert r.status_code == 403  # a key in no team
    r = await env.client.delete("/v1/agents/memories", params={"namespace": "teams/ml", "key": "fact-1"},
                                headers=auth(env))
    assert r.status_code == 403 and env.memory.get(("teams", "ml"), "fact-1") is not None
    body = {"input": "Where is staging?", "stream": False, "team": "ml"}
    r = await env.client.post("/v1/agents/rag-qa/runs", json=body, headers=auth(env))
    assert r.status_code == 403 and r.json()["error"]["param"] == "team"
    assert (await env.client.post("/v1/agents/rag-qa/runs", json=body, headers=as_member)).status_code == 200
    r = await env.client.get("/v1/agents/memories", params={"namespace": "teams/ops"}, headers=auth(env, "admin"))
    assert r.status_code == 200  # an admin key is in every team


async def test_a_key_cannot_see_continue_or_resume_another_keys_run(env) -> None:
    r = await env.client.post("/v1/agents/research/runs", json={"input": "Send the vector report"},
                              headers=auth(env))
    intr = parse_sse(r.text)[-1]
    run_id, thread_id = intr["run_id"], intr["thread_id"]
    other = auth(env, "other")
    r = await env.client.post(f"/v1/agents/runs/{run_id}/resume", json={"action": "approve"}, headers=other)
    assert r.status_code == 404 and env.tool.executed == []
    assert (await env.client.get(f"/v1/agents/runs/{run_id}", headers=other)).status_code == 404
    assert (await env.client.get(f"/v1/agents/threads/{thread_id}", headers=other)).status_code == 404
    assert (await env.client.get("/v1/agents/approvals", headers=other)).json()["data"] == []
    r = await env.client.post("/v1/agents/research/runs", json={"input": "go on", "thread_id": thread_id},
                              headers=other)
    assert r.status_code == 404
    # a run without an owner (started from the CLI) is the operator's: not any key's to resume or read
    cli = parse_sse_events(await env.svc.collect(env.svc.run("research", "Send the vector report")))
    r = await env.client.post(f"/v1/agents/runs/{cli[-1]['run_id']}/resume", json={"action": "approve"},
                              headers=auth(env))
    assert r.status_code == 404 and env.tool.executed == []
    assert (await env.client.get(f"/v1/agents/runs/{cli[-1]['run_id']}", headers=auth(env))).status_code == 404
    r = await env.client.post(f"/v1/agents/runs/{run_id}/resume", json={"action": "approve"}, headers=auth(env))
    assert parse_sse(r.text)[-1]["type"] == "final" and env.tool.executed == [{"to": "ops"}]


def parse_sse_events(events) -> list[dict[str, Any]]:
    from agents.events import to_wire

    return [to_wire(e, i) for i, e in enumerate(events)]
