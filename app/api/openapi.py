"""The OpenAPI document as the server behaves: every error status a route can answer, with Keel's error body.

FastAPI documents a 422 with its own validation schema for any route with parameters; Keel answers a bad request
with a 400 and its OpenAI-style error body instead (``app.api.errors``), and every authenticated route can also
answer 401 (no or a bad key), 429 (the key's rate limit) and, behind a scope, 403; a route with a path parameter
can answer 404 (nothing by that id or name). Routes declare their other domain errors (409, a 404 without a path
parameter, ...) with :func:`error_responses`; :func:`document_errors` adds the ones every route
shares, from what the route depends on, so the document cannot forget a route.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from pydantic.json_schema import models_json_schema

from app.api.deps import authenticate
from app.api.endpoints import endpoints
from app.api.schemas import ErrorResponse

_REF = "#/components/schemas/{model}"
_SHARED = {
    400: "Invalid request: a parameter or the body does not match the schema (the message names the field).",
    401: "Missing, invalid or revoked API key.",
    403: "The API key lacks the scope this route needs (the message names it).",
    404: "Nothing with that id or name (the message names it).",
    429: "Over the API key's rate limit (Retry-After says when to try again).",
}


def error_responses(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: each status with Keel's error body and what it means there."""
    return {status: {"model": ErrorResponse, "description": what} for status, what in descriptions.items()}


def _calls(dependant: Dependant) -> Iterator[Any]:
    for d in dependant.dependencies:
        yield d.call
        yield from _calls(d)


def _shared(route: Any) -> list[int]:
    d: Dependant = route.dependant
    calls = list(_calls(d))
    out = [400] if (d.query_params or d.path_params or d.body_params or d.header_params) else []
    if d.path_params:
        out.append(404)
    if authenticate in calls:
        out += [401, 429]
    if any(getattr(c, "keel_scope", None) for c in calls):
        out.append(403)
    return out


def document_errors(app: FastAPI) -> None:
    """Document the shared error statuses on every route that can answer them, and drop FastAPI's 422."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        _, defs = models_json_schema([(ErrorResponse, "serialization")], ref_template=_REF)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        error = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}
        for route in endpoints(app.routes):
            path = schema.get("paths", {}).get(route.path_format, {})
            for method in route.methods:
                operation = path.get(method.lower())
                if operation is None:
                    continue
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status in _shared(route):
                    responses.setdefault(str(status), {"description": _SHARED[status], "content": error})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
