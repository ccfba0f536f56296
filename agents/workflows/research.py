"""``research``: a supervisor routes among researcher, analyst, critic and writer.

* supervisor - structured decision ``{"next": worker|"FINISH", "reason"}``; a malformed or
  impossible decision (critic with no draft, FINISH before the critic accepted) is replaced by
  a deterministic policy; the step budget (``max_steps`` decisions) ends the run with status
  ``step_limit`` and the best draft so far.
* researcher - retrieval over Qdrant plus a search of shared memory.
* analyst - picks one tool (structured ``{"tool", "args"}``); the ``tools`` node runs it, pausing
  for approval when the tool is risky.
* critic - checks the draft against the sources and the question (model verdict + word overlap).
* writer - drafts the answer from the sources and tool observations, streaming tokens.
* finalize -> remember: a fact worth keeping goes to long-term memory through the (risky, so
  approved) ``memory_write`` tool.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from agents.state import ResearchState
from agents.workflows.common import (
    IDK,
    Deps,
    Emit,
    answer_messages,
    citations_for,
    is_idk,
    new_call_id,
    support,
    template_messages,
    tools_node,
    wrap,
)
from app.core.types import ChatMessage

NAME = "research"
DESCRIPTION = ("A supervisor routes a task among a researcher (document search and memory), an analyst (tools), "
               "a critic and a writer until the critic accepts the draft or the step budget is spent.")

WORKERS = ("researcher", "analyst", "critic", "writer")
SUPERVISOR_SCHEMA = {"type": "object", "properties": {
    "next": {"type": "string", "enum": [*WORKERS, "FINISH"]}, "reason": {"type": "string", "maxLength": 200}},
    "required": ["next", "reason"], "additionalProperties": False}
CRITIC_SCHEMA = {"type": "object", "properties": {
    "accepted": {"type": "boolean"}, "feedback": {"type": "string", "maxLength": 300}},
    "required": ["accepted", "feedback"], "additionalProperties": False}
MEMORY_SCHEMA = {"type": "object", "properties": {
    "worth_keeping": {"type": "boolean"}, "fact": {"type": "string", "maxLength": 300}},
    "required": ["worth_keeping", "fact"], "additionalProperties": False}
ANALYST_EXCLUDED = {"retrieve", "memory_write"}  # the researcher retrieves; only `remember` writes memory


def analyst_tools(deps: Deps) -> list[str]:
    # The lifecycle's tools (registry, releases, drift, ...) are the ops workflow's, not a researcher's.
    return [n for n in deps.tools.names(without_tag="lifecycle") if n not in ANALYST_EXCLUDED]


def analyst_schema(tools: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": {"tool": {"type": "string", "enum": [*tools, "none"]},
                                             "args": {"type": "object"}},
            "required": ["tool", "args"], "additionalProperties": False}


def fallback_next(state: dict[str, Any]) -> str:
    """The deterministic policy used when the supervisor's decision is unusable."""
    researched = any(t.get("worker") == "researcher" for t in state.get("trace") or [])
    if not state.get("sources") and not researched:
        return "researcher"
    written, critiqued = int(state.get("drafts_written") or 0), int(state.get("drafts_critiqued") or 0)
    if written == 0:
        return "writer"
    if critiqued < written:
        return "critic"
    return "writer"  # the critic saw the latest draft and did not accept it


def sanitize(choice: str | None, state: dict[str, Any]) -> tuple[str, str]:
    """Make a decision executable: returns (worker, note)."""
    if choice not in (*WORKERS, "FINISH"):
        return fallback_next(state), "malformed decision; fallback policy"
    if choice == "FINISH" and not (state.get("critique") or {}).get("accepted"):
        return fallback_next(state), "FINISH before the critic accepted; fallback policy"
    if choice == "critic" and int(state.get("drafts_critiqued") or 0) >= int(state.get("drafts_written") or 0):
        return fallback_next(state), "nothing new for the critic; fallback policy"
    return choice, ""


