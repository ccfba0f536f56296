"""Chat: validate a request, send it to the right backend, yield typed events.

Streaming and non-streaming responses both consume :meth:`ChatService.stream`;
only the API layer knows how the events are put on the wire.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from app.core.errors import ContextLengthExceeded, InvalidRequest
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.core.types import (
    ChatMessage,
    Finished,
    GenerationParams,
    GenerationRequest,
    LLMEvent,
    ResponseFormat,
    TextDelta,
    Usage,
)
from app.llm.router import ModelRouter

if TYPE_CHECKING:
    from prompts.registry import PromptRegistry, RenderedPrompt

log = logging.getLogger("keel.chat")


@dataclass(frozen=True, slots=True)
class PromptUse:
    """A registry template to render in front of the request's own messages."""

    ref: str
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str | None
    messages: tuple[ChatMessage, ...]
    params: GenerationParams = field(default_factory=GenerationParams)
    request_id: str = ""
    prompt: PromptUse | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """First event of every response: the identity the wire format needs up front."""

    id: str
    created: int
    model: str
    prompt_ref: str | None = None
    prompt_hash: str | None = None


ChatEvent = Started | LLMEvent


@dataclass
class ChatResult:
    """A whole response, aggregated from the event stream."""

    id: str
    created: int
    model: str
    texts: dict[int, list[str]]
    finish: dict[int, str]
    usage: Usage | None
    prompt_ref: str | None = None
    prompt_hash: str | None = None


class ChatService:
    def __init__(
        self, settings: Settings, router: ModelRouter, metrics: Metrics, prompts: PromptRegistry | None = None
    ) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.prompts = prompts

    def resolve(self, request: ChatRequest) -> tuple[ChatRequest, RenderedPrompt | None]:
        """Render the named prompt (if any) in front of the messages; the template's model and
        parameters are defaults that the request's own values override."""
        rendered = None
        if request.prompt is not None:
            if self.prompts is None:
                raise InvalidRequest("this server has no prompt registry", param="prompt")
            rendered = self.prompts.render(request.prompt.ref, request.prompt.variables)
            tp = rendered.params
            p = request.params
            fmt = p.response_format
            if fmt is None and tp.response_schema:
                fmt = ResponseFormat(type="json_schema", schema=tp.response_schema, name=rendered.name)
            request = replace(
                request,
                model=request.model or tp.model,
                messages=tuple(ChatMessage(m.role, m.content) for m in rendered.messages) + request.messages,
                params=replace(
                    p,
                    temperature=p.temperature if p.temperature is not None else tp.temperature,
                    # A template's default is capped by the server limit; only an explicit request errors.
                    max_tokens=p.max_tokens or (tp.max_tokens and min(tp.max_tokens, self.settings.limits.max_tokens)),
                    stop=p.stop or tuple(tp.stop or ()),
                    response_format=fmt,
                ),
            )
        if not request.model:
            request = replace(request, model=self.settings.default_model)
        if not request.messages:
            raise InvalidRequest("messages must not be empty (or name a prompt)", param="messages")
        return request, rendered

    def validate(self, request: ChatRequest) -> None:
        limits = self.settings.limits
        self.router.route(request.model)  # unknown model -> 404 before anything else
        if len(request.messages) > limits.max_messages:
            raise InvalidRequest(
                f"too many messages ({len(request.messages)}); the limit is {limits.max_messages}",
                param="messages",
            )
        chars = sum(len(m.content) for m in request.messages)
        if chars > limits.max_input_chars:
            raise ContextLengthExceeded(
                f"input is {chars} characters; the limit is {limits.max_input_chars}. Shorten the messages.",
                param="messages",
            )
        if not any(m.content.strip() for m in request.messages):
            raise InvalidRequest("every message is empty; send some content", param="messages")
        max_tokens = request.params.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                param="max_tokens",
            )

    def _with_defaults(self, request: ChatRequest) -> GenerationParams:
        """Fill what the client left unset from the alias's defaults."""
        defaults = self.settings.models[request.model].defaults
        p = request.params
        return replace(
            p,
            temperature=p.temperature if p.temperature is not None else defaults.temperature,
            top_p=p.top_p if p.top_p is not None else defaults.top_p,
            max_tokens=p.max_tokens or min(defaults.max_tokens, self.settings.limits.max_tokens),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        request, rendered = self.resolve(request)
        self.validate(request)
        params = self._with_defaults(request)
        gen_request = GenerationRequest(
            model=request.model, messages=request.messages, params=params,
            request_id=request.request_id,
        )
        response_id = f"chatcmpl-{request.request_id or uuid.uuid4().hex}"
        started = time.perf_counter()
        first_token = True
        self.metrics.inflight.inc()
        try:
            events = self.router.stream(request.model, gen_request)
            if rendered is not None:
                log.info("request %s uses prompt %s (%s)", request.request_id, rendered.ref, rendered.hash[:12])
            yield Started(response_id, int(time.time()), request.model,
                          rendered.ref if rendered else None, rendered.hash if rendered else None)
            async for event in events:
                if first_token and isinstance(event, TextDelta):
                    first_token = False
                    self.metrics.ttft.labels(request.model).observe(time.perf_counter() - started)
                elif isinstance(event, Usage):
                    self.metrics.tokens.labels(request.model, "prompt").inc(event.prompt_tokens)
                    self.metrics.tokens.labels(request.model, "completion").inc(event.completion_tokens)
                yield event
        finally:
            self.metrics.inflight.dec()

    async def complete(self, request: ChatRequest) -> ChatResult:
        result: ChatResult | None = None
        async for event in self.stream(request):
            if isinstance(event, Started):
                result = ChatResult(event.id, event.created, event.model, {}, {}, None,
                                    event.prompt_ref, event.prompt_hash)
            elif isinstance(event, TextDelta):
                result.texts.setdefault(event.index, []).append(event.text)
            elif isinstance(event, Finished):
                result.finish[event.index] = event.reason
            elif isinstance(event, Usage):
                result.usage = event
        assert result is not None
        return result
