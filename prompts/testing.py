"""Helpers for tests of the prompt registry (here, not in conftest, so other suites can use them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    settings.setdefault("seed_library", False)
    return PromptRegistry(SqlitePromptStore(path), PromptSettings(**settings))


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
