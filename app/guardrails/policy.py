"""Guardrail policies as versioned YAML, validated by pydantic.

A policy file names validator lists for the input and the output stage, per named policy, and binds
policies to requests by route / workflow / model alias (first matching binding wins; ``default``
otherwise). See ``infra/guardrails/default.yaml`` for the documented shape. Every decision records the
file's ``version`` and a content hash (sha256 of the canonical JSON of the validated policy, so comments
and formatting do not change it but any effective change does).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.guardrails.errors import GuardrailPolicyError
from app.guardrails.validators import KEEL_VALIDATORS
from app.guardrails.validators.pii import ALL_ENTITIES

Action = Literal["block", "redact", "reask", "log"]
Stage = Literal["input", "output"]

# which on-fail actions make sense for which validator, per stage
_ACTIONS: dict[str, dict[str, set[str]]] = {
    "keel/prompt_injection": {"input": {"block", "log"}, "output": {"block", "log"}},
    "keel/harmful_request": {"input": {"block", "log"}},
    "keel/pii": {"input": {"redact", "block", "log"}, "output": {"redact", "block", "log"}},
    "keel/toxicity": {"input": {"block", "redact", "log"}, "output": {"block", "redact", "reask", "log"}},
    "keel/topic": {"input": {"block", "log"}, "output": {"block", "log"}},
    "keel/groundedness": {"output": {"block", "reask", "log"}},
    "keel/json_schema": {"output": {"block", "reask", "log"}},
    "keel/system_prompt_leakage": {"output": {"block", "log"}},
    "keel/secrets": {"input": {"redact", "block", "log"}, "output": {"redact", "block", "log"}},
}
_PARAMS: dict[str, set[str]] = {
    "keel/prompt_injection": {"sim_floor", "sim_ceiling", "roles"},
    "keel/harmful_request": {"categories", "exclude"},
    "keel/pii": {"entities", "restore_placeholders", "persons"},
    "keel/toxicity": set(),
    "keel/topic": {"allow", "deny", "allow_threshold"},
    "keel/groundedness": {"max_unsupported_ratio", "lexical_threshold"},
    "keel/json_schema": {"schema"},
    "keel/system_prompt_leakage": {"n", "min_shared", "run"},
    "keel/secrets": set(),
}
# a failure of these checks must not let the request through unchecked (issue: guards failed open by default)
FAIL_CLOSED = {"keel/prompt_injection", "keel/harmful_request", "keel/topic", "keel/secrets"}
# validators that need the whole answer (cannot judge a streaming window on its own)
WHOLE_OUTPUT = {"keel/json_schema"}
# cheap text checks whose findings must never be shown: run on every piece of a stream before its release
BEFORE_RELEASE = {"keel/pii", "keel/secrets", "keel/toxicity", "keel/system_prompt_leakage"}


def needs_whole_output(spec: ValidatorSpec) -> bool:
    """Judged once on the whole answer rather than per streaming window. Groundedness with a tolerance
    (``max_unsupported_ratio`` > 0) is a share of the answer's sentences: one window cannot tell it, and
    judging each sentence alone withdrew correct answers for one weak sentence. While streaming, such an
    answer is shown as it comes and retracted at the end if the share is exceeded; with no tolerance every
    window is judged as it comes."""
    return spec.validator in WHOLE_OUTPUT or (
        spec.validator == "keel/groundedness" and float(spec.params.get("max_unsupported_ratio", 0) or 0) > 0)


def before_release(spec: ValidatorSpec) -> bool:
    """Checked on each piece of a stream before the client sees it (whole words, with the text before them
    as context): what it masks or refuses is never shown. The cheap text checks (PII, secrets, toxicity,
    system-prompt leakage) and every redacting entry; the model-backed judges run after release."""
    return spec.validator in BEFORE_RELEASE or spec.on_fail == "redact"


def holds_windows(spec: ValidatorSpec) -> bool:
    """A model-backed judge (topic, prompt injection, per-sentence groundedness) whose entry says
    ``release: before``: a stream's text waits until its sentence window has passed it. Unset or ``after``:
    the window is judged once shown and retracted if it fails."""
    return spec.release == "before" and not before_release(spec) and not needs_whole_output(spec)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValidatorSpec(_Strict):
    validator: str = Field(description="A registered name, e.g. keel/pii.")
    name: str | None = Field(default=None, description="Label in audit and metrics; defaults to the short name.")
    on_fail: Action = "block"
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    params: dict[str, Any] = Field(default_factory=dict)
    refusal: str | None = Field(default=None, description="Refusal text when this validator blocks.")
    on_error: Literal["allow", "block"] | None = Field(default=None, description=(
        "When the validator itself fails (raises): block (fail closed) or allow (fail open). Unset: "
        "guardrails.on_error if set, else closed for the checks that stand between an attacker and the model "
        "(prompt injection, harmful requests, denied/allowed topics, secrets) and open for the rest."))
    release: Literal["before", "after"] | None = Field(default=None, description=(
        "Streaming, for the model-backed output judges (keel/topic, keel/prompt_injection, keel/groundedness "
        "per sentence): 'after' (unset) shows text as soon as the text checks passed it and judges each sentence "
        "window once shown, retracting what was shown when it fails (counted: "
        "keel_guardrail_stream_retractions_total); 'before' holds the text until its window has passed this "
        "entry (about one sentence of delay). keel/pii, keel/secrets, keel/toxicity, keel/system_prompt_leakage "
        "and redact entries always run before release, word by word."))

    @field_validator("validator")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in KEEL_VALIDATORS:
            raise ValueError(f"unknown validator {v!r}; known: {', '.join(KEEL_VALIDATORS)}")
        return v

    @model_validator(mode="after")
    def _check_params(self) -> ValidatorSpec:
        unknown = set(self.params) - _PARAMS[self.validator]
        if unknown:
            allowed = sorted(_PARAMS[self.validator])
            raise ValueError(f"{self.validator}: unknown params {sorted(unknown)}; allowed: {allowed}")
        if self.validator == "keel/pii" and "entities" in self.params:
            bad = set(self.params["entities"]) - set(ALL_ENTITIES)
            if bad:
                raise ValueError(f"keel/pii: unknown entities {sorted(bad)}; known: {list(ALL_ENTITIES)}")
        if self.validator == "keel/pii" and self.params.get("persons", "all") not in ("all", "with_contact", "none"):
            raise ValueError(f"keel/pii: persons must be all, with_contact or none, not {self.params['persons']!r}")
        return self

    @property
    def label(self) -> str:
        return self.name or self.validator.split("/", 1)[-1]


class GuardPolicy(_Strict):
    extends: str | None = None
    description: str = ""
    input: list[ValidatorSpec] | None = None
    output: list[ValidatorSpec] | None = None
    passages: list[ValidatorSpec] | None = Field(default=None, description=(
        "How each retrieved passage is judged before it enters a grounded prompt, each on its own: a passage an "
        "entry blocks is left out (the question is answered from the others). Entries run as on the input; "
        "on_fail block or log. Inherited; unset = the input stage's prompt-injection entries."))
    streaming: Literal["progressive", "windows"] | None = Field(default=None, description=(
        "How a stream's text is released (inherited; unset = progressive): progressive shows it word by word "
        "once the text checks passed it (see app/guardrails/streaming.py); windows holds each sentence window "
        "until every output entry has passed it (Keel's behaviour before 2026.12: about one sentence of delay)."))
    input_overlap: bool | None = Field(default=None, description=(
        "Start the model while the input entries judge the request, so the answer's first token no longer waits "
        "for them; nothing is released before the verdict, and a blocked request's generation is cancelled (the "
        "model server has seen it, nobody else). Only for policies whose input entries never change the input "
        "(no redact): a masked value would reach the model unmasked. Inherited; unset = false."))


class TopicSpec(_Strict):
    description: str
    keywords: list[str] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)


class Binding(_Strict):
    route: str = "*"
    workflow: str = "*"
    model: str = "*"
    policy: str

    def matches(self, route: str, workflow: str, model: str) -> bool:
        return (fnmatch.fnmatchcase(route, self.route) and fnmatch.fnmatchcase(workflow, self.workflow)
                and fnmatch.fnmatchcase(model, self.model))


class PolicyFile(_Strict):
    version: str = Field(min_length=1)
    description: str = ""
    refusal_message: str = "I can't help with that request."
    topics: dict[str, TopicSpec] = Field(default_factory=dict)
    policies: dict[str, GuardPolicy]
    bindings: list[Binding] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PolicyFile:
        if "default" not in self.policies:
            raise ValueError("policies must include 'default' (used when no binding matches)")
        for b in self.bindings:
            if b.policy not in self.policies:
                raise ValueError(f"binding {b.model_dump()} names unknown policy {b.policy!r}")
        for name in self.policies:
            seen: set[str] = set()
            cur: str | None = name
            while cur is not None:
                if cur in seen:
                    raise ValueError(f"policy {name!r}: 'extends' cycle through {cur!r}")
                seen.add(cur)
                if cur not in self.policies:
                    raise ValueError(f"policy {name!r} extends unknown policy {cur!r}")
                cur = self.policies[cur].extends
        for pname in self.policies:
            resolved = self.resolve(pname)
            for entry in resolved.passages or ():
                if entry.on_fail not in ("block", "log") or "block" not in _ACTIONS[entry.validator].get("input", ()):
                    raise ValueError(f"policy {pname!r} passages: {entry.validator} on_fail={entry.on_fail!r} cannot "
                                     "judge a passage; a passage entry blocks (leaves the passage out) or logs, with "
                                     "a validator that can block an input")
            if resolved.input_overlap:
                changing = [s.label for s in resolved.input if s.on_fail == "redact"]
                if changing:
                    raise ValueError(f"policy {pname!r}: input_overlap starts the model on the input as sent, but "
                                     f"{', '.join(changing)} redacts it (the model would read what it masks); "
                                     "remove input_overlap or make those entries block or log")
            # a passage is judged as an input is: its entries get the input stage's checks
            for stage, runs_as in (("input", "input"), ("output", "output"), ("passages", "input")):
                labels = [s.label for s in getattr(resolved, stage) or ()]
                if len(labels) != len(set(labels)):
                    raise ValueError(f"policy {pname!r} {stage}: validator names must be unique (set 'name')")
                for spec in getattr(resolved, stage) or ():
                    allowed = _ACTIONS[spec.validator].get(runs_as)
                    if not allowed:
                        raise ValueError(f"policy {pname!r}: {spec.validator} cannot run on {stage}")
                    if spec.release is not None:
                        _check_release(pname, stage, spec)
                    if spec.on_fail not in allowed:
                        raise ValueError(f"policy {pname!r} {stage}: {spec.validator} cannot on_fail={spec.on_fail!r}; "
                                         f"allowed: {sorted(allowed)}")
                    if spec.validator == "keel/topic":
                        for t in [*spec.params.get("allow", []), *spec.params.get("deny", [])]:
                            if t not in self.topics:
                                raise ValueError(f"policy {pname!r}: keel/topic names unknown topic {t!r}")
                        if not spec.params.get("allow") and not spec.params.get("deny"):
                            raise ValueError(f"policy {pname!r}: keel/topic needs 'allow' or 'deny' topics")
        return self

    def resolve(self, name: str) -> ResolvedPolicy:
        chain: list[GuardPolicy] = []
        cur: str | None = name
        while cur is not None:
            chain.append(self.policies[cur])
            cur = self.policies[cur].extends
        inp: list[ValidatorSpec] = []
        out: list[ValidatorSpec] = []
        passages: list[ValidatorSpec] | None = None
        streaming = "progressive"
        overlap = False
        for p in reversed(chain):  # base first; a child's list replaces its parent's
            if p.input is not None:
                inp = list(p.input)
            if p.output is not None:
                out = list(p.output)
            if p.passages is not None:
                passages = list(p.passages)
            streaming = p.streaming or streaming
            overlap = p.input_overlap if p.input_overlap is not None else overlap
        return ResolvedPolicy(name, tuple(inp), tuple(out), streaming,
                              tuple(passages) if passages is not None else None, overlap)


def _check_release(pname: str, stage: str, spec: ValidatorSpec) -> None:
    where = f"policy {pname!r} {stage}: {spec.label}"
    if stage != "output":
        raise ValueError(f"{where}: 'release' applies to output entries only (input is checked before the model)")
    if before_release(spec) and spec.release == "after":
        raise ValueError(f"{where}: {spec.validator} always runs before release (word by word): what it masks "
                         "or refuses must never be shown; remove 'release'")
    if needs_whole_output(spec) and spec.release == "before":
        raise ValueError(f"{where}: it judges the whole answer, so 'before' would hold the whole answer back; "
                         "send a non-streaming request for that")


@dataclass(frozen=True)
class ResolvedPolicy:
    name: str
    input: tuple[ValidatorSpec, ...]
    output: tuple[ValidatorSpec, ...]
    streaming: Literal["progressive", "windows"] = "progressive"
    passages: tuple[ValidatorSpec, ...] | None = None  # None: the input's prompt-injection entries
    input_overlap: bool = False

    @property
    def passage_entries(self) -> tuple[ValidatorSpec, ...]:
        """The entries each retrieved passage goes through (see ``GuardPolicy.passages``)."""
        if self.passages is not None:
            return self.passages
        return tuple(s for s in self.input if s.validator == "keel/prompt_injection")


@dataclass(frozen=True)
class LoadedPolicy:
    file: PolicyFile
    path: Path | None
    version: str
    content_hash: str

    @property
    def version_tag(self) -> str:
        """What every audit record stores: ``<version>+<first 12 hex of the hash>``."""
        return f"{self.file.version}+{self.content_hash[:12]}"

    def select(self, *, route: str = "", workflow: str = "", model: str = "") -> ResolvedPolicy:
        for b in self.file.bindings:
            if b.matches(route or "", workflow or "", model or ""):
                return self.file.resolve(b.policy)
        return self.file.resolve("default")


def parse_policy(data: dict[str, Any], path: Path | None = None) -> LoadedPolicy:
    try:
        pf = PolicyFile.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        lines = [f"  {'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors()]
        raise GuardrailPolicyError(f"invalid guardrail policy{where}:\n" + "\n".join(lines)) from None
    dumped = pf.model_dump(mode="json")
    for entry in dumped["policies"].values():
        for added in ("passages", "input_overlap"):  # added in 2026.12: unset keeps older files' hash (and tag)
            if entry.get(added) is None:
                entry.pop(added, None)
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return LoadedPolicy(pf, path, pf.version, hashlib.sha256(canonical.encode()).hexdigest())


def load_policy(path: Path | str) -> LoadedPolicy:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GuardrailPolicyError(f"guardrail policy file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise GuardrailPolicyError(f"guardrail policy {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise GuardrailPolicyError(f"guardrail policy {path} must be a mapping at the top level")
    return parse_policy(data, path)
