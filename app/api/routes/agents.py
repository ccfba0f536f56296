"""Agent workflows over HTTP: ``/v1/agents``.

Endpoints (scope ``chat``; an ``admin`` key sees every owner's runs and memories):

* ``GET  /v1/agents/workflows`` - registered workflows and their descriptions.
* ``POST /v1/agents/{workflow}/runs`` - body ``{"input", "thread_id"?, "user"?, "team"?, "max_steps"?,
  "stream"?}``; streams SSE events (below), or with ``"stream": false`` returns a ``RunResult`` JSON.
  The API key decides identity: the run is the key's, and its long-term memory is ``users/<key id>``.
  ``user`` is for ``admin`` keys acting for a user (memory ``users/<user>``; logged); from any other key
  a ``user`` other than its own id is a 403 ``insufficient_scope``.
* ``GET  /v1/agents/runs`` (``?workflow=&status=&thread_id=&limit=``) and ``GET /v1/agents/runs/{run_id}``
  (record, steps with timings, pending approval, and the checkpointed state while it is the thread's
  latest run).
* ``POST /v1/agents/runs/{run_id}/resume`` - ``{"action": "approve"|"reject"|"edit"|"continue",
  "reason"?, "args"?, "stream"?}``; streams like a run. ``continue`` retries a stalled/failed/cancelled
  run from its last checkpoint. Resuming twice answers 409 ``run_not_resumable``.
* ``GET  /v1/agents/approvals`` - runs waiting for a human.
* ``GET  /v1/agents/threads/{thread_id}`` - the thread's question/answer history and runs.
* A key sees, continues (``thread_id``) and resumes only its own runs and threads (another key's answer 404,
  as if absent); an ``admin`` key any.
* ``GET  /v1/agents/memories?namespace=users/<id>&query=&limit=`` and
  ``DELETE /v1/agents/memories?namespace=...&key=...`` - long-term memory (a non-admin key may use
  ``users/<its key id>`` and ``teams/<name>`` of the teams it belongs to).

SSE event schema
----------------
Each event is ``event: <type>`` / ``id: <seq>`` / ``data: <JSON>``; the JSON always has ``type``,
``seq`` (0, 1, ...), ``ts`` (unix seconds) and ``run_id``, plus (models in ``agents/schemas.py``):

==================  ===========================================================================
``run.started``     ``thread_id``, ``workflow``, ``resumed`` (bool), ``guardrails`` (policy tag or null)
``node.started``    ``node``, ``step``
``node.finished``   ``node``, ``step``, ``duration_ms``, ``summary``
``tool.call``       ``call_id``, ``tool``, ``args``, ``node``
``tool.result``     ``call_id``, ``tool``, ``ok``, ``output`` (result or ``error: ...``), ``attempts``,
                    ``duration_ms``
``token``           ``node``, ``text`` - answer tokens as generated (a draft that fails
                    verification is followed by another one; ``final`` carries the answer)
``interrupt``       ``thread_id``, ``tool``, ``args``, ``call_id``, ``reason``, ``actions`` - the run is
                    paused; the stream ends; resume with ``POST /runs/{run_id}/resume``
``final``           ``status`` (``completed`` | ``step_limit`` | ``blocked``), ``answer``, ``citations``
                    (``index``, ``source``, ``title``, ``label``, ``chunk_id``, ``page``, ``text``), ``grounded``,
                    ``guardrails``
``error``           ``code``, ``message`` - the run failed (status ``failed``, or ``timed_out`` with code
                    ``run_timeout`` after ``agents.run_timeout_s``; both resumable with ``continue``)
``guardrail``       ``stage`` (``input`` | ``output``), ``action`` (``block`` | ``redact``), ``validator``,
                    ``reason``, ``message`` (the refusal, for ``block``)
==================  ===========================================================================

A stream starts with ``run.started`` and ends with exactly one of ``final``, ``interrupt`` or
``error``. Errors found before the run starts (unknown workflow, bad body, run not resumable)
are plain HTTP errors in Keel's error format.

Guardrails
----------
Runs are guarded like ``/v1/chat/completions``, by the server's guardrail engine: the policy is selected
with ``route`` = this route's pattern (``/v1/agents/{workflow}/runs``, ``/v1/agents/runs/{run_id}/resume``),
``workflow`` = the workflow's name and ``model`` = ``agent:<workflow>``; ``run.started`` and ``final``
carry it as ``guardrails`` (``<policy>@<version>``), and so does the run record. The ``input`` (and a
``reject`` reason, the text a resume sends the model) passes the input stage before the workflow sees it:
blocked, no node runs, the stream is ``run.started``, ``guardrail`` (``block``), ``final`` with status
``blocked`` and the refusal as ``answer`` (a blocked resume leaves the run interrupted, to be resumed with
other words); masked values (``redact``) stay masked for the model, tools and memory. The final answer
passes the output stage: withheld (status ``blocked``, the refusal as ``answer``) or redacted, with a
``guardrail`` event first. Under a guardrail policy ``token`` events are not sent (they are unchecked
drafts a stream could not take back): the answer comes once, checked, in ``final``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from sse_starlette import EventSourceResponse

from agents.events import AgentEvent, ErrorEvent, Final, InterruptEvent, RunStarted, to_wire
from agents.schemas import ResumeRequest, RunRequest, RunResult, parse_namespace
from app.api.deps import AgentsDep, ChatKey, GuardsDep, ModelKey, token_budget
from app.api.openapi import error_responses
from app.api.schemas import SQL_INT_MAX
from app.core.errors import NotFound, PermissionDenied
from app.security.keys import ApiKey

router = APIRouter(prefix="/v1/agents", tags=["agents"])
log = logging.getLogger("keel.agents")


def _owner(key: ApiKey) -> str | None:
    """None = may see everyone's runs (admin)."""
    return None if key.allows("admin") else key.id


