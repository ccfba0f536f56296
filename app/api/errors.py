"""One place where errors become HTTP responses (OpenAI-style bodies, stable codes)."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.endpoints import allowed_methods
from app.core.errors import KeelError, RateLimited

log = logging.getLogger("keel.api")

_HTTP_CODES = {
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("payload_too_large", "invalid_request_error"),
}


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def keel_error_body(exc: KeelError) -> dict:
    return error_body(exc.message, exc.type, exc.code, exc.param)


def _count(request: Request, code: str) -> None:
    container = getattr(request.app.state, "keel", None)
    if container is not None:
        container.metrics.errors.labels(code).inc()


def describe_validation(exc: RequestValidationError | ValidationError) -> tuple[str, str | None, str]:
    """Turn pydantic's error list (a request body's, or a batch line's) into one sentence that says what to fix."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return f"request body is not valid JSON ({detail})".replace(" ()", ""), None, "invalid_json"
    parts = []
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "is required"
        elif e.get("type") == "model_attributes_type":
            msg = "must be a JSON object"
        parts.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    return "invalid request: " + "; ".join(parts) + more, ".".join(first) or None, "invalid_request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KeelError)
    async def _keel(request: Request, exc: KeelError) -> JSONResponse:
        _count(request, exc.code)
        headers = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        if exc.status >= 500:
            log.warning("request %s failed: %s (%s)", _rid(request), exc.message, exc.code)
        return JSONResponse(keel_error_body(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = describe_validation(exc)
        _count(request, code)
        return JSONResponse(error_body(message, "invalid_request_error", code, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, type_ = _HTTP_CODES.get(exc.status_code, ("http_error", "invalid_request_error"))
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request.app.routes, request.url.path)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        _count(request, code)
        return JSONResponse(error_body(message, type_, code), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in request %s", _rid(request))
        _count(request, "internal_error")
        return JSONResponse(
            error_body(f"internal error; quote request id {_rid(request)} when reporting it",
                       "server_error", "internal_error"),
            status_code=500,
        )


def _rid(request: Request) -> str:
    return getattr(request.state, "request_id", "-")
