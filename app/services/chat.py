"""Chat: validate a request, send it to the right backend, yield typed events.

Streaming and non-streaming responses both consume :meth:`ChatService.stream`;
only the API layer knows how the events are put on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer

from app.core.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter
from app.core.metrics import Metrics
from app.core.settings import CoreConfig
from app.core.tracing import traceparent
from app.core.types import (
    ChatMessage,
    Citations,
    Finished,
    GenerationParams,
    GenerationRequest,
    LLMEvent,
    ResponseFormat,
    Started,
    TextDelta,
    TokenLogprobs,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from app.guardrails.types import (
    GuardContext,
    GuardrailBlocked,
    GuardrailEvent,
    GuardrailRedaction,
    GuardrailRetraction,
    InputDecision,
    ValidatorResult,
)
from app.llm.router import ModelRouter
from app.services.grounding import (
    NOT_IN_SOURCES,
    RAG_PREFIX,
    Attribution,
    Grounded,
    Grounder,
    RagUse,
    Screen,
    attribute,
    citations,
    outcome_of,
    said,
    withdrawal_message,
)

if TYPE_CHECKING:
    from agents.service import AgentService
    from app.guardrails.engine import GuardrailEngine
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
    rag: RagUse | None = None
    user: str | None = None  # the caller's key id: PII placeholders are restored only for the same user
    trace: Any = None  # the OpenTelemetry context to trace under; default: the current one
    trace_attributes: tuple[tuple[str, Any], ...] = ()  # put on the request's keel.chat span (a release's choice)
    end_user: str | None = None  # the body's `user` field: the client's name for its own user (A/B units)
    thread: str | None = None  # the X-Keel-Thread header: a conversation (A/B units)
    policy: str | None = None  # a guardrail policy chosen by a release variant, instead of the bindings'
    scopes: frozenset[str] | None = None  # the caller's key's: an agent model's tool calls are checked against them
    token_budget: int | None = None  # the caller's key's model tokens per minute: the answer's usage counts against
    # it (None: not counted: no limit, or traffic the caller did not send, a release's shadow or probe)
    shadow: bool = False  # a release's shadow: nobody sees the answer, so an agent model changes nothing (no tool
    # that acts runs, nothing waits for approval; AgentService.run)
    background: bool = False  # no person waits on it (an eval run's case; shadows count too): batch work does not
    # yield to it


ChatEvent = Started | LLMEvent | Citations | GuardrailEvent


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
    citations: list[dict[str, Any]] | None = None
    grounding: dict[str, Any] | None = None
    guardrails: str | None = None
    guardrail_events: list[GuardrailEvent] = field(default_factory=list)
    release: str | None = None
    variant: str | None = None
    tool_calls: dict[int, list[ToolCall]] = field(default_factory=dict)
    logprobs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


#: (feature refs, entity keys) -> {"values": {ref: value}, "versions": {view: version}} (FeatureService.online)
FeatureLookup = Callable[[list[str], dict[str, str]], dict[str, Any]]


class ChatService:
    def __init__(
        self, settings: CoreConfig, router: ModelRouter, metrics: Metrics, prompts: PromptRegistry | None = None,
        grounder: Grounder | None = None, guards: GuardrailEngine | None = None, agents: AgentService | None = None,
        tracer: Tracer | None = None, capture_content: bool = False, features: FeatureLookup | None = None,
        on_usage: Callable[[str, int, int], None] | None = None,
    ) -> None:
        """``tracer``: spans of every request (the container passes its :class:`app.core.tracing.Tracing`'s);
        ``capture_content``: put the (PII-masked) messages and answers on them; ``features``: the feature store's
        online lookup, for templates that declare features; ``on_usage(user, token budget, tokens)``: each answer's
        model tokens (prompt + completion), counted against the caller's key's budget (requests with one)."""
        self.on_usage = on_usage
        self.tracer = tracer or trace.NoOpTracer()
        self.features = features
        self.capture_content = capture_content
        self.settings = settings
        self.router = router
        self.metrics = metrics
        #: Model calls in flight in this process, and those of them no person waits on (shadows, probes, eval runs):
        #: the batch runner yields to the difference.
        self.active = 0
        self.background = 0
        self.prompts = prompts
        self.grounder = grounder
        self.guards = guards
        self.agents = agents

    async def resolve(self, request: ChatRequest, span: Span | None = None, screen: Screen | None = None
                      ) -> tuple[ChatRequest, RenderedPrompt | None, Grounded | None]:
        """Turn a request into exactly what the model will see: a named prompt is rendered in front
        of the messages; a grounded request retrieves passages (less those ``screen`` leaves out) and renders the
        RAG prompt around them. A template's model and parameters are defaults that the request's own values
        override."""
        rendered = grounded = None
        if request.model and request.model.startswith(RAG_PREFIX):
            if request.rag is not None:
                raise InvalidRequest("use either a rag:<collection> model or the rag field, not both", param="rag")
            request = replace(request, model=None, rag=RagUse(collection=request.model[len(RAG_PREFIX):]))
        if request.prompt is not None and request.rag is not None:
            raise InvalidRequest("a grounded request renders its own prompt; drop 'prompt' or 'rag'", param="prompt")
        if request.prompt is not None:
            if self.prompts is None:
                raise InvalidRequest("this server has no prompt registry", param="prompt")
            looked = await self._features(request, span)
            with self._child(span, "keel.prompt.render", {"keel.prompt.ref": request.prompt.ref}) as child:
                rendered = self.prompts.render(request.prompt.ref, request.prompt.variables, features=looked)
                child.set_attributes({"keel.prompt.hash": rendered.hash, "keel.prompt.name": rendered.name})
            messages = tuple(ChatMessage(m.role, m.content) for m in rendered.messages) + request.messages
            request = self._apply_template(request, rendered, messages)
        elif request.rag is not None:
            if self.grounder is None:
                raise InvalidRequest("this server has no document store for grounded answers", param="rag")
            with self._child(span, "keel.rag.retrieve", {"keel.rag.collection": request.rag.collection,
                                                          "keel.rag.top_k": request.rag.top_k or 0}) as child:
                grounded = await self.grounder.ground(request.messages, request.rag, request.params.max_tokens,
                                                      screen=screen)
                scores = [round(c.score, 6) for c in grounded.chunks]
                child.set_attributes({"keel.rag.chunks": len(scores), "keel.rag.scores": scores,
                                      "keel.rag.dropped_chunk_ids": [c.citation.chunk_id for c in grounded.dropped],
                                      "keel.rag.chunk_ids": [c.citation.chunk_id for c in grounded.chunks],
                                      "keel.prompt.ref": grounded.rendered.ref})
            rendered = grounded.rendered
            request = self._apply_template(request, rendered, grounded.messages)
        if not request.model:
            request = replace(request, model=self.settings.default_model)
        if not request.messages:
            raise InvalidRequest("messages must not be empty (or name a prompt)", param="messages")
        return request, rendered, grounded

    async def _features(self, request: ChatRequest, span: Span | None) -> dict[str, Any] | None:
        """The values of the features the request's template declares, for the caller: the API key is the user
        entity (never a field of the request)."""
        assert request.prompt is not None and self.prompts is not None
        refs = self.prompts.feature_refs(request.prompt.ref)
        if not refs:
            return None
        if self.features is None:
            raise InvalidRequest(f"prompt {request.prompt.ref} uses features ({', '.join(refs)}), but this server has "
                                 "no feature store (features.enabled)", param="prompt")
        with self._child(span, "keel.features.online", {"keel.features": refs}):
            # Feast's online read is blocking (SQLite, Redis or Postgres): off the event loop.
            return await asyncio.to_thread(self.features, refs, {"user": request.user or ""})

    def _apply_template(
        self, request: ChatRequest, rendered: RenderedPrompt, messages: tuple[ChatMessage, ...]
    ) -> ChatRequest:
        tp = rendered.params
        p = request.params
        fmt = p.response_format
        if fmt is None and tp.response_schema:
            fmt = ResponseFormat(type="json_schema", schema=tp.response_schema, name=rendered.name)
        return replace(
            request,
            model=request.model or tp.model,
            messages=messages,
            params=replace(
                p,
                temperature=p.temperature if p.temperature is not None else tp.temperature,
                # A template's default is capped by the server limit; only an explicit request errors.
                max_tokens=p.max_tokens or (tp.max_tokens and min(tp.max_tokens, self.settings.limits.max_tokens)),
                stop=p.stop or tuple(tp.stop or ()),
                response_format=fmt,
            ),
        )

    def validate(self, request: ChatRequest) -> None:
        self.router.route(request.model)  # unknown model -> 404 before anything else
        self._check_size(request)
        max_tokens = request.params.max_tokens
        if max_tokens is not None and max_tokens > self.settings.limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}; this server allows at most {self.settings.limits.max_tokens}",
                param="max_tokens",
            )

    def _check_size(self, request: ChatRequest) -> None:
        """The request's own size limits: cheap, so they run before any guard model sees the input."""
        limits = self.settings.limits
        if len(request.messages) > limits.max_messages:
            raise InvalidRequest(
                f"too many messages ({len(request.messages)}); the limit is {limits.max_messages}",
                param="messages",
            )
        chars = sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in request.messages)
        if chars > limits.max_input_chars:
            raise ContextLengthExceeded(
                f"input is {chars} characters; the limit is {limits.max_input_chars}. Shorten the messages.",
                param="messages",
            )
        if not any(m.content.strip() or m.tool_calls for m in request.messages):
            raise InvalidRequest("every message is empty; send some content", param="messages")

    def _with_defaults(self, request: ChatRequest) -> GenerationParams:
        """Fill what the client left unset from the alias's defaults."""
        defaults = self.router.route(request.model).spec.defaults
        p = request.params
        return replace(
            p,
            temperature=p.temperature if p.temperature is not None else defaults.temperature,
            top_p=p.top_p if p.top_p is not None else defaults.top_p,
            max_tokens=p.max_tokens or min(defaults.max_tokens, self.settings.limits.max_tokens),
        )

    async def stream(self, request: ChatRequest, *, reask: bool = False) -> AsyncIterator[ChatEvent]:
        """``reask`` (non-streaming callers): an output verdict ``reask`` asks the model once more, with the
        validator's reason, instead of retracting: the answer is checked whole before anything is released.

        Traced: one ``keel.chat`` span per response (under the caller's span: the HTTP server span, a release's),
        with children for the input guard, prompt rendering, retrieval and the model call (GenAI conventions)."""
        span = self.tracer.start_span("keel.chat", context=request.trace, attributes={
            "keel.request_id": request.request_id, "keel.model": request.model or "",
            "gen_ai.operation.name": "chat", **({"keel.user": request.user} if request.user else {}),
            **dict(request.trace_attributes)})
        first = True
        try:
            async with contextlib.aclosing(self._stream(request, reask, span)) as events:
                async for event in events:
                    if isinstance(event, Started):
                        event = replace(event, trace_id=_trace_id(span))
                        span.set_attributes({"gen_ai.response.id": event.id, "gen_ai.request.model": event.model,
                                             **({"keel.prompt.ref": event.prompt_ref} if event.prompt_ref else {}),
                                             **({"keel.guardrails.policy": event.guardrails}
                                                if event.guardrails else {})})
                    elif isinstance(event, TextDelta) and first:
                        first = False
                        span.add_event("first_token")
                    elif isinstance(event, GuardrailBlocked | GuardrailRetraction | GuardrailRedaction):
                        span.add_event(f"guardrail.{event.type}", {"keel.guardrails.validator": event.validator})
                    elif isinstance(event, Usage):
                        span.set_attributes({"gen_ai.usage.input_tokens": event.prompt_tokens,
                                             "gen_ai.usage.output_tokens": event.completion_tokens})
                    yield event
        except (GeneratorExit, asyncio.CancelledError):
            span.set_attribute("keel.cancelled", True)
            raise
        except BaseException as exc:
            span.set_status(StatusCode.ERROR, getattr(exc, "message", str(exc))[:500])
            span.set_attribute("error.type", getattr(exc, "code", type(exc).__name__))
            raise
        finally:
            span.end()

    @contextlib.contextmanager
    def _child(self, parent: Span | None, name: str, attributes: dict[str, Any], kind: SpanKind = SpanKind.INTERNAL):
        """A span under ``parent`` (not made current: an async generator must not leak context to its caller)."""
        if parent is None:
            yield trace.INVALID_SPAN
            return
        child = self.tracer.start_span(name, context=trace.set_span_in_context(parent), kind=kind,
                                       attributes=attributes)
        try:
            yield child
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit | asyncio.CancelledError):
                child.set_status(StatusCode.ERROR, getattr(exc, "message", str(exc))[:500])
            raise
        finally:
            child.end()

    def _guarded_input(self, span: Span, stage: str):
        return self._child(span, "keel.guardrails.input", {"keel.guardrails.stage": stage})

    async def _stream(self, request: ChatRequest, reask: bool, span: Span) -> AsyncIterator[ChatEvent]:
        alias = request.model
        # before resolve(): for RAG the last user turn becomes the rendered passages + question
        question = next((m.content for m in reversed(request.messages) if m.role == "user"), None)
        agent = self.agents is not None and self.agents.is_agent_model(alias)
        if agent:
            # An agent workflow answers: it calls models and tools itself; the guards still apply.
            if not request.messages:
                raise InvalidRequest("messages must not be empty", param="messages")
            if request.params.tools:
                raise InvalidRequest(f"{alias} is an agent workflow: it calls its own tools; send tools to a model",
                                     param="tools")
            if request.params.logprobs:
                raise InvalidRequest(f"{alias} is an agent workflow: its answer is not one model's tokens",
                                     param="logprobs")
            rendered = grounded = pre = None
            params = request.params
        else:
            pre = None
            if self.guards is not None and (request.rag is not None or (alias or "").startswith(RAG_PREFIX)):
                self._check_size(request)
                # A grounded request's input guard judges the user's own words, before retrieval: run over the
                # rendered passages, one document that mentioned a denied topic got every question retrieving
                # it refused. The question it passes (redacted if need be) is what retrieval and the prompt get.
                with self._guarded_input(span, "question") as gspan:
                    pre = await self.guards.check_input(request.messages, self._guard_context(
                        request, alias, request.params, None, question, workflow="rag"))
                    _verdicts(gspan, pre)
                if pre.blocked:
                    started = Started(f"chatcmpl-{request.request_id or uuid.uuid4().hex}", int(time.time()),
                                      alias or self.settings.default_model, guardrails=_policy_tag(pre))
                    for event in _refused(started, pre):
                        yield event
                    return
                request = replace(request, messages=pre.messages)
            screen = self._passage_screen(request, alias, question, span) if pre is not None else None
            request, rendered, grounded = await self.resolve(request, span, screen)
            self.validate(request)
            params = self._with_defaults(request)
        response_id = f"chatcmpl-{request.request_id or uuid.uuid4().hex}"
        decision = context = early = None
        if self.guards is not None:
            context = self._guard_context(request, alias, params, grounded, question)
            if params.logprobs:
                policy = self.guards.select(context).name
                if self._reads_output(policy):
                    raise UnsupportedParameter(
                        f"logprobs are not returned under guardrail policy {policy!r}: its output validators may "
                        "redact or withdraw text whose tokens the log probabilities would still show; use a model "
                        "alias bound to a policy without output validators", param="logprobs")
            if not agent and pre is not None:
                # The question was checked on its own above, each passage for instructions aimed at the model as
                # it was retrieved (those flagged were left out of the prompt): nothing here is left to judge.
                decision = replace(pre, messages=request.messages)
            else:
                if not agent and self.guards.select(context).input_overlap:
                    # the policy lets the model start on the input as sent (no entry of it changes the input)
                    llm_span = self._model_span(span, request, alias, params, agent, response_id)
                    gen_request = self._generation(request, request.messages, params, llm_span)
                    early = _Early(self.router.stream(request.model, gen_request))
                    # the model is busy from now on: the batch runner's throttle (``active``) sees it
                    self.metrics.inflight.inc()
                    self._count(request, 1)
                try:
                    with self._guarded_input(span, "input") as gspan:
                        decision = await self.guards.check_input(request.messages, context)
                        _verdicts(gspan, decision)
                except BaseException:
                    if early is not None:  # the check failed (or the client left): the model's work is dropped
                        early.drop()
                        llm_span.end()
                        self.metrics.inflight.dec()
                        self._count(request, -1)
                    raise
                if early is not None and decision.blocked:
                    try:
                        await early.cancel()  # refused: the model's work is thrown away, none of it shown
                    finally:
                        llm_span.set_attribute("keel.input_overlap", "cancelled")
                        llm_span.end()
                        self.metrics.inflight.dec()
                        self._count(request, -1)
        started = Started(
            response_id, int(time.time()), request.model, rendered.ref if rendered else None,
            rendered.hash if rendered else None, _policy_tag(decision),
            features=rendered.features if rendered else None,
        )
        if rendered is not None:
            log.info("request %s uses prompt %s (%s)", request.request_id, rendered.ref, rendered.hash[:12])
        masked: list[ChatEvent] = [*_masked(decision)] if decision else []
        if grounded is not None and grounded.dropped:
            # The client hears that sources were left out (not which: their text may be the attack itself).
            masked.append(GuardrailRedaction(screen.validator if screen else "prompt_injection", -1, ("passage",),
                                             len(grounded.dropped), stage="input"))
        if decision is not None and decision.blocked:
            # Refused before the model (it never sees the input), or with input_overlap its work cancelled above.
            for event in _refused(started, decision):
                yield event
            return
        if early is None:
            llm_span = self._model_span(span, request, alias, params, agent, response_id)
            gen_request = self._generation(request, decision.messages if decision else request.messages, params,
                                           llm_span)
        else:
            llm_span.set_attribute("keel.input_overlap", "released")
        # from the model's start: with input_overlap that is before the verdict (a check slower than the model's
        # first token is in it)
        t0 = early.started if early is not None else time.perf_counter()
        first_token = True
        finishes: list[str] = []
        if early is None:  # (an early model call is counted since it started)
            self.metrics.inflight.inc()
            self._count(request, 1)
        try:
            if self.capture_content:
                llm_span.set_attribute("gen_ai.input.messages", self._content(
                    [{"role": m.role, "content": m.content} for m in gen_request.messages]))
            if agent:
                events = _without_started(self.agents.chat_events(  # its model calls count their own tokens
                    alias, gen_request.messages, request_id=request.request_id, owner=request.user,
                    scopes=request.scopes, token_budget=request.token_budget, shadow=request.shadow))
            elif grounded is not None and not grounded.chunks:
                events = said(NOT_IN_SOURCES, params.n)  # retrieval found nothing: no passage, no model call
            elif early is not None:
                events = early.events()
            else:
                events = self.router.stream(request.model, gen_request)
            attribution = Attribution()
            cite = None
            if grounded is not None and params.n == 1 and not params.calls_tools and self.grounder is not None:
                passages, embedder = [c.text for c in grounded.chunks], self.grounder.rag.embedder

                def cite(stream: AsyncIterator[ChatEvent], *, again: bool = True) -> AsyncIterator[ChatEvent]:
                    if again:  # a re-asked answer replaces the first one
                        attribution.reset()
                    return attribute(stream, passages, embedder, question=question, stats=attribution)

                events = cite(events, again=False)
            if decision is not None:
                if reask and not agent and params.n == 1 and not params.calls_tools and self._reasks(decision):
                    events = self._checked_whole(events, gen_request, context, decision, cite)
                else:
                    events = self.guards.output_guard(context, decision).wrap(events)
                if params.calls_tools and self._reads_output(decision.policy):
                    # (a policy without output validators streams calls as they come: nothing would read them)
                    events = self._checked_calls(events, context, decision)
                events = self._traced_output(span, decision.policy, events)
            yield started
            for event in masked:
                yield event
            answer: list[str] = []
            calls: list[ToolCallDelta] = []
            keep = grounded is not None or self.capture_content
            withdrawn = False
            async for event in events:
                if isinstance(event, GuardrailRetraction) and grounded is not None and event.index == 0:
                    withdrawn = True
                    if self._grounding_check(decision, event.validator):
                        event = replace(event, message=withdrawal_message(event.message, grounded.chunks))
                if isinstance(event, TextDelta):
                    if first_token:
                        first_token = False
                        ttft = time.perf_counter() - t0
                        self.metrics.ttft.labels(request.model).observe(ttft)
                        llm_span.set_attribute("keel.ttft_ms", round(ttft * 1000, 3))
                    if keep and event.index == 0:
                        answer.append(event.text)
                elif isinstance(event, Usage):
                    self.metrics.tokens.labels(request.model, "prompt").inc(event.prompt_tokens)
                    self.metrics.tokens.labels(request.model, "completion").inc(event.completion_tokens)
                    if self.on_usage is not None and request.user and request.token_budget and not agent:
                        self.on_usage(request.user, request.token_budget, event.prompt_tokens + event.completion_tokens)
                    llm_span.set_attributes({"gen_ai.usage.input_tokens": event.prompt_tokens,
                                             "gen_ai.usage.output_tokens": event.completion_tokens})
                elif isinstance(event, Finished):
                    finishes.append(event.reason)
                elif isinstance(event, ToolCallDelta) and keep and event.index == 0:
                    calls.append(event)
                yield event
            if grounded is not None:
                text = "".join(answer)
                outcome = outcome_of(text, withdrawn=withdrawn, passages=len(grounded.chunks))
                self.metrics.rag_answers.labels(request.rag.collection if request.rag else "", outcome).inc()
                self.metrics.rag_citations.labels("model").inc(attribution.model_cited)
                self.metrics.rag_citations.labels("attributed").inc(attribution.attributed)
                span.set_attributes({"keel.rag.outcome": outcome, "keel.rag.attributed": attribution.attributed})
                yield Citations(citations(grounded.chunks, text), outcome=outcome,
                                attributed=attribution.attributed)
            if self.capture_content:
                out: dict[str, Any] = {"role": "assistant", "content": "".join(answer)}
                if calls:
                    out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                                         for c in _whole_calls(calls)]
                llm_span.set_attribute("gen_ai.output.messages", self._content([out]))
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit | asyncio.CancelledError):
                llm_span.set_status(StatusCode.ERROR, getattr(exc, "message", str(exc))[:500])
                llm_span.set_attribute("error.type", getattr(exc, "code", type(exc).__name__))
            raise
        finally:
            if early is not None:
                early.drop()
            if finishes:
                llm_span.set_attribute("gen_ai.response.finish_reasons", finishes)
            llm_span.end()
            self.metrics.inflight.dec()
            self._count(request, -1)

    async def _checked_calls(self, events: AsyncIterator[ChatEvent], context: GuardContext,
                             decision: InputDecision) -> AsyncIterator[ChatEvent]:
        """Function calls through the output guard, each released whole once its arguments pass: a client may run
        a call as soon as it has it, so a call cannot be streamed first and retracted after. A failing call
        withdraws its choice (``content_filter``); redacted arguments are released redacted."""
        pending: dict[int, list[ToolCallDelta]] = {}
        shown: dict[int, int] = {}
        args_context = replace(context, response_schema=None, expect_json=False)
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if isinstance(event, ToolCallDelta):
                    pending.setdefault(event.index, []).append(event)
                    continue
                if isinstance(event, TextDelta):
                    shown[event.index] = shown.get(event.index, 0) + len(event.text)
                elif isinstance(event, GuardrailRetraction) or (
                        isinstance(event, Finished) and event.reason == "content_filter"):
                    pending.pop(event.index, None)  # the choice was withdrawn: its calls with it
                elif isinstance(event, Finished) and event.index in pending:
                    released: list[ChatEvent] = []
                    for call in _whole_calls(pending.pop(event.index)):
                        verdict = await self.guards.check_output(call.arguments, args_context, decision)
                        failed = next((r for r in verdict.results if r.action in ("block", "reask")), None)
                        if failed is not None:
                            message = verdict.refusal or self.guards.refusal_for(decision.policy, failed.validator)
                            yield GuardrailRetraction(failed.validator, 0, f"{call.name} arguments: {failed.reason}",
                                                      message, shown.get(event.index, 0), event.index)
                            event = Finished("content_filter", event.index)
                            released = []
                            break
                        released += [GuardrailRedaction.of(r, event.index) for r in verdict.results
                                     if r.action == "redact"]
                        released += [replace(call, arguments=verdict.text)]
                    for out in released:
                        yield out
                yield event

    async def _traced_output(self, parent: Span, policy: str, events: AsyncIterator[ChatEvent]
                             ) -> AsyncIterator[ChatEvent]:
        """The output stage as a span over the guarded stream: what it redacted or retracted, as events."""
        with self._child(parent, "keel.guardrails.output", {"keel.guardrails.stage": "output",
                                                            "keel.guardrails.policy": policy}) as span:
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, GuardrailRedaction | GuardrailRetraction):
                        span.add_event(f"guardrail.{event.type}", {"keel.guardrails.validator": event.validator})
                    yield event

    @staticmethod
    def _generation(request: ChatRequest, messages: Sequence[Any], params: GenerationParams,
                    llm_span: Span) -> GenerationRequest:
        return GenerationRequest(model=request.model, messages=messages, params=params,
                                 request_id=request.request_id, trace_headers=tuple(traceparent(llm_span).items()))

    def _model_span(self, parent: Span, request: ChatRequest, alias: str | None, params: GenerationParams,
                    agent: bool, response_id: str) -> Span:
        """The model call, as the OpenTelemetry GenAI conventions name it (``chat <model>``, a client span)."""
        ctx = trace.set_span_in_context(parent)
        if agent:
            workflow = (alias or "").removeprefix("agent:")
            return self.tracer.start_span(f"invoke_agent {workflow}", context=ctx, kind=SpanKind.INTERNAL,
                                          attributes={"gen_ai.operation.name": "invoke_agent",
                                                      "gen_ai.agent.name": workflow, "gen_ai.response.id": response_id})
        route = self.router.route(request.model)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": _PROVIDERS.get(
                self.settings.backends[route.spec.backend].kind, "openai"),
            "gen_ai.request.model": route.spec.model, "gen_ai.response.id": response_id,
            "keel.model_alias": request.model, "keel.backend": route.spec.backend,
            "server.address": self.settings.backends[route.spec.backend].base_url or "",
        }
        if route.spec.adapter:
            attrs["keel.adapter"] = str(route.spec.adapter)
        for key, value in (("gen_ai.request.max_tokens", params.max_tokens),
                           ("gen_ai.request.temperature", params.temperature),
                           ("gen_ai.request.top_p", params.top_p), ("gen_ai.request.seed", params.seed)):
            if value is not None:
                attrs[key] = value
        if params.n != 1:
            attrs["gen_ai.request.choice.count"] = params.n
        return self.tracer.start_span(f"chat {route.spec.model}", context=ctx, kind=SpanKind.CLIENT, attributes=attrs)

    def _content(self, messages: list[dict[str, str]]) -> str:
        """Messages as the trace stores them: credentials and personal data masked first (never written unmasked),
        in the content and in tool-call arguments."""
        masked = [{**m, "content": _mask_sensitive(m["content"]),
                   **({"tool_calls": [{**c, "arguments": _mask_sensitive(c["arguments"])} for c in m["tool_calls"]]}
                      if m.get("tool_calls") else {})} for m in messages]
        return json.dumps(masked, ensure_ascii=False)

    def _reads_output(self, policy: str) -> bool:
        """Whether an output validator of ``policy`` reads (and may change) the answer."""
        return self.guards.settings.enabled and bool(self.guards.compiled(policy, "output"))

    def _grounding_check(self, decision: InputDecision | None, label: str) -> bool:
        """Whether the output entry ``label`` of the request's policy is a groundedness check (labels are the
        policy author's; the validator names what it checks)."""
        if decision is None or self.guards is None:
            return False
        return any(s.label == label and s.validator == "keel/groundedness"
                   for s in self.guards.policy.file.resolve(decision.policy).output)

    def _reasks(self, decision: InputDecision) -> bool:
        return any(s.on_fail == "reask" for s in self.guards.policy.file.resolve(decision.policy).output)

    async def _checked_whole(self, events: AsyncIterator[ChatEvent], gen: GenerationRequest, context: GuardContext,
                             decision: InputDecision, cite: Callable[[AsyncIterator[ChatEvent]],
                                                                     AsyncIterator[ChatEvent]] | None = None
                             ) -> AsyncIterator[ChatEvent]:
        """The whole answer through the output guard, re-asked once when a ``reask`` validator fails (a stream
        cannot take back what it sent, so streaming retracts instead): one bounded retry with the validator's
        reason; a second failure is refused like a ``block``."""
        text, finish, usage = await _drain(events)
        verdict = await self.guards.check_output(text, context, decision)
        if verdict.reask:
            log.info("request %s: output failed a reask validator; asking the model once more", gen.request_id)
            retry = replace(gen, messages=(*gen.messages, ChatMessage("assistant", text),
                                           ChatMessage("user", verdict.reask)))
            again = self.router.stream(gen.model, retry)
            text, finish, more = await _drain(cite(again) if cite is not None else again)
            usage = Usage(usage.prompt_tokens + more.prompt_tokens, usage.completion_tokens + more.completion_tokens)
            verdict = await self.guards.check_output(text, context, decision)
        failed = next((r for r in verdict.results if r.action in ("block", "reask")), None)
        if failed is not None:
            yield GuardrailRetraction(failed.validator, 0, failed.reason,
                                      verdict.refusal or self.guards.refusal_for(decision.policy, failed.validator), 0)
            yield Finished("content_filter")
        else:
            for r in verdict.results:
                if r.action == "redact":
                    yield GuardrailRedaction.of(r, 0)
            yield TextDelta(verdict.text)
            yield Finished(finish)
        yield usage

    def _passage_screen(self, request: ChatRequest, alias: str | None, question: str | None,
                        span: Span) -> _PassageScreen:
        """The check of a grounded request's retrieved passages (the rag policy's passage entries)."""
        return _PassageScreen(self, request, self._guard_context(request, alias, request.params, None, question,
                                                                 workflow="rag"), span)

    @staticmethod
    def _guard_context(
        request: ChatRequest, alias: str | None, params: GenerationParams, grounded: Grounded | None,
        question: str | None = None, workflow: str | None = None,
    ) -> GuardContext:
        fmt = params.response_format
        schema = fmt.schema if fmt is not None and fmt.type == "json_schema" else None
        # an agent model is guarded under its workflow's name, as its runs API does (agent:rag-qa -> rag policy)
        workflow = workflow or ("rag" if grounded is not None else "structured" if fmt is not None
                                else alias.removeprefix("agent:") if alias and alias.startswith("agent:") else "chat")
        return GuardContext(
            request_id=request.request_id, route="/v1/chat/completions", workflow=workflow,
            model=alias or request.model or "", user=request.user,
            # as the model saw them (the RAG prompt shows "title > section: text"): a name from a passage's
            # title is grounded
            passages=tuple(f"{c.citation.label()}: {c.text}" for c in grounded.chunks) if grounded is not None
            else None,
            response_schema=schema, expect_json=fmt is not None, question=question, policy=request.policy,
        )

    def _count(self, request: ChatRequest, step: int) -> None:
        self.active += step
        if request.background or request.shadow:
            self.background += step

    async def complete(self, request: ChatRequest) -> ChatResult:
        return await collect(self.stream(request, reask=True))


