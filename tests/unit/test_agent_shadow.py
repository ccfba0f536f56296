"""A release's shadow agent run: it reads what the owner's run would, but nothing that can change something runs,
nothing waits for approval, and the run is not the owner's (tests/unit/test_releases.py drives one through a
shadow release)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import pytest
from langgraph.graph import END, StateGraph

from agents.events import InterruptEvent, ToolResult
from agents.registry import Workflow
from agents.state import BaseState
from agents.testing import ScriptedLLM, SideEffectTool
from agents.tools import ToolContext, ToolRegistry, builtin_tools, execute
from app.core.errors import InvalidRequest
from tests.unit.test_agents import ANSWER, by_kind, collect, final, make_service
from tests.unit.test_agents import _close_services as _close_services  # the autouse fixture


class Memory:
    """Long-term memory that records every write."""

    def __init__(self) -> None:
        self.writes: list[tuple[Any, ...]] = []

    def put(self, namespace, key, value) -> None:
        self.writes.append((tuple(namespace), key, value))

    def search(self, namespace, query=None, limit=10) -> list:
        return []


def service(tmp_path: Path, tool: SideEffectTool, memory: Memory):
    reg = ToolRegistry(builtin_tools())  # memory_write is not risky here: it would run without asking
    reg.register(tool)
    llm = ScriptedLLM(responder=by_kind(
        next=[{"next": "analyst", "reason": "send"}, {"next": "researcher", "reason": "r"},
              {"next": "writer", "reason": "w"}, {"next": "critic", "reason": "c"}, {"next": "FINISH", "reason": "f"}],
        tool=[{"tool": "send_report", "args": {"to": "team@example.com", "body": "hi"}}],
        accepted=[{"accepted": True, "feedback": "ok"}], text=lambda messages: ANSWER,
        worth_keeping=[{"worth_keeping": True, "fact": "Keel stores vectors in Qdrant."}]))
    return make_service(tmp_path, llm, tools=reg, memory=memory)


async def test_a_shadow_run_executes_nothing_that_acts_and_is_not_the_owners(tmp_path: Path) -> None:
    tool, memory = SideEffectTool(), Memory()
    svc = service(tmp_path, tool, memory)
    events = await collect(svc.run("research", "Send the vector store report", owner="alice", shadow=True))
    assert not any(isinstance(e, InterruptEvent) for e in events)  # nobody is asked: the call is not made
    assert final(events).status == "completed" and final(events).answer == ANSWER
    results = {e.tool: e for e in events if isinstance(e, ToolResult)}
    assert not results["send_report"].ok and "shadow run" in results["send_report"].output
    assert not results["memory_write"].ok and "not executed" in results["memory_write"].output
    assert results["retrieve"].ok  # reading the documents changes nothing: a shadow sees what the primary sees
    assert tool.executed == [] and memory.writes == []
    run_id = final(events).run_id
    assert await svc.list_runs(owner="alice") == [] and await svc.pending_approvals(owner="alice") == []
    assert [r["owner"] for r in await svc.list_runs()] == ["shadow:alice"]  # an admin sees it, as a shadow's
    record = svc.get_record(run_id)
    assert record.owner == "shadow:alice" and record.namespace == ["users", "alice"]


async def test_the_same_run_outside_a_shadow_acts(tmp_path: Path) -> None:
    """The control: without ``shadow`` the risky call waits for approval and the memory write runs."""
    tool, memory = SideEffectTool(), Memory()
    svc = service(tmp_path, tool, memory)
    events = await collect(svc.run("research", "Send the vector store report", owner="alice"))
    assert isinstance(events[-1], InterruptEvent) and events[-1].tool == "send_report"
    events = await collect(svc.resume(events[-1].run_id, "approve", owner="alice"))
    assert final(events).status == "completed"
    assert tool.executed == [{"to": "team@example.com", "body": "hi"}] and len(memory.writes) == 1


async def test_only_tools_known_to_change_nothing_run_in_a_shadow() -> None:
    acting = SideEffectTool(name="notify", risky=False)  # not risky, but not marked read-only either
    reg = ToolRegistry([*builtin_tools(), acting], risky={"prompt_read"})
    shadow = ToolContext(run_id="r", shadow=True)
    calc = await execute(reg, "calculator", {"expression": "2 + 3"}, shadow)
    assert calc.ok and calc.data == 5
    for name, args in (("notify", {"to": "x"}), ("prompt_read", {"ref": "greet@production"}),
                       ("memory_write", {"text": "a fact"})):
        obs = await execute(reg, name, args, shadow)
        assert not obs.ok and obs.error_code == "not_executed_in_shadow" and obs.attempts == 0, name
    assert acting.executed == []
    assert (await execute(reg, "notify", {"to": "x"}, ToolContext(run_id="r"))).ok  # outside a shadow it runs
    assert [n for n in ("retrieve", "memory_search", "prompt_read", "calculator", "memory_write", "notify")
            if reg.changes_nothing(n)] == ["retrieve", "memory_search", "calculator"]


async def test_an_external_servers_read_only_hint_counts_in_a_shadow_only_where_trusted() -> None:
    from lifecycle.tools.remote import RemoteTool

    def remote(shadow_safe: bool) -> RemoteTool:
        return RemoteTool(name=f"crm__lookup_{shadow_safe}", description="d", input_schema={"type": "object"},
                          risky=False, scope="chat", server=None, remote_name="lookup", read_only=True,
                          shadow_safe=shadow_safe)

    reg = ToolRegistry([remote(False), remote(True)])
    assert reg.changes_nothing("crm__lookup_False") and not reg.runs_in_shadow("crm__lookup_False")
    assert reg.runs_in_shadow("crm__lookup_True")
    obs = await execute(reg, "crm__lookup_False", {}, ToolContext(shadow=True))
    assert obs.error_code == "not_executed_in_shadow"  # never reached the server (server=None would raise)


class _Question(TypedDict, total=False):  # a state or input schema without BaseState's 'shadow' key
    question: str


@pytest.mark.parametrize("schemas", [
    {"state_schema": _Question},  # the state drops the flag
    {"state_schema": BaseState, "input_schema": _Question},  # the state keeps it, but a run starts without it
], ids=["state", "input-schema"])
async def test_a_workflow_that_would_drop_the_flag_cannot_run_as_a_shadow(tmp_path: Path, schemas) -> None:
    """Its nodes would never see 'shadow', and its tools would act: refused (fail closed)."""
    def build(deps):
        g = StateGraph(**schemas)
        g.add_node("answer", lambda s: {})
        g.set_entry_point("answer")
        g.add_edge("answer", END)
        return g

    svc = service(tmp_path, SideEffectTool(), Memory())
    svc.registry.register(Workflow("narrow", "drops the flag", build, lambda question, **_: {"question": question}))
    with pytest.raises(InvalidRequest, match="cannot run as a shadow"):
        await collect(svc.run("narrow", "hello", owner="alice", shadow=True))


def test_a_shadow_runs_tool_calls_are_audited_as_the_shadows(tmp_path: Path) -> None:
    from agents.tools import ToolObservation
    from lifecycle.tools.audit import ToolAudit

    log = ToolAudit(tmp_path / "tools.db")
    obs = ToolObservation("c1", "retrieve", {"query": "q"}, True, "passages")
    log.record(ToolContext(run_id="r1", principal="alice", shadow=True), obs)
    log.record(ToolContext(run_id="r2", principal="alice"), obs)
    events = {e.details["run_id"]: e for e in log.events()}
    assert events["r1"].actor == "shadow:alice" and events["r1"].details["shadow"] is True
    assert events["r2"].actor == "alice" and "shadow" not in events["r2"].details
    log.close()
