"""What the guardrail layer takes and returns. The API layer maps :data:`GuardrailEvent` to the SSE
``guardrail`` event (see docs in engine.py); nothing here knows about HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.core.types import ChatMessage
from app.guardrails.validators.pii import PiiVault

Verdict = Literal["pass", "fail", "error", "skipped"]
ActionTaken = Literal["none", "block", "redact", "reask", "log", "retract"]


@dataclass(frozen=True)
class GuardContext:
    """Per-request facts the validators need. ``system_prompt`` defaults to the request's system messages."""

    request_id: str = ""
    route: str = ""
    workflow: str = ""
    model: str = ""
    user: str | None = None
    system_prompt: str | None = None
    passages: tuple[str, ...] | None = None
    response_schema: dict[str, Any] | None = None
    expect_json: bool = False
    secret_values: tuple[str, ...] = ()
    # the user's last message: a name the answer takes from the question is not its invention
    question: str | None = None
    # a release variant's policy: used instead of the one the bindings select
    policy: str | None = None


@dataclass(frozen=True)
class ValidatorResult:
    validator: str          # the policy's label (e.g. "pii", "denied_topics")
    registered: str         # the guardrails-ai name (e.g. "keel/pii")
    stage: Literal["input", "output"]
    verdict: Verdict
    action: ActionTaken
    score: float = 0.0
    reason: str = ""
    latency_ms: float = 0.0
    window: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class InputDecision:
    request_id: str
    policy: str
    policy_version: str
    blocked: bool
    refusal: str | None
    messages: tuple[ChatMessage, ...]
    results: list[ValidatorResult]
    vault: PiiVault
    latency_ms: float
    enabled: bool = True

    @property
    def redacted(self) -> bool:
        return any(r.action == "redact" for r in self.results)

    @property
    def blocked_by(self) -> ValidatorResult | None:
        return next((r for r in self.results if r.action == "block"), None)


@dataclass
class OutputDecision:
    request_id: str
    policy: str
    policy_version: str
    passed: bool
    blocked: bool
    text: str
    refusal: str | None
    reask: str | None
    results: list[ValidatorResult]
    latency_ms: float


# -- streaming events ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GuardrailRedaction:
    """Output: text in the window about to be released was redacted (it is already redacted in the next
    TextDelta). Input (``stage="input"``, sent right after the role chunk): values in the request were masked
    before the model saw them (``window`` -1); the answer gets the user's own values back where it uses them."""

    validator: str
    window: int
    kinds: tuple[str, ...]
    count: int
    index: int = 0
    type: Literal["redaction"] = "redaction"
    stage: Literal["input", "output"] = "output"

    @classmethod
    def of(cls, result: ValidatorResult, window: int, index: int = 0) -> GuardrailRedaction:
        kinds = tuple(result.details.get("kinds", ()))
        counts = result.details.get("counts")
        count = sum(counts.values()) if counts else len(kinds) or 1
        return cls(result.validator, window, kinds, count, index, stage=result.stage)


@dataclass(frozen=True, slots=True)
class GuardrailRetraction:
    """A later window failed: the client must withdraw the ``retracted_chars`` it already showed for choice
    ``index`` and show ``message`` instead. The stream then ends (finish_reason ``content_filter``)."""

    validator: str
    window: int
    reason: str
    message: str
    retracted_chars: int
    index: int = 0
    type: Literal["retraction"] = "retraction"


@dataclass(frozen=True, slots=True)
class GuardrailBlocked:
    """The input was refused; the model was not called. ``message`` is the refusal to show."""

    validator: str
    reason: str
    message: str
    type: Literal["blocked"] = "blocked"


GuardrailEvent = GuardrailRedaction | GuardrailRetraction | GuardrailBlocked


def event_payload(event: GuardrailEvent, *, policy_version: str = "") -> dict[str, Any]:
    """The JSON body of the documented SSE ``guardrail`` event (``event: guardrail`` + ``data: <this>``)."""
    from dataclasses import asdict

    body = asdict(event)
    body["kinds"] = list(body["kinds"]) if "kinds" in body else body.get("kinds")
    if body.get("kinds") is None:
        body.pop("kinds", None)
    if policy_version:
        body["policy_version"] = policy_version
    return body
