"""The ``ops`` workflow (agents.workflows.ops) with a scripted model and scripted lifecycle tools: triage, the
investigations' calls and arguments, the findings it cites, the proposal that waits for approval, scopes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.events import Final, InterruptEvent, ToolCall
from agents.service import AgentService
from agents.settings import AgentSettings
from agents.testing import ScriptedLLM
from agents.tools import ToolContext, ToolRegistry, builtin_tools
from agents.workflows import ops
from agents.workflows.common import Deps
from lifecycle.tools import LifecycleTool

DRIFT = {"id": "dc-1", "verdict": "drift", "drifted_checks": ["input_embedding", "grounded_rate"],
         "current": {"rows": 120}, "checks": [
             {"name": "input_embedding", "drifted": True, "current_value": None, "reference_value": None},
             {"name": "grounded_rate", "drifted": True, "current_value": 0.31, "reference_value": 0.82},
             {"name": "answer_chars", "drifted": False}]}
CANARY = {"name": "support", "strategy": "canary", "status": "running", "weights": {"stable": 75, "canary": 25}}


class World:
    """Scripted lifecycle tools over a little state; records every call and what changed."""

    def __init__(self, *, drift: dict | None = None, releases: list | None = None, gate: bool = True) -> None:
        self.drift, self.releases, self.gate = drift or {**DRIFT, "verdict": "no_drift", "drifted_checks": [],
                                                          "checks": []}, releases or [], gate
        self.calls: list[tuple[str, dict]] = []
        self.changed: list[tuple[str, dict]] = []

    def tool(self, name: str, scope: str, fn: Any, *, risky: bool = False) -> LifecycleTool:
        def run(args: dict, ctx: ToolContext) -> Any:
            self.calls.append((name, args))
            return fn(args)

        return LifecycleTool(name, name, {"type": "object"}, run, scope=scope, risky=risky, read_only=not risky,
                             title=name)

    def registry(self) -> ToolRegistry:
        reg = ToolRegistry(builtin_tools())
        versions = [{"version": "1", "aliases": ["production"]}, {"version": "2", "aliases": []},
                    {"version": "3", "aliases": []}]

        def change(name: str):
            def fn(args: dict) -> dict:
                self.changed.append((name, args))
                return {"ok": True}
            return fn

        for t in [
            self.tool("drift_check", "monitor", lambda a: self.drift),
            self.tool("drift_reports", "monitor", lambda a: [self.drift]),
            self.tool("traces_search", "monitor", lambda a: [{"errors": 1, "duration_ms": 900.0},
                                                             {"errors": 0, "duration_ms": 40.0}]),
            self.tool("eval_results", "evals", lambda a: [{"id": "run-9", "suite": "support-golden", "passed": False,
                                                           "status": "completed"}]),
            self.tool("release_list", "releases", lambda a: self.releases),
            self.tool("release_status", "releases", lambda a: {"name": a["name"], "status": "running", "variants": {
                "stable": {"requests": 90, "error_rate": 0.0, "block_rate": 0.0},
                "canary": {"requests": 30, "error_rate": 0.1, "block_rate": 0.0}}, "decision": None}),
            self.tool("release_rollback", "releases", change("release_rollback"), risky=True),
            self.tool("model_list", "finetune", lambda a: ["support-lora"]),
            self.tool("model_versions", "finetune", lambda a: versions),
            self.tool("model_gate", "finetune", lambda a: {"passed": self.gate, "reason": (
                "every required suite passed" if self.gate else "no passing run of suite support-golden")}),
            self.tool("model_promote", "finetune", change("model_promote"), risky=True),
            self.tool("prompt_list", "prompts:read", lambda a: [{"name": "support-qa"}]),
            self.tool("prompt_versions", "prompts:read", lambda a: [{"version": 1, "labels": ["production"]},
                                                                    {"version": 2, "labels": []}]),
            self.tool("prompt_gate", "prompts:read", lambda a: {"passed": self.gate, "reason": "gate says so"}),
            self.tool("prompt_promote", "prompts:write", change("prompt_promote"), risky=True),
        ]:
            reg.register(t)
        return reg


_OPEN: list[AgentService] = []


@pytest.fixture(autouse=True)
async def _close():
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


def service(tmp_path: Path, world: World, llm: ScriptedLLM) -> AgentService:
    svc = AgentService(Deps(llm=llm, tools=world.registry(), settings=AgentSettings()), db_path=tmp_path / "a.db")
    _OPEN.append(svc)
    return svc


def writer(text: str = "Grounded answers dropped because the questions drifted [1]."):
    def respond(messages, schema):
        if schema is None:
            return text
        return {"intent": "overview"}
    return respond


async def run(svc: AgentService, question: str, **kw: Any) -> list[Any]:
    return [e async for e in svc.run("ops", question, owner="alice", **kw)]


def test_words_decide_the_intent_when_they_are_clear() -> None:
    assert ops.intent_by_words("Why did grounded answers drop this week?") == "quality"
    assert ops.intent_by_words("Is adapter support-lora v3 ready for production?") == "readiness"
    assert ops.intent_by_words("How is the canary doing?") == "release"
    assert ops.intent_by_words("Is v3 ready to roll out as a canary?") == "readiness"
    assert ops.intent_by_words("What should I look at?") is None


async def test_a_quality_drop_with_drift_during_a_canary_proposes_a_rollback_that_waits(tmp_path: Path) -> None:
    world = World(drift=DRIFT, releases=[CANARY])
    llm = ScriptedLLM(responder=writer())
    svc = service(tmp_path, world, llm)
    events = await run(svc, "Why did grounded answers drop this week?")
    assert [name for name, _ in world.calls] == ["drift_check", "traces_search", "eval_results", "release_list"]
    assert world.calls[0][1] == {"window_s": 7 * 86400}
    assert not any(schema for _, schema in llm.calls)  # the words decided: the model only wrote
    findings_prompt = llm.calls[-1][0][-1].content
    assert "[1] Drift check dc-1 on 120 answers: DRIFT in input_embedding, grounded_rate (0.82 -> 0.31)" in \
        findings_prompt and "1 with errors" in findings_prompt
    intr = events[-1]
    assert isinstance(intr, InterruptEvent) and intr.tool == "release_rollback"
    assert intr.args["name"] == "support" and "drift" in intr.reason
    assert world.changed == []  # nothing changes before a person approves
    done = [e async for e in svc.resume(intr.run_id, "approve", owner="alice")]
    final = done[-1]
    assert isinstance(final, Final) and final.status == "completed"
    assert world.changed == [("release_rollback", intr.args)]
    assert final.answer.startswith("Grounded answers dropped") and "Findings:\n[1] Drift check dc-1" in final.answer
    assert "approved and done" in final.answer
    assert final.citations and final.citations[0].source == "tool:drift_check"


async def test_a_rejected_proposal_changes_nothing_and_says_why(tmp_path: Path) -> None:
    world = World(drift=DRIFT, releases=[CANARY])
    svc = service(tmp_path, world, ScriptedLLM(responder=writer()))
    intr = (await run(svc, "Why did quality drop?"))[-1]
    final = [e async for e in svc.resume(intr.run_id, "reject", reason="the canary is fine", owner="alice")][-1]
    assert world.changed == [] and "a human rejected this call: the canary is fine" in final.answer


async def test_no_drift_means_no_proposal(tmp_path: Path) -> None:
    world = World(releases=[CANARY])
    svc = service(tmp_path, world, ScriptedLLM(responder=writer("Nothing drifted [1].")))
    final = (await run(svc, "why did answers get worse today?"))[-1]
    assert isinstance(final, Final) and final.status == "completed" and "Proposed" not in final.answer
    assert world.calls[0] == ("drift_check", {"window_s": 86400})


async def test_a_ready_adapter_version_is_proposed_for_promotion(tmp_path: Path) -> None:
    world = World(gate=True)
    svc = service(tmp_path, world, ScriptedLLM(responder=writer("Yes: the gate passes [3].")))
    intr = (await run(svc, "Is adapter support-lora v3 ready for production?"))[-1]
    assert [n for n, _ in world.calls][:3] == ["model_list", "model_versions", "model_gate"]
    assert world.calls[2][1] == {"model": "support-lora", "version": "3"}
    assert isinstance(intr, InterruptEvent) and intr.tool == "model_promote"
    assert intr.args["model"] == "support-lora" and intr.args["version"] == "3"


async def test_a_failing_gate_is_explained_and_nothing_is_proposed(tmp_path: Path) -> None:
    world = World(gate=False)
    final = (await run(service(tmp_path, world, ScriptedLLM(responder=writer("No [3]."))),
                       "is adapter v2 ready?"))[-1]
    assert isinstance(final, Final) and "REFUSES support-lora v2: no passing run of suite support-golden" in \
        final.answer and "Proposed" not in final.answer


async def test_a_prompt_version_readiness(tmp_path: Path) -> None:
    world = World(gate=True)
    intr = (await run(service(tmp_path, world, ScriptedLLM(responder=writer("Ready [2]."))),
                      "Is the prompt support-qa v2 ready for production?"))[-1]
    assert "model_list" not in [n for n, _ in world.calls]
    assert isinstance(intr, InterruptEvent) and intr.tool == "prompt_promote"
    assert intr.args == {"name": "support-qa", "version": 2, "label": "production"}


async def test_an_unclear_question_asks_the_model_and_a_bad_answer_gets_the_overview(tmp_path: Path) -> None:
    world = World()
    llm = ScriptedLLM(script=["not json at all", "All quiet [1]."])
    final = (await run(service(tmp_path, world, llm), "What should I look at?"))[-1]
    assert isinstance(final, Final) and final.status == "completed"
    assert llm.calls[0][1] == ops.TRIAGE_SCHEMA
    assert [n for n, _ in world.calls] == ["release_list", "drift_reports", "eval_results", "model_list"]


async def test_the_run_key_scopes_bound_the_investigation(tmp_path: Path) -> None:
    world = World(drift=DRIFT, releases=[CANARY])
    llm = ScriptedLLM(responder=writer())
    events = await run(service(tmp_path, world, llm), "Why did grounded answers drop?", scopes={"chat", "monitor"})
    assert [n for n, _ in world.calls] == ["drift_check", "traces_search"]  # evals, releases: refused
    calls = [e.tool for e in events if isinstance(e, ToolCall)]
    assert calls == ["drift_check", "traces_search", "eval_results", "release_list"]
    final = events[-1]
    assert isinstance(final, Final) and "could not run release_list: release_list needs an API key with the " \
        "'releases' scope" in final.answer
    assert "Proposed" not in final.answer  # it could not see the release, so it proposes nothing


def test_a_looping_answer_is_cut_at_its_first_repeat() -> None:
    loop = "Drift was found [1]. The results were not enough. The results were not enough. The results were"
    assert ops.without_repeats(loop) == "Drift was found [1]. The results were not enough."
    assert ops.without_repeats("One sentence without an end") == "One sentence without an end"
    assert ops.without_repeats("First. Second cut off mid") == "First."
    assert ops.without_repeats("") == ""
