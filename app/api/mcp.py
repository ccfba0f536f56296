"""``/mcp``: Keel's tools over MCP's streamable HTTP (:mod:`lifecycle.tools.mcp`), on the API's port, keys and
scopes. The MCP app is built in the lifespan, once the container is; until then (or with ``mcp.enabled``
false) the endpoint answers in the API's own error shape."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send


class McpEndpoint:
    """Hands each request to the app the lifespan built (``app.state.mcp``), path and all."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        mcp = getattr(scope["app"].state, "mcp", None)
        if mcp is None:
            response = JSONResponse(status_code=404, content={"error": {
                "message": "MCP is not served here: it is off (mcp.enabled) or the server is starting",
                "type": "invalid_request_error", "param": None, "code": "mcp_off"}})
            await response(scope, receive, send)
            return
        await mcp(scope, receive, send)
