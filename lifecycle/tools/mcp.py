"""Keel's tools as an MCP server (fastmcp): the lifecycle tools, retrieval and prompt reads, over stdio
(``keel mcp serve``) and streamable HTTP (``/mcp`` on the API).

One registry, one executor: an MCP call runs through :func:`agents.tools.execute` exactly as an agent's tool
call does — the arguments checked against the tool's JSON Schema, the caller's scopes checked against the
tool's, errors returned as the tool's result (``isError``, with the message saying what to fix), every call
on the ``tools`` audit trail.

Who calls: over HTTP the API key (``Authorization: Bearer``) decides it, as on every other route — a bad key
is a 401, a key sees only the tools its scopes allow (``tools/list`` is filtered, and a call of another tool
is refused). Over stdio the server acts for the key given to ``keel mcp serve --key`` (or ``KEEL_API_KEY``),
or, without one, for the operator who started it (unscoped, like the other ``keel`` commands on the
server's own home). Risky tools (they change what serves traffic, or spend a GPU) carry
``destructiveHint``, which MCP hosts use to ask their user before calling; read-only ones ``readOnlyHint``.

Stateless HTTP with JSON responses: any API process can answer any request, so the endpoint scales out
with the API.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

from agents.tools import Tool, ToolContext, ToolRegistry, execute
from app.core.errors import KeelError
from app.security.keys import scope_allows

#: The built-in tools MCP clients get, with the scope each needs (the others — memory writes, the
#: calculator — are an agent's own business).
BUILTIN_SCOPES = {"retrieve": "chat", "memory_search": "chat", "prompt_read": "prompts:read"}

#: ``verify(raw_key)`` -> (key id, scopes), or None for a bad or revoked key.
Verify = Callable[[str], "tuple[str, frozenset[str]] | None"]
#: ``context(principal, scopes)`` -> the ToolContext a call runs with (retriever, memory namespace, ...).
ContextFactory = Callable[[str, "frozenset[str] | None"], ToolContext]


def served_tools(registry: ToolRegistry) -> dict[str, tuple[Tool, str | None]]:
    """The tools an MCP client may see, each with the scope it needs."""
    out: dict[str, tuple[Tool, str | None]] = {}
    for tool in registry.tools():
        scope = getattr(tool, "scope", None)
        if scope is not None:
            out[tool.name] = (tool, scope)
        elif tool.name in BUILTIN_SCOPES:
            out[tool.name] = (tool, BUILTIN_SCOPES[tool.name])
    return out


def build_server(registry: ToolRegistry, context: ContextFactory, *, verify: Verify | None = None,
                 identity: tuple[str, frozenset[str] | None] | None = None,
                 check_rate: Callable[[str], None] | None = None, retries: int = 1) -> Any:
    """The MCP server over ``registry``'s tools.

    ``verify``: HTTP with API keys (each request's bearer token decides who calls). Without it every call
    acts as ``identity`` (principal, scopes; None scopes: unscoped): stdio, or an API with auth off.
    ``check_rate(principal)`` raises :class:`~app.core.errors.RateLimited` past the key's limit.
    """
    from fastmcp import FastMCP
    from fastmcp.server.auth import AccessToken, AuthContext, TokenVerifier
    from fastmcp.server.dependencies import get_access_token
    from fastmcp.server.middleware import AuthMiddleware
    from fastmcp.tools import Tool as McpTool
    from fastmcp.tools import ToolResult
    from mcp_types import ToolAnnotations

    tools = served_tools(registry)
    fixed = identity or ("operator", None)

    def caller() -> tuple[str, frozenset[str] | None]:
        if verify is None:
            return fixed
        token = get_access_token()
        if token is None:  # the HTTP layer let no request through without one; fail closed all the same
            return "", frozenset()
        return token.client_id, frozenset(token.scopes)

    class RegistryTool(McpTool):
        """One registry tool: its own JSON Schema, run through the registry's executor."""

        keel_name: str

        async def run(self, arguments: dict[str, Any]) -> ToolResult:
            principal, scopes = caller()
            ctx = context(principal, scopes)
            ctx.request_id = f"mcp-{uuid.uuid4().hex[:16]}"
            if check_rate is not None and principal:
                try:
                    await asyncio.to_thread(check_rate, principal)  # a shared limit is a database round trip
                except KeelError as e:
                    return ToolResult(content=f"error: {e}", is_error=True)
            name = self.keel_name
            obs = await execute(registry, name, arguments or {}, ctx,
                                retries=0 if registry.is_risky(name) else retries)
            if not obs.ok:
                return ToolResult(content=obs.output, structured_content={"error": {
                    "code": obs.error_code, "message": obs.output.removeprefix("error: ")}}, is_error=True)
            data = obs.data if isinstance(obs.data, dict) else {"result": _jsonable(obs.data)}
            return ToolResult(content=obs.output, structured_content=data)

    def allowed(ctx: AuthContext) -> bool:
        if verify is None:
            return True  # identity decides, checked by the executor on each call
        scope = tools.get(ctx.component.name, (None, None))[1] if hasattr(ctx.component, "name") else None
        return ctx.token is not None and (scope is None or scope_allows(ctx.token.scopes, scope))

    class KeyVerifier(TokenVerifier):
        async def verify_token(self, token: str) -> AccessToken | None:
            found = await asyncio.to_thread(verify, token) if verify is not None else None  # may read the store
            if found is None:
                return None
            key_id, scopes = found
            return AccessToken(token=token, client_id=key_id, scopes=sorted(scopes))

    server = FastMCP("keel", instructions=(
        "Keel's LLMOps lifecycle: releases (A/B, canary, shadow, blue/green), drift and traces, the model "
        "registry and experiments, eval runs and gate verdicts, fine-tuning jobs, prompt versions, and document "
        "retrieval. Tools marked destructive change what serves production: confirm with the user first."),
        auth=KeyVerifier() if verify is not None else None,
        middleware=[AuthMiddleware(auth=allowed)] if verify is not None else None)
    for name, (tool, _scope) in sorted(tools.items()):
        risky = registry.is_risky(name)
        read_only = registry.changes_nothing(name)
        server.add_tool(RegistryTool(
            name=name, keel_name=name, description=tool.description, parameters=tool.input_schema,
            tags=set(getattr(tool, "tags", ())),
            annotations=ToolAnnotations(title=getattr(tool, "title", "") or name.replace("_", " ").capitalize(),
                                        read_only_hint=read_only, destructive_hint=risky,
                                        idempotent_hint=read_only, open_world_hint=False)))
    return server


def http_app(server: Any) -> Any:
    """The streamable-HTTP ASGI app at ``/mcp`` (stateless, JSON responses). Its ``lifespan`` must run."""
    return server.http_app(path="/mcp", stateless_http=True, json_response=True)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
