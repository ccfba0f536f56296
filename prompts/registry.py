"""The prompt registry service: validation, cached rendering, labels and the promotion gate.

Versions live in the prompt store; which version a label serves lives in the routing table
(:mod:`app.llm.routing`, kind ``prompt``), where every decision about what serves traffic is written, audited
and revisioned. This layer keeps resolved and compiled versions in memory for the hot path and drops them when
either revision counter moves (checked at most every ``change_check_interval_s``), so a version saved or a label
moved by another worker is seen within about that interval.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.core.errors import InvalidRequest, KeelError, NotFound
from app.llm.routing import Label, RoutingTable, memory_table
from prompts import yamlio
from prompts.errors import LabelProtected, PromotionGateFailed
from prompts.models import (
    LATEST,
    AuditEntry,
    Message,
    ModelParams,
    Ref,
    TemplateContent,
    TemplateSummary,
    TemplateVersion,
    parse_ref,
    validate_label,
    validate_name,
)
from prompts.render import CompiledPrompt, Renderer
from prompts.settings import PromptSettings
from prompts.store import PromptStore, audit_entry

log = logging.getLogger("keel.prompts")

LIBRARY_DIR = Path(__file__).parent / "library"
_CACHE_MAX = 2048
KIND = "prompt"  # the routing table's kind for prompt labels
Trail = Literal["prompts", "routing"]
_ID_MAX = 2**63 - 1  # audit ids are BIGINTs
_TRAIL_ORDER = {"prompts": 0, "routing": 1}  # ties in time: a version saved, then its label moved


class GateVerdict(BaseModel):
    passed: bool
    reason: str
    details: dict[str, Any] = Field(default_factory=dict)


# Called with the template name and the exact version about to get a protected label.
PromotionGate = Callable[[str, int], GateVerdict]


def allow_all_gate(template_name: str, version: int) -> GateVerdict:
    return GateVerdict(passed=True, reason="no gate configured")


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """What will be sent to the model, and exactly which version produced it."""

    name: str
    version: int | None
    hash: str
    messages: list[Message]
    params: ModelParams
    #: the feature values it was rendered with and their views' versions (lineage), when it declares features
    features: Mapping[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else 'draft'}"


@dataclass(frozen=True, slots=True)
class LabelMove:
    name: str
    label: str
    from_version: int | None
    to_version: int | None
    changed: bool
    verdict: GateVerdict | None = None
    overridden: bool = False


@dataclass(frozen=True, slots=True)
class VersionDiff:
    from_ref: str
    to_ref: str
    diff: str
    changed: list[str] = field(default_factory=list)


class PromptRegistry:
    def __init__(
        self,
        store: PromptStore,
        settings: PromptSettings | None = None,
        *,
        gate: PromotionGate | None = None,
        clock: Callable[[], float] = time.monotonic,
        routes: RoutingTable | None = None,
        owns_routes: bool = False,
    ) -> None:
        """``routes``: the routing table that holds the labels (an in-memory one when omitted: a registry of its
        own, as in tests); closed with the registry when omitted or ``owns_routes``."""
        self.store = store
        self.routes = routes if routes is not None else memory_table({}, {})
        self._owns_routes = routes is None or owns_routes
        self.settings = settings or PromptSettings()
        self.renderer = Renderer(self.settings.limits)
        self.gate: PromotionGate = gate or allow_all_gate
        self._clock = clock
        self._lock = threading.Lock()
        self._resolved: dict[str, TemplateVersion] = {}
        self._compiled: dict[str, CompiledPrompt] = {}
        self._revision = self._revisions()
        self._checked = clock()

    def close(self) -> None:
        self.store.close()
        if self._owns_routes:
            self.routes.close()

    def _revisions(self) -> tuple[int, int]:
        return self.store.revision(), self.routes.catch_up()

    def set_gate(self, gate: PromotionGate | None) -> None:
        """The eval harness plugs its gate in here; None restores the allow-all default."""
        self.gate = gate or allow_all_gate

    @property
    def protected_labels(self) -> frozenset[str]:
        return frozenset(self.settings.protected_labels)

    # --- cache ----------------------------------------------------------------------------------
    def _maybe_refresh(self) -> None:
        now = self._clock()
        if now - self._checked < self.settings.change_check_interval_s:
            return
        self._checked = now
        try:
            revision = self._revisions()
        except KeelError as e:
            # A networked store (Postgres) can be briefly unreachable: keep serving what is cached
            # (the hot path must not fail for it) and check again after the next interval.
            log.warning("prompt store change check failed, serving cached versions: %s", e)
            return
        if revision != self._revision:
            self._revision = revision
            self._clear()

    def _clear(self) -> None:
        with self._lock:
            self._resolved.clear()
            self._compiled.clear()

    def invalidate(self) -> None:
        """Drop cached versions after a write through this registry (or its store)."""
        self._clear()
        self._revision = self._revisions()
        self._checked = self._clock()

    def _remember(self, cache: dict[str, Any], key: str, value: Any) -> None:
        with self._lock:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[key] = value

    # --- reads ----------------------------------------------------------------------------------
    def resolve(self, ref: str | Ref) -> TemplateVersion:
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        key = str(parsed)
        self._maybe_refresh()
        hit = self._resolved.get(key)
        if hit is not None:
            return hit
        version = self._lookup(parsed)
        self._remember(self._resolved, key, version)
        return version

    def _lookup(self, ref: Ref) -> TemplateVersion:
        if ref.version is not None:
            return self.store.get_version(ref.name, ref.version)
        if ref.label == LATEST:
            latest = self.store.latest_version(ref.name)
            if latest is None:
                raise NotFound(f"no prompt template named {ref.name!r}", param="ref")
            return self.store.get_version(ref.name, latest)
        labels = self.labels(ref.name)
        if ref.label not in labels:
            have = ", ".join(f"{k}->{v}" for k, v in labels.items()) or "none"
            raise NotFound(
                f"{ref.name!r} has no label {ref.label!r} (labels: {have}); use {ref.name}@<version>, "
                f"{ref.name}@latest, or move the label first",
                param="ref",
            )
        return self.store.get_version(ref.name, labels[ref.label])

    def compiled(self, ref: str) -> CompiledPrompt:
        version = self.resolve(ref)
        key = f"{ref}\x00{version.hash}"
        hit = self._compiled.get(key)
        if hit is not None:
            return hit
        compiled = self.renderer.compile(version.content, self.resolve, version=version, origin=version.ref)
        self._remember(self._compiled, key, compiled)
        return compiled

    def render(self, ref: str, variables: Mapping[str, Any] | None = None, *,
               features: Mapping[str, Any] | None = None) -> RenderedPrompt:
        """The hot path: served from memory after the first call for a reference. ``features``: the lookup of
        :meth:`feature_refs` for the caller (``{"values": {ref: value}, "versions": {view: version}}``)."""
        compiled = self.compiled(ref)
        version = compiled.version
        assert version is not None
        messages = self.renderer.render(compiled, variables or {}, (features or {}).get("values"))
        return RenderedPrompt(version.name, version.version, version.hash, messages, version.content.params,
                              dict(features) if features else None)

    def feature_refs(self, ref: str) -> list[str]:
        """The features the version ``ref`` resolves to declares (looked up per caller before rendering)."""
        return list(self.compiled(ref).content.features)

    def preview(
        self, content: TemplateContent, variables: Mapping[str, Any] | None = None, *, name: str = "draft"
    ) -> RenderedPrompt:
        """Render unsaved content (the editor's live preview); includes resolve against the registry."""
        compiled = self.renderer.compile(content, self.resolve, version=None, origin=f"{name}@draft")
        messages = self.renderer.render(compiled, variables or {})
        return RenderedPrompt(name, None, content.content_hash(), messages, content.params)

    def validate(self, content: TemplateContent, *, name: str = "draft") -> None:
        self.renderer.check(content, self.resolve, origin=f"{name}@draft")

    def list_templates(self, query: str | None = None) -> list[TemplateSummary]:
        labels = self.routes.all_labels(KIND)
        return [dataclasses.replace(t, labels=_versions(labels.get(t.name, {})))
                for t in self.store.list_templates(query)]

    def versions(self, name: str) -> list[TemplateVersion]:
        return self.store.list_versions(validate_name(name))

    def labels(self, name: str) -> dict[str, int]:
        """The template's labels and the versions they serve (404 for a template that does not exist)."""
        labels = _versions(self.routes.labels(KIND, validate_name(name)))
        if not labels and self.store.latest_version(name) is None:
            raise NotFound(f"no prompt template named {name!r}", param="name")
        return labels

    def label_history(self, name: str, label: str | None = None, limit: int = 100) -> list[AuditEntry]:
        entries = self.audit_log(name=validate_name(name), label=label, limit=limit)
        return [e for e in entries if e.label is not None]

    def audit_log(self, *, name: str | None = None, label: str | None = None, limit: int = 100,
                  before_id: int | None = None, before_trail: Trail = "prompts") -> list[AuditEntry]:
        """A template's history (or every template's), newest first: its versions from the prompt store and its
        label moves from the routing table, in one list. Pages back from the entry ``before_id`` of
        ``before_trail`` (an entry's ``id`` is unique within its ``trail``)."""
        limit = max(1, min(limit, 1000))
        cursor = self._cursor(before_id, before_trail) if before_id is not None else None
        until = cursor.ts if cursor is not None else None
        mine = {t: before_id if cursor is not None and cursor.trail == t else None for t in _TRAIL_ORDER}
        saved = self.store.audit_log(name=name, label=label, limit=limit, before_id=mine["prompts"],
                                     until=None if mine["prompts"] else until)
        moved = [audit_entry(e) for e in self.routes.label_events(
            KIND, subject=name, label=label, limit=limit, before_id=mine["routing"],
            until=None if mine["routing"] else until)]
        entries = [e for e in saved + moved if cursor is None or _older(e, cursor)]
        entries.sort(key=_order, reverse=True)
        return entries[:limit]

    def _cursor(self, before_id: int, trail: Trail) -> AuditEntry:
        """The entry to page back from: its time bounds the other trail's entries."""
        upto = min(before_id + 1, _ID_MAX)
        found = (self.store.audit_log(before_id=upto, limit=1) if trail == "prompts" else
                 [audit_entry(e) for e in self.routes.label_events(KIND, before_id=upto, limit=1)])
        if not found or found[0].id != before_id:
            raise NotFound(f"no {trail} audit entry {before_id} to page back from (a cursor is the id and trail of "
                           "the previous page's last entry; audit retention may have deleted it since: start again "
                           "from the newest page)", param="before_id")
        return found[0]

    def diff(self, name: str, from_ref: str, to_ref: str) -> VersionDiff:
        a = self.resolve(_scoped(name, from_ref))
        b = self.resolve(_scoped(name, to_ref))
        left, right = _diffable(a.content), _diffable(b.content)
        text = "\n".join(
            difflib.unified_diff(
                yamlio.dump(left).splitlines(), yamlio.dump(right).splitlines(),
                fromfile=a.ref, tofile=b.ref, lineterm="",
            )
        )
        changed = [k for k in left if left[k] != right.get(k)]
        return VersionDiff(a.ref, b.ref, text, changed)

    # --- writes ---------------------------------------------------------------------------------
    def create(self, name: str, content: TemplateContent, *, author: str, message: str = "") -> TemplateVersion:
        return self.save(name, content, author=author, message=message or "created", base_version=None)

    def save(
        self, name: str, content: TemplateContent, *, author: str, message: str = "", base_version: int | None
    ) -> TemplateVersion:
        validate_name(name)
        self.renderer.check(content, self.resolve, origin=f"{name}@new")
        version = self.store.save(name, content, author=author, message=message, base_version=base_version)
        self.invalidate()
        log.info("prompt %s saved by %s", version.ref, author)
        return version

    def move_label(
        self, name: str, label: str, version: int, *, actor: str, override_reason: str | None = None
    ) -> LabelMove:
        """Point a label at a version. Protected labels pass the promotion gate first; a refused
        move goes through only with an override reason (the API allows that to admins only)."""
        validate_name(name)
        validate_label(label)
        target = self.store.get_version(name, version)
        self.routes.catch_up()  # where the label points now, not as of the last background refresh
        current = self.labels(name).get(label)
        if current == version:
            return LabelMove(name, label, current, version, changed=False)
        verdict: GateVerdict | None = None
        overridden = False
        action = "label.move"
        if label in self.protected_labels:
            verdict = self.check_gate(name, target.version)
            if not verdict.passed:
                if not (override_reason and override_reason.strip()):
                    raise PromotionGateFailed(
                        f"the promotion gate refused {name}@{version} for label {label!r}: {verdict.reason}. "
                        "Fix what the gate reports and try again, or have an admin override with a reason",
                        reason=verdict.reason, details=verdict.details,
                    )
                overridden = True
                action = "label.override"
        details: dict[str, Any] = {"hash": target.hash}
        if verdict is not None:
            details["gate"] = verdict.model_dump()
        previous = self.routes.set_label(Label(KIND, name, label, version, ref=target.hash, actor=actor),
                                         action=action, reason=(override_reason or "").strip(), details=details)
        self.invalidate()
        log.info("prompt label %s@%s: %s -> %s by %s%s", name, label, previous, version, actor,
                 " (gate overridden)" if overridden else "")
        return LabelMove(name, label, previous, version, True, verdict, overridden)

    def remove_label(
        self, name: str, label: str, *, actor: str, override_reason: str | None = None
    ) -> LabelMove:
        validate_name(name)
        validate_label(label)
        reason = (override_reason or "").strip()
        if label in self.protected_labels and not reason:
            raise LabelProtected(
                f"{label!r} is a protected label; removing it needs an admin override with a reason "
                "(or move it to another version instead)",
                param="label",
            )
        if self.store.latest_version(name) is None:
            raise NotFound(f"no prompt template named {name!r}", param="name")
        previous = self.routes.remove_label(KIND, name, label, actor=actor, reason=reason)
        if previous is None:
            raise NotFound(f"{name!r} has no label {label!r}", param="label")
        self.invalidate()
        return LabelMove(name, label, previous, None, True, None, overridden=bool(reason))

    def adopt_legacy_labels(self) -> int:
        """Hand the labels an earlier release kept in the prompt store over to the routing table, once (recorded in
        the prompt store; its rows stay, read-only). Safe to repeat and to run from several processes: a label the
        table already has wins. Returns how many moved. Processes of the earlier release do not see moves made
        after it: upgrade every process sharing the stores at once."""
        legacy = self.store.legacy_labels()
        moved = 0
        for name, label, version, actor in legacy:
            target = self.store.get_version(name, version)
            moved += self.routes.set_label(
                Label(KIND, name, label, version, ref=target.hash, actor=actor or "system:migrate"),
                action="label.adopt", reason="moved from the prompt store to the routing table",
                only_if_absent=True) is None
        if legacy:
            self.store.legacy_labels_adopted()
            self.invalidate()
            log.info("prompt labels: %d of %d moved from the prompt store to the routing table", moved, len(legacy))
        return moved

    def check_gate(self, name: str, version: int) -> GateVerdict:
        """The promotion gate's verdict on one exact version (fails closed when the gate itself fails)."""
        try:
            verdict = self.gate(name, version)
        except Exception as exc:  # a broken gate must fail closed, not open
            log.exception("promotion gate raised for %s@%s", name, version)
            return GateVerdict(passed=False, reason=f"the gate raised {type(exc).__name__}: {exc}")
        if not isinstance(verdict, GateVerdict):
            return GateVerdict(passed=False, reason=f"the gate returned {type(verdict).__name__}, not a verdict")
        return verdict


def _versions(labels: Mapping[str, Label]) -> dict[str, int]:
    return {name: labels[name].version for name in sorted(labels)}


def _order(e: AuditEntry) -> tuple[float, int, int]:
    return e.ts, _TRAIL_ORDER[e.trail], e.id


def _older(e: AuditEntry, cursor: AuditEntry) -> bool:
    """Whether ``e`` comes after ``cursor`` in the newest-first history (the other trail is read by time only,
    so its entries at the cursor's exact time are sorted here)."""
    return e.trail == cursor.trail or _order(e) < _order(cursor)


def _scoped(name: str, ref: str) -> str:
    """Diff endpoints take '3', 'v3', 'staging' or a full 'name@3'."""
    validate_name(name)
    if "@" in ref:
        if ref.split("@", 1)[0] != name:
            raise InvalidRequest(f"{ref!r} belongs to another template than {name!r}", param="ref")
        return ref
    return f"{name}@{ref}"


def _diffable(content: TemplateContent) -> dict[str, Any]:
    data = content.model_dump(mode="json", exclude_none=True)
    return {k: data[k] for k in ("description", "messages", "params", "variables")}