class _Early:
    """A model stream started before the input verdict (``input_overlap``): its first event (the prefill and the
    first token, most of the time to first token) is fetched in the background while the input entries run;
    nothing reaches the caller until :meth:`events` is iterated, which happens only once the input passed."""

    _dropping: set[asyncio.Task] = set()  # the clean-ups in flight (a task nobody holds may be collected)

    def __init__(self, stream: AsyncIterator[ChatEvent]) -> None:
        self._stream = stream
        self.started = time.perf_counter()
        self._first = asyncio.ensure_future(anext(stream))
        self._finished = False

    async def events(self) -> AsyncIterator[ChatEvent]:
        try:
            try:
                first = await self._first
            except StopAsyncIteration:
                return
            yield first
            async for event in self._stream:
                yield event
        finally:  # closed early (the output guard withdrew every choice): the model stops now, as without overlap
            self._finished = True
            await self._close()

    async def cancel(self) -> None:
        self._first.cancel()
        # waited for, not awaited: a cancellation of the caller's own task must still reach it
        await asyncio.wait({self._first})
        if not self._first.cancelled():
            self._first.exception()  # taken, so an error nobody will see is not logged as never retrieved
        await self._close()

    async def _close(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    def drop(self) -> None:
        """Stop the model's work unless the answer was read to its end (a client gone mid-answer): from a
        ``finally`` that may not await, so in a task of its own."""
        if not self._finished:
            task = asyncio.ensure_future(self.cancel())
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)


