"""``ops``: an operations agent that answers questions about production from the lifecycle tools and proposes
the action a person approves.

"Why did grounded answers drop this week?", "is adapter support-lora v3 ready for production?", "is prompt
support-qa v2 ready?", "how is the canary doing?" — the agent investigates with the lifecycle tools
(:mod:`lifecycle.tools`: drift checks, traces, eval results, the model registry, releases, prompt versions
and gates), writes its answer from what they returned (numbered findings it cites), and, when the findings
call for one, proposes one action — a rollback, a promotion — that pauses the run for a person's approval in
the API, CLI or web UI (``interrupt()``, the risky tools' path); nothing changes production without it.

* triage - which investigation: ``quality`` (a drop, drift, regressions), ``readiness`` (of an adapter or a
  prompt version), ``release`` (a rollout's state) or ``overview``. Words in the question decide when they
  are clear; otherwise the model chooses (structured ``{"intent"}``); a question it cannot place gets the
  overview.
* investigate - runs the investigation's read-only tool calls in order, each one's arguments taken from the
  question and the calls before (a model name from the registry's list, a version from "v3", the window from
  "this week"). A call the run's key may not make, or one that fails, is a finding too.
* write - the model's answer from the numbered findings (streamed); the findings follow it.
* propose -> tools - at most one risky call the findings support; it waits for approval.
* finish - the answer, with what became of the proposal.

Small models cannot be trusted to pick among thirty tools and fill their arguments; the investigations are
code (what an on-call engineer would look at first) and the model does what it does well: read findings and
explain them. Every call goes through the registry's executor: scoped to the run's key, audited.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from langgraph.graph import END, START, StateGraph

from agents.state import OpsState
from agents.workflows.common import IDK, Deps, Emit, citations_for, is_idk, new_call_id, template_messages, tools_node
from agents.workflows.common import wrap as _wrap
from app.core.types import ChatMessage

NAME = "ops"
DESCRIPTION = ("An operations agent: investigates production with the lifecycle tools (drift, traces, evals, the "
               "model registry, releases, prompt gates), explains what it found, and proposes one action (a "
               "rollback, a promotion) that runs only once a person approves it.")

INTENTS = ("quality", "readiness", "release", "overview")
TRIAGE_SCHEMA = {"type": "object", "properties": {"intent": {"type": "string", "enum": list(INTENTS)}},
                 "required": ["intent"], "additionalProperties": False}
_WORDS = {
    "readiness": re.compile(r"\b(ready|readiness|promot\w*|adapter|version|v\d+|gate)\b", re.I),
    "quality": re.compile(r"\b(drop\w*|drift\w*|wors\w*|degrad\w*|regress\w*|declin\w*|fell|fall\w*|lower|"
                          r"quality|grounded|errors?)\b", re.I),
    "release": re.compile(r"\b(canary|release|rollout|rolling|a/b|ab test|shadow|blue/green|traffic)\b", re.I),
}
_VERSION = re.compile(r"\b(?:v|version\s*)(\d+)\b", re.I)
_WINDOWS = [(re.compile(r"\b(today|24 ?h|hours?|day)\b", re.I), 86_400.0),
            (re.compile(r"\b(week|7 ?d(ays)?)\b", re.I), 7 * 86_400.0),
            (re.compile(r"\b(month|30 ?d(ays)?)\b", re.I), 30 * 86_400.0)]
MAX_FINDINGS = 12
WRITE_MAX_TOKENS = 160  # a few sentences: the findings follow the answer


# -- triage -----------------------------------------------------------------------------------------------


def intent_by_words(question: str) -> str | None:
    hits = [name for name, words in _WORDS.items() if words.search(question)]
    if hits == ["readiness", "release"] or hits == ["release", "readiness"]:
        return "readiness"  # "ready to roll out" asks about the artifact
    return hits[0] if len(hits) == 1 else None


async def triage(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    question = state["question"]
    intent = intent_by_words(question)
    how = "words"
    if intent is None:
        msgs = template_messages(deps, "ops-triage@production", {"question": question}) or [
            ChatMessage("system", "Classify an operations question about an LLM service. quality: answers got worse, "
                        "drift, errors. readiness: is a model adapter or prompt version ready for production. "
                        "release: the state of a canary, A/B test or rollout. overview: anything else. "
                        'Reply with JSON {"intent": ...}.'),
            ChatMessage("user", question)]
        decision = await deps.decide(msgs, TRIAGE_SCHEMA)
        intent = (decision or {}).get("intent")
        how = "model"
        if intent not in INTENTS:
            intent, how = "overview", "default"
    return {"intent": intent, "_summary": f"{intent} (by {how})"}


# -- investigate --------------------------------------------------------------------------------------------


class Findings:
    """The numbered facts an investigation collected, each from one tool call."""

    def __init__(self, state: dict[str, Any], deps: Deps, emit: Emit) -> None:
        self.state, self.deps, self.emit = state, deps, emit
        self.items: list[dict[str, Any]] = []
        self.observations: list[dict[str, Any]] = list(state.get("observations") or [])
        self.data: dict[str, Any] = {}

    async def call(self, tool: str, args: dict[str, Any], describe: Callable[[Any], str | None]) -> Any:
        """Run one read-only call; its finding is ``describe(data)`` (or the error). Returns the data, or None."""
        if tool not in self.deps.tools:
            return None
        obs = await self.deps.call_tool(self.state, tool, args, self.emit, "investigate")
        self.observations.append(obs.to_state())
        text = describe(obs.data) if obs.ok else f"could not run {tool}: {obs.output.removeprefix('error: ')}"
        if text and len(self.items) < MAX_FINDINGS:
            self.items.append({"title": tool, "text": text, "source": f"tool:{tool}", "args": args, "ok": obs.ok})
        self.data[tool] = obs.data if obs.ok else None
        return obs.data if obs.ok else None


def _window(question: str) -> float:
    for words, seconds in _WINDOWS:
        if words.search(question):
            return seconds
    return 7 * 86_400.0


def _when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return "?"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.0f}%"


def describe_drift(result: dict[str, Any] | None) -> str | None:
    if not result:
        return None
    parts = []
    for c in result.get("checks") or []:
        if c.get("drifted"):
            detail = ""
            if c.get("current_value") is not None and c.get("reference_value") is not None:
                detail = f" ({c['reference_value']:.3g} -> {c['current_value']:.3g})"
            parts.append(f"{c['name']}{detail}")
    cur = result.get("current") or {}
    rows = f"{cur.get('rows')} answers" if cur.get("rows") is not None else "the current window"
    if result.get("verdict") == "drift":
        return f"Drift check {result['id']} on {rows}: DRIFT in {', '.join(parts) or 'several checks'}."
    if result.get("verdict") == "not_enough_data":
        return f"Drift check {result['id']}: not enough traffic to judge ({rows})."
    return f"Drift check {result['id']} on {rows}: no drift."


def describe_traces(rows: list[dict[str, Any]] | None) -> str | None:
    if rows is None:
        return None
    errors = sum(1 for r in rows if r.get("errors"))
    slow = sorted((r.get("duration_ms") or 0 for r in rows), reverse=True)[:1]
    return (f"{len(rows)} recent traces, {errors} with errors" +
            (f"; slowest {slow[0]:.0f} ms" if slow and rows else "") + ".")


def describe_evals(rows: list[dict[str, Any]] | None) -> str | None:
    if not rows:
        return "No eval runs recorded." if rows is not None else None
    latest = [f"{r['suite']} {'passed' if r.get('passed') else 'FAILED' if r.get('passed') is False else r['status']}"
              f" ({r['id']})" for r in rows[:4]]
    return "Latest eval runs: " + "; ".join(latest) + "."


def describe_releases(rows: list[dict[str, Any]] | None) -> str | None:
    if rows is None:
        return None
    running = [r for r in rows if r.get("status") in ("running", "paused")]
    if not running:
        return "No release is running."
    return "Releases: " + "; ".join(
        f"{r['name']} ({r['strategy']}, {r['status']}, weights {json.dumps(r.get('weights'))})" for r in running) + "."


def describe_release(report: dict[str, Any] | None) -> str | None:
    if not report:
        return None
    arms = "; ".join(f"{name}: {v.get('requests', 0)} requests, errors {_pct(v.get('error_rate'))}, blocks "
                     f"{_pct(v.get('block_rate'))}" for name, v in (report.get("variants") or {}).items())
    decision = report.get("decision") or {}
    last = f" Last decision: {decision.get('action')} - {decision.get('reason')}." if decision else ""
    return f"Release {report['name']} is {report['status']}: {arms}.{last}"


def describe_gate(subject: str, verdict: dict[str, Any] | None) -> str | None:
    if verdict is None:
        return None
    return f"The promotion gate {'PASSES' if verdict.get('passed') else 'REFUSES'} {subject}: {verdict.get('reason')}"


def _mentioned(question: str, names: list[str]) -> str | None:
    q = question.lower()
    found = sorted((n for n in names if n.lower() in q), key=len, reverse=True)
    return found[0] if found else None


async def investigate(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    f = Findings(state, deps, emit)
    question, intent = state["question"], state.get("intent") or "overview"
    subject: dict[str, Any] = {}
    if intent == "quality":
        window = _window(question)
        await f.call("drift_check", {"window_s": window}, describe_drift)
        await f.call("traces_search", {"limit": 50}, describe_traces)
        await f.call("eval_results", {"limit": 5}, describe_evals)
        await f.call("release_list", {}, describe_releases)
    elif intent == "readiness":
        subject = await _readiness(question, f)
    elif intent == "release":
        releases = await f.call("release_list", {}, describe_releases) or []
        named = _mentioned(question, [r["name"] for r in releases])
        for r in [x for x in releases if x["name"] == named] or releases[:2]:
            await f.call("release_status", {"name": r["name"]}, describe_release)
        await f.call("drift_reports", {"limit": 3}, lambda rows: describe_drift(rows[0]) if rows else
                     "No drift checks recorded.")
    else:
        await f.call("release_list", {}, describe_releases)
        await f.call("drift_reports", {"limit": 3}, lambda rows: describe_drift(rows[0]) if rows else
                     "No drift checks recorded.")
        await f.call("eval_results", {"limit": 5}, describe_evals)
        await f.call("model_list", {}, lambda names: f"Registered adapter models: {', '.join(names) or 'none'}.")
    # What the proposal reads, not every call's data (the state is checkpointed after each node).
    facts = {k: f.data.get(k) for k in ("drift_check", "release_list")}
    return {"findings": f.items, "observations": f.observations, "subject": subject, "facts": facts,
            "_summary": f"{len(f.items)} finding(s) from {len(f.observations)} call(s)"}


async def _readiness(question: str, f: Findings) -> dict[str, Any]:
    """An adapter version when the question names a registered model (or asks about an adapter), else a prompt."""
    version = _VERSION.search(question)
    wants_prompt = re.search(r"\b(prompt|template)\b", question, re.I)
    models = [] if wants_prompt else (await f.call(
        "model_list", {}, lambda names: f"Registered adapter models: {', '.join(names) or 'none'}.") or [])
    model = _mentioned(question, models) or (models[0] if len(models) == 1 else None)
    if model is not None:
        versions = await f.call("model_versions", {"model": model}, lambda rows: (
            f"{model} has versions " + ", ".join(f"v{v['version']}" + (f" ({', '.join(v['aliases'])})"
                                                                        if v["aliases"] else "") for v in rows)
            + ".")) or []
        chosen = version.group(1) if version else (versions[-1]["version"] if versions else None)
        if chosen is None:
            return {}
        verdict = await f.call("model_gate", {"model": model, "version": chosen},
                               lambda v: describe_gate(f"{model} v{chosen}", v))
        await f.call("eval_results", {"limit": 5}, describe_evals)
        await f.call("release_list", {}, describe_releases)
        production = next((v for v in versions if "production" in v["aliases"]), None)
        return {"kind": "adapter", "model": model, "version": str(chosen), "passed": bool(verdict and
                verdict.get("passed")), "production": production["version"] if production else None}
    prompts = await f.call("prompt_list", {}, lambda rows: None) or []
    name = _mentioned(question, [p["name"] for p in prompts])
    if name is None:
        f.items.append({"title": "question", "text": "The question names no registered adapter model or prompt "
                        "template.", "source": "ops", "args": {}, "ok": True})
        return {}
    versions = await f.call("prompt_versions", {"name": name}, lambda rows: (
        f"Prompt {name} has versions " + ", ".join(f"v{v['version']}" + (f" ({', '.join(v['labels'])})"
                                                                          if v["labels"] else "") for v in rows)
        + ".")) or []
    chosen = int(version.group(1)) if version else (versions[-1]["version"] if versions else None)
    if chosen is None:
        return {}
    verdict = await f.call("prompt_gate", {"name": name, "version": chosen},
                           lambda v: describe_gate(f"{name} v{chosen}", v))
    await f.call("eval_results", {"limit": 5}, describe_evals)
    production = next((v for v in versions if "production" in v["labels"]), None)
    return {"kind": "prompt", "name": name, "version": chosen, "passed": bool(verdict and verdict.get("passed")),
            "production": production["version"] if production else None}


# -- write, propose, finish -------------------------------------------------------------------------------


async def write(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    findings = state.get("findings") or []
    if not findings:
        return {"draft": IDK, "_summary": "no findings"}
    numbered = "\n".join(f"[{i}] {x['text']}" for i, x in enumerate(findings, 1))
    msgs = template_messages(deps, "ops-answer@production", {"question": state["question"], "findings": [
        {"text": x["text"], "tool": x["title"]} for x in findings]}) or [
        ChatMessage("system", "You are an on-call engineer for an LLM service. Answer the question using only the "
                    "numbered findings, which come from the monitoring and release tools. Cite findings like [1]. "
                    "Say what is wrong (or that nothing is), and the likely cause. At most 80 words."),
        ChatMessage("user", f"Findings:\n{numbered}\n\nQuestion: {state['question']}")]
    text = await deps.stream_text(msgs, state, "write", emit, max_tokens=min(deps.settings.answer_max_tokens,
                                                                               WRITE_MAX_TOKENS))
    text = without_repeats(text)
    return {"draft": text or IDK, "_summary": f"{len(text)} chars"}


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def without_repeats(text: str) -> str:
    """The answer with each sentence once, up to the first repeat: a small model at temperature 0 can loop on a
    sentence until its token budget runs out, and the findings below the answer say the rest."""
    seen: set[str] = set()
    kept: list[str] = []
    for sentence in _SENTENCE.split(text.strip()):
        key = re.sub(r"\W+", " ", sentence.lower()).strip()
        if key in seen:
            break
        seen.add(key)
        kept.append(sentence)
    out = " ".join(kept).strip()
    if kept and not re.search(r"[.!?]$", out) and len(kept) > 1:  # a sentence cut off by the token budget
        out = " ".join(kept[:-1]).strip()
    return out


def proposal(state: dict[str, Any]) -> dict[str, Any] | None:
    """The one action the findings support, if any: a call of a risky tool, with why."""
    intent, facts, subject = state.get("intent"), state.get("facts") or {}, state.get("subject") or {}
    if intent == "quality":
        drift = facts.get("drift_check") or {}
        running = [r for r in facts.get("release_list") or [] if r.get("status") == "running"
                   and r.get("strategy") in ("canary", "ab")]
        if drift.get("verdict") == "drift" and running:
            r = running[0]
            why = (f"drift check {drift['id']} found drift in {', '.join(drift.get('drifted_checks') or [])} while "
                   f"{r['name']} ({r['strategy']}) sends traffic to its candidate")
            return {"tool": "release_rollback", "args": {"name": r["name"], "reason": f"ops agent: {why}"},
                    "reason": f"roll back {r['name']}: {why}"}
    if intent == "readiness" and subject.get("passed") and str(subject.get("production")) != str(
            subject.get("version")):
        if subject["kind"] == "adapter":
            return {"tool": "model_promote", "args": {"model": subject["model"], "version": subject["version"],
                                                      "reason": "ops agent: the promotion gate passes"},
                    "reason": f"promote {subject['model']} v{subject['version']} to production (the gate passes)"}
        return {"tool": "prompt_promote", "args": {"name": subject["name"], "version": subject["version"],
                                                   "label": "production"},
                "reason": f"point {subject['name']}@production at v{subject['version']} (the gate passes)"}
    return None


async def propose(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    p = proposal(state)
    if p is None or p["tool"] not in deps.tools:
        return {"pending_call": None, "proposal": None, "_summary": "no action proposed"}
    call = {"call_id": new_call_id(), "tool": p["tool"], "args": p["args"], "reason": p["reason"],
            "return_to": "finish"}
    return {"pending_call": call, "proposal": p, "_summary": f"proposes {p['tool']}"}


async def finish(state: dict[str, Any], deps: Deps, emit: Emit) -> dict[str, Any]:
    findings = state.get("findings") or []
    draft = state.get("draft") or IDK
    lines = [draft if not is_idk(draft) else "The tools' findings:"]
    lines += ["", "Findings:"] + [f"[{i}] {x['text']}" for i, x in enumerate(findings, 1)] if findings else []
    p = state.get("proposal")
    if p:
        done = next((o for o in reversed(state.get("observations") or []) if o.get("tool") == p["tool"]), None)
        if done is None:
            outcome = "not run"
        elif done.get("ok"):
            outcome = "approved and done"
        elif done.get("error_code") == "rejected":
            outcome = done["output"]
        else:
            outcome = f"approved but failed: {done['output']}"
        lines += ["", f"Proposed: {p['reason']} - {outcome}."]
    answer = "\n".join(lines).strip()
    passages = [{"text": x["text"], "title": x["title"], "source": x["source"]} for x in findings]
    cites = citations_for(draft, passages) if passages and not is_idk(draft) else []
    return {"answer": answer, "citations": cites, "status": "completed", "grounded": bool(findings),
            "history": [{"question": state["question"], "answer": answer, "run_id": state.get("run_id", "")}],
            "_summary": f"{len(findings)} finding(s)" + (f"; {p['tool']}" if p else "")}


def build(deps: Deps) -> StateGraph:
    g = StateGraph(OpsState)
    for name, fn in [("triage", triage), ("investigate", investigate), ("write", write), ("propose", propose),
                     ("tools", tools_node), ("finish", finish)]:
        g.add_node(name, _wrap(name, fn, deps))
    g.add_edge(START, "triage")
    g.add_edge("triage", "investigate")
    g.add_edge("investigate", "write")
    g.add_edge("write", "propose")
    g.add_conditional_edges("propose", lambda s: "tools" if s.get("pending_call") else "finish", ["tools", "finish"])
    g.add_edge("tools", "finish")
    g.add_edge("finish", END)
    return g


def initial_state(question: str) -> dict[str, Any]:
    return {"question": question, "intent": "", "findings": [], "facts": {}, "subject": {}, "draft": "",
            "proposal": None, "answer": "", "citations": [], "observations": [], "pending_call": None,
            "status": "running", "grounded": None, "step": 0}
