"""Typed graph state. Per-run fields are reset by each run's input; ``history`` accumulates per thread."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict


class Passage(TypedDict, total=False):
    text: str
    title: str
    source: str
    label: str
    chunk_id: str
    page: int | None
    score: float


class PendingCall(TypedDict, total=False):
    call_id: str
    tool: str
    args: dict[str, Any]
    reason: str
    return_to: str


class BaseState(TypedDict, total=False):
    run_id: str
    thread_id: str
    question: str
    namespace: list[str]
    search_namespaces: list[list[str]]
    principal: str  # the key that started the run ("" for the CLI)
    scopes: list[str] | None  # its scopes, which every tool call is checked against (None: unscoped)
    shadow: bool  # a release's shadow run: no approval pauses, no call that can change something
    status: str
    answer: str
    citations: list[dict[str, Any]]
    grounded: bool | None
    step: int
    observations: list[dict[str, Any]]
    pending_call: PendingCall | None
    history: Annotated[list[dict[str, Any]], operator.add]


class RagQAState(BaseState, total=False):
    query: str
    passages: list[Passage]
    round: int
    draft: str
    verdict: dict[str, Any]


class ResearchState(BaseState, total=False):
    sources: list[Passage]
    notes: list[str]
    draft: str
    critique: dict[str, Any] | None
    drafts_critiqued: int
    drafts_written: int
    trace: list[dict[str, str]]
    decisions: int
    max_steps: int
    next: str


class OpsState(BaseState, total=False):
    intent: str
    findings: list[dict[str, Any]]
    facts: dict[str, Any]
    subject: dict[str, Any]
    draft: str
    proposal: dict[str, Any] | None
