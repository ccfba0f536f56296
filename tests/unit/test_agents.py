"""Agents: nodes, routing, tools and the runner with a scripted fake model (no server, no model)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agents.arithmetic import evaluate
from agents.errors import MalformedOutput, RunNotResumable, ToolInputError
from agents.events import ErrorEvent, Final, InterruptEvent, NodeFinished, RunStarted, Token, ToolCall, ToolResult
from agents.llm import parse_json
from agents.service import AgentService
from agents.settings import AgentSettings
from agents.testing import FlakyTool, KeywordRetriever, ScriptedLLM, SideEffectTool, schema_kind
from agents.tools import FunctionTool, ToolContext, ToolRegistry, builtin_tools, execute
from agents.workflows import rag_qa, research
from agents.workflows.common import IDK, Deps, citations_for, support
from app.core.errors import ModelNotFound
from app.core.types import ChatMessage

DOCS = {
    "qdrant": "Keel stores document vectors in Qdrant, an embedded vector engine.",
    "vllm": "Keel serves the SmolLM2 model with vLLM on CPU at about 30 tokens per second.",
    "zebra": "Zebras are striped animals living in Africa.",
}
ANSWER = "Keel stores document vectors in Qdrant [1]."


def by_kind(**answers: Any):
    """A responder: per decision kind, a list consumed in order (the last one repeats) or a callable."""
    queues = {k: (list(v) if isinstance(v, list) else v) for k, v in answers.items()}

    def respond(messages, schema):
        kind = schema_kind(schema)
        q = queues.get(kind)
        if q is None:
            raise AssertionError(f"unscripted {kind} request")
        if callable(q):
            return q(messages)
        return q.pop(0) if len(q) > 1 else q[0]

    return respond


_OPEN: list[AgentService] = []


@pytest.fixture(autouse=True)
async def _close_services():
    yield
    while _OPEN:  # an unclosed aiosqlite connection keeps a thread (and the test process) alive
        await _OPEN.pop().aclose()


def make_service(tmp_path: Path, llm: ScriptedLLM, *, tools: ToolRegistry | None = None, retriever: Any = None,
                 memory: Any = None, **settings: Any) -> AgentService:
    deps = Deps(llm=llm, tools=tools or ToolRegistry(builtin_tools(), risky={"memory_write"}),
                settings=AgentSettings(**settings), retriever=retriever or KeywordRetriever(DOCS), memory=memory)
    svc = AgentService(deps, db_path=tmp_path / "agents.db")
    _OPEN.append(svc)
    return svc


async def collect(events) -> list[Any]:
    return [e async for e in events]


def final(events: list[Any]) -> Final:
    assert isinstance(events[-1], Final), events[-1]
    return events[-1]


# -- safe arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "value"), [("2 * (3 + 4) ** 2", 98), ("10 / 4", 2.5), ("-3 + abs(-2)", -1),
                                             ("2^10", 1024), ("sqrt(16) + max(1, 5)", 9), ("7 // 2 + 7 % 2", 4)])
def test_arithmetic_evaluates(expr: str, value: float) -> None:
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('echo hi')", "a + 1", "(1).real", "[1, 2]", "2 ** 1000",
                                  "1 / 0", "lambda: 1", "open('x')", "", "1 if 1 else 2", "'a' * 3", "True + 1"])
def test_arithmetic_rejects(expr: str) -> None:
    with pytest.raises(ToolInputError):
        evaluate(expr)


# -- model output parsing ----------------------------------------------------------------------


def test_parse_json_tolerates_fences_and_chatter() -> None:
    assert parse_json('```json\n{"next": "writer"}\n```') == {"next": "writer"}
    assert parse_json('Sure! {"a": 1} done') == {"a": 1}
    for bad in ("not json", "[1, 2]", '{"a": '):
        with pytest.raises(MalformedOutput):
            parse_json(bad)


# -- tools ---------------------------------------------------------------------------------------


async def test_tool_errors_become_observations_with_bounded_retries() -> None:
    flaky, broken = FlakyTool(failures=1), FlakyTool(name="broken", failures=99)

    async def slow(args, ctx):
        await asyncio.sleep(5)

    reg = ToolRegistry([*builtin_tools(), flaky, broken,
                        FunctionTool("slow", "sleeps", {"type": "object", "properties": {}}, slow)])
    events: list[Any] = []
    ctx = ToolContext(run_id="r")

    ok = await execute(reg, "flaky", {}, ctx, emit=events.append, retries=1, backoff_s=0)
    assert ok.ok and ok.attempts == 2 and ok.output == "worked"
    bad = await execute(reg, "broken", {}, ctx, emit=events.append, retries=2, backoff_s=0)
    assert not bad.ok and bad.attempts == 3 and "transient failure" in bad.output
    assert broken.attempts == 3
    timeout = await execute(reg, "slow", {}, ctx, retries=0, timeout_s=0.05)
    assert not timeout.ok and timeout.error_code == "tool_timeout"
    bad_input = await execute(reg, "calculator", {"expression": "1/0"}, ctx, retries=3)
    assert not bad_input.ok and bad_input.attempts == 1 and "division by zero" in bad_input.output
    missing = await execute(reg, "calculator", {}, ctx)
    assert not missing.ok and "missing argument" in missing.output
    unknown = await execute(reg, "nope", {}, ctx)
    assert not unknown.ok and unknown.error_code == "tool_not_found"
    calc = await execute(reg, "calculator", {"expression": "6*7"}, ctx)
    assert calc.ok and calc.data == 42
    assert [type(e) for e in events] == [ToolCall, ToolResult, ToolCall, ToolResult]


def test_tool_registry_protocol_and_risk() -> None:
    reg = ToolRegistry(builtin_tools(), risky={"memory_write"})
    reg.register(SideEffectTool())
    assert reg.is_risky("send_report") and reg.is_risky("memory_write") and not reg.is_risky("calculator")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(SideEffectTool())
    with pytest.raises(TypeError):
        reg.register(object())  # type: ignore[arg-type]
    spec = {s["name"]: s for s in reg.specs()}
    assert spec["send_report"]["risky"] and spec["calculator"]["input_schema"]["required"] == ["expression"]


# -- rag-qa nodes --------------------------------------------------------------------------------


def test_grounding_helpers() -> None:
    passages = [{"text": DOCS["qdrant"], "title": "qdrant", "source": "/q.md"},
                {"text": DOCS["vllm"], "title": "vllm", "source": "/v.md"}]
    assert support(ANSWER, passages) == 1.0
    assert support("Paris is the capital of France.", passages) < 0.5
    assert [c["index"] for c in citations_for("It uses vLLM [2] and Qdrant [1] [2] [9].", passages)] == [2, 1]
    assert [c["index"] for c in citations_for("SmolLM2 runs on vLLM.", passages)] == [2]


async def test_verify_node_combines_overlap_and_model_verdict() -> None:
    passages = [{"text": DOCS["qdrant"], "title": "qdrant"}]
    state = {"question": "Where are vectors?", "draft": ANSWER, "passages": passages}
    llm = ScriptedLLM([{"supported": True}, {"supported": False}, "garbage", {"supported": True}])
    deps = Deps(llm=llm, tools=ToolRegistry())
    emit = lambda _e: None  # noqa: E731
    assert (await rag_qa.verify(state, deps, emit))["grounded"] is True
    assert (await rag_qa.verify(state, deps, emit))["grounded"] is False  # model says unsupported
    assert (await rag_qa.verify(state, deps, emit))["grounded"] is True  # malformed -> overlap alone
    off_topic = {**state, "draft": "Paris is the capital of France."}
    out = await rag_qa.verify(off_topic, deps, emit)
    assert out["grounded"] is False and out["verdict"]["reason"] == "low overlap"
    idk = await rag_qa.verify({**state, "draft": IDK}, deps, emit)
    assert idk["grounded"] is False
    assert rag_qa.route_after_verify({"grounded": True, "round": 1}, 2) == "finalize"
    assert rag_qa.route_after_verify({"grounded": False, "round": 1}, 2) == "reformulate"
    assert rag_qa.route_after_verify({"grounded": False, "round": 2}, 2) == "finalize"


async def test_reformulate_falls_back_on_malformed_or_unchanged_query() -> None:
    deps = Deps(llm=ScriptedLLM(["{broken", {"query": "where are vectors?"}, {"query": "vector engine name"}]),
                tools=ToolRegistry())
    state = {"question": "Where are the vectors stored?", "query": "where are vectors?"}
    emit = lambda _e: None  # noqa: E731
    q1 = (await rag_qa.reformulate(state, deps, emit))["query"]
    q2 = (await rag_qa.reformulate(state, deps, emit))["query"]
    q3 = (await rag_qa.reformulate(state, deps, emit))["query"]
    assert q1 and q1 != state["query"] and q2 != state["query"] and q3 == "vector engine name"


# -- rag-qa runs ---------------------------------------------------------------------------------


async def test_rag_qa_answers_with_citations(tmp_path: Path) -> None:
    llm = ScriptedLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    svc = make_service(tmp_path, llm)
    events = await collect(svc.run("rag-qa", "Where does Keel store vectors?"))
    f = final(events)
    assert f.status == "completed" and f.answer == ANSWER and f.grounded is True
    assert [c.title for c in f.citations] == ["qdrant"]
    assert isinstance(events[0], RunStarted)
    assert "".join(e.text for e in events if isinstance(e, Token)) == ANSWER
    nodes = [e.node for e in events if isinstance(e, NodeFinished)]
    assert nodes == ["retrieve", "answer", "verify", "finalize"]
    run = await svc.get_run(f.run_id)
    assert run["status"] == "completed" and [s["node"] for s in run["steps"]] == nodes
    assert all(s["duration_ms"] >= 0 for s in run["steps"]) and run["state"]["answer"] == ANSWER
    await svc.aclose()


async def test_rag_qa_reformulates_then_answers(tmp_path: Path) -> None:
    llm = ScriptedLLM(responder=by_kind(text=["Zebras are striped [1].", ANSWER], supported=[{"supported": True}],
                                        query=[{"query": "qdrant vector engine"}]))
    retriever = KeywordRetriever(DOCS)
    svc = make_service(tmp_path, llm, retriever=retriever)
    f = final(await collect(svc.run("rag-qa", "Which engine holds the document vectors?")))
    assert f.answer == ANSWER and f.status == "completed"
    assert retriever.queries == ["Which engine holds the document vectors?", "qdrant vector engine"]
    await svc.aclose()


async def test_rag_qa_says_it_does_not_know_after_bounded_rounds(tmp_path: Path) -> None:
    llm = ScriptedLLM(responder=by_kind(text=["The moon is made of cheese."], supported=[{"supported": False}],
                                        query=["not json"]))
    retriever = KeywordRetriever(DOCS)
    svc = make_service(tmp_path, llm, retriever=retriever, max_rounds=3)
    f = final(await collect(svc.run("rag-qa", "What is the moon made of, says Keel?")))
    assert f.answer == IDK and f.citations == [] and f.status == "completed"
    assert len(retriever.queries) == 3
    await svc.aclose()


async def test_rag_qa_tool_failure_is_an_observation_not_a_crash(tmp_path: Path) -> None:
    llm = ScriptedLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}],
                                        query=[{"query": "qdrant vectors"}]))
    # fails twice: the first round's retry also fails -> no passages -> second round succeeds
    retriever = KeywordRetriever(DOCS, fail=2)
    svc = make_service(tmp_path, llm, retriever=retriever, tool_retries=1)
    events = await collect(svc.run("rag-qa", "Where does Keel store vectors?"))
    results = [e for e in events if isinstance(e, ToolResult)]
    assert not results[0].ok and results[0].attempts == 2 and "vector store unreachable" in results[0].output
    assert results[1].ok
    assert final(events).answer == ANSWER
    await svc.aclose()


async def test_node_timeout_fails_the_run_and_continue_retries(tmp_path: Path) -> None:
    class SlowLLM(ScriptedLLM):
        slow = True

        async def stream(self, messages, **kw):
            if self.slow:
                await asyncio.sleep(2)
            async for t in super().stream(messages, **kw):
                yield t

    llm = SlowLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    svc = make_service(tmp_path, llm, node_timeout_s=0.2)
    events = await collect(svc.run("rag-qa", "Where does Keel store vectors?"))
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "node_timeout"
    run_id = events[-1].run_id
    assert (await svc.get_run(run_id))["status"] == "failed"
    llm.slow = False
    resumed = await collect(svc.resume(run_id, "continue"))
    assert final(resumed).answer == ANSWER
    # retrieval was not repeated: the checkpoint after `retrieve` was kept
    assert next(e.node for e in resumed if isinstance(e, NodeFinished)) == "answer"
    await svc.aclose()


async def test_thread_keeps_history_across_runs(tmp_path: Path) -> None:
    llm = ScriptedLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    svc = make_service(tmp_path, llm)
    f1 = final(await collect(svc.run("rag-qa", "Where does Keel store vectors?", thread_id="t-1")))
    f2 = final(await collect(svc.run("rag-qa", "And which engine is that?", thread_id="t-1")))
    hist = await svc.thread_history("t-1")
    assert [h["run_id"] for h in hist["history"]] == [f1.run_id, f2.run_id]
    answer_prompt = [m for m, s in llm.calls if s is None][-1]
    assert ChatMessage("user", "Where does Keel store vectors?") in answer_prompt  # prior turn in context
    await svc.aclose()


async def test_cancelled_consumer_leaves_a_resumable_run(tmp_path: Path) -> None:
    llm = ScriptedLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    svc = make_service(tmp_path, llm)
    gen = svc.run("rag-qa", "Where does Keel store vectors?")
    first = await anext(gen)
    await anext(gen)
    await gen.aclose()
    assert (await svc.get_run(first.run_id))["status"] == "cancelled"
    assert final(await collect(svc.resume(first.run_id, "continue"))).answer == ANSWER
    await svc.aclose()


# -- research ---------------------------------------------------------------------------------------


def test_supervisor_sanitizes_impossible_decisions() -> None:
    empty: dict[str, Any] = {"trace": [], "sources": []}
    assert research.sanitize(None, empty)[0] == "researcher"
    assert research.sanitize("FINISH", empty)[0] == "researcher"
    drafted = {"trace": [{"worker": "researcher"}], "sources": [{}], "draft": "d", "drafts_written": 1,
               "drafts_critiqued": 0}
    assert research.sanitize("FINISH", drafted)[0] == "critic"
    assert research.sanitize("analyst", drafted) == ("analyst", "")
    critiqued = {**drafted, "drafts_critiqued": 1, "critique": {"accepted": False}}
    assert research.sanitize("critic", critiqued)[0] == "writer"
    assert research.sanitize("FINISH", {**critiqued, "critique": {"accepted": True}}) == ("FINISH", "")


def research_llm(*, supervisor: list[Any], critic: list[Any], analyst: list[Any] | None = None,
                 writer: list[str] | None = None, memory: list[Any] | None = None) -> ScriptedLLM:
    return ScriptedLLM(responder=by_kind(next=supervisor, accepted=critic, tool=analyst or [{"tool": "none",
                                                                                             "args": {}}],
                                         text=writer or [ANSWER], worth_keeping=memory or [{"worth_keeping": False,
                                                                                            "fact": ""}]))


async def test_research_routes_until_the_critic_accepts(tmp_path: Path) -> None:
    llm = research_llm(supervisor=[{"next": "researcher", "reason": "facts"}, "{malformed",
                                   {"next": "critic", "reason": "check"}, {"next": "FINISH", "reason": "x"}],
                       critic=[{"accepted": True, "feedback": "good"}])
    svc = make_service(tmp_path, llm)
    events = await collect(svc.run("research", "Where does Keel store vectors?"))
    f = final(events)
    assert f.status == "completed" and f.answer == ANSWER and f.grounded is True
    nodes = [e.node for e in events if isinstance(e, NodeFinished)]
    # the malformed decision fell back to the writer; the critic accepted; supervisor finished
    assert nodes == ["supervisor", "researcher", "supervisor", "writer", "supervisor", "critic", "supervisor",
                     "finalize", "remember"]
    await svc.aclose()


async def test_research_step_budget_ends_with_status_not_exception(tmp_path: Path) -> None:
    llm = research_llm(supervisor=[{"next": "writer", "reason": "w"}, {"next": "critic", "reason": "c"}],
                       critic=[{"accepted": False, "feedback": "not good enough"}])
    svc = make_service(tmp_path, llm)
    events = await collect(svc.run("research", "Where does Keel store vectors?", max_steps=4))
    f = final(events)
    assert f.status == "step_limit" and f.answer == ANSWER
    assert sum(1 for e in events if isinstance(e, NodeFinished) and e.node == "supervisor") == 5
    assert (await svc.get_run(f.run_id))["status"] == "step_limit"
    await svc.aclose()


async def test_recursion_limit_is_a_step_limit_status(tmp_path: Path) -> None:
    llm = research_llm(supervisor=[{"next": "researcher", "reason": "r"}, {"next": "writer", "reason": "w"},
                                   {"next": "critic", "reason": "c"}],
                       critic=[{"accepted": False, "feedback": "no"}])
    svc = make_service(tmp_path, llm, recursion_limit=6, max_steps=50)
    f = final(await collect(svc.run("research", "Where does Keel store vectors?")))
    assert f.status == "step_limit" and f.answer == ANSWER
    await svc.aclose()


# -- human in the loop -------------------------------------------------------------------------------


def hitl_service(tmp_path: Path, tool: SideEffectTool, *, restarted: bool = False, **kw: Any) -> AgentService:
    reg = ToolRegistry(builtin_tools())
    reg.register(tool)
    seen_notes: list[str] = []

    def writer(messages):
        seen_notes.append(messages[-1].content)
        return ANSWER

    llm = ScriptedLLM(responder=by_kind(
        next=[{"next": "analyst", "reason": "send"}, {"next": "researcher", "reason": "r"},
              {"next": "writer", "reason": "w"}, {"next": "critic", "reason": "c"},
              {"next": "FINISH", "reason": "f"}][1 if restarted else 0:],
        tool=[{"tool": "send_report", "args": {"to": "team@example.com", "body": "hi"}}],
        accepted=[{"accepted": True, "feedback": "ok"}], text=writer,
        worth_keeping=[{"worth_keeping": False, "fact": ""}]))
    svc = make_service(tmp_path, llm, tools=reg, **kw)
    svc.seen_notes = seen_notes  # type: ignore[attr-defined]
    return svc


async def _pause(svc: AgentService) -> InterruptEvent:
    events = await collect(svc.run("research", "Send the vector store report", owner="alice"))
    assert isinstance(events[-1], InterruptEvent), events[-1]
    return events[-1]


async def test_interrupt_then_approve_runs_the_side_effect_once(tmp_path: Path) -> None:
    tool = SideEffectTool()
    svc = hitl_service(tmp_path, tool)
    intr = await _pause(svc)
    assert intr.tool == "send_report" and intr.args == {"to": "team@example.com", "body": "hi"}
    assert tool.executed == []
    pending = await svc.pending_approvals(owner="alice")
    assert [p["run_id"] for p in pending] == [intr.run_id] and pending[0]["tool"] == "send_report"
    assert await svc.pending_approvals(owner="bob") == []
    events = await collect(svc.resume(intr.run_id, "approve", owner="alice"))
    assert isinstance(events[0], RunStarted) and events[0].resumed
    assert final(events).status == "completed"
    assert tool.executed == [{"to": "team@example.com", "body": "hi"}]
    with pytest.raises(RunNotResumable):
        await collect(svc.resume(intr.run_id, "approve", owner="alice"))
    assert tool.executed == [{"to": "team@example.com", "body": "hi"}]  # never repeated
    assert await svc.pending_approvals() == []
    await svc.aclose()


async def test_interrupt_reject_reason_reaches_the_agent(tmp_path: Path) -> None:
    tool = SideEffectTool()
    svc = hitl_service(tmp_path, tool)
    intr = await _pause(svc)
    events = await collect(svc.resume(intr.run_id, "reject", reason="not before the review", owner="alice"))
    results = [e for e in events if isinstance(e, ToolResult)]
    assert results[0].tool == "send_report" and not results[0].ok and "not before the review" in results[0].output
    assert tool.executed == []
    assert final(events).status == "completed"
    assert any("not before the review" in n for n in svc.seen_notes)  # type: ignore[attr-defined]
    await svc.aclose()


async def test_interrupt_edit_runs_with_the_edited_args(tmp_path: Path) -> None:
    tool = SideEffectTool()
    svc = hitl_service(tmp_path, tool)
    intr = await _pause(svc)
    with pytest.raises(Exception, match="edit needs"):
        await collect(svc.resume(intr.run_id, "edit", owner="alice"))
    events = await collect(svc.resume(intr.run_id, "edit", args={"to": "lead@example.com"}, owner="alice"))
    assert tool.executed == [{"to": "lead@example.com"}]
    assert final(events).status == "completed"
    await svc.aclose()


async def test_interrupted_run_survives_a_new_service_instance(tmp_path: Path) -> None:
    tool = SideEffectTool()
    svc = hitl_service(tmp_path, tool)
    intr = await _pause(svc)
    await svc.aclose()
    svc2 = hitl_service(tmp_path, tool, restarted=True)  # a "restarted" process on the same database
    assert [p["run_id"] for p in await svc2.pending_approvals()] == [intr.run_id]
    with pytest.raises(Exception, match="has run"):
        await collect(svc2.run("research", "again", thread_id=intr.thread_id, owner="alice"))
    assert final(await collect(svc2.resume(intr.run_id, "approve"))).status == "completed"
    assert len(tool.executed) == 1
    await svc2.aclose()


async def test_run_validation_errors_come_before_the_first_event(tmp_path: Path) -> None:
    svc = make_service(tmp_path, ScriptedLLM())
    from agents.errors import RunNotFound, WorkflowNotFound
    from app.core.errors import InvalidRequest

    with pytest.raises(WorkflowNotFound):
        await anext(svc.run("nope", "q"))
    with pytest.raises(InvalidRequest):
        await anext(svc.run("rag-qa", "  "))
    with pytest.raises(InvalidRequest):
        await anext(svc.run("rag-qa", "q", thread_id="bad id!"))
    with pytest.raises(RunNotFound):
        await anext(svc.resume("run-missing"))
    assert await svc.list_runs() == []
    await svc.aclose()


# -- the chat-model path ----------------------------------------------------------------------------


async def test_chat_events_stream_the_final_answer(tmp_path: Path) -> None:
    from app.core.types import Finished, TextDelta
    from app.services.chat import Started

    llm = ScriptedLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    svc = make_service(tmp_path, llm)
    assert {m["id"] for m in svc.chat_models()} == {"agent:ops", "agent:rag-qa", "agent:research"}
    msgs = [ChatMessage("system", "be brief"), ChatMessage("user", "Where does Keel store vectors?")]
    events = [e async for e in svc.chat_events("agent:rag-qa", msgs, request_id="req1")]
    assert isinstance(events[0], Started) and events[0].model == "agent:rag-qa" and events[0].id == "chatcmpl-req1"
    assert isinstance(events[-2], Finished)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text.startswith(ANSWER) and "Sources: [1] qdrant" in text
    # like a rag: answer, the passages follow as their own event (the API sends it before [DONE])
    from app.services.chat import Citations

    assert isinstance(events[-1], Citations) and events[-1].items[0]["index"] == 1
    assert events[-1].items[0]["text"] and events[-1].items[0]["label"]
    with pytest.raises(ModelNotFound):
        await anext(svc.chat_events("agent:nope", msgs))
    await svc.aclose()


# -- the run's time limit ---------------------------------------------------------------------------


class StallingLLM(ScriptedLLM):
    """Streams its answer only after a long pause while ``stall`` is set; records a cancelled pause."""

    stall = True
    cancelled = 0

    async def stream(self, messages, **kw):
        if self.stall:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        async for t in super().stream(messages, **kw):
            yield t


async def test_run_time_limit_ends_the_run_with_a_status_and_continue_finishes_it(tmp_path: Path) -> None:
    llm = StallingLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    # Every node is far inside its own limit; only the run's overall limit can stop the stalled answer.
    svc = make_service(tmp_path, llm, node_timeout_s=120, run_timeout_s=0.5)
    events = await collect(svc.run("rag-qa", "Where does Keel store vectors?"))
    assert isinstance(events[-1], ErrorEvent), events[-1]
    assert events[-1].code == "run_timeout" and "run_timeout_s=0.5" in events[-1].message
    assert not any(isinstance(e, Final) for e in events)
    assert llm.cancelled == 1  # the node in flight was cancelled, not left running in the background
    run = await svc.get_run(events[-1].run_id)
    assert run["status"] == "timed_out" and run["error"]["code"] == "run_timeout"
    assert [s["node"] for s in run["steps"]] == ["retrieve"]
    llm.stall = False
    resumed = await collect(svc.resume(run["run_id"], "continue"))
    assert final(resumed).status == "completed" and final(resumed).answer == ANSWER
    # the retrieval finished before the limit is not repeated: the checkpoint after it was kept
    assert next(e.node for e in resumed if isinstance(e, NodeFinished)) == "answer"
    with pytest.raises(RunNotResumable):
        await collect(svc.resume(run["run_id"], "continue"))
    await svc.aclose()


def test_run_timeout_setting_is_validated() -> None:
    assert AgentSettings().run_timeout_s == 300
    with pytest.raises(ValueError, match="greater than 0"):
        AgentSettings(run_timeout_s=0)


async def test_run_time_limit_on_the_chat_model_path_is_a_504(tmp_path: Path) -> None:
    from app.core.errors import KeelError

    llm = StallingLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    svc = make_service(tmp_path, llm, node_timeout_s=120, run_timeout_s=0.3)
    with pytest.raises(KeelError, match=r"run_timeout_s=0\.3") as e:
        _ = [ev async for ev in svc.chat_events("agent:rag-qa", [ChatMessage("user", "Where are vectors?")])]
    assert (e.value.status, e.value.code) == (504, "run_timeout")
    assert (await svc.list_runs())[0]["status"] == "timed_out"
    await svc.aclose()
