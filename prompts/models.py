"""Domain types of the prompt registry.

``TemplateContent`` is the versioned, hashed part of a template (pydantic, because it is
also what export files and API bodies carry). Store records around it are plain frozen
dataclasses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.errors import InvalidRequest

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_VAR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_FEATURE_RE = re.compile(r"[a-z][a-z0-9_]{0,62}:[a-z][a-z0-9_]{0,62}")
DEFAULT_LABEL = "production"
# A pseudo-label: always the newest version. It cannot be moved, so it is not a valid label name.
LATEST = "latest"

VarType = Literal["string", "integer", "number", "boolean", "list", "object"]
Role = Literal["system", "user", "assistant"]


def validate_name(name: str, *, what: str = "template name", param: str = "name") -> str:
    """Names become folder names on export, so only a safe character set is allowed."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise InvalidRequest(
            f"invalid {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param=param,
        )
    return name


def validate_label(label: str) -> str:
    validate_name(label, what="label", param="label")
    if label == LATEST or re.fullmatch(r"v?\d+", label):
        raise InvalidRequest(
            f"{label!r} cannot be a label: 'latest', '7' and 'v7' are reserved for references",
            param="label",
        )
    return label


def type_matches(kind: VarType, value: Any) -> bool:
    # bool is a subclass of int in Python; a JSON true must not pass as an integer.
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list | tuple)
    return isinstance(value, dict)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    role: Role
    content: str = Field(description="Jinja2 template text.")


class ModelParams(_Strict):
    model: str | None = Field(default=None, description="Model alias; None means the server default.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] | None = Field(default=None, max_length=4)
    response_schema: dict[str, Any] | None = Field(
        default=None, description="JSON schema the answer must follow (guided decoding)."
    )


class VariableSpec(_Strict):
    name: str
    type: VarType = "string"
    required: bool = True
    default: Any = None
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _VAR_RE.fullmatch(v):
            raise ValueError(
                f"variable name {v!r} must start with a letter and contain only letters, digits and '_'"
            )
        return v

    @model_validator(mode="after")
    def _default_type(self) -> VariableSpec:
        if self.default is not None and not type_matches(self.type, self.default):
            raise ValueError(
                f"default of variable {self.name!r} is {type(self.default).__name__}, not {self.type}"
            )
        return self


class TemplateContent(_Strict):
    """Everything a version freezes: the hash covers exactly this."""

    description: str = Field(default="", max_length=2000)
    messages: list[Message] = Field(min_length=1)
    params: ModelParams = Field(default_factory=ModelParams)
    variables: list[VariableSpec] = Field(default_factory=list)
    features: list[str] = Field(default_factory=list, max_length=50, description=(
        "Feature-store values filled at render time for the caller (the API key): 'view:feature' references, "
        "read in the template as {{ features.view.feature }} (None when unknown); their versions go to the "
        "answer's lineage."))

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if not _FEATURE_RE.fullmatch(f)]
        if bad:
            raise ValueError(f"features are view:feature references, e.g. user_stats:feedback_rate; got "
                             f"{', '.join(map(repr, bad))}")
        if len(set(v)) != len(v):
            raise ValueError("each feature may be listed once")
        return v

    @field_validator("variables")
    @classmethod
    def _unique(cls, v: list[VariableSpec]) -> list[VariableSpec]:
        seen: set[str] = set()
        for spec in v:
            if spec.name in seen:
                raise ValueError(f"variable {spec.name!r} is declared twice")
            seen.add(spec.name)
        return v

    def canonical_json(self) -> str:
        # Defaults are left out so that adding an optional field later does not change old hashes.
        data = self.model_dump(mode="json", exclude_defaults=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def content_hash(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def variable(self, name: str) -> VariableSpec | None:
        return next((v for v in self.variables if v.name == name), None)


@dataclass(frozen=True, slots=True)
class TemplateVersion:
    name: str
    version: int
    content: TemplateContent
    hash: str
    parent: int | None
    author: str
    message: str
    created_at: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class TemplateSummary:
    name: str
    description: str
    latest_version: int
    labels: dict[str, int]
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: str
    actor: str
    action: str
    name: str
    label: str | None = None
    from_version: int | None = None
    to_version: int | None = None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: where the event is kept: ``prompts`` (versions; label moves before labels joined the routing table) or
    #: ``routing`` (label moves); an ``id`` is unique within its trail
    trail: str = "prompts"
    ts: float = 0.0  # ``at`` as unix seconds (the merged history's order)


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference: ``name@7`` (version), ``name@staging`` (label), ``name`` (production)."""

    name: str
    version: int | None = None
    label: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else self.label}"


def parse_ref(ref: str, *, default_label: str = DEFAULT_LABEL) -> Ref:
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest("empty prompt reference: use name, name@<version> or name@<label>", param="ref")
    name, sep, selector = ref.partition("@")
    validate_name(name, param="ref")
    if not sep:
        return Ref(name, label=default_label)
    if selector.isdigit():
        version = int(selector)
        if version < 1:
            raise InvalidRequest(f"versions start at 1, got {ref!r}", param="ref")
        return Ref(name, version=version)
    if selector.startswith("v") and selector[1:].isdigit() and int(selector[1:]) >= 1:
        return Ref(name, version=int(selector[1:]))
    if selector == LATEST:
        return Ref(name, label=LATEST)
    validate_name(selector, what="label", param="ref")
    return Ref(name, label=selector)
