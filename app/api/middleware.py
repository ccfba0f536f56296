"""Pure ASGI middleware (BaseHTTPMiddleware would buffer and slow down streamed responses)."""

from __future__ import annotations

import json
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logs import request_id
from app.core.metrics import Metrics

_RID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Routes that stream their body to disk and enforce their own, larger limit (document uploads:
# limits.max_upload_bytes). Refusing or buffering them here at max_body_bytes would defeat both.
_OWN_LIMIT = {("POST", "/v1/ingest"), ("POST", "/v1/files")}  # files: batch.max_file_bytes


class RequestContextMiddleware:
    """Request id (honours a sane ``X-Request-Id``), body size limit, request metrics."""

    def __init__(self, app: ASGIApp, metrics_getter, max_body_bytes_getter) -> None:
        self.app = app
        self._metrics = metrics_getter
        self._max_body = max_body_bytes_getter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _RID_OK.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        request_id.set(rid)  # log lines of this request carry it (app.core.logs)
        rid_header = (b"x-request-id", rid.encode())

        if (scope["method"], scope["path"]) not in _OWN_LIMIT:
            limit = self._max_body()
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _too_large(send, limit, rid_header)
                return
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                # Chunked upload: buffer it (bounded) so an oversized body is refused cleanly.
                body = bytearray()
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    body += message.get("body", b"")
                    if len(body) > limit:
                        await _too_large(send, limit, rid_header)
                        return
                    if not message.get("more_body", False):
                        break
                receive = _replay(bytes(body), receive)

        metrics: Metrics | None = self._metrics()
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if metrics is not None:
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                metrics.requests.labels(scope["method"], path, str(status)).inc()
                metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _too_large(send: Send, limit: int, rid_header: tuple[bytes, bytes]) -> None:
    body = json.dumps({"error": {
        "message": f"request body is larger than {limit} bytes (limits.max_body_bytes); send less (e.g. fewer "
                   "or shorter messages). Documents go to POST /v1/ingest, which has limits.max_upload_bytes",
        "type": "invalid_request_error", "param": None, "code": "payload_too_large",
    }}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), rid_header,
    ]})
    await send({"type": "http.response.body", "body": body})
