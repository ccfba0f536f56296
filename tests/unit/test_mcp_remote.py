"""Tools from external MCP servers (lifecycle.tools.remote): a real MCP server (fastmcp, over streamable HTTP
on a localhost port with a bearer token, and over stdio as a subprocess) configured in ``mcp.servers``; its
tools reach Keel's registry with their schemas, scopes and approvals, and an agent run pauses before a side
effect on the remote server."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from pydantic import ValidationError

from agents.events import Final, InterruptEvent
from agents.service import AgentService
from agents.settings import AgentSettings
from agents.testing import ScriptedLLM, schema_kind
from agents.tools import ToolContext, execute
from agents.workflows.common import Deps
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from lifecycle.tools.settings import McpServerSettings, McpSettings
from tests.data.mcp import shop_server
from tests.fakes.llm import ScriptedBackend

SHOP = Path(shop_server.__file__)


@pytest.fixture(scope="module")
def shop_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(shop_server.build().http_app(path="/mcp"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the shop MCP server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/mcp"
    server.should_exit = True
    thread.join(10)


async def _container(home: Path, servers: dict) -> Container:
    settings = load_settings(home=home, backends={"local": {"kind": "openai", "base_url": "http://unused/v1"}},
                             models={"m": {"backend": "local", "model": "fake"}}, default_model="m",
                             guardrails={"enabled": False}, mcp={"servers": servers})
    return await Container.build(settings, backends={"local": ScriptedBackend()},
                                 rag=build_rag(settings, embedder=HashingEmbedder()))


@pytest.fixture
async def container(tmp_path: Path, shop_url: str):
    c = await _container(tmp_path, {
        "shop": {"url": shop_url, "headers": {"Authorization": f"Bearer {shop_server.TOKEN}"}},
        "down": {"url": "http://127.0.0.1:9/mcp", "timeout_s": 2}})
    yield c
    await c.aclose()


async def test_an_external_servers_tools_join_the_registry_with_their_schemas_and_approvals(container) -> None:
    tools = container.tools
    assert {"shop__lookup_order", "shop__refund_order"} <= set(tools.names())
    assert not any(n.startswith("down__") for n in tools.names())  # did not answer: left out, Keel still started
    assert not tools.is_risky("shop__lookup_order") and tools.is_risky("shop__refund_order")
    assert tools.get("shop__lookup_order").input_schema["required"] == ["order_id"]
    assert tools.scope("shop__refund_order") == "chat"


async def test_calls_run_on_the_remote_server_and_its_errors_are_observations(container) -> None:
    ctx = ToolContext(principal="k", scopes=frozenset({"chat"}))
    obs = await execute(container.tools, "shop__lookup_order", {"order_id": "A-100"}, ctx)
    assert obs.ok and obs.data == {"id": "A-100", "status": "shipped", "total": 42.5}
    bad = await execute(container.tools, "shop__lookup_order", {"order": "A-100"}, ctx)
    assert not bad.ok and bad.error_code == "tool_input_invalid"  # the remote schema, checked here
    missing = await execute(container.tools, "shop__lookup_order", {"order_id": "Z-9"}, ctx)
    assert not missing.ok and missing.error_code == "mcp_tool_error" and "no order Z-9" in missing.output
    assert missing.attempts == 1  # the remote's answer is not retried
    denied = await execute(container.tools, "shop__lookup_order", {"order_id": "A-100"},
                           ToolContext(principal="k", scopes=frozenset({"evals"})))
    assert not denied.ok and denied.error_code == "tool_scope_denied"
    assert container.tool_audit.events(subject="shop__lookup_order", limit=10)


async def test_an_agent_pauses_before_a_remote_side_effect_and_runs_it_once_approved(container, tmp_path) -> None:
    shop_server.REFUNDS.clear()
    decisions = iter([{"next": "analyst", "reason": "refund"}])
    answers = {"tool": {"tool": "shop__refund_order", "args": {"order_id": "A-100", "amount": 10.0}},
               "text": "Refunded 10.0 on A-100.", "accepted": {"accepted": True, "feedback": "ok"},
               "worth_keeping": {"worth_keeping": False, "fact": ""}}

    def respond(messages, schema):
        kind = schema_kind(schema)
        return next(decisions, {"next": "FINISH", "reason": "done"}) if kind == "next" else answers[kind]

    llm = ScriptedLLM(responder=respond)
    svc = AgentService(Deps(llm=llm, tools=container.tools, settings=AgentSettings()), db_path=tmp_path / "a.db")
    try:
        events = [e async for e in svc.run("research", "Refund 10 on order A-100", owner="k", max_steps=4)]
        intr = events[-1]
        assert isinstance(intr, InterruptEvent) and intr.tool == "shop__refund_order"
        assert shop_server.REFUNDS == []
        done = [e async for e in svc.resume(intr.run_id, "approve", owner="k")]
        assert isinstance(done[-1], Final)
        assert shop_server.REFUNDS == [{"order_id": "A-100", "amount": 10.0}]
    finally:
        await svc.aclose()


async def test_a_stdio_server_is_started_and_its_tools_called(tmp_path: Path) -> None:
    c = await _container(tmp_path, {"local-shop": {"command": [sys.executable, str(SHOP), "stdio"],
                                                   "approval": "always"}})
    try:
        assert c.tools.is_risky("local-shop__lookup_order")  # approval: always
        obs = await execute(c.tools, "local-shop__lookup_order", {"order_id": "A-100"}, ToolContext())
        assert obs.ok and obs.data["status"] == "shipped"
    finally:
        await c.aclose()


def test_bad_server_settings_say_what_to_fix() -> None:
    with pytest.raises(ValidationError, match="either url"):
        McpServerSettings()
    with pytest.raises(ValidationError, match="not a key scope"):
        McpServerSettings(url="http://x/mcp", scope="everything")
    with pytest.raises(ValidationError, match="letters, digits"):
        McpSettings(servers={"a b": {"url": "http://x/mcp"}})
