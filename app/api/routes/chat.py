"""POST /v1/chat/completions in the OpenAI wire format, streamed (SSE) or not."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import ChatDep, MetricsDep, ModelKey, token_budget
from app.api.errors import keel_error_body
from app.api.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    FunctionCallOut,
    GroundingInfo,
    PromptInfo,
    ReleaseInfo,
    ToolCallOut,
    UsageOut,
)
from app.core.errors import ClientGone, KeelError, UnsupportedParameter
from app.core.types import Finished, TextDelta, TokenLogprobs, ToolCallDelta, Usage
from app.guardrails.types import GuardrailBlocked, GuardrailRedaction, GuardrailRetraction, event_payload
from app.services.chat import ChatEvent, ChatRequest, ChatResult, Citations, PromptUse, Started
from app.services.grounding import RagUse

log = logging.getLogger("keel.api")
T = TypeVar("T")
_DISCONNECT_POLL_S = 0.25

router = APIRouter(tags=["chat"])


RELEASE_HEADER = "X-Keel-Release"
THREAD_HEADER = "X-Keel-Thread"


def to_domain(body: ChatCompletionRequest, request_id: str, user: str | None = None,
              thread: str | None = None, scopes: frozenset[str] | None = None,
              token_budget: int | None = None) -> ChatRequest:
    unknown = sorted(set(body.model_extra or ()))
    if unknown:
        raise UnsupportedParameter(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0])
    return ChatRequest(
        model=body.model,
        messages=tuple(m.to_domain() for m in body.messages),
        params=body.params(),
        request_id=request_id,
        prompt=PromptUse(body.prompt.ref, body.prompt.variables) if body.prompt else None,
        rag=RagUse(body.rag.collection, body.rag.top_k, body.rag.filters, body.rag.prompt, body.rag.group_by)
        if body.rag else None,
        user=user,
        end_user=body.user,
        thread=thread,
        scopes=scopes,
        token_budget=token_budget,
    )


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, response: Response, _key: ModelKey, chat: ChatDep,
    metrics: MetricsDep,
):
    chat_request = to_domain(body, request.state.request_id, getattr(request.state, "api_key_id", None),
                             request.headers.get(THREAD_HEADER), getattr(request.state, "api_key_scopes", None),
                             token_budget(request))
    if not body.stream:
        result = await _unless_disconnected(request, chat.complete(chat_request))
        if result.release:
            response.headers[RELEASE_HEADER] = f"{result.release}/{result.variant}"
        return completion(body, result)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = aiter(chat.stream(chat_request))
    # Pull until the backend has answered, so errors before the first token (unknown model,
    # backend down) are proper HTTP errors rather than an error inside a 200 stream.
    primed = await _prime(events)
    headers = {"X-Request-Id": request.state.request_id}
    started = next((e for e in primed if isinstance(e, Started)), None)
    if started is not None and started.release:
        headers[RELEASE_HEADER] = f"{started.release}/{started.variant}"
    return EventSourceResponse(
        _sse(primed, events, body.n, include_usage, lambda code: metrics.errors.labels(code).inc(), _tier(body)),
        ping=15, sep="\n", headers=headers,
    )


def completion(body: ChatCompletionRequest, result: ChatResult) -> ChatCompletion:
    """A whole answer as the OpenAI ``chat.completion`` object (the route's, and each line of a batch)."""
    usage = result.usage
    return ChatCompletion(
        id=result.id, created=result.created, model=result.model,
        choices=[
            Choice(index=i, message=_message(result, i), finish_reason=result.finish.get(i, "stop"),
                   logprobs=ChoiceLogprobs(content=result.logprobs[i]) if i in result.logprobs else None)
            for i in range(body.n)
        ],
        usage=UsageOut(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       total_tokens=usage.total_tokens) if usage else None,
        prompt=PromptInfo(ref=result.prompt_ref, hash=result.prompt_hash) if result.prompt_ref else None,
        release=ReleaseInfo(name=result.release, variant=result.variant) if result.release else None,
        citations=result.citations,
        grounding=GroundingInfo(**result.grounding) if result.grounding else None,
        guardrails=result.guardrails,
        guardrail_events=[event_payload(e) for e in result.guardrail_events] or None,
        service_tier=_tier(body),
    )


def _message(result: ChatResult, index: int) -> AssistantMessage:
    text = "".join(result.texts.get(index, []))
    calls = result.tool_calls.get(index)
    if not calls:
        return AssistantMessage(content=text)
    # OpenAI: an assistant turn that only calls functions has null content
    return AssistantMessage(content=text or None, tool_calls=[
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls])


def _tier(body: ChatCompletionRequest) -> str | None:
    """OpenAI answers a request that names a service tier with the tier that served it: Keel has one."""
    return "default" if body.service_tier is not None else None


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away: Starlette does not cancel a
    non-streaming handler on disconnect, and the model would keep generating for no one."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                log.info("client left request %s; generation cancelled", request.state.request_id)
                raise ClientGone("the client closed the request before the answer was ready")
    finally:
        if not task.done():
            task.cancel()


async def _prime(events: AsyncIterator[ChatEvent]) -> list[ChatEvent]:
    primed: list[ChatEvent] = []
    try:
        async for event in events:
            primed.append(event)
            if not isinstance(event, Started):
                break
    except BaseException:
        await events.aclose()
        raise
    return primed


async def _sse(
    primed: list[ChatEvent], events: AsyncIterator[ChatEvent], n: int, include_usage: bool,
    on_error: Callable[[str], None], service_tier: str | None = None,
) -> AsyncIterator[str | ServerSentEvent]:
    """Chunks as OpenAI sends them: every choice carries ``finish_reason`` and ``logprobs`` (null until the
    last), which the schema's ``_required`` fields keep through ``exclude_none``."""
    chunk: ChatCompletionChunk | None = None
    policy = ""

    def frame(choices: list[ChunkChoice], usage: UsageOut | None = None) -> str:
        chunk.choices = choices
        chunk.usage = usage
        return chunk.model_dump_json(exclude_none=True)

    async def all_events() -> AsyncIterator[ChatEvent]:
        for event in primed:
            yield event
        async for event in events:
            yield event

    try:
        async for event in all_events():
            if isinstance(event, TextDelta):
                yield frame([ChunkChoice(index=event.index, delta=Delta(content=event.text))])
            elif isinstance(event, TokenLogprobs):
                yield frame([ChunkChoice(index=event.index, delta=Delta(),
                                         logprobs=ChoiceLogprobs(content=[dict(t) for t in event.content]))])
            elif isinstance(event, ToolCallDelta):
                call = DeltaToolCall(index=event.call, id=event.id, type="function" if event.id else None,
                                     function=DeltaFunction(name=event.name, arguments=event.arguments))
                yield frame([ChunkChoice(index=event.index, delta=Delta(tool_calls=[call]))])
            elif isinstance(event, Finished):
                yield frame([ChunkChoice(index=event.index, delta=Delta(), finish_reason=event.reason)])
            elif isinstance(event, Usage):
                if include_usage:
                    yield frame([], UsageOut(prompt_tokens=event.prompt_tokens,
                                             completion_tokens=event.completion_tokens,
                                             total_tokens=event.total_tokens))
            elif isinstance(event, Citations):
                # Its own event, a chunk with no choices like the usage chunk: OpenAI clients skip it.
                chunk.citations = event.items
                chunk.grounding = GroundingInfo(outcome=event.outcome, attributed=event.attributed)
                yield ServerSentEvent(frame([]), event="citations")
                chunk.citations = chunk.grounding = None
            elif isinstance(event, GuardrailRedaction | GuardrailRetraction | GuardrailBlocked):
                chunk.guardrail = event_payload(event, policy_version=policy)
                yield ServerSentEvent(frame([]), event="guardrail")
                chunk.guardrail = None
            elif isinstance(event, Started):
                chunk = ChatCompletionChunk(id=event.id, created=event.created, model=event.model, choices=[],
                                            service_tier=service_tier)
                policy = event.guardrails or ""
                # Announced once, on the role chunk.
                chunk.guardrails = event.guardrails
                if event.prompt_ref:
                    chunk.prompt = PromptInfo(ref=event.prompt_ref, hash=event.prompt_hash)
                if event.release:
                    chunk.release = ReleaseInfo(name=event.release, variant=event.variant or "")
                yield frame([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                             for i in range(n)])
                chunk.prompt = chunk.guardrails = chunk.release = None
        yield "[DONE]"
    except Exception as exc:
        # Headers are gone; the error travels as the last event (the openai client raises it)
        # and the stream closes without [DONE].
        if not isinstance(exc, KeelError):
            log.exception("unexpected error mid-stream")
            exc = KeelError("internal error while streaming; the response is incomplete")
        else:
            log.warning("stream failed: %s (%s)", exc.message, exc.code)
        on_error(exc.code)
        yield json.dumps(keel_error_body(exc))
    finally:
        await events.aclose()
