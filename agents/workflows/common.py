"""What every workflow shares: dependencies, the node wrapper (events, timeout), prompts, grounding."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agents.errors import MalformedOutput, NodeTimeout
from agents.events import NodeFinished, NodeStarted, Token, ToolResult
from agents.llm import LLM
from agents.settings import AgentSettings
from agents.tools import ToolContext, ToolObservation, ToolRegistry, execute
from app.core.types import ChatMessage

log = logging.getLogger("keel.agents")

IDK = "I don't know based on the provided documents."

Emit = Callable[[Any], None]
NodeFn = Callable[[dict[str, Any], "Deps", Emit], Awaitable[dict[str, Any]]]


@dataclass
class Deps:
    """Everything a node may use. Unit tests build one with a scripted LLM and fakes."""

    llm: LLM
    tools: ToolRegistry
    settings: AgentSettings = field(default_factory=AgentSettings)
    retriever: Any = None
    memory: Any = None
    prompts: Any = None
    collection: str | None = None

    def tool_context(self, state: dict[str, Any]) -> ToolContext:
        ns = tuple(state.get("namespace") or ("users", "anonymous"))
        search = tuple(tuple(n) for n in state.get("search_namespaces") or [ns])
        return ToolContext(run_id=state.get("run_id", ""), thread_id=state.get("thread_id", ""), namespace=ns,
                           search_namespaces=search, retriever=self.retriever, collection=self.collection,
                           top_k=self.settings.top_k, memory=self.memory, prompts=self.prompts,
                           principal=state.get("principal") or "",
                           scopes=frozenset(scopes) if (scopes := state.get("scopes")) is not None else None,
                           shadow=bool(state.get("shadow")))

    async def call_tool(self, state: dict[str, Any], tool: str, args: dict[str, Any], emit: Emit, node: str,
                        call_id: str | None = None) -> ToolObservation:
        retries = 0 if self.tools.is_risky(tool) else self.settings.tool_retries  # never repeat a side effect
        return await execute(self.tools, tool, args, self.tool_context(state), emit=emit, node=node,
                             call_id=call_id, retries=retries, timeout_s=self.settings.tool_timeout_s)

    async def decide(self, messages: list[ChatMessage], schema: dict[str, Any]) -> dict[str, Any] | None:
        """A structured decision, or None when the model's output is unusable (never raises for that)."""
        try:
            out = await self.llm.complete(messages, schema, max_tokens=self.settings.decision_max_tokens,
                                          temperature=0.0)
        except MalformedOutput:
            return None
        return out if isinstance(out, dict) else None

    async def stream_text(self, messages: list[ChatMessage], state: dict[str, Any], node: str, emit: Emit,
                          max_tokens: int | None = None) -> str:
        parts = []
        async for text in self.llm.stream(messages, max_tokens=max_tokens or self.settings.answer_max_tokens,
                                          temperature=0.0):
            parts.append(text)
            emit(Token(state.get("run_id", ""), node, text))
        return "".join(parts).strip()


def _writer() -> Emit:
    try:
        from langgraph.config import get_stream_writer

        return get_stream_writer()
    except Exception:  # outside a graph (unit tests calling the wrapped node directly)
        return lambda _e: None


def wrap(name: str, fn: NodeFn, deps: Deps) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """A LangGraph node from ``fn(state, deps, emit)``: node events, step counter, timeout."""

    async def node(state: dict[str, Any]) -> dict[str, Any]:
        emit = _writer()
        step = int(state.get("step") or 0) + 1
        run_id = state.get("run_id", "")
        emit(NodeStarted(run_id, name, step))
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(deps.settings.node_timeout_s):
                update = await fn(state, deps, emit)
        except TimeoutError:
            raise NodeTimeout(f"node {name!r} took longer than {deps.settings.node_timeout_s:g} s") from None
        update = dict(update or {})
        summary = str(update.pop("_summary", ""))
        update["step"] = step
        emit(NodeFinished(run_id, name, step, round((time.perf_counter() - t0) * 1000, 2), summary))
        return update

    node.__name__ = name.replace("-", "_")
    return node


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:12]}"


# -- prompts ----------------------------------------------------------------------------------


def template_messages(deps: Deps, ref: str, variables: dict[str, Any]) -> list[ChatMessage] | None:
    """Render a registry template's messages, or None when there is no registry or the template is
    missing/broken: the caller then uses its built-in copy, so an edited prompt can never break a run."""
    if deps.prompts is None:
        return None
    try:
        rendered = deps.prompts.render(ref, variables)
    except Exception as e:
        log.warning("prompt %s unavailable (%s); using the built-in copy", ref, e)
        return None
    return [ChatMessage(m.role, m.content) for m in rendered.messages]


