"""Domain types shared by every layer. Wire formats (OpenAI JSON) live in the API layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort", "error", "content_filter", "tool_calls"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model asked for: ``arguments`` is the JSON text it wrote, as OpenAI passes it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn that called functions
    tool_call_id: str | None = None  # a tool turn: the call it answers


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call (OpenAI's ``tools[].function``)."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None  # a JSON Schema
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``none``, ``auto``, ``required`` (some function), or ``function`` (the one named)."""

    mode: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None


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
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None  # None: the backend's default (auto when there are tools)
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def calls_tools(self) -> bool:
        """Whether the model may answer with function calls."""
        return bool(self.tools) and (self.tool_choice is None or self.tool_choice.mode != "none")


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
class ToolCallDelta:
    """A piece of choice ``index``'s ``call``-th function call, as OpenAI streams them: the first piece of a call
    carries its ``id`` and ``name``, the pieces after it more of its ``arguments`` text."""

    call: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    index: int = 0


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log probabilities of choice ``index``'s next tokens, as OpenAI's ``logprobs.content`` entries (token,
    logprob, bytes, top_logprobs)."""

    content: tuple[Mapping[str, Any], ...]
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


LLMEvent = TextDelta | ToolCallDelta | TokenLogprobs | Finished | Usage


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
    """Grounded answers only: the passages the model was given, after the answer is complete, and what the
    answer turned out to be (``outcome``: answered, not_in_sources or withdrawn; ``attributed``: citation
    markers Keel added to sentences the model left uncited)."""

    items: list[dict[str, Any]]
    outcome: str = "answered"
    attributed: int = 0
