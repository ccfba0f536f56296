"""Settings of the ``mcp`` section: Keel's tools served over the Model Context Protocol."""

from __future__ import annotations

from pydantic import BaseModel, Field


class McpSettings(BaseModel):
    """Keel as an MCP server: the lifecycle tools, retrieval and prompt reads (``lifecycle.tools.mcp``)."""

    enabled: bool = Field(default=True, description=(
        "Serve the tools over streamable HTTP at /mcp on the API (the same API keys and scopes); "
        "`keel mcp serve` serves them over stdio either way."))
