"""Settings of the ``mcp`` section: Keel's tools served over the Model Context Protocol."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from app.security.keys import SCOPES


class McpServerSettings(BaseModel):
    """An external MCP server whose tools Keel's agents may call (as ``<server>__<tool>``)."""

    url: str | None = Field(default=None, description="Streamable-HTTP endpoint, e.g. https://tools.example/mcp.")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description=(
        "Sent with every HTTP request (e.g. Authorization); kept out of logs and `keel config`."))
    command: list[str] | None = Field(default=None, description="stdio: the command that starts the server.")
    env: dict[str, str] = Field(default_factory=dict, description="stdio: its environment (nothing else is passed).")
    scope: str = Field(default="chat", description="The API-key scope a run needs to call this server's tools.")
    approval: Literal["unless_read_only", "always", "never"] = Field(default="unless_read_only", description=(
        "Which of its tools pause an agent run for a person's approval: those not annotated readOnlyHint "
        "(default), all, or none."))
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Per call, and to connect at start.")
    shadow: bool = Field(default=False, description=(
        "Let a release's shadow agent runs call this server's tools annotated readOnlyHint. The hint is the "
        "server's word, not a guarantee: turn it on only for a server you trust to mark its tools truthfully "
        "(off: a shadow run reads 'not executed' for every tool of this server)."))

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSettings:
        if (self.url is None) == (self.command is None):
            raise ValueError("give an external MCP server either url (streamable HTTP) or command (stdio)")
        if self.command is not None and not self.command:
            raise ValueError("command is empty: give the program and its arguments, e.g. [npx, my-mcp-server]")
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r} is not a key scope; use one of {', '.join(SCOPES)}")
        return self


class McpSettings(BaseModel):
    """Keel as an MCP server: the lifecycle tools, retrieval and prompt reads (``lifecycle.tools.mcp``)."""

    enabled: bool = Field(default=True, description=(
        "Serve the tools over streamable HTTP at /mcp on the API (the same API keys and scopes); "
        "`keel mcp serve` serves them over stdio either way."))
    servers: dict[str, McpServerSettings] = Field(default_factory=dict, description=(
        "External MCP servers whose tools Keel's agents may use, by name (letters, digits, '-'); a server that "
        "does not answer at start is logged and left out."))

    @field_validator("servers")
    @classmethod
    def _names(cls, servers: dict[str, McpServerSettings]) -> dict[str, McpServerSettings]:
        for name in servers:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,39}", name):
                raise ValueError(f"MCP server name {name!r}: letters, digits and '-' (its tools are <name>__<tool>)")
        return servers
