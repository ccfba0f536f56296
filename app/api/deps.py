"""FastAPI dependencies: the service container, authentication and scopes."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, Request

from app.container import Container
from app.core.errors import PermissionDenied, Unauthenticated
from app.security.keys import SCOPES, ApiKey

DEV_PRINCIPAL = ApiKey(
    id="dev", name="dev-mode (auth disabled)", scopes=frozenset({"admin"}), rate_limit_per_minute=None,
    created_at="",
)


# Dependencies are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a worker
# thread, and three thread hops per request showed up in the TTFT benchmark.


async def get_container(request: Request) -> Container:
    return request.app.state.keel


async def authenticate(request: Request, container: Container = Depends(get_container)) -> ApiKey:
    """Resolve the caller's API key from ``Authorization: Bearer`` (or ``X-API-Key``) and rate-limit it."""
    if not container.settings.auth.enabled:
        return DEV_PRINCIPAL
    raw = _bearer(request)
    if raw is None:
        raise Unauthenticated(
            "missing API key: send 'Authorization: Bearer <key>' (create one with `keel keys create`)"
        )
    key = container.keys.verify(raw)
    if key is None:
        raise Unauthenticated("invalid or revoked API key")
    limit = key.rate_limit_per_minute or container.settings.auth.default_rate_limit_per_minute
    container.rate_limiter.check(key.id, limit)
    request.state.api_key_id = key.id
    return key


def require_scope(scope: str) -> Callable[..., ApiKey]:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def dependency(key: ApiKey = Depends(authenticate)) -> ApiKey:
        if not key.allows(scope):
            raise PermissionDenied(
                f"this API key lacks the '{scope}' scope (it has: {', '.join(sorted(key.scopes))})"
            )
        return key

    return dependency


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key")
