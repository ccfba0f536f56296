"""Helpers for tests of the prompt registry (here, not in conftest, so other suites can use them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.llm.routing import RoutingTable, SqliteRoutingStore
from prompts.models import TemplateContent
from prompts.registry import GateVerdict, PromptRegistry
from prompts.settings import PromptSettings
from prompts.store import SqlitePromptStore


def content(*messages: tuple[str, str] | str, variables: list[dict[str, Any]] | None = None,
            **params: Any) -> TemplateContent:
    """``content("Hi {{ name }}", variables=[{"name": "name"}])``; a bare string is a user message."""
    msgs = [{"role": "user", "content": m} if isinstance(m, str) else {"role": m[0], "content": m[1]}
            for m in messages]
    return TemplateContent.model_validate(
        {"messages": msgs, "variables": variables or [], "params": params}
    )


def sqlite_registry(path: Path, **settings: Any) -> PromptRegistry:
    """A registry on the SQLite file ``path``, its labels in a routing table beside it (``<stem>.routing.db``):
    two registries on one path see each other's versions and labels, like two processes on one Keel home."""
    settings.setdefault("seed_library", False)
    routes = RoutingTable({}, {}, SqliteRoutingStore(Path(path).with_suffix(".routing.db")), check_interval_s=0.0)
    return PromptRegistry(SqlitePromptStore(path), PromptSettings(**settings), routes=routes, owns_routes=True)


class RecordingGate:
    """A promotion gate for tests: passes versions in ``allow``, records every call."""

    def __init__(self, allow: set[int] | None = None, reason: str = "eval score 0.41 < 0.80") -> None:
        self.allow = allow or set()
        self.reason = reason
        self.calls: list[tuple[str, int]] = []

    def __call__(self, template_name: str, version: int) -> GateVerdict:
        self.calls.append((template_name, version))
        if version in self.allow:
            return GateVerdict(passed=True, reason="evals passed", details={"score": 0.93})
        return GateVerdict(passed=False, reason=self.reason, details={"score": 0.41})
