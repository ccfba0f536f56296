"""Wire models of the agents API: the SSE event schema and request/response bodies.

The API router serialises :mod:`agents.events` dataclasses with :func:`agents.events.to_wire`;
these models are the documented contract of that JSON (tests validate every streamed event).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.core.errors import InvalidRequest


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int = Field(description="Position of the event in this stream, from 0.")
    ts: float = Field(description="Unix time the event was put on the wire.")
    run_id: str


class RunStartedEvent(_Event):
    type: Literal["run.started"]
    thread_id: str
    workflow: str
    resumed: bool
    guardrails: str | None = Field(default=None, description="'<policy>@<version>' of the guardrail policy that "
                                   "checks this run's input and answer; null when the server has no guardrails.")


class NodeStartedEvent(_Event):
    type: Literal["node.started"]
    node: str
    step: int


class NodeFinishedEvent(_Event):
    type: Literal["node.finished"]
    node: str
    step: int
    duration_ms: float
    summary: str


class ToolCallEvent(_Event):
    type: Literal["tool.call"]
    call_id: str
    tool: str
    args: dict[str, Any]
    node: str


class ToolResultEvent(_Event):
    type: Literal["tool.result"]
    call_id: str
    tool: str
    ok: bool
    output: str = Field(description="What the agent sees: the result, or 'error: ...' / a rejection reason.")
    attempts: int
    duration_ms: float


class TokenEvent(_Event):
    type: Literal["token"]
    node: str = Field(description="The node generating (answer, writer); drafts may be rejected by verification.")
    text: str


class InterruptWireEvent(_Event):
    type: Literal["interrupt"]
    thread_id: str
    tool: str
    args: dict[str, Any]
    call_id: str
    reason: str
    actions: list[Literal["approve", "reject", "edit"]]


class CitationOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    source: str
    title: str
    label: str
    chunk_id: str | None = ""
    page: int | None = None
    text: str = ""


class FinalEvent(_Event):
    type: Literal["final"]
    status: Literal["completed", "step_limit", "blocked"]
    answer: str = Field(description="The answer (after the output guardrails), or the refusal when blocked.")
    citations: list[CitationOut]
    grounded: bool | None
    guardrails: str | None = None


class GuardrailWireEvent(_Event):
    type: Literal["guardrail"]
    stage: Literal["input", "output"]
    action: Literal["block", "redact", "retract"] = Field(description=(
        "block: refused (input) or withheld (output); redact: values masked; retract: the answer tokens "
        "streamed so far are withdrawn (final carries what to show)."))
    validator: str = Field(description="The policy entry that acted (e.g. prompt_injection, pii).")
    reason: str
    message: str = Field(description="block: the refusal shown instead of an answer.")


class ErrorWireEvent(_Event):
    type: Literal["error"]
    code: str
    message: str


AgentWireEvent = Annotated[
    RunStartedEvent | NodeStartedEvent | NodeFinishedEvent | ToolCallEvent | ToolResultEvent | TokenEvent
    | InterruptWireEvent | FinalEvent | ErrorWireEvent | GuardrailWireEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(AgentWireEvent)


def validate_event(data: dict[str, Any]) -> BaseModel:
    return EVENT_ADAPTER.validate_python(data)


# -- requests / responses ----------------------------------------------------------------------------


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1, max_length=20_000, description="The question or task.")
    thread_id: str | None = Field(default=None, description="Continue this thread (its history); new if absent.")
    user: str | None = Field(default=None, description="Admin keys only: act for this user (memory namespace "
                             "users/<user>, audited). The namespace otherwise comes from the API key "
                             "(users/<key id>); another key's id here is a 403.")
    team: str | None = Field(default=None, description="Also search memories of teams/<team>.")
    max_steps: int | None = Field(default=None, ge=2, le=50, description="research: supervisor step budget.")
    stream: bool = True


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["approve", "reject", "edit", "continue"] = "approve"
    reason: str | None = Field(default=None, max_length=2000, description="reject: what the agent is told.")
    args: dict[str, Any] | None = Field(default=None, description="edit: the tool arguments to use instead.")
    stream: bool = True


class RunResult(BaseModel):
    """The non-streaming response: the outcome plus every event."""

    run_id: str
    thread_id: str
    status: str
    answer: str | None = None
    citations: list[CitationOut] = Field(default_factory=list)
    interrupt: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    guardrails: str | None = None
    events: list[dict[str, Any]]


def parse_namespace(text: str) -> tuple[str, ...]:
    """``"users/alice"`` -> ``("users", "alice")``."""
    parts = tuple(p for p in text.strip("/").split("/") if p)
    if not parts:
        raise InvalidRequest("namespace is empty; use e.g. users/<id> or teams/<name>", param="namespace")
    return parts
