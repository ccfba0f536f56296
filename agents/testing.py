"""Test doubles for agents: a scripted LLM, a keyword retriever and tools with observable side effects.

Used by the unit tests and by the kill-and-restart test's child process (so they live in the
package, not in a test file).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.llm import parse_json
from app.core.types import ChatMessage
from ingest.retriever import Citation, RetrievalResult, RetrievedChunk

Response = str | dict[str, Any] | Exception
Responder = Callable[[Sequence[ChatMessage], dict[str, Any] | None], Response]


@dataclass
class ScriptedLLM:
    """Answers from ``script`` in order, or from ``responder(messages, schema)``.

    A string answer to a schema request is parsed like the real model's (invalid JSON raises
    :class:`MalformedOutput`); an ``Exception`` is raised; ``stream`` yields the text word by word.
    """

    script: list[Response] = field(default_factory=list)
    responder: Responder | None = None
    calls: list[tuple[list[ChatMessage], dict[str, Any] | None]] = field(default_factory=list)

    def _next(self, messages: Sequence[ChatMessage], schema: dict[str, Any] | None) -> Response:
        self.calls.append((list(messages), schema))
        if self.script:
            return self.script.pop(0)
        if self.responder is not None:
            return self.responder(messages, schema)
        raise AssertionError("ScriptedLLM ran out of responses")

    async def complete(self, messages: Sequence[ChatMessage], schema: dict[str, Any] | None = None, *,
                       max_tokens: int | None = None, temperature: float | None = None) -> str | dict[str, Any]:
        r = self._next(messages, schema)
        if isinstance(r, Exception):
            raise r
        if schema is None:
            return r if isinstance(r, str) else json.dumps(r)
        if isinstance(r, dict):
            return r
        return parse_json(r)

    async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int | None = None,
                     temperature: float | None = None) -> AsyncIterator[str]:
        r = self._next(messages, None)
        if isinstance(r, Exception):
            raise r
        text = r if isinstance(r, str) else json.dumps(r)
        for i, word in enumerate(text.split(" ")):
            yield word if i == 0 else " " + word


def schema_kind(schema: dict[str, Any] | None) -> str:
    """Which decision a schema asks for: 'next', 'supported', 'query', 'accepted', 'tool', 'worth_keeping'."""
    if not schema:
        return "text"
    props = schema.get("properties", {})
    for key in ("next", "supported", "query", "accepted", "tool", "worth_keeping"):
        if key in props:
            return key
    return "unknown"


class KeywordRetriever:
    """Scores canned documents by shared words; returns ``ingest.retriever.RetrievalResult``."""

    def __init__(self, docs: dict[str, str], fail: int = 0) -> None:
        self.docs = docs
        self.fail = fail
        self.queries: list[str] = []

    def retrieve(self, query: str, *, collection: str | None = None, top_k: int | None = None, **_: Any):
        self.queries.append(query)
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("vector store unreachable")
        q = {w.strip(".,?!").lower() for w in query.split() if len(w) > 2}
        scored = []
        for i, (title, text) in enumerate(self.docs.items()):
            words = {w.strip(".,?!").lower() for w in text.split()} | {title.lower()}
            s = len(q & words)
            if s:
                scored.append((s, i, title, text))
        scored.sort(key=lambda t: (-t[0], t[1]))
        chunks = [RetrievedChunk(text=text, score=float(s), citation=Citation(
            source=f"/docs/{title}.md", title=title, char_start=0, char_end=len(text), doc_id=title,
            chunk_id=f"{title}-0", chunk_index=0, snapshot_id="snap")) for s, _i, title, text in scored[: top_k or 4]]
        return RetrievalResult(query=query, collection=collection or "default", chunks=chunks, took_ms=0.1)


@dataclass
class SideEffectTool:
    """A risky tool whose every execution is recorded (in memory and, optionally, as a line in a file)."""

    name: str = "send_report"
    description: str = "Send the report to the team (irreversible)."
    input_schema: dict[str, Any] = field(default_factory=lambda: {
        "type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
        "required": ["to"], "additionalProperties": False})
    risky: bool = True
    log_path: Path | None = None
    executed: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, args: dict[str, Any], ctx: Any) -> str:
        self.executed.append(dict(args))
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps({"run_id": ctx.run_id, "args": args}) + "\n")
        return f"sent to {args['to']}"


@dataclass
class FlakyTool:
    """Raises ``failures`` times, then answers; counts attempts."""

    name: str = "flaky"
    description: str = "A tool that fails before it works."
    input_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    risky: bool = False
    failures: int = 1
    attempts: int = 0

    async def run(self, args: dict[str, Any], ctx: Any) -> str:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise RuntimeError(f"transient failure {self.attempts}")
        return "worked"