async def collect(events: AsyncIterator[ChatEvent]) -> ChatResult:
    """A whole response from its event stream (what non-streaming callers get)."""
    result: ChatResult | None = None
    calls: dict[int, list[ToolCallDelta]] = {}
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, Started):
                result = ChatResult(event.id, event.created, event.model, {}, {}, None,
                                    event.prompt_ref, event.prompt_hash, guardrails=event.guardrails,
                                    release=event.release, variant=event.variant)
            elif isinstance(event, TextDelta):
                result.texts.setdefault(event.index, []).append(event.text)
            elif isinstance(event, ToolCallDelta):
                calls.setdefault(event.index, []).append(event)
            elif isinstance(event, TokenLogprobs):
                result.logprobs.setdefault(event.index, []).extend(dict(t) for t in event.content)
            elif isinstance(event, Finished):
                result.finish[event.index] = event.reason
            elif isinstance(event, Usage):
                result.usage = event
            elif isinstance(event, Citations):
                result.citations = event.items
                result.grounding = {"outcome": event.outcome, "attributed": event.attributed}
            elif isinstance(event, GuardrailRetraction):
                # What was "shown" is withdrawn: the whole answer becomes the guard's message.
                result.texts[event.index] = [event.message]
                result.finish[event.index] = "content_filter"
                result.guardrail_events.append(event)
            elif isinstance(event, GuardrailRedaction | GuardrailBlocked):
                result.guardrail_events.append(event)
        assert result is not None
        result.tool_calls = {i: [ToolCall(c.id or "", c.name or "", c.arguments) for c in _whole_calls(deltas)]
                             for i, deltas in calls.items() if result.finish.get(i) != "content_filter"}
        return result