def _route(request: Request) -> str:
    """The matched route's pattern ("/v1/agents/{workflow}/runs"): what policy bindings match on."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or request.url.path


def _memory_user(body: RunRequest, key: ApiKey, workflow: str) -> str:
    """Whose long-term memory the run reads and writes: the key's own. The body never decides identity;
    an admin key may act for a user, and that is logged."""
    if not body.user or body.user == key.id:
        return key.id
    if not key.allows("admin"):
        raise PermissionDenied(f"'user' needs an admin key: a run's memory namespace comes from the API key "
                               f"(this key's is users/{key.id}); drop 'user'", param="user")
    log.warning("admin key %s starts a %s run acting for user %r (memory users/%s)", key.id, workflow, body.user,
                body.user)
    return body.user


async def _stream_or_collect(events: AsyncIterator[AgentEvent], stream: bool):
    it = aiter(events)
    first = await anext(it)  # validation errors surface here as HTTP errors

    async def all_events() -> AsyncIterator[AgentEvent]:
        yield first
        async for e in it:
            yield e

    if not stream:
        wire, result = [], {"run_id": first.run_id, "thread_id": getattr(first, "thread_id", ""),
                            "status": "running", "guardrails": getattr(first, "guardrails", None)}
        async for i, e in _enumerate(all_events()):
            wire.append(to_wire(e, i))
            if isinstance(e, Final):
                result.update(status=e.status, answer=e.answer, citations=wire[-1]["citations"])
            elif isinstance(e, InterruptEvent):
                result.update(status="interrupted", interrupt=wire[-1])
            elif isinstance(e, ErrorEvent):
                result.update(status="failed", error={"code": e.code, "message": e.message})
        return RunResult(events=wire, **result)

    async def sse() -> AsyncIterator[dict[str, str]]:
        try:
            async for i, e in _enumerate(all_events()):
                yield {"event": e.type, "id": str(i), "data": json.dumps(to_wire(e, i), ensure_ascii=False)}
        finally:
            await it.aclose()

    headers = {"X-Run-Id": first.run_id} if isinstance(first, RunStarted) else {}
    return EventSourceResponse(sse(), ping=15, sep="\n", headers=headers)


async def _enumerate(events: AsyncIterator[AgentEvent]) -> AsyncIterator[tuple[int, AgentEvent]]:
    i = 0
    async for e in events:
        yield i, e
        i += 1


@router.get("/workflows")
async def list_workflows(_key: ChatKey, svc: AgentsDep) -> dict[str, Any]:
    return {"object": "list", "data": svc.workflows()}


@router.post("/{workflow}/runs", response_model=None)
async def start_run(key: ModelKey, svc: AgentsDep, guards: GuardsDep, workflow: str, body: RunRequest,
                    request: Request):
    user = _memory_user(body, key, workflow)
    guard = svc.guard(guards, route=_route(request), workflow=workflow, user=key.id,
                      request_id=getattr(request.state, "request_id", ""))
    if body.team and not key.in_team(body.team):
        raise PermissionDenied(f"this API key is not in team {body.team!r}: its memories are its members' (an admin "
                               "adds a key to a team: keel keys create --team)", param="team")
    events = svc.run(workflow, body.input, thread_id=body.thread_id, user=user, team=body.team,
                     owner=key.id, max_steps=body.max_steps, guard=guard, scopes=key.scopes,
                     token_budget=token_budget(request))
    return await _stream_or_collect(events, body.stream)


@router.get("/runs")
async def list_runs(key: ChatKey, svc: AgentsDep, workflow: str | None = None, status: str | None = None,
                    thread_id: str | None = None, limit: int = Query(default=50, ge=1, le=500)) -> dict[str, Any]:
    runs = await svc.list_runs(workflow=workflow, status=status, thread_id=thread_id, owner=_owner(key),
                               limit=limit)
    return {"object": "list", "data": runs}


@router.get("/runs/{run_id}")
async def get_run(key: ChatKey, svc: AgentsDep, run_id: str) -> dict[str, Any]:
    return await svc.get_run(run_id, owner=_owner(key))


@router.post("/runs/{run_id}/resume", response_model=None)
async def resume_run(key: ModelKey, svc: AgentsDep, guards: GuardsDep, run_id: str, body: ResumeRequest,
                     request: Request):
    events = svc.resume(run_id, body.action, reason=body.reason, args=body.args, owner=_owner(key),
                        guard_with=guards, route=_route(request),
                        request_id=getattr(request.state, "request_id", ""), token_budget=token_budget(request),
                        charged_to=key.id)  # whoever resumes it (an admin resuming another's run: the admin)
    return await _stream_or_collect(events, body.stream)


@router.get("/approvals")
async def pending_approvals(key: ChatKey, svc: AgentsDep) -> dict[str, Any]:
    return {"object": "list", "data": await svc.pending_approvals(owner=_owner(key))}


@router.get("/threads/{thread_id}")
async def thread(key: ChatKey, svc: AgentsDep, thread_id: str) -> dict[str, Any]:
    return await svc.thread_history(thread_id, owner=_owner(key))


def _namespace(namespace: str, key: ApiKey) -> tuple[str, ...]:
    """A memory namespace the key may use: its own (users/<key id>), its teams' (teams/<name>), any for admin."""
    ns = parse_namespace(namespace)
    if key.allows("admin") or ns[:2] == ("users", key.id) or (ns[0] == "teams" and len(ns) > 1 and
                                                               key.in_team(ns[1])):
        return ns
    teams = ", ".join(f"teams/{t}" for t in sorted(key.teams)) or "no team's (keel keys create --team)"
    raise PermissionDenied(f"this API key may only use users/{key.id} and its teams' memories: {teams}")


@router.get("/memories")
async def list_memories(key: ChatKey, svc: AgentsDep, namespace: str | None = None, query: str | None = None,
                        limit: int = Query(default=50, ge=1, le=500),
                        offset: int = Query(default=0, ge=0, le=SQL_INT_MAX)) -> dict[str, Any]:
    ns = _namespace(namespace or f"users/{key.id}", key)
    items = await svc.list_memories(ns, query=query, limit=limit, offset=offset)
    return {"object": "list", "namespace": "/".join(ns), "data": items}


@router.delete("/memories", responses=error_responses({404: "No such memory in your namespace."}))
async def delete_memory(key: ChatKey, svc: AgentsDep, namespace: str,
                        key_: str = Query(alias="key")) -> dict[str, Any]:
    ns = _namespace(namespace, key)
    deleted = await svc.delete_memory(ns, key_)
    if not deleted:
        raise NotFound(f"no memory {key_!r} in {'/'.join(ns)}", param="key")
    return {"deleted": True, "namespace": "/".join(ns), "key": key_}
