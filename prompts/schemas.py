"""Wire models of the /v1/prompts API (domain types live in prompts.models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from prompts.models import (
    NAME_PATTERN,
    AuditEntry,
    Message,
    ModelParams,
    TemplateContent,
    TemplateSummary,
    TemplateVersion,
)
from prompts.registry import GateVerdict, LabelMove, RenderedPrompt, VersionDiff


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateTemplateIn(_In):
    name: str = Field(pattern=NAME_PATTERN, description="Lowercase letters, digits, '.', '_', '-'.")
    content: TemplateContent
    message: str = Field(default="", max_length=2000, description="Like a commit message.")


class SaveVersionIn(_In):
    content: TemplateContent
    base_version: int = Field(ge=1, description="The version you edited; a newer one means 409.")
    message: str = Field(default="", max_length=2000)


class RenderIn(_In):
    ref: str = Field(default="production", description="Version ('3'), label ('staging') or 'latest'.")
    variables: dict[str, Any] = Field(default_factory=dict)


class PreviewIn(_In):
    content: TemplateContent
    variables: dict[str, Any] = Field(default_factory=dict)
    name: str = Field(default="draft", pattern=NAME_PATTERN)


class LabelMoveIn(_In):
    version: int = Field(ge=1)
    override_reason: str | None = Field(
        default=None, max_length=2000, description="Admin only: move even if the promotion gate refuses."
    )


class TemplateOut(BaseModel):
    name: str
    description: str
    latest_version: int
    labels: dict[str, int]
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, t: TemplateSummary) -> TemplateOut:
        return cls(name=t.name, description=t.description, latest_version=t.latest_version, labels=t.labels,
                   created_at=t.created_at, updated_at=t.updated_at)


class TemplateList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TemplateOut]


class VersionSummaryOut(BaseModel):
    name: str
    version: int
    ref: str
    hash: str
    parent: int | None
    author: str
    message: str
    created_at: str
    labels: list[str] = Field(default_factory=list, description="Labels pointing at this version.")

    @classmethod
    def of(cls, v: TemplateVersion, labels: dict[str, int]) -> VersionSummaryOut:
        return cls(name=v.name, version=v.version, ref=v.ref, hash=v.hash, parent=v.parent, author=v.author,
                   message=v.message, created_at=v.created_at,
                   labels=sorted(k for k, n in labels.items() if n == v.version))


class VersionOut(VersionSummaryOut):
    content: TemplateContent

    @classmethod
    def full(cls, v: TemplateVersion, labels: dict[str, int]) -> VersionOut:
        return cls(**VersionSummaryOut.of(v, labels).model_dump(), content=v.content)


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionSummaryOut]


class RenderOut(BaseModel):
    ref: str = Field(description="The resolved name@version ('name@draft' for previews).")
    name: str
    version: int | None
    hash: str
    messages: list[Message]
    params: ModelParams

    @classmethod
    def of(cls, r: RenderedPrompt) -> RenderOut:
        return cls(ref=r.ref, name=r.name, version=r.version, hash=r.hash, messages=r.messages, params=r.params)


class LabelMoveOut(BaseModel):
    name: str
    label: str
    from_version: int | None
    to_version: int | None
    changed: bool
    verdict: GateVerdict | None = None
    overridden: bool = False

    @classmethod
    def of(cls, m: LabelMove) -> LabelMoveOut:
        return cls(name=m.name, label=m.label, from_version=m.from_version, to_version=m.to_version,
                   changed=m.changed, verdict=m.verdict, overridden=m.overridden)


class AuditEntryOut(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    name: str
    label: str | None
    from_version: int | None
    to_version: int | None
    reason: str
    details: dict[str, Any]
    trail: Literal["prompts", "routing"] = Field(
        description="Where the entry is kept (label moves: the routing table); an id is unique within its trail.")

    @classmethod
    def of(cls, e: AuditEntry) -> AuditEntryOut:
        return cls(id=e.id, at=e.at, actor=e.actor, action=e.action, name=e.name, label=e.label,
                   from_version=e.from_version, to_version=e.to_version, reason=e.reason, details=e.details,
                   trail=e.trail)


class AuditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEntryOut]


class DiffOut(BaseModel):
    from_ref: str
    to_ref: str
    changed: list[str] = Field(description="Top-level parts that differ: description, messages, params, variables.")
    diff: str = Field(description="Unified diff of the two versions as YAML; empty when identical.")

    @classmethod
    def of(cls, d: VersionDiff) -> DiffOut:
        return cls(from_ref=d.from_ref, to_ref=d.to_ref, changed=d.changed, diff=d.diff)