def _whole_calls(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """One choice's streamed call pieces joined into whole calls (in call order; a call without an id gets one)."""
    calls: dict[int, ToolCallDelta] = {}
    for d in deltas:
        c = calls.get(d.call)
        calls[d.call] = d if c is None else replace(c, id=c.id or d.id, name=c.name or d.name,
                                                    arguments=c.arguments + d.arguments)
    return [replace(c, id=c.id or f"call_{uuid.uuid4().hex[:24]}") for _, c in sorted(calls.items())]


_PROVIDERS = {"vllm": "vllm", "openai": "openai", "transformers": "transformers"}


def _trace_id(span: Span) -> str | None:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def _verdicts(span: Span, decision: InputDecision) -> None:
    """Every validator's verdict as an event of the guard span (what ran, what it decided, how long)."""
    span.set_attributes({"keel.guardrails.policy": decision.policy, "keel.guardrails.blocked": decision.blocked})
    _verdict_events(span, decision.results)


class _PassageScreen:
    """A :data:`Screen` over one request's passages; ``validator``: the policy entry that left one out (the
    redaction event names it)."""

    def __init__(self, chat: ChatService, request: ChatRequest, context: GuardContext, span: Span) -> None:
        self.chat, self.request, self.context, self.span = chat, request, context, span
        self.validator: str | None = None

    async def __call__(self, texts: list[str]) -> list[int]:
        with self.chat._guarded_input(self.span, "passages") as gspan:
            flagged, results = await self.chat.guards.screen_passages(texts, self.context)
            _verdict_events(gspan, results)
            gspan.set_attribute("keel.guardrails.passages_dropped", len(flagged))
        if flagged:
            first = next(r for r in results if r.action == "block")
            self.validator = first.validator
            log.warning("request %s: %d of %d retrieved passages left out by %s (%s)", self.request.request_id,
                        len(flagged), len(texts), self.validator, first.reason)
        return flagged


def _verdict_events(span: Span, results: Sequence[ValidatorResult]) -> None:
    for r in results:
        span.add_event("guardrail.verdict", {"keel.guardrails.validator": r.validator, "keel.guardrails.verdict":
                                             str(r.verdict), "keel.guardrails.action": str(r.action),
                                             "keel.guardrails.score": float(r.score or 0.0)})


def _mask_sensitive(text: str) -> str:
    """Credentials and personal data masked (``<SECRET:KIND>``, ``<KIND>``): what a trace may keep of a text."""
    # lazy: the detectors load only when content capture is on (phonenumbers alone ~0.15 s)
    from app.guardrails.validators.leakage import check_secrets
    from app.guardrails.validators.pii import find_pii, redact  # lazy: as the line above

    secrets = check_secrets(text)
    if not secrets.passed and secrets.fixed is not None:
        text = secrets.fixed
    findings = find_pii(text)
    return redact(text, findings) if findings else text


def _policy_tag(decision: InputDecision | None) -> str | None:
    return f"{decision.policy}@{decision.policy_version}" if decision and decision.enabled else None


def _masked(decision: InputDecision) -> list[GuardrailRedaction]:
    """What the input guard masked before the model saw it: the user hears of it in the response too."""
    return [GuardrailRedaction.of(r, -1) for r in decision.results if r.action == "redact"]


def _refused(started: Started, decision: InputDecision) -> list[ChatEvent]:
    """A response refused before the model: it never sees the input."""
    blocker = decision.blocked_by
    return [started, *_masked(decision), GuardrailBlocked(blocker.validator, blocker.reason, decision.refusal or ""),
            TextDelta(decision.refusal or ""), Finished("content_filter"), Usage(0, 0)]


async def _drain(events: AsyncIterator[ChatEvent]) -> tuple[str, str, Usage]:
    """A single choice's whole answer, its finish reason and usage."""
    text: list[str] = []
    finish, usage = "stop", Usage(0, 0)
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                finish = event.reason
            elif isinstance(event, Usage):
                usage = event
    return "".join(text), finish, usage


async def _without_started(events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
    """The agent runner announces its own response; the chat service already did."""
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if not isinstance(event, Started):
                yield event
