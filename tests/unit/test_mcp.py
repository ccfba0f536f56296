"""Keel's tools over MCP (lifecycle.tools.mcp): a real API on a localhost port, called with the MCP SDK's own
client over streamable HTTP with real API keys; and the server object in-process (fastmcp's client)."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from agents.tools import ToolContext, ToolRegistry, builtin_tools
from lifecycle.tools import LifecycleTool
from lifecycle.tools.mcp import build_server
from tests.cli_server import ApiServer
from tests.fakes.llm import ScriptedBackend

SETTINGS = {"backends": {"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
            "models": {"m": {"backend": "local", "model": "fake"}}, "default_model": "m",
            "guardrails": {"enabled": False}, "auth": {"default_rate_limit_per_minute": 10_000}}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    server = ApiServer(tmp_path_factory.mktemp("mcp"), settings=SETTINGS, backends={"local": ScriptedBackend()},
                       keys={"admin": ["admin"], "chat": ["chat"], "ops": ["releases", "monitor", "evals"]}).start()
    yield server
    server.stop()


class Session:
    """The MCP SDK's client session over streamable HTTP, with one API key."""

    def __init__(self, api: ApiServer, key: str) -> None:
        self.url, self.headers = f"{api.url}/mcp", {"Authorization": f"Bearer {key}"}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> ClientSession:
        http = await self._stack.enter_async_context(httpx2.AsyncClient(headers=self.headers))
        read, write, *_ = await self._stack.enter_async_context(streamable_http_client(self.url, http_client=http))
        session = await self._stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        return session

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()


async def test_a_key_lists_and_calls_only_the_tools_its_scopes_allow(api: ApiServer) -> None:
    async with Session(api, api.keys["admin"]) as s:
        everything = {t.name: t for t in (await s.list_tools()).tools}
    assert {"release_status", "drift_reports", "model_versions", "eval_results", "prompt_diff", "retrieve",
            "prompt_read"} <= set(everything)
    assert "memory_write" not in everything and "calculator" not in everything
    rollback = everything["release_rollback"]
    assert rollback.annotations.destructive_hint is True and rollback.annotations.read_only_hint is False
    assert everything["release_status"].annotations.read_only_hint is True
    assert rollback.input_schema["required"] == ["name"]

    async with Session(api, api.keys["chat"]) as s:
        assert {t.name for t in (await s.list_tools()).tools} == {"retrieve", "memory_search"}
        refused = await s.call_tool("release_list", {})
        assert refused.is_error  # not listed, not callable

    async with Session(api, api.keys["ops"]) as s:
        names = {t.name for t in (await s.list_tools()).tools}
        assert "release_start" in names and "drift_check" in names and "eval_run" in names
        assert not names & {"model_promote", "prompt_promote", "retrieve"}
        listed = await s.call_tool("release_list", {})
        assert not listed.is_error and listed.structured_content == {"result": []}


async def test_bad_arguments_and_unknown_things_come_back_as_tool_errors_that_say_what_to_fix(api: ApiServer
                                                                                             ) -> None:
    async with Session(api, api.keys["ops"]) as s:
        bad = await s.call_tool("release_status", {"name": 42})
        assert bad.is_error and bad.structured_content["error"]["code"] == "tool_input_invalid"
        assert "argument 'name' must be string" in bad.content[0].text
        missing = await s.call_tool("release_status", {"name": "nope"})
        assert missing.is_error and missing.structured_content["error"]["code"] == "release_not_found"
        spec = await s.call_tool("release_start", {"spec": {"name": "x", "strategy": "sideways"}})
        assert spec.is_error and "strategy" in spec.content[0].text


async def test_every_call_is_audited_with_the_key_that_made_it(api: ApiServer) -> None:
    ops_id = next(k.id for k in api.container.keys.list() if k.name == "ops")
    async with Session(api, api.keys["ops"]) as s:
        await s.call_tool("drift_reports", {"limit": 3})
    async with httpx.AsyncClient(base_url=api.url, headers=api.h("admin")) as client:
        r = await client.get("/v1/admin/audit", params={"trail": "tools", "actor": ops_id, "subject": "drift_reports"})
    assert r.status_code == 200, r.text
    event = r.json()[0]
    assert event["action"] == "tool.call" and event["details"]["ok"] is True
    assert json.loads(event["details"]["args"]) == {"limit": 3} and event["request_id"].startswith("mcp-")


def test_a_bad_key_is_a_401_and_no_tool_runs(api: ApiServer) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}
    r = httpx.post(f"{api.url}/mcp", json=body, headers={"Authorization": "Bearer keel-nope", **accept})
    assert r.status_code == 401 and "invalid_token" in r.headers["www-authenticate"]
    assert httpx.post(f"{api.url}/mcp", json=body, headers=accept).status_code == 401


def test_mcp_off_is_a_clear_404(tmp_path: Path) -> None:
    server = ApiServer(tmp_path, settings={**SETTINGS, "mcp": {"enabled": False}},
                       backends={"local": ScriptedBackend()}, keys={"admin": ["admin"]}).start()
    try:
        r = httpx.post(f"{server.url}/mcp", json={}, headers=server.h("admin"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "mcp_off"
    finally:
        server.stop()


# -- the server object, in-process -------------------------------------------------------------------


def _registry() -> ToolRegistry:
    reg = ToolRegistry(builtin_tools())
    reg.register(LifecycleTool("rel_read", "reads", {"type": "object", "properties": {}}, lambda a, c: {"n": 1},
                               scope="releases", title="Read"))
    reg.register(LifecycleTool("rel_change", "changes", {"type": "object", "properties": {}}, lambda a, c: "done",
                               scope="releases", risky=True, read_only=False, title="Change"))
    return reg


def _context(principal: str, scopes: frozenset[str] | None) -> ToolContext:
    return ToolContext(principal=principal, scopes=scopes)


async def test_a_stdio_server_for_a_key_refuses_what_the_key_may_not_do() -> None:
    from fastmcp import Client

    chat_only = build_server(_registry(), _context, identity=("key-1", frozenset({"chat"})))
    async with Client(chat_only) as c:
        r = await c.call_tool("rel_read", {}, raise_on_error=False)
        assert r.is_error and "needs an API key with the 'releases' scope" in r.content[0].text
    operator = build_server(_registry(), _context)
    async with Client(operator) as c:
        tools = {t.name: t for t in await c.list_tools()}
        assert set(tools) == {"rel_read", "rel_change", "retrieve", "memory_search", "prompt_read"}
        assert tools["rel_change"].annotations.destructive_hint and tools["rel_read"].annotations.read_only_hint
        assert (await c.call_tool("rel_read", {})).structured_content == {"n": 1}
        assert (await c.call_tool("rel_change", {})).structured_content == {"result": "done"}
