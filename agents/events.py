"""Typed events a run yields. Plain dataclasses: only the API router puts them on the wire (SSE).

Every event carries ``run_id``; :func:`to_wire` gives the JSON object documented in
``app/api/routes/agents.py`` (``type`` plus the fields below), validated by ``agents.schemas``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class RunStarted:
    type: ClassVar[str] = "run.started"
    run_id: str
    thread_id: str
    workflow: str
    resumed: bool = False
    guardrails: str | None = None  # "<policy>@<version>" that checks this run (None: no guardrail engine)


@dataclass(frozen=True, slots=True)
class NodeStarted:
    type: ClassVar[str] = "node.started"
    run_id: str
    node: str
    step: int


@dataclass(frozen=True, slots=True)
class NodeFinished:
    type: ClassVar[str] = "node.finished"
    run_id: str
    node: str
    step: int
    duration_ms: float
    summary: str = ""


@dataclass(frozen=True, slots=True)
class ToolCall:
    type: ClassVar[str] = "tool.call"
    run_id: str
    call_id: str
    tool: str
    args: dict[str, Any]
    node: str = ""


@dataclass(frozen=True, slots=True)
class ToolResult:
    type: ClassVar[str] = "tool.result"
    run_id: str
    call_id: str
    tool: str
    ok: bool
    output: str
    attempts: int = 1
    duration_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Token:
    type: ClassVar[str] = "token"
    run_id: str
    node: str
    text: str


@dataclass(frozen=True, slots=True)
class InterruptEvent:
    """The run is paused until a human approves, rejects or edits the pending tool call."""

    type: ClassVar[str] = "interrupt"
    run_id: str
    thread_id: str
    tool: str
    args: dict[str, Any]
    call_id: str
    reason: str = ""
    actions: tuple[str, ...] = ("approve", "reject", "edit")


@dataclass(frozen=True, slots=True)
class Citation:
    index: int
    source: str
    title: str
    label: str
    chunk_id: str = ""
    page: int | None = None
    text: str = ""  # the cited passage, so clients (and eval metrics) see what the answer rests on


@dataclass(frozen=True, slots=True)
class Final:
    type: ClassVar[str] = "final"
    run_id: str
    status: str  # completed | step_limit | blocked (a guardrail refused the input or the answer)
    answer: str
    citations: list[Citation] = field(default_factory=list)
    grounded: bool | None = None
    guardrails: str | None = None


@dataclass(frozen=True, slots=True)
class GuardrailEvent:
    """A guardrail acted on this run: ``block`` (input: the workflow never started, the model never saw it;
    output: the answer is withheld and ``final`` carries ``message``) or ``redact`` (values were masked)."""

    type: ClassVar[str] = "guardrail"
    run_id: str
    stage: str  # input | output
    action: str  # block | redact | retract (the streamed answer tokens are withdrawn)
    validator: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    type: ClassVar[str] = "error"
    run_id: str
    code: str
    message: str


AgentEvent = (RunStarted | NodeStarted | NodeFinished | ToolCall | ToolResult | Token | InterruptEvent | Final
              | ErrorEvent | GuardrailEvent)


def to_wire(event: AgentEvent, seq: int | None = None) -> dict[str, Any]:
    """The JSON object of one event: ``{"type": ..., "seq": n, "ts": epoch, **fields}``."""
    out: dict[str, Any] = {"type": event.type}
    if seq is not None:
        out["seq"] = seq
    out["ts"] = round(time.time(), 3)
    out.update(asdict(event))
    if "actions" in out:
        out["actions"] = list(out["actions"])
    return out
