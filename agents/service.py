"""The agent runner: starts and resumes runs on durable threads and yields typed events.

``AgentService.run`` / ``resume`` are async generators of :mod:`agents.events` dataclasses;
validation happens before the first event, so a caller that pulls one event first (the API
router does) turns bad requests into HTTP errors instead of errors inside a 200 stream.

Statuses: ``running`` -> ``interrupted`` (waiting for approval) | ``completed`` | ``step_limit``
(budget or recursion limit hit: a final answer, no exception) | ``timed_out`` (``run_timeout_s``
spent: an ``error`` event with code ``run_timeout``, no exception; resumable with ``continue``) |
``failed`` (error event; the checkpoint stays, ``resume(action="continue")`` retries from the last
completed step) | ``cancelled`` (the consumer went away) | ``stalled`` (the process died while
running; found at start-up, resumable with ``continue``).

Storage: SQLite files by default; with ``agents.postgres_url`` the checkpoints and the runs table
are in Postgres, shared by every API process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode, Tracer

from agents.errors import RunNotFound, RunNotResumable, WorkflowNotFound
from agents.events import (
    AgentEvent,
    Citation,
    ErrorEvent,
    Final,
    GuardrailEvent,
    InterruptEvent,
    NodeFinished,
    NodeStarted,
    RunStarted,
    Token,
    ToolCall,
    ToolResult,
)
from agents.llm import USAGE_KEY, AgentLLM
from agents.memory import QdrantMemoryStore
from agents.registry import WorkflowRegistry, default_registry
from agents.runs import RESUMABLE, TERMINAL, PostgresRunStore, RunRecord, RunStore, RunStoreBase, runs_db_path
from agents.settings import AgentConfig, AgentSettings
from agents.tools import SHADOW_OWNER, ToolRegistry, builtin_tools
from agents.workflows.common import IDK, Deps
from app.core.db import RECONNECT_TIMEOUT_S, advisory_lock, postgres_unavailable
from app.core.errors import Conflict, InvalidRequest, KeelError, ModelNotFound, NotFound, StoreUnavailable
from app.core.types import ChatMessage, Citations, Finished, Started, TextDelta
from app.guardrails.types import GuardContext, GuardrailRedaction, GuardrailRetraction

log = logging.getLogger("keel.agents")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_STREAMED = (NodeStarted, NodeFinished, ToolCall, ToolResult, Token)
AGENT_MODEL_PREFIX = "agent:"


# A run still ``running`` in a shared (Postgres) store is only known dead once it has been idle longer
# than any live run can be: the time limit plus this margin for a loaded event loop.
STALL_MARGIN_S = 60.0
_STALL_SWEEP_EVERY_S = 30.0
# Serialises the checkpointer's schema set-up when several processes start at once.
_CHECKPOINT_SETUP_LOCK = 0x6B65656C_636B  # "keelck"


AgentStoreUnavailable = StoreUnavailable  # the name callers and tests know


class RunTimeout(KeelError):
    """A run that spent ``run_timeout_s``, where it must be an HTTP error (the ``agent:`` chat models)."""

    code = "run_timeout"
    status = 504
    type = "server_error"


class RunTimedOut(Exception):
    """The run's wall-clock budget (``run_timeout_s``) is spent."""


async def _bounded(stream: Any, deadline: float) -> AsyncIterator[Any]:
    """``stream``'s items until the loop clock reaches ``deadline``, then :class:`RunTimedOut`.

    The timeout wraps each single ``anext`` (never a ``yield``), so the cancellation lands in the
    graph's pending work, where LangGraph cancels the running node, and not in the consumer's code.
    """
    it = aiter(stream)
    while True:
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                item = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if timeout.expired():
                raise RunTimedOut from None
            raise  # a node's own TimeoutError is an ordinary failure
        yield item


def _check_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise InvalidRequest(f"invalid {what} {value!r}: 1-128 letters, digits, '_', '-', '.', ':'", param=what)
    return value


