"""``rag-qa``: retrieve -> answer -> verify groundedness -> (reformulate -> retrieve)* -> finalize.

The loop is bounded by ``agents.max_rounds``; an answer that is still unsupported after the
last round becomes "I don't know". Verification combines a deterministic check (share of the
answer's content words found in the passages) with the model's own verdict (structured output);
an unreadable verdict falls back to the deterministic check alone.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from agents.state import RagQAState
from agents.workflows.common import (
    IDK,
    Deps,
    Emit,
    answer_messages,
    citations_for,
    content_words,
    is_idk,
    support,
    wrap,
)
from app.core.types import ChatMessage

NAME = "rag-qa"
DESCRIPTION = ("Answers a question from the document store with citations: retrieve, answer, verify the answer "
               "against the passages, reformulate and retry (bounded), or say it does not know.")

VERIFY_SCHEMA = {"type": "object", "properties": {"supported": {"type": "boolean"}},
                 "required": ["supported"], "additionalProperties": False}
REFORMULATE_SCHEMA = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 200}},
                      "required": ["query"], "additionalProperties": False}


async def retrieve(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    query = state.get("query") or state["question"]
    obs = await deps.call_tool(state, "retrieve", {"query": query}, emit, "retrieve")
    passages = list(obs.data or []) if obs.ok else []
    observations = [*(state.get("observations") or []), obs.to_state()]
    if deps.memory is not None and "memory_search" in deps.tools:
        mem = await deps.call_tool(state, "memory_search", {"query": query, "limit": 2}, emit, "retrieve")
        observations.append(mem.to_state())
        for m in (mem.data or []) if mem.ok else []:
            if (m.get("score") or 0) >= deps.settings.memory_search_min_score:
                passages.append({"text": m["text"], "title": "Memory", "source": f"memory:{m['namespace']}/{m['key']}",
                                 "label": f"memory {m['namespace']}", "chunk_id": m["key"]})
    return {"passages": passages, "round": int(state.get("round") or 0) + 1, "observations": observations,
            "_summary": f"{len(passages)} passages for {query!r}" if obs.ok else obs.output}


async def answer(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    passages = state.get("passages") or []
    if not passages:
        return {"draft": IDK, "_summary": "no passages"}
    msgs = answer_messages(deps, state["question"], passages, history=state.get("history"))
    text = await deps.stream_text(msgs, state, "answer", emit)
    return {"draft": text or IDK, "_summary": f"{len(text)} chars"}


async def verify(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    draft, passages = state.get("draft", ""), state.get("passages") or []
    if is_idk(draft) or not passages:
        verdict = {"grounded": False, "support": 0.0, "model": None, "reason": "no answer"}
    else:
        score = support(draft, passages)
        numbered = "\n".join(f"[{i}] {p.get('text', '')[:500]}" for i, p in enumerate(passages, 1))
        decision = await deps.decide([
            ChatMessage("system", "You check whether an answer is supported by the passages. "
                        'Reply with JSON {"supported": true} or {"supported": false}.'),
            ChatMessage("user", f"Passages:\n{numbered}\n\nQuestion: {state['question']}\nAnswer: {draft}\n\n"
                        "Is every claim in the answer supported by the passages?"),
        ], VERIFY_SCHEMA)
        model_ok = decision.get("supported") if decision and isinstance(decision.get("supported"), bool) else None
        lexical_ok = score >= deps.settings.grounded_min_overlap
        grounded = lexical_ok and model_ok is not False
        verdict = {"grounded": grounded, "support": round(score, 3), "model": model_ok,
                   "reason": "ok" if grounded else ("model says unsupported" if lexical_ok else "low overlap")}
    return {"verdict": verdict, "grounded": verdict["grounded"],
            "_summary": f"grounded={verdict['grounded']} support={verdict['support']} model={verdict['model']}"}


async def reformulate(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    question, old = state["question"], state.get("query") or state["question"]
    decision = await deps.decide([
        ChatMessage("system", "Rewrite a search query so a document search finds the answer. "
                    'Reply with JSON {"query": "<new search query>"}.'),
        ChatMessage("user", f"Question: {question}\nPrevious query: {old}\nWrite a different, more specific query."),
    ], REFORMULATE_SCHEMA)
    query = (decision or {}).get("query")
    if not isinstance(query, str) or not query.strip() or query.strip().lower() == old.strip().lower():
        # unusable or unchanged: fall back to the question's content words
        words = sorted(content_words(question), key=len, reverse=True)
        query = " ".join(words[:8]) or question
        if query.strip().lower() == old.strip().lower():
            query = question
    return {"query": query.strip(), "_summary": f"new query {query.strip()!r}"}


async def finalize(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    grounded = bool(state.get("grounded"))
    draft = state.get("draft", "")
    if grounded:
        answer_text, citations = draft, citations_for(draft, state.get("passages") or [])
    else:
        answer_text, citations = IDK, []
    return {"answer": answer_text, "citations": citations, "status": "completed",
            "history": [{"question": state["question"], "answer": answer_text, "run_id": state.get("run_id", "")}],
            "_summary": "answered" if grounded else "does not know"}


def route_after_verify(state: dict[str, Any], max_rounds: int) -> str:
    if state.get("grounded"):
        return "finalize"
    if int(state.get("round") or 0) < max_rounds:
        return "reformulate"
    return "finalize"


def build(deps: Deps) -> StateGraph:
    g = StateGraph(RagQAState)
    for name, fn in [("retrieve", retrieve), ("answer", answer), ("verify", verify), ("reformulate", reformulate),
                     ("finalize", finalize)]:
        g.add_node(name, wrap(name, fn, deps))
    g.add_edge(START, "retrieve")
    g.add_edge("retrieve", "answer")
    g.add_edge("answer", "verify")
    g.add_conditional_edges("verify", lambda s: route_after_verify(s, deps.settings.max_rounds),
                            ["reformulate", "finalize"])
    g.add_edge("reformulate", "retrieve")
    g.add_edge("finalize", END)
    return g


def initial_state(question: str) -> dict[str, Any]:
    return {"question": question, "query": question, "passages": [], "round": 0, "draft": "", "verdict": {},
            "grounded": None, "answer": "", "citations": [], "observations": [], "pending_call": None,
            "status": "running", "step": 0}