async def supervisor(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    decisions = int(state.get("decisions") or 0)
    budget = int(state.get("max_steps") or deps.settings.max_steps)
    trace = list(state.get("trace") or [])
    if (state.get("critique") or {}).get("accepted"):
        return {"next": "finalize", "_summary": "critic accepted the draft"}
    if decisions >= budget:
        return {"next": "finalize", "status": "step_limit", "_summary": f"step budget of {budget} spent"}
    msgs = template_messages(deps, "supervisor-route@production", {
        "task": state["question"], "progress": [{"worker": t["worker"], "summary": t["summary"]} for t in trace]})
    if msgs is None:
        progress = "\n".join(f"{i}. {t['worker']}: {t['summary']}" for i, t in enumerate(trace, 1))
        msgs = [
            ChatMessage("system", "You supervise workers: researcher (searches documents), analyst (uses tools such "
                        "as a calculator), critic (checks the draft), writer (writes the answer). Pick who acts next, "
                        'or FINISH once the critic accepted the draft. Reply with JSON {"next": ..., "reason": ...}.'),
            ChatMessage("user", f"Task: {state['question']}\n\nProgress:\n{progress or 'No worker has acted.'}"
                        "\n\nWho acts next?"),
        ]
    decision = await deps.decide(msgs, SUPERVISOR_SCHEMA)
    choice = decision.get("next") if decision else None
    worker, note = sanitize(choice, state)
    reason = note if note else (decision or {}).get("reason", "")
    return {"next": worker, "decisions": decisions + 1,
            "_summary": f"-> {worker}" + (f" ({reason})" if reason else "")}


async def researcher(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    feedback = (state.get("critique") or {}).get("feedback") or ""
    query = state["question"] if not feedback or not state.get("sources") else f"{state['question']} {feedback}"[:300]
    obs = await deps.call_tool(state, "retrieve", {"query": query}, emit, "researcher")
    sources = list(state.get("sources") or [])
    seen = {s.get("chunk_id") for s in sources}
    new = [p for p in (obs.data or []) if p.get("chunk_id") not in seen] if obs.ok else []
    sources += new
    notes = list(state.get("notes") or [])
    if not obs.ok:
        notes.append(f"retrieve failed: {obs.output}")
    observations = [*(state.get("observations") or []), obs.to_state()]
    if deps.memory is not None and "memory_search" in deps.tools:
        mem = await deps.call_tool(state, "memory_search", {"query": state["question"], "limit": 3}, emit,
                                   "researcher")
        observations.append(mem.to_state())
        for m in (mem.data or []) if mem.ok else []:
            if (m.get("score") or 0) >= deps.settings.memory_search_min_score:
                notes.append(f"memory: {m['text']}")
    summary = f"{len(new)} new passages ({len(sources)} total)" if obs.ok else obs.output[:100]
    return {"sources": sources, "notes": notes, "observations": observations,
            "trace": [*(state.get("trace") or []), {"worker": "researcher", "summary": summary}],
            "_summary": summary}


async def analyst(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    tools = analyst_tools(deps)
    specs = [{"name": s["name"], "description": s["description"],
              "args": list(s["input_schema"].get("properties", {}))} for s in deps.tools.specs(tools)]
    msgs = template_messages(deps, "analyst-tool-choice@production", {"task": state["question"], "tools": specs})
    if msgs is None:
        listing = "\n".join(f"- {s['name']}: {s['description']} args: {s['args']}" for s in specs)
        msgs = [
            ChatMessage("system", f"You are an analyst. Pick one tool to help with the task, or none.\nTools:\n"
                        f'{listing}\nReply with JSON {{"tool": <name or "none">, "args": {{...}}}}.'),
            ChatMessage("user", f"Task: {state['question']}"),
        ]
    # The schema always comes from code: it enumerates the tools this run may call.
    decision = await deps.decide(msgs, analyst_schema(tools))
    trace = list(state.get("trace") or [])
    tool = (decision or {}).get("tool")
    args = (decision or {}).get("args")
    if decision is None or tool not in tools or not isinstance(args, dict):
        why = "malformed tool choice" if decision is None or tool not in (*tools, "none") else "no tool needed"
        return {"pending_call": None, "trace": [*trace, {"worker": "analyst", "summary": why}], "_summary": why}
    call = {"call_id": new_call_id(), "tool": tool, "args": args, "reason": f"analyst wants {tool}",
            "return_to": "supervisor"}
    return {"pending_call": call, "trace": [*trace, {"worker": "analyst", "summary": f"calls {tool} {args}"}],
            "_summary": f"calls {tool}"}


async def after_tools(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    """Fold the latest observation into the notes the writer sees."""
    obs = (state.get("observations") or [])[-1:]
    notes = list(state.get("notes") or [])
    for o in obs:
        notes.append(f"{o['tool']}({o.get('args')}): {o['output']}")
    return {"notes": notes, "_summary": obs[0]["output"][:100] if obs else ""}


async def critic(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    draft, sources = state.get("draft", ""), state.get("sources") or []
    trace = list(state.get("trace") or [])
    n = int(state.get("drafts_written") or 0)
    if not draft or is_idk(draft):
        critique = {"accepted": False, "feedback": "there is no usable draft yet; gather sources and write one"}
    else:
        score = support(draft, sources) if sources else 0.0
        msgs = template_messages(deps, "research-critic@production", {
            "task": state["question"], "draft": draft, "sources": [{"text": p.get("text", "")} for p in sources]})
        if msgs is None:
            numbered = "\n".join(f"[{i}] {p.get('text', '')[:400]}" for i, p in enumerate(sources, 1))
            msgs = [
                ChatMessage("system", "You are a strict critic. Accept the draft only if it answers the task and "
                            "every claim is supported by the sources. "
                            'Reply with JSON {"accepted": true|false, "feedback": ...}.'),
                ChatMessage("user", f"Task: {state['question']}\n\nSources:\n{numbered}\n\nDraft: {draft}"),
            ]
        decision = await deps.decide(msgs, CRITIC_SCHEMA)
        lexical_ok = score >= deps.settings.grounded_min_overlap
        if decision is None or not isinstance(decision.get("accepted"), bool):
            critique = {"accepted": lexical_ok, "feedback": "critic output unreadable; judged by source overlap"}
        else:
            accepted = decision["accepted"] and lexical_ok
            fb = decision.get("feedback") or ""
            if decision["accepted"] and not lexical_ok:
                fb = f"the draft is not supported by the sources (overlap {score:.2f})"
            critique = {"accepted": accepted, "feedback": fb}
        critique["support"] = round(score, 3)
    summary = ("accepted" if critique["accepted"] else "rejected") + f": {critique['feedback']}"[:120]
    return {"critique": critique, "drafts_critiqued": n,
            "trace": [*trace, {"worker": "critic", "summary": summary}], "_summary": summary}


async def writer(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    sources = state.get("sources") or []
    notes = state.get("notes") or []
    extra = []
    if notes:
        extra.append("Notes from tools:\n" + "\n".join(f"- {n}" for n in notes[-5:]))
    feedback = (state.get("critique") or {}).get("feedback")
    if feedback and state.get("draft"):
        extra.append(f"Your previous draft was: {state['draft']}\nA critic said: {feedback}\nWrite a better answer.")
    passages = sources or [{"text": n, "title": "Note"} for n in notes]
    if not passages:
        text = IDK
    else:
        msgs = answer_messages(deps, state["question"], passages, history=state.get("history"),
                               extra="\n\n".join(extra) or None)
        text = await deps.stream_text(msgs, state, "writer", emit) or IDK
    n = int(state.get("drafts_written") or 0) + 1
    return {"draft": text, "drafts_written": n, "critique": None,
            "trace": [*(state.get("trace") or []), {"worker": "writer", "summary": f"draft {n}: {text[:80]}"}],
            "_summary": f"draft {n} ({len(text)} chars)"}


async def finalize(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    draft = state.get("draft") or ""
    accepted = bool((state.get("critique") or {}).get("accepted"))
    status = state.get("status") if state.get("status") == "step_limit" else "completed"
    answer = draft if draft and not is_idk(draft) else IDK
    cites = citations_for(answer, state.get("sources") or []) if answer != IDK else []
    return {"answer": answer, "citations": cites, "status": status, "grounded": accepted,
            "history": [{"question": state["question"], "answer": answer, "run_id": state.get("run_id", "")}],
            "_summary": f"{status}; critic {'accepted' if accepted else 'did not accept'}"}


async def remember(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    answer = state.get("answer") or ""
    if deps.memory is None or "memory_write" not in deps.tools or is_idk(answer) \
            or not (state.get("critique") or {}).get("accepted"):
        return {"pending_call": None, "_summary": "nothing to remember"}
    msgs = template_messages(deps, "memory-extract@production", {"task": state["question"], "answer": answer}) or [
        ChatMessage("system", "Decide whether the answer contains one durable fact worth remembering for later "
                    'tasks. Reply with JSON {"worth_keeping": true|false, "fact": "<one sentence>"}.'),
        ChatMessage("user", f"Task: {state['question']}\nAnswer: {answer}"),
    ]
    decision = await deps.decide(msgs, MEMORY_SCHEMA)
    fact = (decision or {}).get("fact")
    if not decision or not decision.get("worth_keeping") or not isinstance(fact, str) or not fact.strip():
        return {"pending_call": None, "_summary": "nothing worth keeping"}
    call = {"call_id": new_call_id(), "tool": "memory_write", "args": {"text": fact.strip(), "kind": "fact"},
            "reason": "store a fact learned in this run", "return_to": "end"}
    return {"pending_call": call, "_summary": f"remember {fact.strip()[:60]!r}"}


def build(deps: Deps) -> StateGraph:
    g = StateGraph(ResearchState)
    for name, fn in [("supervisor", supervisor), ("researcher", researcher), ("analyst", analyst),
                     ("tools", tools_node), ("after_tools", after_tools), ("critic", critic), ("writer", writer),
                     ("finalize", finalize), ("remember", remember)]:
        g.add_node(name, wrap(name, fn, deps))
    g.add_edge(START, "supervisor")
    g.add_conditional_edges("supervisor", lambda s: s.get("next") or "finalize",
                            [*WORKERS, "finalize"])
    for w in ("researcher", "critic", "writer"):
        g.add_edge(w, "supervisor")
    g.add_conditional_edges("analyst", lambda s: "tools" if s.get("pending_call") else "supervisor",
                            ["tools", "supervisor"])
    g.add_conditional_edges("tools", lambda s: "after_tools", ["after_tools"])
    g.add_conditional_edges("after_tools", lambda s: END if s.get("answer") else "supervisor", ["supervisor", END])
    g.add_edge("finalize", "remember")
    g.add_conditional_edges("remember", lambda s: "tools" if s.get("pending_call") else END, ["tools", END])
    return g


def initial_state(question: str, max_steps: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "question": question, "sources": [], "notes": [], "draft": "", "critique": None, "drafts_written": 0,
        "drafts_critiqued": 0, "trace": [], "decisions": 0, "next": "", "answer": "", "citations": [],
        "observations": [], "pending_call": None, "status": "running", "grounded": None, "step": 0}
    if max_steps:
        out["max_steps"] = max_steps
    return out
