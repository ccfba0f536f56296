"""``keel mcp``: Keel's tools for MCP clients (Claude Desktop, IDEs, other agents) over stdio.

``keel mcp serve`` builds the services on this machine's Keel home (no model server is started: the tools are
the lifecycle's, retrieval and prompt reads) and speaks MCP on stdin/stdout; logs go to stderr. Jobs it starts
(an eval run) are queued in the home's job queue, where the running API's workers take them. The same tools
are served over HTTP at ``/mcp`` by ``keel serve``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer
from rich.console import Console

from app.cli.common import fail, settings_or_exit
from app.core.errors import KeelError

err = Console(stderr=True)
app = typer.Typer(help="MCP: serve Keel's tools to MCP clients.", no_args_is_help=True, pretty_exceptions_enable=False)


@app.command("serve")
def serve(key: Annotated[str | None, typer.Option(
        "--key", envvar="KEEL_API_KEY", help="Act for this API key: its scopes decide which tools a client sees "
        "and may call (default: the operator, unscoped)")] = None) -> None:
    """Serve the tools over stdio (for an MCP client that starts this command)."""
    os.environ.setdefault("FASTMCP_ENABLE_TELEMETRY", "false")
    settings = settings_or_exit({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    from app.container import Container  # lazy: keeps `keel --help` fast
    from app.core.logs import configure

    configure(settings.log_level, settings.log_format)  # stderr: stdout is the protocol's

    async def main() -> None:
        container = await Container.build(settings, start_backends=False)
        try:
            server = container.mcp_server(key=key)
            await server.run_stdio_async(show_banner=False)
        finally:
            await container.aclose()

    try:
        asyncio.run(main())
    except KeelError as e:
        raise fail(e) from None
    except KeyboardInterrupt:
        pass
