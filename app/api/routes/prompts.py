"""Prompt registry API: templates, versions, rendering, labels and the audit log.

Reads need ``prompts:read``, writes ``prompts:write``; overriding the promotion gate
needs ``admin``. Handlers are plain ``def``: FastAPI runs them in its thread pool, which
is where blocking SQLite calls and a possibly slow promotion gate belong.
"""

from __future__ import annotations

from fastapi import APIRouter, Query

from app.api.deps import PromptsDep, PromptsReadKey, PromptsWriteKey
from app.api.openapi import error_responses
from app.api.schemas import SQL_INT_MAX
from app.core.errors import PermissionDenied
from app.security.keys import ApiKey
from prompts.models import NAME_PATTERN
from prompts.registry import Trail
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

CURSOR_GONE = "The entry `before_id` names (with `before_trail`) does not exist (or retention deleted it)."
BEFORE_ID = "Page: entries older than this one (the id of the previous page's last entry, with its trail)."
BEFORE_TRAIL = ("The trail of the entry `before_id` names: `prompts` (versions saved) or `routing` (label moves, "
                "kept in the routing table with every other decision about what serves traffic).")


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
    registry: PromptsDep, _: PromptsReadKey,
    q: str | None = Query(default=None, max_length=200, description="Search in names and descriptions."),
) -> TemplateList:
    return TemplateList(data=[TemplateOut.of(t) for t in registry.list_templates(q)])


@router.post("", response_model=VersionOut, status_code=201, responses=error_responses({
    409: "A template by that name exists: add a version to it instead."}))
def create_template(registry: PromptsDep, key: PromptsWriteKey, body: CreateTemplateIn) -> VersionOut:
    version = registry.create(body.name, body.content, author=actor_of(key), message=body.message)
    return VersionOut.full(version, registry.labels(body.name))


@router.get("/audit", response_model=AuditList, responses=error_responses({404: CURSOR_GONE}))
def audit_log(
    registry: PromptsDep, _: PromptsReadKey,
    name: str | None = Query(default=None, pattern=NAME_PATTERN),
    limit: int = Query(default=100, ge=1, le=1000),
    before_id: int | None = Query(default=None, ge=1, le=SQL_INT_MAX, description=BEFORE_ID),
    before_trail: Trail = Query(default="prompts", description=BEFORE_TRAIL),
) -> AuditList:
    entries = registry.audit_log(name=name, limit=limit, before_id=before_id, before_trail=before_trail)
    return AuditList(data=[AuditEntryOut.of(e) for e in entries])


@router.post("/preview", response_model=RenderOut)
def preview(registry: PromptsDep, _: PromptsReadKey, body: PreviewIn) -> RenderOut:
    """Render unsaved content: the editor's live preview. Nothing is stored."""
    return RenderOut.of(registry.preview(body.content, body.variables, name=body.name))


@router.get("/{name}", response_model=TemplateOut)
def get_template(registry: PromptsDep, _: PromptsReadKey, name: str) -> TemplateOut:
    labels = registry.labels(name)
    versions = registry.versions(name)
    latest = versions[-1]
    return TemplateOut(name=name, description=latest.content.description, latest_version=latest.version,
                       labels=labels, created_at=versions[0].created_at, updated_at=latest.created_at)


@router.get("/{name}/versions", response_model=VersionList)
def list_versions(registry: PromptsDep, _: PromptsReadKey, name: str) -> VersionList:
    labels = registry.labels(name)
    return VersionList(data=[VersionSummaryOut.of(v, labels) for v in reversed(registry.versions(name))])


@router.post("/{name}/versions", response_model=VersionOut, status_code=201)
def save_version(registry: PromptsDep, key: PromptsWriteKey, name: str, body: SaveVersionIn) -> VersionOut:
    version = registry.save(name, body.content, author=actor_of(key), message=body.message,
                            base_version=body.base_version)
    return VersionOut.full(version, registry.labels(name))


@router.get("/{name}/versions/{ref}", response_model=VersionOut)
def get_version(registry: PromptsDep, _: PromptsReadKey, name: str, ref: str) -> VersionOut:
    """``ref`` is a number ('3' or 'v3'), a label ('production') or 'latest'."""
    version = registry.resolve(f"{name}@{ref}")
    return VersionOut.full(version, registry.labels(name))


@router.get("/{name}/diff", response_model=DiffOut)
def diff(
    registry: PromptsDep, _: PromptsReadKey,
    name: str,
    from_: str = Query(alias="from", description="Version, label or 'latest'."),
    to: str = Query(default="latest", description="Version, label or 'latest'."),
) -> DiffOut:
    return DiffOut.of(registry.diff(name, from_, to))


@router.post("/{name}/render", response_model=RenderOut)
def render(registry: PromptsDep, _: PromptsReadKey, name: str, body: RenderIn) -> RenderOut:
    return RenderOut.of(registry.render(f"{name}@{body.ref}", body.variables))


@router.get("/{name}/labels", response_model=dict[str, int])
def labels(registry: PromptsDep, _: PromptsReadKey, name: str) -> dict[str, int]:
    return registry.labels(name)


@router.put("/{name}/labels/{label}", response_model=LabelMoveOut)
def move_label(registry: PromptsDep, key: PromptsWriteKey, name: str, label: str, body: LabelMoveIn) -> LabelMoveOut:
    reason = _check_override(key, body.override_reason)
    move = registry.move_label(name, label, body.version, actor=actor_of(key), override_reason=reason)
    return LabelMoveOut.of(move)


@router.delete("/{name}/labels/{label}", response_model=LabelMoveOut)
def remove_label(
    registry: PromptsDep, key: PromptsWriteKey,
    name: str, label: str,
    override_reason: str | None = Query(default=None, max_length=2000, description="Admin: remove a protected label."),
) -> LabelMoveOut:
    reason = _check_override(key, override_reason)
    return LabelMoveOut.of(registry.remove_label(name, label, actor=actor_of(key), override_reason=reason))


@router.get("/{name}/labels/{label}/history", response_model=AuditList)
def label_history(
    registry: PromptsDep, _: PromptsReadKey,
    name: str, label: str, limit: int = Query(default=100, ge=1, le=1000),
) -> AuditList:
    return AuditList(data=[AuditEntryOut.of(e) for e in registry.label_history(name, label, limit)])


@router.get("/{name}/audit", response_model=AuditList, responses=error_responses({
    404: f"No such template, or {CURSOR_GONE[0].lower()}{CURSOR_GONE[1:]}"}))
def template_audit(
    registry: PromptsDep, _: PromptsReadKey,
    name: str, limit: int = Query(default=100, ge=1, le=1000),
    before_id: int | None = Query(default=None, ge=1, le=SQL_INT_MAX, description=BEFORE_ID),
    before_trail: Trail = Query(default="prompts", description=BEFORE_TRAIL),
) -> AuditList:
    registry.labels(name)  # 404 for unknown templates rather than an empty list
    entries = registry.audit_log(name=name, limit=limit, before_id=before_id, before_trail=before_trail)
    return AuditList(data=[AuditEntryOut.of(e) for e in entries])
