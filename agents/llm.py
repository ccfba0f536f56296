"""The small model interface agents use, over Keel's in-process :class:`ModelRouter`.

Agents open no client of their own: every call goes through the router, so it gets the chat path's client
layer (:mod:`app.llm.clients`), retries, circuit breaker, fallback and metrics.

``complete(messages, schema=...)`` sends the JSON schema as ``response_format`` (vLLM turns it
into guided decoding), so decisions parse even from a 135M model; anything that still does not
parse raises :class:`MalformedOutput`, which every decision node handles.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from langgraph.config import get_config

from agents.errors import MalformedOutput
from app.core.types import ChatMessage, GenerationParams, GenerationRequest, ResponseFormat, TextDelta, Usage

Messages = Sequence[ChatMessage]


@runtime_checkable
class LLM(Protocol):
    async def complete(self, messages: Messages, schema: dict[str, Any] | None = None, *,
                       max_tokens: int | None = None, temperature: float | None = None) -> str | dict[str, Any]: ...

    def stream(self, messages: Messages, *, max_tokens: int | None = None,
               temperature: float | None = None) -> AsyncIterator[str]: ...


#: The key of a run's config (``configurable``) holding where its model calls report their tokens: LangGraph passes
#: a run's config to its nodes (``langgraph.config.get_config``), and a callable is never written to a checkpoint.
USAGE_KEY = "keel_usage"


def _usage_sink() -> Callable[[int], None] | None:
    try:
        return get_config().get("configurable", {}).get(USAGE_KEY)
    except RuntimeError:  # called outside a run (a workflow's test, the CLI): nothing to count against
        return None


class AgentLLM:
    """Calls a model alias through the router. ``schema`` -> parsed ``dict``; otherwise text."""

    def __init__(self, router: Any, alias: str, *, default_max_tokens: int = 256) -> None:
        self.router = router
        self.alias = alias
        self.default_max_tokens = default_max_tokens

    def _request(self, messages: Messages, schema: dict[str, Any] | None, max_tokens: int | None,
                 temperature: float | None) -> GenerationRequest:
        fmt = ResponseFormat(type="json_schema", schema=schema, name="decision") if schema else None
        params = GenerationParams(max_tokens=max_tokens or self.default_max_tokens,
                                  temperature=0.0 if temperature is None else temperature, response_format=fmt)
        return GenerationRequest(model=self.alias, messages=tuple(messages), params=params,
                                 request_id=f"agent-{uuid.uuid4().hex[:12]}")

    async def _texts(self, request: GenerationRequest) -> AsyncIterator[str]:
        """The first choice's text deltas (the router applies the backend's timeouts, retries and breaker); the
        call's tokens go to the run's usage sink (its config's :data:`USAGE_KEY`: the key's token budget)."""
        async for event in self.router.stream(self.alias, request):
            if isinstance(event, TextDelta) and event.index == 0 and event.text:
                yield event.text
            elif isinstance(event, Usage) and (sink := _usage_sink()) is not None:
                sink(event.prompt_tokens + event.completion_tokens)

    async def stream(self, messages: Messages, *, max_tokens: int | None = None,
                     temperature: float | None = None) -> AsyncIterator[str]:
        async for text in self._texts(self._request(messages, None, max_tokens, temperature)):
            yield text

    async def complete(self, messages: Messages, schema: dict[str, Any] | None = None, *,
                       max_tokens: int | None = None, temperature: float | None = None) -> str | dict[str, Any]:
        text = "".join([t async for t in self._texts(self._request(messages, schema, max_tokens, temperature))])
        return parse_json(text) if schema else text


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


def parse_json(text: str) -> dict[str, Any]:
    """The first JSON object in ``text`` (tolerating code fences and chatter), else MalformedOutput."""
    cleaned = _FENCE.sub("", text.strip())
    try:
        value = json.loads(cleaned)
    except json.JSONDecodeError:
        start = cleaned.find("{")
        value = None
        if start >= 0:
            try:
                value, _ = json.JSONDecoder().raw_decode(cleaned[start:])
            except json.JSONDecodeError:
                value = None
    if not isinstance(value, dict):
        raise MalformedOutput(f"expected a JSON object, got {text[:120]!r}")
    return value
