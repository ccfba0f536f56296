"""Prompt registry API: templates, versions, rendering, labels and the audit log.

Reads need ``prompts:read``, writes ``prompts:write``; overriding the promotion gate
needs ``admin``. Handlers are plain ``def``: FastAPI runs them in its thread pool, which
is where blocking SQLite calls and a possibly slow promotion gate belong.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from app.api.deps import require_scope
from app.core.errors import BackendUnavailable, PermissionDenied
from app.security.keys import ApiKey
from prompts.models import NAME_PATTERN
from prompts.registry import PromptRegistry
from prompts.schemas import (
    AuditEntryOut,
    AuditList,
    CreateTemplateIn,
    DiffOut,
    LabelMoveIn,
    LabelMoveOut,
    PreviewIn,
    RenderIn,
    RenderOut,
    SaveVersionIn,
    TemplateList,
    TemplateOut,
    VersionList,
    VersionOut,
    VersionSummaryOut,
)

router = APIRouter(prefix="/v1/prompts", tags=["prompts"])

read = require_scope("prompts:read")
write = require_scope("prompts:write")


def get_prompt_registry(request: Request) -> PromptRegistry:
    registry = getattr(getattr(request.app.state, "keel", None), "prompts", None)
    if registry is None:
        raise BackendUnavailable("the prompt registry is not configured on this server")
    return registry


def actor_of(key: ApiKey) -> str:
    return f"{key.name} [{key.id}]"


def _check_override(key: ApiKey, reason: str | None) -> str | None:
    if reason is None or not reason.strip():
        return None
    if not key.allows("admin"):
        raise PermissionDenied(
            "overriding the promotion gate needs the 'admin' scope; leave override_reason out, or ask an admin",
            param="override_reason",
        )
    return reason.strip()


@router.get("", response_model=TemplateList)
def list_templates(
    q: str | None = Query(default=None, max_length=200, description="Search in names and descriptions."),
    registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> TemplateList:
    return TemplateList(data=[TemplateOut.of(t) for t in registry.list_templates(q)])


@router.post("", response_model=VersionOut, status_code=201)
def create_template(
    body: CreateTemplateIn, registry: PromptRegistry = Depends(get_prompt_registry), key: ApiKey = Depends(write),
) -> VersionOut:
    version = registry.create(body.name, body.content, author=actor_of(key), message=body.message)
    return VersionOut.full(version, registry.labels(body.name))


@router.get("/audit", response_model=AuditList)
def audit_log(
    name: str | None = Query(default=None, pattern=NAME_PATTERN),
    limit: int = Query(default=100, ge=1, le=1000),
    before_id: int | None = Query(default=None, ge=1, description="Page: entries older than this id."),
    registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> AuditList:
    entries = registry.audit_log(name=name, limit=limit, before_id=before_id)
    return AuditList(data=[AuditEntryOut.of(e) for e in entries])


@router.post("/preview", response_model=RenderOut)
def preview(
    body: PreviewIn, registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> RenderOut:
    """Render unsaved content: the editor's live preview. Nothing is stored."""
    return RenderOut.of(registry.preview(body.content, body.variables, name=body.name))


@router.get("/{name}", response_model=TemplateOut)
def get_template(
    name: str, registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> TemplateOut:
    labels = registry.labels(name)
    versions = registry.versions(name)
    latest = versions[-1]
    return TemplateOut(name=name, description=latest.content.description, latest_version=latest.version,
                       labels=labels, created_at=versions[0].created_at, updated_at=latest.created_at)


@router.get("/{name}/versions", response_model=VersionList)
def list_versions(
    name: str, registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> VersionList:
    labels = registry.labels(name)
    return VersionList(data=[VersionSummaryOut.of(v, labels) for v in reversed(registry.versions(name))])


@router.post("/{name}/versions", response_model=VersionOut, status_code=201)
def save_version(
    name: str, body: SaveVersionIn, registry: PromptRegistry = Depends(get_prompt_registry),
    key: ApiKey = Depends(write),
) -> VersionOut:
    version = registry.save(name, body.content, author=actor_of(key), message=body.message,
                            base_version=body.base_version)
    return VersionOut.full(version, registry.labels(name))


@router.get("/{name}/versions/{ref}", response_model=VersionOut)
def get_version(
    name: str, ref: str, registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> VersionOut:
    """``ref`` is a number ('3' or 'v3'), a label ('production') or 'latest'."""
    version = registry.resolve(f"{name}@{ref}")
    return VersionOut.full(version, registry.labels(name))


@router.get("/{name}/diff", response_model=DiffOut)
def diff(
    name: str,
    from_: str = Query(alias="from", description="Version, label or 'latest'."),
    to: str = Query(default="latest", description="Version, label or 'latest'."),
    registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> DiffOut:
    return DiffOut.of(registry.diff(name, from_, to))


@router.post("/{name}/render", response_model=RenderOut)
def render(
    name: str, body: RenderIn, registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> RenderOut:
    return RenderOut.of(registry.render(f"{name}@{body.ref}", body.variables))


@router.get("/{name}/labels", response_model=dict[str, int])
def labels(
    name: str, registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> dict[str, int]:
    return registry.labels(name)


@router.put("/{name}/labels/{label}", response_model=LabelMoveOut)
def move_label(
    name: str, label: str, body: LabelMoveIn, registry: PromptRegistry = Depends(get_prompt_registry),
    key: ApiKey = Depends(write),
) -> LabelMoveOut:
    reason = _check_override(key, body.override_reason)
    move = registry.move_label(name, label, body.version, actor=actor_of(key), override_reason=reason)
    return LabelMoveOut.of(move)


@router.delete("/{name}/labels/{label}", response_model=LabelMoveOut)
def remove_label(
    name: str, label: str,
    override_reason: str | None = Query(default=None, max_length=2000, description="Admin: remove a protected label."),
    registry: PromptRegistry = Depends(get_prompt_registry), key: ApiKey = Depends(write),
) -> LabelMoveOut:
    reason = _check_override(key, override_reason)
    return LabelMoveOut.of(registry.remove_label(name, label, actor=actor_of(key), override_reason=reason))


@router.get("/{name}/labels/{label}/history", response_model=AuditList)
def label_history(
    name: str, label: str, limit: int = Query(default=100, ge=1, le=1000),
    registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> AuditList:
    return AuditList(data=[AuditEntryOut.of(e) for e in registry.label_history(name, label, limit)])


@router.get("/{name}/audit", response_model=AuditList)
def template_audit(
    name: str, limit: int = Query(default=100, ge=1, le=1000), before_id: int | None = Query(default=None, ge=1),
    registry: PromptRegistry = Depends(get_prompt_registry), _: ApiKey = Depends(read),
) -> AuditList:
    registry.labels(name)  # 404 for unknown templates rather than an empty list
    return AuditList(data=[AuditEntryOut.of(e) for e in registry.audit_log(name=name, limit=limit,
                                                                               before_id=before_id)])
