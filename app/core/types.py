"""Domain types shared by every layer. Wire formats (OpenAI JSON) live in the API layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort", "error", "content_filter"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Constrained output. ``json_schema`` is enforced by vLLM's guided decoding."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str = "response"
    strict: bool = True


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a backend is asked to do; ``model`` is the name *on that backend*."""

    model: str
    messages: tuple[ChatMessage, ...]
    params: GenerationParams = field(default_factory=GenerationParams)
    adapter: str | None = None
    request_id: str = ""
    # W3C trace context (traceparent) of the span making this call: the model server's spans join the trace
    trace_headers: tuple[tuple[str, str], ...] = ()


# -- stream events a backend yields ------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    index: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


LLMEvent = TextDelta | Finished | Usage


@dataclass(frozen=True, slots=True)
class Started:
    """First event of every response: the identity the wire format needs up front."""

    id: str
    created: int
    model: str
    prompt_ref: str | None = None
    prompt_hash: str | None = None
    guardrails: str | None = None  # "<policy>@<version>+<hash>" that checked this request
    release: str | None = None  # the release endpoint that routed this request, and the variant that answered
    variant: str | None = None
    trace_id: str | None = None  # the OpenTelemetry trace of this response (keel traces show <id>)
    features: Mapping[str, Any] | None = None  # feature values the prompt was rendered with, and their versions


@dataclass(frozen=True, slots=True)
class Citations:
    """Grounded answers only: the passages the model was given, after the answer is complete."""

    items: list[dict[str, Any]]
