"""The app's endpoints, flat: what the OpenAPI document, the 405 handler and the route audits walk."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fastapi.dependencies.models import Dependant


def endpoints(routes: Iterable[Any]) -> Iterator[Any]:
    """Every endpoint route, through included routers (FastAPI 0.16x keeps them behind effective contexts)."""
    for r in routes:
        if hasattr(r, "effective_candidates"):
            yield from endpoints(r.effective_candidates())
        elif isinstance(getattr(r, "dependant", None), Dependant) and getattr(r, "methods", None):
            yield r


def allowed_methods(routes: Iterable[Any], path: str) -> list[str]:
    """The methods some endpoint answers at ``path`` (the ``Allow`` of a 405: every route of the path, not only
    the first that matched; HEAD wherever GET is)."""
    methods: set[str] = set()
    for route in endpoints(routes):
        if route.path_regex.match(path):
            methods |= set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