def answer_messages(deps: Deps, question: str, passages: list[dict[str, Any]], *,
                    history: list[dict[str, Any]] | None = None, extra: str | None = None,
                    max_words: int = 80) -> list[ChatMessage]:
    """The ``rag-answer`` template from the registry (built-in copy when there is no registry)."""
    msgs = template_messages(deps, "rag-answer@production", {
        "question": question, "max_words": max_words,
        "passages": [{"text": p.get("text", ""), "title": p.get("title", "")} for p in passages]})
    if msgs is None:
        numbered = "\n".join(f"[{i}] {p.get('title') + ': ' if p.get('title') else ''}{p.get('text', '')}"
                             for i, p in enumerate(passages, 1))
        msgs = [
            ChatMessage("system", "You answer questions using only the numbered passages the user provides. "
                        "Cite passages like [1]. If the passages do not contain the answer, reply exactly: "
                        f"\"{IDK}\" Answer in at most {max_words} words."),
            ChatMessage("user", f"Passages:\n{numbered}\n\nQuestion: {question}"),
        ]
    if history:
        prior = []
        for turn in history[-2:]:
            prior += [ChatMessage("user", turn.get("question", "")), ChatMessage("assistant", turn.get("answer", ""))]
        msgs = msgs[:1] + prior + msgs[1:]
    if extra:
        msgs.append(ChatMessage("user", extra))
    return msgs


# -- grounding --------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("""
a an the and or but if of to in on at by for with from as is are was were be been being this that these those
it its they them their there here what which who whom whose when where why how not no yes do does did done can
could should would may might will shall about into over under than then also such only very more most some any
each all both other passage passages document documents answer question based provided according
""".split())  # noqa: SIM905
_CITE = re.compile(r"\[(\d{1,2})\]")


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOP and not w.isdigit()} | {
        w for w in _WORD.findall(text.lower()) if w.isdigit() and len(w) > 1}


def is_idk(text: str) -> bool:
    t = text.lower().replace("\u2019", "'")
    return not t.strip() or "don't know" in t or "do not know" in t or "cannot answer" in t or "no information" in t


def support(answer: str, passages: list[dict[str, Any]]) -> float:
    """Share of the answer's content words found in the passages (0..1)."""
    words = content_words(_CITE.sub(" ", answer))
    if not words:
        return 0.0
    pool = content_words(" ".join(p.get("text", "") + " " + p.get("title", "") for p in passages))
    return len(words & pool) / len(words)


def cited_indices(answer: str, n: int) -> list[int]:
    seen: list[int] = []
    for m in _CITE.finditer(answer):
        i = int(m.group(1))
        if 1 <= i <= n and i not in seen:
            seen.append(i)
    return seen


def citations_for(answer: str, passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Passages the answer cites as [n]; all passages that support it when it cites none."""
    idx = cited_indices(answer, len(passages))
    if not idx:
        words = content_words(answer)
        idx = [i for i, p in enumerate(passages, 1) if words & content_words(p.get("text", ""))] or (
            [1] if passages else [])
    return [{"index": i, "source": passages[i - 1].get("source", ""), "title": passages[i - 1].get("title", ""),
             "label": passages[i - 1].get("label", passages[i - 1].get("title", "")),
             "chunk_id": passages[i - 1].get("chunk_id", ""), "page": passages[i - 1].get("page"),
             "text": passages[i - 1].get("text", "")} for i in idx]


# -- the tools node: the one place a risky side effect happens -------------------------------------


async def tools_node(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    """Run ``state.pending_call``. A risky tool first pauses the run with ``interrupt()``; in a release's
    shadow run (``state.shadow``) nothing pauses and a call that can change something is not executed.

    LangGraph re-runs this node from its start on resume, so nothing before ``interrupt()`` has a
    side effect; the tool runs only after the human's decision, once. The decision is
    ``{"action": "approve"}``, ``{"action": "reject", "reason": ...}`` or
    ``{"action": "edit", "args": {...}}``; a rejection reaches the agent as an observation.
    """
    call = state.get("pending_call")
    if not call:
        return {"_summary": "nothing to run"}
    tool, args, call_id = call["tool"], dict(call.get("args") or {}), call.get("call_id") or new_call_id()
    observations = list(state.get("observations") or [])
    if deps.tools.is_risky(tool) and not state.get("shadow"):  # a shadow never waits: the call is not executed
        from langgraph.types import interrupt

        decision = interrupt({"kind": "approval", "call_id": call_id, "tool": tool, "args": args,
                              "reason": call.get("reason", ""), "node": "tools"})
        decision = decision if isinstance(decision, dict) else {"action": str(decision)}
        action = decision.get("action", "approve")
        if action == "reject":
            reason = decision.get("reason") or "no reason given"
            obs = {"call_id": call_id, "tool": tool, "args": args, "ok": False, "error_code": "rejected",
                   "output": f"a human rejected this call: {reason}", "data": None, "attempts": 0}
            emit(ToolResult(state.get("run_id", ""), call_id, tool, False, obs["output"], 0, 0.0))
            return {"observations": [*observations, obs], "pending_call": None,
                    "_summary": f"{tool} rejected: {reason}"}
        if action == "edit":
            args = dict(decision.get("args") or {})
    obs_ = await deps.call_tool(state, tool, args, emit, "tools", call_id=call_id)
    return {"observations": [*observations, obs_.to_state()], "pending_call": None,
            "_summary": f"{tool}: {'ok' if obs_.ok else obs_.output[:80]}"}
