"""Tools from external MCP servers (``mcp.servers``), for Keel's agents.

Each configured server is connected once, when the services start (one MCP session held for the process's
life; fastmcp's client), and each of its tools becomes a registry tool named ``<server>__<tool>`` with the
server's own JSON Schema: the executor validates the arguments, checks the run's key against the server's
``scope``, audits the call, and a risky one (by default: any tool the server does not annotate
``readOnlyHint``) pauses the run for approval like Keel's own. A server that does not answer at start is
logged and left out; one that fails later gives the agent an error observation, never a crash.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from agents.tools import ToolContext, ToolOutput
from app.core.errors import BackendUnavailable, KeelError
from lifecycle.tools.settings import McpServerSettings

log = logging.getLogger("keel.mcp")
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class RemoteTool:
    """One tool of an external MCP server, called through the server's held session."""

    name: str
    description: str
    input_schema: dict[str, Any]
    risky: bool
    scope: str
    server: RemoteServer
    remote_name: str
    read_only: bool = False
    shadow_safe: bool = False  # a shadow run may call it (read_only and the server's settings say shadow: true)
    title: str = ""
    tags: tuple[str, ...] = ("mcp",)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        return await self.server.call(self.remote_name, args)


@dataclass
class RemoteServer:
    name: str
    settings: McpServerSettings
    client: Any = None
    tools: list[RemoteTool] = field(default_factory=list)
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def _transport(self) -> Any:
        from fastmcp.client import StdioTransport, StreamableHttpTransport

        s = self.settings
        if s.url is not None:
            return StreamableHttpTransport(s.url, headers={k: v.get_secret_value() for k, v in s.headers.items()})
        command, *args = s.command or []
        return StdioTransport(command, args, env=dict(s.env), keep_alive=True)

    async def connect(self) -> RemoteServer:
        from fastmcp import Client

        s = self.settings
        self.client = await self._stack.enter_async_context(Client(self._transport(), timeout=s.timeout_s,
                                                                    init_timeout=s.timeout_s))
        for t in await self.client.list_tools():
            ann = t.annotations
            read_only = bool(ann and ann.read_only_hint)
            risky = s.approval == "always" or (s.approval == "unless_read_only" and not read_only)
            self.tools.append(RemoteTool(
                name=f"{self.name}__{_NAME.sub('_', t.name)}"[:128],
                description=f"[{self.name}] {t.description or t.name}"[:1000],
                input_schema=dict(t.input_schema or {"type": "object"}), risky=risky, scope=s.scope, server=self,
                remote_name=t.name, read_only=read_only and not risky, shadow_safe=s.shadow,
                title=(ann.title if ann else None) or t.name,
                tags=("mcp", self.name)))
        return self

    async def call(self, tool: str, args: dict[str, Any]) -> ToolOutput:
        try:
            result = await self.client.call_tool(tool, args, raise_on_error=False)
        except Exception as e:  # the server went away or timed out: the agent reads it, the executor may retry
            raise BackendUnavailable(f"MCP server {self.name!r} did not answer {tool}: {e}") from e
        text = "\n".join(getattr(c, "text", "") for c in result.content or [] if getattr(c, "text", None))
        if result.is_error:
            raise RemoteToolError(f"{self.name}/{tool}: {text or 'the tool failed'}")
        return ToolOutput(text or str(result.structured_content or ""), result.structured_content)

    async def aclose(self) -> None:
        await self._stack.aclose()


class RemoteToolError(KeelError):
    """The external tool answered with an error: its word, returned to the agent, not retried."""

    code = "mcp_tool_error"
    status = 422
    type = "invalid_request_error"


async def connect_servers(servers: dict[str, McpServerSettings]) -> list[RemoteServer]:
    """Every configured server that answers, connected, with its tools listed."""
    out = []
    for name, settings in servers.items():
        server = RemoteServer(name, settings)
        try:
            out.append(await server.connect())
            log.info("MCP server %s: %d tool(s)", name, len(server.tools))
        except Exception as e:  # one server down must not keep Keel from starting
            log.warning("MCP server %s is left out: it did not answer (%s: %s)", name, type(e).__name__, e)
            with contextlib.suppress(Exception):
                await server.aclose()
    return out
