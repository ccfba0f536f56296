"""The agent runner: starts and resumes runs on durable threads and yields typed events.

``AgentService.run`` / ``resume`` are async generators of :mod:`agents.events` dataclasses;
validation happens before the first event, so a caller that pulls one event first (the API
router does) turns bad requests into HTTP errors instead of errors inside a 200 stream.

Statuses: ``running`` -> ``interrupted`` (waiting for approval) | ``completed`` | ``step_limit``
(budget or recursion limit hit: a final answer, no exception) | ``failed`` (error event; the
checkpoint stays, ``resume(action="continue")`` retries from the last completed step) |
``cancelled`` (the consumer went away) | ``stalled`` (the process died while running; found at
start-up, resumable with ``continue``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from agents.errors import RunNotFound, RunNotResumable, WorkflowNotFound
from agents.events import (
    AgentEvent,
    Citation,
    ErrorEvent,
    Final,
    InterruptEvent,
    NodeFinished,
    NodeStarted,
    RunStarted,
    Token,
    ToolCall,
    ToolResult,
)
from agents.registry import WorkflowRegistry, default_registry
from agents.runs import RESUMABLE, RunRecord, RunStore
from agents.settings import AgentSettings
from agents.workflows.common import IDK, Deps
from app.core.errors import Conflict, InvalidRequest, KeelError, NotFound

log = logging.getLogger("keel.agents")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_STREAMED = (NodeStarted, NodeFinished, ToolCall, ToolResult, Token)
AGENT_MODEL_PREFIX = "agent:"


def runs_db_path(checkpoint_db: Path) -> Path:
    """The runs table's SQLite file, next to the checkpoints: ``agents.db`` -> ``agents.runs.db``."""
    return checkpoint_db.with_name(checkpoint_db.stem + ".runs.db")