@dataclasses.dataclass
class RunGuard:
    """The guardrail engine around one drive of a run (a start or a resume), as the chat path guards a request:
    the input stage before the workflow sees the text, the output stage on the final answer."""

    engine: Any  # app.guardrails.engine.GuardrailEngine
    context: Any  # app.guardrails.types.GuardContext
    decision: Any = None  # the input stage's InputDecision (None: a resume that sends the model no new text)

    @property
    def tag(self) -> str | None:
        """``<policy>@<version>`` as chat reports it in ``guardrails``; None while the engine is disabled."""
        d = self.decision
        if d is not None:
            return f"{d.policy}@{d.policy_version}" if d.enabled else None
        if not self.engine.settings.enabled:
            return None
        c = self.context
        policy = self.engine.policy.select(route=c.route, workflow=c.workflow, model=c.model)
        return f"{policy.name}@{self.engine.policy.version_tag}"

    async def check_input(self, text: str) -> Any:
        self.decision = await self.engine.check_input([ChatMessage("user", text)], self.context)
        # what the answer may repeat without it counting as a leak or new PII: the user's own (checked) words
        self.context = dataclasses.replace(self.context, question=self.decision.messages[-1].content)
        return self.decision

    def input_events(self, run_id: str) -> list[GuardrailEvent]:
        d = self.decision
        if d is None:
            return []
        out = [GuardrailEvent(run_id, "input", "redact", r.validator, r.reason) for r in d.results
               if r.action == "redact"]
        if d.blocked:
            by = d.blocked_by
            out.append(GuardrailEvent(run_id, "input", "block", by.validator, by.reason, d.refusal or ""))
        return out

    def token_stream(self) -> Any:
        """The windowed output guard the chat path streams through: answer tokens are released window by window
        once each passed, so a run still streams under a policy; ``final`` stays the checked answer."""
        return self.engine.output_guard(self.context, self.decision)

    async def tokens(self, run_id: str, out: Any, chunk: Token | None) -> list[Token | GuardrailEvent]:
        """Feed one token (``None``: the stream ended) through ``out``; what may be sent now."""
        released = await (out.feed(TextDelta(chunk.text)) if chunk is not None else out.finish(0))
        node = chunk.node if chunk is not None else ""
        events: list[Token | GuardrailEvent] = []
        for e in released:
            if isinstance(e, TextDelta):
                events.append(Token(run_id, node, e.text))
            elif isinstance(e, GuardrailRedaction):
                events.append(GuardrailEvent(run_id, "output", "redact", e.validator))
            elif isinstance(e, GuardrailRetraction):
                # the tokens shown are withdrawn; ``final`` carries what to show instead
                events.append(GuardrailEvent(run_id, "output", "retract", e.validator, e.reason, e.message))
        return events

    async def check_answer(self, run_id: str, answer: str, cites: list[dict[str, Any]], *, streamed: bool = False
                           ) -> tuple[str | None, str, list[GuardrailEvent]]:
        """(refusal if the answer is withheld, the answer to release, events). The cited passages are the
        sources the groundedness check (policy ``rag``) holds the answer to, as for a grounded chat answer."""
        passages = tuple(f"{c.get('label') or c.get('title') or ''}: {c.get('text') or ''}" for c in cites)
        context = dataclasses.replace(self.context, passages=passages or None)
        verdict = await self.engine.check_output(answer, context, self.decision)
        # reask is a non-streamed chat answer's retry; a finished run has no model call left to redo: refused
        failed = next((r for r in verdict.results if r.action in ("block", "reask")), None)
        if failed is not None:
            refusal = verdict.refusal or self.engine.refusal_for(verdict.policy, failed.validator)
            # tokens already shown (checks that need the whole answer and its sources, like groundedness, judge
            # only here) are withdrawn: 'retract', as a chat stream would
            action = "retract" if streamed else "block"
            return refusal, "", [GuardrailEvent(run_id, "output", action, failed.validator, failed.reason, refusal)]
        return None, verdict.text, [GuardrailEvent(run_id, "output", "redact", r.validator, r.reason)
                                    for r in verdict.results if r.action == "redact"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class AgentService:
    def __init__(self, deps: Deps, registry: WorkflowRegistry | None = None, *, db_path: Path,
                 postgres_url: str | None = None, checkpointer: Any = None, tracer: Tracer | None = None) -> None:
        self.deps = deps
        self.tracer = tracer or trace.NoOpTracer()
        #: ``on_usage(key id, token budget, tokens)``: each model call's tokens, for the key's token limit
        self.on_usage: Callable[[str, int, int], None] | None = None
        self.settings: AgentSettings = deps.settings
        self.registry = registry or default_registry()
        self.db_path = Path(db_path)
        self.postgres_url = postgres_url
        self.checkpointer = checkpointer
        self.runs: RunStoreBase | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._graphs: dict[str, Any] = {}
        self._swept_at = 0.0
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, *, sweep: bool = True) -> None:
        """Open the runs table and the checkpointer (idempotent; call it in the serving event loop). ``sweep``:
        mark the runs a gone process left ``running`` as stalled (a serving process does; ``keel migrate``,
        which may run beside a live server, does not)."""
        # Opening awaits; a second caller must wait for the checkpointer rather than see a half-open service.
        async with self._start_lock:
            if self.runs is not None:
                return
            if self.postgres_url:
                import psycopg

                try:
                    self.runs = await asyncio.to_thread(PostgresRunStore, self.postgres_url)
                except psycopg.OperationalError as e:
                    raise self._unavailable(e) from None
            else:
                # Its own file: a sync write to the checkpointer's file could block the event loop while the
                # aiosqlite thread holds the write lock waiting for that same loop (a deadlock until timeout).
                self.runs = RunStore(runs_db_path(self.db_path))
            if sweep:
                self._sweep_stalled(force=True)
            if self.checkpointer is None:
                self._stack = contextlib.AsyncExitStack()
                try:
                    saver = await (self._postgres_saver() if self.postgres_url else self._sqlite_saver())
                except BaseException:
                    await self.aclose()
                    raise
                self.checkpointer = saver

    async def _sqlite_saver(self) -> Any:
        import aiosqlite
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        conn = await aiosqlite.connect(str(self.db_path))
        self._stack.push_async_callback(conn.close)
        saver = AsyncSqliteSaver(conn)
        await saver.setup()
        return saver

    async def _postgres_saver(self) -> Any:
        import psycopg
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        # A pool rather than from_conn_string's single connection: a Postgres restart costs a reconnect
        # (check on checkout), not every later run. The saver's own lock serialises its queries anyway,
        # so two connections are plenty. These kwargs are the ones the saver requires.
        pool = AsyncConnectionPool(
            self.postgres_url, min_size=1, max_size=2, timeout=10.0, open=False, name="keel-agent-checkpoints",
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
            check=AsyncConnectionPool.check_connection, reconnect_timeout=RECONNECT_TIMEOUT_S,
        )
        self._stack.push_async_callback(pool.close)
        try:
            await pool.open(wait=True, timeout=10.0)
            saver = AsyncPostgresSaver(pool)
            # setup() runs migrations and records them; two processes doing it at once would collide.
            async with advisory_lock(self.postgres_url, _CHECKPOINT_SETUP_LOCK, what="the agents' checkpoint schema"):
                await saver.setup()
        except psycopg.OperationalError as e:  # PoolTimeout is one too
            raise self._unavailable(e) from None
        return saver

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        return postgres_unavailable("the agents'", self.postgres_url or "", "agents.postgres_url", e)

    def _sweep_stalled(self, *, force: bool = False) -> None:
        """Mark runs whose process died as ``stalled``. A store this process owns (SQLite) is swept once at
        start-up: every ``running`` run is an orphan. In a shared store (Postgres) other processes have live
        runs, so only runs idle longer than any live run can be are orphans, and the sweep repeats now and
        then, since a dead process's runs age into that state long after any start-up."""
        now = time.monotonic()
        if self.runs is None or not (force or (self.runs.shared and now - self._swept_at >= _STALL_SWEEP_EVERY_S)):
            return
        self._swept_at = now
        idle = self.settings.run_timeout_s + STALL_MARGIN_S if self.runs.shared else None
        stalled = self.runs.mark_stalled(idle_for_s=idle)
        if stalled:
            log.warning("%d agent run(s) were left running by a process that is gone: marked stalled", stalled)

    async def aclose(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self.checkpointer = None
        if self.runs is not None:
            self.runs.close()
            self.runs = None
        self._graphs.clear()

    def graph(self, workflow: str) -> Any:
        g = self._graphs.get(workflow)
        if g is None:
            wf = self.registry.get(workflow)
            g = self._graphs[workflow] = wf.build(self.deps).compile(checkpointer=self.checkpointer,
                                                                     store=self.deps.memory)
        return g

    def workflows(self) -> list[dict[str, str]]:
        return [w.info() for w in self.registry.list()]

    def _config(self, thread_id: str) -> dict[str, Any]:
        return {"configurable": {"thread_id": thread_id}, "recursion_limit": self.settings.recursion_limit}

    # -- runs --------------------------------------------------------------------------------------

    def guard(self, guards: Any, *, route: str, workflow: str, user: str | None, request_id: str = ""
              ) -> RunGuard | None:
        """A :class:`RunGuard` for ``guards`` (a GuardrailEngine; None: unguarded). ``route`` is the HTTP route
        pattern and ``workflow`` the workflow's name, which the policy bindings select on; the model is the
        workflow's chat model name (``agent:<workflow>``), as the chat path reports it."""
        if guards is None:
            return None
        return RunGuard(guards, GuardContext(request_id=request_id, route=route, workflow=workflow,
                                             model=AGENT_MODEL_PREFIX + workflow, user=user))

    async def run(self, workflow: str, question: str, *, thread_id: str | None = None, user: str | None = None,
                  team: str | None = None, owner: str | None = None, max_steps: int | None = None,
                  guard: RunGuard | None = None, scopes: Iterable[str] | None = None,
                  token_budget: int | None = None, shadow: bool = False) -> AsyncIterator[AgentEvent]:
        """Start a run (a new thread unless ``thread_id`` names one of this owner's threads).

        ``scopes``: the starting key's; every tool call of the run (resumed ones too) is checked against them
        (None: unscoped, the operator's CLI). ``token_budget``: the key's model tokens per minute; the run's
        model calls are counted against ``owner``'s budget (:attr:`on_usage`).

        ``guard``: the question passes its input stage before the workflow starts (blocked: the run ends
        ``blocked`` with the refusal, no node runs; masked values are masked for the model, tools and memory)
        and the final answer its output stage. ``owner`` None (admin, CLI) may use any thread.

        ``shadow``: a release's shadow run, whose answer nobody sees: it reads what the owner's run would (memory,
        documents, within the key's scopes) but no tool that can change something runs (the agent reads "not
        executed"), nothing waits for approval, and the run belongs to ``shadow:<owner>``, so it is neither
        listed nor resumable as the owner's (an admin sees it)."""
        await self.start()
        self._sweep_stalled()
        wf = self.registry.get(workflow)
        if not isinstance(question, str) or not question.strip():
            raise InvalidRequest("input is empty: ask a question", param="input")
        if max_steps is not None and not 2 <= max_steps <= 50:
            raise InvalidRequest("max_steps must be between 2 and 50", param="max_steps")
        if shadow and thread_id:
            raise InvalidRequest("a shadow run starts its own thread", param="thread_id")
        if shadow and not _keeps_shadow(self.graph(workflow)):
            # its nodes would never see the flag, and its tools would act: fail closed
            raise InvalidRequest(f"workflow {workflow!r} cannot run as a shadow: its state does not extend "
                                 "agents.state.BaseState (the 'shadow' key)", param="model")
        if thread_id:
            _check_id(thread_id, "thread_id")
            prior = self.runs.list(thread_id=thread_id, limit=1)
            # an ownerless thread (the CLI's) is the operator's, not anyone's
            if prior and owner is not None and prior[0].owner != owner:
                raise NotFound(f"no thread {thread_id!r}", param="thread_id")
            if prior and prior[0].workflow != workflow:
                raise Conflict(f"thread {thread_id!r} belongs to workflow {prior[0].workflow!r}", param="thread_id")
            active = self.runs.active_on_thread(thread_id)
            if active is not None:
                raise Conflict(f"thread {thread_id!r} has run {active.run_id} {active.status}; resume or wait for it",
                               param="thread_id")
        thread_id = thread_id or f"thread-{uuid.uuid4().hex[:16]}"
        for value, what in ((user, "user"), (team, "team")):
            if value:
                _check_id(value, what)
        namespace = ["users", user or owner or "anonymous"]
        search = [namespace] + ([["teams", team]] if team else [])
        question = question.strip()
        if guard is not None:
            decision = await guard.check_input(question)
            question = decision.messages[-1].content.strip()  # masked: the record never holds the values either
        rec = self.runs.create(RunRecord(run_id=f"run-{uuid.uuid4().hex[:16]}", thread_id=thread_id,
                                         workflow=workflow, owner=f"{SHADOW_OWNER}{owner or ''}" if shadow else owner,
                                         namespace=namespace, status="running",
                                         question=question, guardrails=guard.tag if guard else None))
        if guard is not None and guard.decision.blocked:
            async for event in self._refuse(rec, guard, resumed=False):
                yield event
            return
        state = wf.initial_state(question, max_steps=max_steps)
        state.update(run_id=rec.run_id, thread_id=thread_id, namespace=namespace, search_namespaces=search,
                     principal=owner or "", scopes=sorted(scopes) if scopes is not None else None, shadow=shadow)
        usage = None if shadow else self._usage(owner, token_budget)
        async with contextlib.aclosing(self._drive(rec, self.graph(workflow), state, resumed=False, guard=guard,
                                                   usage=usage)) as events:
            async for event in events:
                yield event

    async def _refuse(self, rec: RunRecord, guard: RunGuard, *, resumed: bool) -> AsyncIterator[AgentEvent]:
        """A drive the input guard refused: the workflow never starts, so the model never sees the text."""
        refusal = guard.decision.refusal or ""
        if not resumed:
            self.runs.update(rec.run_id, status="blocked", answer=refusal)
        yield RunStarted(rec.run_id, rec.thread_id, rec.workflow, resumed, guard.tag)
        for event in guard.input_events(rec.run_id):
            yield event
        yield Final(rec.run_id, "blocked", refusal, [], None, guard.tag)

    async def resume(self, run_id: str, action: str = "approve", *, reason: str | None = None,
                     args: dict[str, Any] | None = None, owner: str | None = None, guard_with: Any = None,
                     route: str = "", request_id: str = "", token_budget: int | None = None,
                     charged_to: str | None = None) -> AsyncIterator[AgentEvent]:
        """``approve`` / ``reject`` (reason reaches the agent) / ``edit`` (new tool args) an interrupted run,
        or ``continue`` a stalled, failed or cancelled one from its last checkpoint.

        ``guard_with`` (a GuardrailEngine): a reject ``reason`` (text the model reads) passes the input stage
        first (blocked: nothing is resumed, the run stays interrupted, and the stream ends with a ``blocked``
        final carrying the refusal); the answer the resumed run ends with passes the output stage."""
        await self.start()
        rec = self.get_record(run_id, owner=owner)
        guard = self.guard(guard_with, route=route, workflow=rec.workflow, user=rec.owner, request_id=request_id)
        if action not in ("approve", "reject", "edit", "continue"):
            raise InvalidRequest("action must be approve, reject, edit or continue", param="action")
        if action == "edit" and not isinstance(args, dict):
            raise InvalidRequest("edit needs 'args': the tool arguments to use instead", param="args")
        if action == "continue":
            if rec.status not in RESUMABLE or rec.status == "interrupted":
                raise RunNotResumable(f"run {run_id} is {rec.status}; 'continue' applies to stalled, failed, "
                                      "timed-out or cancelled runs (approve/reject/edit an interrupted one)")
            command: Any = None
            claimed = self.runs.claim(run_id, ("stalled", "failed", "cancelled", "timed_out"))
        else:
            if rec.status != "interrupted":
                raise RunNotResumable(f"run {run_id} is {rec.status}, not waiting for approval")
            from langgraph.types import Command

            decision: dict[str, Any] = {"action": action}
            if guard is not None and reason and action == "reject":
                checked = await guard.check_input(reason)
                if checked.blocked:
                    async for event in self._refuse(rec, guard, resumed=True):
                        yield event
                    return
                reason = checked.messages[-1].content
            if reason:
                decision["reason"] = reason
            if action == "edit":
                decision["args"] = args
            command = Command(resume=decision)
            claimed = self.runs.claim(run_id, ("interrupted",))
        if not claimed:
            raise RunNotResumable(f"run {run_id} was resumed by someone else")
        rec = self.runs.get(run_id)
        if guard is not None:
            self.runs.update(run_id, guardrails=guard.tag)
        async with contextlib.aclosing(self._drive(rec, self.graph(rec.workflow), command, resumed=True, guard=guard,
                                                   usage=self._usage(charged_to or rec.owner, token_budget))) as events:
            async for event in events:
                yield event

    def _usage(self, owner: str | None, token_budget: int | None) -> Callable[[int], None] | None:
        """What the run's model calls report their tokens to (``owner``'s budget), or None (no limit to count)."""
        sink = self.on_usage
        if sink is None or not owner or not token_budget:
            return None
        return lambda tokens: sink(owner, token_budget, tokens)

    async def _drive(self, rec: RunRecord, graph: Any, inp: Any, *, resumed: bool, guard: RunGuard | None = None,
                     usage: Callable[[int], None] | None = None) -> AsyncIterator[AgentEvent]:
        """A run (a start or a resume) as a trace: ``invoke_agent <workflow>`` with a span per node and per tool
        call (GenAI conventions: ``execute_tool <tool>``), built from the run's own events."""
        run = self.tracer.start_span(f"invoke_agent {rec.workflow}", attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": rec.workflow,
            "keel.agent.run_id": rec.run_id, "keel.agent.thread_id": rec.thread_id, "keel.agent.resumed": resumed})
        under = trace.set_span_in_context(run)
        open_spans: dict[str, Span] = {}
        try:
            async with contextlib.aclosing(self._drive_untraced(rec, graph, inp, resumed=resumed, guard=guard,
                                                                usage=usage)) as ev:
                async for event in ev:
                    if isinstance(event, NodeStarted):
                        open_spans[f"node:{event.node}"] = self.tracer.start_span(
                            f"keel.agent.node {event.node}", context=under,
                            attributes={"keel.agent.node": event.node, "keel.agent.step": event.step})
                    elif isinstance(event, NodeFinished) and (span := open_spans.pop(f"node:{event.node}", None)):
                        span.end()
                    elif isinstance(event, ToolCall):
                        open_spans[f"tool:{event.call_id}"] = self.tracer.start_span(
                            f"execute_tool {event.tool}", context=under, attributes={
                                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": event.tool,
                                "gen_ai.tool.call.id": event.call_id, "keel.agent.node": event.node})
                    elif isinstance(event, ToolResult) and (span := open_spans.pop(f"tool:{event.call_id}", None)):
                        span.set_attributes({"keel.tool.ok": event.ok, "keel.tool.attempts": event.attempts})
                        if not event.ok:
                            span.set_status(StatusCode.ERROR, event.output[:500])
                        span.end()
                    elif isinstance(event, Final):
                        run.set_attribute("keel.agent.status", event.status)
                    elif isinstance(event, ErrorEvent):
                        run.set_status(StatusCode.ERROR, event.message[:500])
                        run.set_attribute("error.type", event.code)
                    elif isinstance(event, InterruptEvent):
                        run.set_attribute("keel.agent.status", "interrupted")
                    yield event
        finally:
            for span in open_spans.values():
                span.end()
            run.end()

    async def _drive_untraced(self, rec: RunRecord, graph: Any, inp: Any, *, resumed: bool,
                              guard: RunGuard | None = None, usage: Callable[[int], None] | None = None
                              ) -> AsyncIterator[AgentEvent]:
        from langgraph.errors import GraphRecursionError

        runs = self.runs
        config = self._config(rec.thread_id)
        if usage is not None:  # the run's config, which its nodes' model calls read (agents.llm.USAGE_KEY)
            config["configurable"][USAGE_KEY] = usage
        steps = list(rec.steps)
        started: dict[str, float] = {}
        finished = False
        status: str | None = None
        error: ErrorEvent | None = None
        tag = guard.tag if guard is not None else None
        token_guard = None
        stream = graph.astream(inp, config, stream_mode=["custom", "updates"])
        # Each drive (a start or a resume) gets the whole budget: waiting for a human's approval between
        # drives is not running time.
        bounded = _bounded(stream, asyncio.get_running_loop().time() + self.settings.run_timeout_s)
        try:
            yield RunStarted(rec.run_id, rec.thread_id, rec.workflow, resumed, tag)
            if guard is not None:  # what the input guard masked before the model saw it
                for event in guard.input_events(rec.run_id):
                    yield event
            try:
                async for mode, chunk in bounded:
                    if mode != "custom" or not isinstance(chunk, _STREAMED):
                        continue
                    if tag is not None and isinstance(chunk, Token):
                        # Answer tokens are the model's unchecked drafts: under a policy they are released as
                        # the chat path releases a stream, window by window once checked (a window that fails
                        # retracts what was shown); ``final`` is the answer checked whole.
                        token_guard = token_guard or guard.token_stream()
                        for event in await guard.tokens(rec.run_id, token_guard, chunk):
                            yield event
                        continue
                    if isinstance(chunk, NodeStarted):
                        started[chunk.node] = time.time()
                    elif isinstance(chunk, NodeFinished):
                        steps.append({"node": chunk.node, "step": chunk.step,
                                      "started_at": started.pop(chunk.node, None), "duration_ms": chunk.duration_ms,
                                      "summary": chunk.summary})
                        runs.update(rec.run_id, steps=steps)
                    yield chunk
            except GraphRecursionError:
                status = "step_limit"
            except RunTimedOut:
                # Like the step limit, a status rather than an exception; the checkpoint keeps every step
                # that completed, so ``continue`` can go on from there with a fresh budget.
                error = ErrorEvent(rec.run_id, RunTimeout.code,
                                   f"the run took longer than agents.run_timeout_s={self.settings.run_timeout_s:g} s "
                                   f"and was stopped after {len(steps)} completed step(s); resume it with "
                                   "action 'continue' to go on from the last completed step")
                status = "timed_out"
            except KeelError as e:
                error = ErrorEvent(rec.run_id, e.code, e.message)
            except Exception as e:  # a node bug must end the run with an error event, not kill the stream
                log.exception("agent run %s failed", rec.run_id)
                error = ErrorEvent(rec.run_id, "internal_error", f"{type(e).__name__}: {e}")
            if error is not None:
                runs.update(rec.run_id, status=status or "failed",
                            error={"code": error.code, "message": error.message}, steps=steps)
                finished = True
                yield error
                return
            snapshot = await graph.aget_state(config)
            interrupts = getattr(snapshot, "interrupts", ()) or ()
            if interrupts and status is None:
                intr = interrupts[0]
                pending = dict(intr.value) if isinstance(intr.value, dict) else {"value": intr.value}
                pending["interrupt_id"] = getattr(intr, "id", None)
                runs.update(rec.run_id, status="interrupted", pending=_jsonable(pending), steps=steps)
                finished = True
                yield InterruptEvent(rec.run_id, rec.thread_id, str(pending.get("tool", "")),
                                     dict(pending.get("args") or {}), str(pending.get("call_id", "")),
                                     str(pending.get("reason", "")))
                return
            if token_guard is not None:
                for event in await guard.tokens(rec.run_id, token_guard, None):
                    yield event
            values = snapshot.values or {}
            if status == "step_limit":
                answer = values.get("answer") or values.get("draft") or IDK
                cites = values.get("citations") or []
            else:
                status = values.get("status") if values.get("status") in ("completed", "step_limit") else "completed"
                answer, cites = values.get("answer") or IDK, values.get("citations") or []
            if guard is not None:
                refusal, answer, notes = await guard.check_answer(
                    rec.run_id, answer, cites, streamed=token_guard is not None and token_guard.released_chars > 0)
                if refusal is not None:
                    status, answer, cites = "blocked", refusal, []
                for event in notes:
                    yield event
            runs.update(rec.run_id, status=status, answer=answer, citations=_jsonable(cites), steps=steps)
            finished = True
            yield Final(rec.run_id, status, answer, [Citation(**{k: c.get(k) for k in
                                                                  ("index", "source", "title", "label", "chunk_id",
                                                                   "page")}, text=c.get("text") or "")
                                                     for c in cites],
                        values.get("grounded"), tag)
        finally:
            if not finished:
                runs.update(rec.run_id, status="cancelled", steps=steps)
            with contextlib.suppress(Exception):
                await bounded.aclose()
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def collect(self, events: AsyncIterator[AgentEvent]) -> list[AgentEvent]:
        return [e async for e in events]

    # -- inspection --------------------------------------------------------------------------------

    def get_record(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        if self.runs is None:
            raise KeelError("agent service is not started")
        self._sweep_stalled()
        rec = self.runs.get(run_id)
        # an ownerless run (the CLI's) is the operator's: only an admin (owner None) sees it
        if rec is None or (owner is not None and rec.owner != owner):
            raise RunNotFound(f"no run {run_id!r}", param="run_id")
        return rec

    async def get_run(self, run_id: str, *, owner: str | None = None) -> dict[str, Any]:
        """The run's record plus, while it is its thread's latest run, the checkpointed state."""
        await self.start()
        rec = self.get_record(run_id, owner=owner)
        out = rec.to_dict()
        snapshot = await self.graph(rec.workflow).aget_state(self._config(rec.thread_id))
        values = snapshot.values or {}
        if values.get("run_id") == run_id and not _guard_changed(rec, values):
            out["state"] = _jsonable(values)
            out["next"] = list(snapshot.next or ())
        return out

    async def list_runs(self, *, workflow: str | None = None, status: str | None = None,
                        thread_id: str | None = None, owner: str | None = None, limit: int = 50
                        ) -> list[dict[str, Any]]:
        await self.start()
        self._sweep_stalled()
        return [r.to_dict() for r in self.runs.list(workflow=workflow, status=status, thread_id=thread_id,
                                                    owner=owner, limit=min(max(limit, 1), 500))]

    async def pending_approvals(self, *, owner: str | None = None) -> list[dict[str, Any]]:
        await self.start()
        out = []
        for r in self.runs.list(status="interrupted", owner=owner, limit=500):
            p = r.pending or {}
            out.append({"run_id": r.run_id, "thread_id": r.thread_id, "workflow": r.workflow,
                        "question": r.question, "tool": p.get("tool"), "args": p.get("args") or {},
                        "call_id": p.get("call_id"), "reason": p.get("reason", ""), "since": r.updated_at,
                        "actions": ["approve", "reject", "edit"]})
        return out

    async def thread_history(self, thread_id: str, *, owner: str | None = None) -> dict[str, Any]:
        await self.start()
        runs = self.runs.list(thread_id=thread_id, owner=owner, limit=500)
        if not runs:
            raise NotFound(f"no thread {thread_id!r}", param="thread_id")
        snapshot = await self.graph(runs[0].workflow).aget_state(self._config(thread_id))
        # the checkpoint holds each answer as the model wrote it; a guarded run's is the one its guard released
        released = {r.run_id: r.answer for r in runs if r.guardrails and r.status in TERMINAL}
        history = [{**t, "answer": released[t["run_id"]]} if t.get("run_id") in released else t
                   for t in (snapshot.values or {}).get("history") or []]
        return {"thread_id": thread_id, "workflow": runs[0].workflow,
                "history": _jsonable(history),
                "runs": [r.run_id for r in reversed(runs)]}

    # -- memory ------------------------------------------------------------------------------------

    def _memory(self) -> Any:
        if self.deps.memory is None:
            raise NotFound("this server has no agent memory (no vector store)")
        return self.deps.memory

    async def list_memories(self, namespace: Sequence[str], *, query: str | None = None, limit: int = 50,
                            offset: int = 0) -> list[dict[str, Any]]:
        items = await self._memory().asearch(tuple(namespace), query=query or None, limit=min(max(limit, 1), 500),
                                              offset=max(offset, 0))
        return [_jsonable(i.dict()) for i in items]

    async def delete_memory(self, namespace: Sequence[str], key: str) -> bool:
        mem = self._memory()
        return await asyncio.to_thread(mem.delete_memory, tuple(namespace), key)

    # -- the OpenAI-compatible chat path -------------------------------------------------------------

    def chat_models(self) -> list[dict[str, str]]:
        return [{"id": AGENT_MODEL_PREFIX + w.name, "description": w.description} for w in self.registry.list()]

    @staticmethod
    def is_agent_model(model: str | None) -> bool:
        return bool(model) and model.startswith(AGENT_MODEL_PREFIX)

    async def chat_events(self, model: str, messages: Sequence[Any], *, request_id: str = "",
                          owner: str | None = None, scopes: Iterable[str] | None = None,
                          token_budget: int | None = None, shadow: bool = False) -> AsyncIterator[Any]:
        """``agent:<workflow>`` as a chat model: yields ChatService events (``Started``, ``TextDelta``s of the
        final answer, ``Finished``). The question is the last user message; each request is a new thread."""
        workflow = model[len(AGENT_MODEL_PREFIX):] if self.is_agent_model(model) else model
        try:
            self.registry.get(workflow)
        except WorkflowNotFound as e:
            raise ModelNotFound(f"model {model!r} does not exist: {e.message}", param="model") from None
        question = next((m.content for m in reversed(messages) if m.role == "user" and m.content.strip()), "")
        if not question:
            raise InvalidRequest("send a user message with the question", param="messages")
        text, cited = "", []
        async with contextlib.aclosing(self.run(workflow, question, owner=owner, scopes=scopes,
                                                token_budget=token_budget, shadow=shadow)) as events:
            first = await anext(events)  # validation errors surface here, before Started
            yield Started(f"chatcmpl-{request_id or uuid.uuid4().hex}", int(time.time()), model)
            async for ev in _chain(first, events):
                if isinstance(ev, Final):
                    text, cited = ev.answer, ev.citations
                    if ev.citations:
                        text += "\n\nSources: " + "; ".join(f"[{c.index}] {c.label}" for c in ev.citations)
                elif isinstance(ev, InterruptEvent):
                    text = (f"Run {ev.run_id} is waiting for approval of {ev.tool}({ev.args}). Approve or reject "
                            f"it with POST /v1/agents/runs/{ev.run_id}/resume.")
                elif isinstance(ev, ErrorEvent):
                    if ev.code == RunTimeout.code:
                        raise RunTimeout(ev.message)
                    raise KeelError(ev.message, code=ev.code)
        for piece in re.findall(r"\S+\s*|\s+", text):
            yield TextDelta(piece)
        yield Finished("stop")
        if cited:
            # the same event a rag: answer ends with: clients and eval metrics get the passages
            yield Citations([{**dataclasses.asdict(c), "cited": True} for c in cited])


def _keeps_shadow(graph: Any) -> bool:
    """Whether a run's ``shadow`` flag reaches the nodes: a key of the graph's state and of its input schema (the
    start of a run writes only the input schema's keys)."""
    return "shadow" in graph.channels and "shadow" in typing.get_type_hints(graph.builder.input_schema)


def _guard_changed(rec: RunRecord, values: dict[str, Any]) -> bool:
    """A guarded run whose answer the output guard withheld or masked: the checkpointed state (answer, drafts,
    notes as the model wrote them) would disclose what the guard took out, so it is not shown."""
    return bool(rec.guardrails) and rec.status in TERMINAL and rec.answer != values.get("answer")


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for x in rest:
        yield x


def build_agents(settings: AgentConfig, llm_router: Any, rag: Any = None, prompts: Any = None, *, llm: Any = None,
                 tools: Any = None, registry: WorkflowRegistry | None = None, tracer: Tracer | None = None
                 ) -> AgentService:
    """The agent service for a process. Cheap: the database opens on ``await service.start()``
    (or the first run). ``rag`` is ``ingest.build_rag(settings)``'s result (retriever, store,
    embedder); without it there is no retrieval and no memory."""
    a: AgentSettings = getattr(settings, "agents", None) or AgentSettings()
    alias = a.model or settings.default_model
    llm = llm or AgentLLM(llm_router, alias, default_max_tokens=a.answer_max_tokens)
    memory = None
    if rag is not None:
        memory = QdrantMemoryStore(rag.store, rag.embedder, sparse=getattr(rag, "sparse", None),
                                   collection=a.memory_collection, dedup_threshold=a.memory_dedup_threshold)
    if tools is None:
        tools = ToolRegistry(builtin_tools(), risky=set(a.risky_tools))
    collection = a.collection or getattr(getattr(settings, "rag", None), "collection", None)
    deps = Deps(llm=llm, tools=tools, settings=a, retriever=getattr(rag, "retriever", None), memory=memory,
                prompts=prompts, collection=collection)
    return AgentService(deps, registry, db_path=a.db_path(Path(settings.home)),
                        postgres_url=a.postgres_url.get_secret_value() if a.postgres_url else None, tracer=tracer)
