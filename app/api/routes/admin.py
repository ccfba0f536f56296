"""Admin: API keys, backend status/logs and the audit trails (scope ``admin``)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from app.api.deps import ContainerDep, GuardsDep, KeysDep, LlmDep, require_scope
from app.api.openapi import error_responses
from app.api.schemas import SQL_INT_MAX
from app.core.errors import NotFound
from app.security.keys import ApiKey

INT32_MAX = 2**31 - 1  # the limits are INTEGER columns (Postgres: 32 bits)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_scope("admin"))])


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(min_length=1)
    rate_limit_per_minute: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=INT32_MAX, description=(
        "Model tokens (prompt + completion) per minute; unset: the server's default (auth.default_tokens_per_minute)."))
    teams: list[str] = Field(default_factory=list, max_length=50, description=(
        "Teams the key belongs to: it may read and search their shared agent memories (teams/<name>)."))


class KeyOut(BaseModel):
    id: str
    name: str
    scopes: list[str]
    rate_limit_per_minute: int | None = Field(default=None, description="Unset: the server's default limit.")
    tokens_per_minute: int | None = Field(default=None, description="Unset: the server's default (or none).")
    created_at: str
    revoked_at: str | None = None
    teams: list[str] = Field(default_factory=list)
    key: str | None = Field(default=None, description="The secret; returned once, at creation.")


def _out(key: ApiKey, secret: str | None = None) -> KeyOut:
    return KeyOut(id=key.id, name=key.name, scopes=sorted(key.scopes),
                  rate_limit_per_minute=key.rate_limit_per_minute, tokens_per_minute=key.tokens_per_minute,
                  created_at=key.created_at,
                  revoked_at=key.revoked_at, teams=sorted(key.teams), key=secret)


@router.post("/keys", response_model=KeyOut, status_code=201)
async def create_key(body: KeyCreate, keys: KeysDep) -> KeyOut:
    key, secret = keys.create(body.name, body.scopes, body.rate_limit_per_minute, body.teams,
                              tokens_per_minute=body.tokens_per_minute)
    return _out(key, secret)


@router.get("/keys", response_model=list[KeyOut], response_model_exclude_none=True)
async def list_keys(keys: KeysDep) -> list[KeyOut]:
    return [_out(k) for k in keys.list()]


@router.delete("/keys/{key_id}", response_model=KeyOut)
async def revoke_key(key_id: str, keys: KeysDep) -> KeyOut:
    return _out(keys.revoke(key_id))


@router.get("/backends")
async def backends(llm: LlmDep) -> dict:
    return await llm.readiness()


@router.get("/routing")
async def routing(llm: LlmDep, container: ContainerDep) -> dict:
    """What serves traffic, in one place: the model aliases (configured, and routed at run time: adapter deploys)
    the labels (which version of a prompt template ``production``, ``staging``... serve) and the release endpoints'
    splits, at the routing table's revision; with the releases behind the endpoints.
    Changes: the ``routing`` audit trail."""
    table = llm.routes
    await asyncio.to_thread(table.refresh, force=True)
    labels = [asdict(label) for _, by_name in sorted(table.all_labels("prompt").items())
              for label in by_name.values()]
    releases = getattr(container, "releases", None)
    endpoints = []
    for name in releases.names() if releases is not None else []:
        release = releases.active(name)
        if release is not None:
            endpoints.append({"endpoint": name, "release": release.name, "strategy": release.spec.strategy,
                              "status": release.status, "weights": release.weights})
    return {"revision": table.revision, "routes": [r.public() for r in table.routes()], "labels": labels,
            "splits": [s.public() for _, s in sorted(table.splits().items())], "releases": endpoints}


@router.get("/backends/{name}/logs")
async def backend_logs(llm: LlmDep, name: str, lines: int = Query(200, ge=1, le=5000)) -> dict:
    backend = llm.backends.get(name)
    if backend is None:
        raise NotFound(f"no backend {name!r}; backends: {', '.join(llm.backends)}", param="name")
    sup = getattr(backend.inner, "supervisor", None)
    if sup is None:
        raise NotFound(f"backend {name!r} is not a server Keel runs, so Keel has no logs for it")
    return {"backend": name, "log_file": str(sup.log_path), "lines": sup.tail(lines)}


@router.get("/guardrails/audit", responses=error_responses({404: "Guardrails are off on this server."}))
async def guardrail_audit(
    guards: GuardsDep, request_id: str | None = None, validator: str | None = None, verdict: str | None = None,
    action: str | None = None, stage: str | None = None, since: float | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[dict]:
    """Every guard decision (validator, verdict, action, latency, policy version) by request id."""
    if guards is None:
        raise NotFound("guardrails are disabled on this server (KEEL_GUARDRAILS__ENABLED=false)")
    await guards.flush()  # decisions are written in the background
    records = guards.query_audit(request_id=request_id, validator=validator, verdict=verdict, action=action,
                                 stage=stage, since=since, limit=limit)
    return [asdict(r) for r in records]


@router.get("/guardrails/policy", responses=error_responses({404: "Guardrails are off on this server."}))
async def guardrail_policy(guards: GuardsDep) -> dict:
    if guards is None:
        raise NotFound("guardrails are disabled on this server (KEEL_GUARDRAILS__ENABLED=false)")
    policy = guards.policy
    return {"version": policy.version_tag, "path": str(policy.path), "policies": sorted(policy.file.policies),
            "bindings": [b.model_dump() for b in policy.file.bindings]}


Trail = Literal["guardrails", "prompts", "adapters", "routing", "jobs", "releases", "tools", "pipelines"]


@router.get("/audit", responses=error_responses({404: "The trail's subsystem is off on this server."}))
async def audit_events(
    container: ContainerDep, trail: Trail, subject_kind: str | None = None, subject: str | None = None,
    subject_ref: str | None = None, actor: str | None = None, action: str | None = None,
    request_id: str | None = None, since: float | None = None, until: float | None = None,
    before_id: int | None = Query(None, ge=1, le=SQL_INT_MAX), limit: int = Query(100, ge=1, le=1000),
) -> list[dict]:
    """One audit trail's events, newest first (the kernel's query: app.core.audit): who, what, on what, from and
    to, why, when. ``since``/``until`` are unix seconds; ``before_id`` pages back from an event's id."""
    filters: dict[str, Any] = {"subject_kind": subject_kind, "subject": subject, "subject_ref": subject_ref,
                               "actor": actor, "action": action, "request_id": request_id, "since": since,
                               "until": until, "before_id": before_id, "limit": limit}
    if trail == "guardrails":
        guards = getattr(container, "guards", None)
        if guards is None:
            raise NotFound("guardrails are disabled on this server (KEEL_GUARDRAILS__ENABLED=false)")
        await guards.flush()  # decisions are written in the background
        query = guards.audit.events
    elif trail == "prompts":
        registry = getattr(container, "prompts", None)
        if registry is None:
            raise NotFound("the prompt registry is not configured on this server")
        query = registry.store.audit_events
    elif trail == "routing":
        query = container.llm.routes.store.audit_events
    elif trail == "releases":
        if getattr(container, "releases", None) is None:
            raise NotFound("releases are off on this server (releases.enabled)")
        query = container.releases.store.audit_events
    elif trail == "tools":
        if getattr(container, "tool_audit", None) is None:
            raise NotFound("this server keeps no tool audit")
        query = container.tool_audit.events
    elif trail == "pipelines":
        if getattr(container, "pipelines", None) is None:
            raise NotFound("continuous-training pipelines are off on this server (pipelines.enabled)")
        query = container.pipelines.store.audit_events
    elif trail == "jobs":
        if container.jobs is None:
            raise NotFound("this server runs no job queue")
        query = container.jobs.queue.audit_events
    else:
        finetune = getattr(container, "finetune", None)
        if finetune is None:
            raise NotFound("fine-tuning is not configured on this server")
        query = finetune.store.audit_events
    events = await asyncio.to_thread(query, **filters)
    return [{**asdict(e), "details": dict(e.details)} for e in events]