def _check_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise InvalidRequest(f"invalid {what} {value!r}: 1-128 letters, digits, '_', '-', '.', ':'", param=what)
    return value


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
                 postgres_url: str | None = None, checkpointer: Any = None) -> None:
        self.deps = deps
        self.settings: AgentSettings = deps.settings
        self.registry = registry or default_registry()
        self.db_path = Path(db_path)
        self.postgres_url = postgres_url
        self.checkpointer = checkpointer
        self.runs: RunStore | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._graphs: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the runs table and the checkpointer (idempotent; call it in the serving event loop)."""
        if self.runs is not None:
            return
        # Its own file: a sync write to the checkpointer's file could block the event loop while the
        # aiosqlite thread holds the write lock waiting for that same loop (a deadlock until timeout).
        self.runs = RunStore(runs_db_path(self.db_path))
        stalled = self.runs.mark_stalled()
        if stalled:
            log.warning("%d agent run(s) were left running by a previous process: marked stalled", stalled)
        if self.checkpointer is None:
            self._stack = contextlib.AsyncExitStack()
            if self.postgres_url:
                try:
                    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
                except ImportError as e:
                    raise KeelError("agents.postgres_url is set but langgraph-checkpoint-postgres is not installed"
                                    ) from e
                saver = await self._stack.enter_async_context(AsyncPostgresSaver.from_conn_string(self.postgres_url))
            else:
                import aiosqlite
                from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

                conn = await aiosqlite.connect(str(self.db_path))
                self._stack.push_async_callback(conn.close)
                saver = AsyncSqliteSaver(conn)
            await saver.setup()
            self.checkpointer = saver

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

    async def run(self, workflow: str, question: str, *, thread_id: str | None = None, user: str | None = None,
                  team: str | None = None, owner: str | None = None, max_steps: int | None = None
                  ) -> AsyncIterator[AgentEvent]:
        """Start a run (a new thread unless ``thread_id`` names one of this owner's threads)."""
        await self.start()
        wf = self.registry.get(workflow)
        if not isinstance(question, str) or not question.strip():
            raise InvalidRequest("input is empty: ask a question", param="input")
        if max_steps is not None and not 2 <= max_steps <= 50:
            raise InvalidRequest("max_steps must be between 2 and 50", param="max_steps")
        if thread_id:
            _check_id(thread_id, "thread_id")
            prior = self.runs.list(thread_id=thread_id, limit=1)
            if prior and owner is not None and prior[0].owner not in (owner, None):
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
        rec = self.runs.create(RunRecord(run_id=f"run-{uuid.uuid4().hex[:16]}", thread_id=thread_id,
                                         workflow=workflow, owner=owner, namespace=namespace, status="running",
                                         question=question.strip()))
        state = wf.initial_state(question.strip(), max_steps=max_steps)
        state.update(run_id=rec.run_id, thread_id=thread_id, namespace=namespace, search_namespaces=search)
        async with contextlib.aclosing(self._drive(rec, self.graph(workflow), state, resumed=False)) as events:
            async for event in events:
                yield event

    async def resume(self, run_id: str, action: str = "approve", *, reason: str | None = None,
                     args: dict[str, Any] | None = None, owner: str | None = None) -> AsyncIterator[AgentEvent]:
        """``approve`` / ``reject`` (reason reaches the agent) / ``edit`` (new tool args) an interrupted run,
        or ``continue`` a stalled, failed or cancelled one from its last checkpoint."""
        await self.start()
        rec = self.get_record(run_id, owner=owner)
        if action not in ("approve", "reject", "edit", "continue"):
            raise InvalidRequest("action must be approve, reject, edit or continue", param="action")
        if action == "edit" and not isinstance(args, dict):
            raise InvalidRequest("edit needs 'args': the tool arguments to use instead", param="args")
        if action == "continue":
            if rec.status not in RESUMABLE or rec.status == "interrupted":
                raise RunNotResumable(f"run {run_id} is {rec.status}; 'continue' applies to stalled, failed or "
                                      "cancelled runs (approve/reject/edit an interrupted one)")
            command: Any = None
            claimed = self.runs.claim(run_id, ("stalled", "failed", "cancelled"))
        else:
            if rec.status != "interrupted":
                raise RunNotResumable(f"run {run_id} is {rec.status}, not waiting for approval")
            from langgraph.types import Command

            decision: dict[str, Any] = {"action": action}
            if reason:
                decision["reason"] = reason
            if action == "edit":
                decision["args"] = args
            command = Command(resume=decision)
            claimed = self.runs.claim(run_id, ("interrupted",))
        if not claimed:
            raise RunNotResumable(f"run {run_id} was resumed by someone else")
        rec = self.runs.get(run_id)
        async with contextlib.aclosing(self._drive(rec, self.graph(rec.workflow), command, resumed=True)) as events:
            async for event in events:
                yield event

    async def _drive(self, rec: RunRecord, graph: Any, inp: Any, *, resumed: bool) -> AsyncIterator[AgentEvent]:
        from langgraph.errors import GraphRecursionError

        runs = self.runs
        config = self._config(rec.thread_id)
        steps = list(rec.steps)
        started: dict[str, float] = {}
        finished = False
        status: str | None = None
        error: ErrorEvent | None = None
        stream = graph.astream(inp, config, stream_mode=["custom", "updates"])
        try:
            yield RunStarted(rec.run_id, rec.thread_id, rec.workflow, resumed)
            try:
                async for mode, chunk in stream:
                    if mode != "custom" or not isinstance(chunk, _STREAMED):
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
            except KeelError as e:
                error = ErrorEvent(rec.run_id, e.code, e.message)
            except Exception as e:  # a node bug must end the run with an error event, not kill the stream
                log.exception("agent run %s failed", rec.run_id)
                error = ErrorEvent(rec.run_id, "internal_error", f"{type(e).__name__}: {e}")
            if error is not None:
                runs.update(rec.run_id, status="failed", error={"code": error.code, "message": error.message},
                            steps=steps)
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
            values = snapshot.values or {}
            if status == "step_limit":
                answer = values.get("answer") or values.get("draft") or IDK
                cites = values.get("citations") or []
            else:
                status = values.get("status") if values.get("status") in ("completed", "step_limit") else "completed"
                answer, cites = values.get("answer") or IDK, values.get("citations") or []
            runs.update(rec.run_id, status=status, answer=answer, citations=_jsonable(cites), steps=steps)
            finished = True
            yield Final(rec.run_id, status, answer, [Citation(**{k: c.get(k) for k in
                                                                  ("index", "source", "title", "label", "chunk_id",
                                                                   "page")}) for c in cites],
                        values.get("grounded"))
        finally:
            if not finished:
                runs.update(rec.run_id, status="cancelled", steps=steps)
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def collect(self, events: AsyncIterator[AgentEvent]) -> list[AgentEvent]:
        return [e async for e in events]

    # -- inspection --------------------------------------------------------------------------------

    def get_record(self, run_id: str, *, owner: str | None = None) -> RunRecord:
        if self.runs is None:
            raise KeelError("agent service is not started")
        rec = self.runs.get(run_id)
        if rec is None or (owner is not None and rec.owner not in (owner, None)):
            raise RunNotFound(f"no run {run_id!r}", param="run_id")
        return rec

    async def get_run(self, run_id: str, *, owner: str | None = None) -> dict[str, Any]:
        """The run's record plus, while it is its thread's latest run, the checkpointed state."""
        await self.start()
        rec = self.get_record(run_id, owner=owner)
        out = rec.to_dict()
        snapshot = await self.graph(rec.workflow).aget_state(self._config(rec.thread_id))
        values = snapshot.values or {}
        if values.get("run_id") == run_id:
            out["state"] = _jsonable(values)
            out["next"] = list(snapshot.next or ())
        return out

    async def list_runs(self, *, workflow: str | None = None, status: str | None = None,
                        thread_id: str | None = None, owner: str | None = None, limit: int = 50
                        ) -> list[dict[str, Any]]:
        await self.start()
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
        return {"thread_id": thread_id, "workflow": runs[0].workflow,
                "history": _jsonable((snapshot.values or {}).get("history") or []),
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
        import asyncio

        mem = self._memory()
        return await asyncio.to_thread(mem.delete_memory, tuple(namespace), key)

    # -- the OpenAI-compatible chat path -------------------------------------------------------------

    def chat_models(self) -> list[dict[str, str]]:
        return [{"id": AGENT_MODEL_PREFIX + w.name, "description": w.description} for w in self.registry.list()]

    @staticmethod
    def is_agent_model(model: str | None) -> bool:
        return bool(model) and model.startswith(AGENT_MODEL_PREFIX)

    async def chat_events(self, model: str, messages: Sequence[Any], *, request_id: str = "",
                          owner: str | None = None) -> AsyncIterator[Any]:
        """``agent:<workflow>`` as a chat model: yields ChatService events (``Started``, ``TextDelta``s of the
        final answer, ``Finished``). The question is the last user message; each request is a new thread."""
        from app.core.errors import ModelNotFound
        from app.core.types import Finished, TextDelta
        from app.services.chat import Started

        workflow = model[len(AGENT_MODEL_PREFIX):] if self.is_agent_model(model) else model
        try:
            self.registry.get(workflow)
        except WorkflowNotFound as e:
            raise ModelNotFound(f"model {model!r} does not exist: {e.message}", param="model") from None
        question = next((m.content for m in reversed(messages) if m.role == "user" and m.content.strip()), "")
        if not question:
            raise InvalidRequest("send a user message with the question", param="messages")
        text = ""
        async with contextlib.aclosing(self.run(workflow, question, owner=owner)) as events:
            first = await anext(events)  # validation errors surface here, before Started
            yield Started(f"chatcmpl-{request_id or uuid.uuid4().hex}", int(time.time()), model)
            async for ev in _chain(first, events):
                if isinstance(ev, Final):
                    text = ev.answer
                    if ev.citations:
                        text += "\n\nSources: " + "; ".join(f"[{c.index}] {c.label}" for c in ev.citations)
                elif isinstance(ev, InterruptEvent):
                    text = (f"Run {ev.run_id} is waiting for approval of {ev.tool}({ev.args}). Approve or reject "
                            f"it with POST /v1/agents/runs/{ev.run_id}/resume.")
                elif isinstance(ev, ErrorEvent):
                    raise KeelError(ev.message, code=ev.code)
        for piece in re.findall(r"\S+\s*|\s+", text):
            yield TextDelta(piece)
        yield Finished("stop")


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for x in rest:
        yield x


def build_agents(settings: Any, llm_router: Any, rag: Any = None, prompts: Any = None, *, llm: Any = None,
                 tools: Any = None, registry: WorkflowRegistry | None = None) -> AgentService:
    """The agent service for a process. Cheap: the database opens on ``await service.start()``
    (or the first run). ``rag`` is ``ingest.build_rag(settings)``'s result (retriever, store,
    embedder); without it there is no retrieval and no memory."""
    from agents.llm import AgentLLM
    from agents.memory import QdrantMemoryStore
    from agents.tools import ToolRegistry, builtin_tools

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
    return AgentService(deps, registry, db_path=a.db_path(Path(settings.home)), postgres_url=a.postgres_url)
