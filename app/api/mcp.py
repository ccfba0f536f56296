"""``/mcp``: Keel's tools over MCP's streamable HTTP (:mod:`lifecycle.tools.mcp`), on the API's port, keys and
scopes. The MCP app is built in the lifespan, once the container is; until then (or with ``mcp.enabled``
false) the endpoint answers in the API's own error shape."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send


class McpEndpoint:
    """Hands each request to the app the lifespan started (``app.state.mcp``), path and all."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        running = getattr(scope["app"].state, "mcp", None)
        if running is None or not running.ready.is_set():
            response = JSONResponse(status_code=404, content={"error": {
                "message": "MCP is not served here: it is off (mcp.enabled) or the server is starting",
                "type": "invalid_request_error", "param": None, "code": "mcp_off"}})
            await response(scope, receive, send)
            return
        await running.app(scope, receive, send)


class RunningMcp:
    """The MCP app with its lifespan (the SDK's session manager: an anyio task group) held open by one task of
    its own, so that it is entered and left in the same task whoever starts and stops the API."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _hold(self) -> None:
        async with self.app.lifespan(self.app):
            self.ready.set()
            await self._stop.wait()

    async def start(self) -> RunningMcp:
        self._task = asyncio.create_task(self._hold(), name="keel-mcp")
        waiter = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not self.ready.is_set():
            waiter.cancel()
            self._task.result()  # the lifespan failed: say why
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
