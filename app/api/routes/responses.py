"""The OpenAI Responses API (``/v1/responses``) on Keel's chat path.

A response is a chat request underneath: its input items (after the stored conversation of
``previous_response_id``) become chat messages and go through the same path as ``/v1/chat/completions`` (releases,
guardrails, traces, lineage); the chat events become output items (a message, function calls) and, streamed, the
Responses API's typed events. Streaming and not share one path (:class:`ResponseBuilder`); a stored response
(``store``, the default) keeps its conversation for the next turn, readable only by the key that made it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import ChatDep, ChatKey, ContainerDep, ModelKey, token_budget
from app.api.errors import keel_error_body
from app.api.openapi import error_responses
from app.api.responses_schemas import (
    DeletedResponse,
    InputItemList,
    MessageItem,
    OutputFunctionCall,
    OutputMessage,
    OutputText,
    ResponseCreate,
    ResponseObject,
    ResponseUsage,
)
from app.api.routes.chat import THREAD_HEADER, _prime, _unless_disconnected
from app.api.schemas import ResponseFormatIn, response_format, tool_params
from app.core.errors import BackendUnavailable, InvalidRequest, KeelError, NotFound, UnsupportedParameter
from app.core.types import ChatMessage, Finished, GenerationParams, TextDelta, ToolCall, ToolCallDelta, Usage
from app.guardrails.types import GuardrailBlocked, GuardrailRedaction, GuardrailRetraction, event_payload
from app.services.chat import ChatEvent, ChatRequest, Started
from app.services.response_store import ResponseStore, StoredResponse

log = logging.getLogger("keel.api")
router = APIRouter(tags=["responses"])

_ERRORS = error_responses({
    400: "Invalid input: an unknown item or parameter, a bad tool schema, a function_call_output without its call.",
    401: "Missing or invalid API key.", 403: "The key lacks the 'chat' scope.",
    404: "Unknown model, or no stored response of this key with that id.", 413: "Request body over "
    "limits.max_body_bytes.", 429: "Rate limit of the API key.", 503: "The model's backend is down or starting.",
})
_NOT_STORED = ("(a response is kept only when it was created with store: true, and only the key that created it "
               "can read or continue it)")


def _store(container: Any) -> ResponseStore:
    store = getattr(container, "responses", None)
    if store is None:
        raise BackendUnavailable("this server keeps no responses")
    return store


def conversation(items: list[dict[str, Any]], instructions: str | None, first_new: int) -> tuple[ChatMessage, ...]:
    """Responses API items as chat messages: a function call joins the assistant turn before it (or starts one),
    its output is a tool turn. ``first_new``: where this request's own input starts (its errors name it).
    Items are dicts as stored; the earlier turns' items were written by Keel (model output included), so they are
    read as they are, not re-validated against the request's limits."""
    out: list[ChatMessage] = [ChatMessage("system", instructions)] if instructions else []
    called: set[str] = set()
    for n, raw in enumerate(items):
        kind = raw.get("type", "message")
        if kind == "message":
            role = raw.get("role", "user")
            out.append(ChatMessage("system" if role == "developer" else role, _text(raw.get("content"))))
        elif kind == "function_call":
            call = ToolCall(str(raw.get("call_id", "")), str(raw.get("name", "")), str(raw.get("arguments", "")))
            called.add(call.id)
            if out and out[-1].role == "assistant":
                out[-1] = ChatMessage("assistant", out[-1].content, (*out[-1].tool_calls, call))
            else:
                out.append(ChatMessage("assistant", "", (call,)))
        else:
            call_id = str(raw.get("call_id", ""))
            if call_id not in called:
                i = n - first_new
                raise InvalidRequest(f"input[{i}] is the output of call {call_id!r}, which no earlier function_call "
                                     "made (send the function_call item too, or continue the response that made it "
                                     "with previous_response_id)", param=f"input[{i}].call_id")
            out.append(ChatMessage("tool", _text(raw.get("output")), tool_call_id=call_id))
    return tuple(out)


def _text(value: Any) -> str:
    """An item's content: a string, or text parts joined."""
    if isinstance(value, str):
        return value
    return "".join(p.get("text", "") for p in value or ())


def _params(body: ResponseCreate) -> GenerationParams:
    unknown = sorted(set(body.model_extra or ()))
    if unknown:
        raise UnsupportedParameter(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0])
    choice = body.tool_choice
    functions = [t.function() for t in body.tools or ()]
    if isinstance(choice, str) or choice is None:
        tools, tool_choice = tool_params(functions, choice, "tools[{i}]")
    else:
        tools, tool_choice = tool_params(functions, "function", "tools[{i}]", named=choice.name)
    fmt = body.text.format if body.text else None
    # the chat request's own conversion: one meaning of a schema for both APIs
    wire = ResponseFormatIn(type=fmt.type, json_schema=fmt.spec()) if fmt is not None else None
    return GenerationParams(max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p,
                            response_format=response_format(wire, "text.format"), tools=tools,
                            tool_choice=tool_choice, parallel_tool_calls=body.parallel_tool_calls)


class ResponseBuilder:
    """Chat events in, Responses API events out, and the response they add up to (what a non-streamed request
    returns and what is stored)."""

    def __init__(self, response_id: str, body: ResponseCreate) -> None:
        self.body = body
        self.response = ResponseObject(
            id=response_id, status="in_progress", model=body.model or "", output=[], instructions=body.instructions,
            previous_response_id=body.previous_response_id, max_output_tokens=body.max_output_tokens,
            metadata=body.metadata or {}, parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=body.temperature, top_p=body.top_p, tools=[t.model_dump(exclude_none=True)
                                                                   for t in body.tools or ()],
            tool_choice=body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump")
            else body.tool_choice or "auto", store=body.store,
            text={"format": body.text.format.model_dump(by_alias=True, exclude_none=True)
                  if body.text.format.type == "json_schema" else {"type": body.text.format.type}} if body.text
            else {"format": {"type": "text"}}, user=body.user, service_tier="default" if body.service_tier else None)
        self.seq = 0
        self._message: OutputMessage | None = None
        self._calls: dict[int, OutputFunctionCall] = {}
        self.finish = "stop"
        self.guardrail_events: list[dict[str, Any]] = []

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **data}  # numbered from 0, as OpenAI does
        self.seq += 1
        return event

    def snapshot(self) -> dict[str, Any]:
        return self.response.model_dump(mode="json", exclude_none=True)

    def started(self) -> list[dict[str, Any]]:
        return [self.event("response.created", response=self.snapshot()),
                self.event("response.in_progress", response=self.snapshot())]

    def feed(self, event: ChatEvent) -> list[dict[str, Any]]:
        r = self.response
        if isinstance(event, Started):
            r.model = event.model
            r.guardrails = event.guardrails
            if event.release:
                r.release = {"name": event.release, "variant": event.variant or ""}
            return []
        if isinstance(event, TextDelta) and event.index == 0:
            out = self._open_message()
            assert self._message is not None
            self._message.content[0].text += event.text
            return [*out, self.event("response.output_text.delta", item_id=self._message.id,
                                      output_index=self._index(self._message), content_index=0, delta=event.text,
                                      logprobs=[])]
        if isinstance(event, ToolCallDelta) and event.index == 0:
            out = self._close_message()
            call = self._calls.get(event.call)
            if call is None:
                call = self._calls[event.call] = OutputFunctionCall(
                    id=f"fc_{uuid.uuid4().hex}", call_id=event.id or f"call_{uuid.uuid4().hex[:24]}",
                    name=event.name or "", arguments="", status="in_progress")
                r.output.append(call)
                out.append(self.event("response.output_item.added", output_index=self._index(call),
                                       item=call.model_dump(exclude_none=True)))
            call.name = call.name or event.name or ""
            if event.arguments:
                call.arguments += event.arguments
                out.append(self.event("response.function_call_arguments.delta", item_id=call.id,
                                       output_index=self._index(call), delta=event.arguments))
            return out
        if isinstance(event, GuardrailRetraction) and event.index == 0:
            # what was shown is withdrawn: the message becomes the guard's (its done events carry the new text;
            # the final response's guardrail_events say why)
            out = self._open_message()
            assert self._message is not None
            self._message.content[0].text = event.message
            self.guardrail_events.append(event_payload(event))
            return out
        if isinstance(event, GuardrailRedaction | GuardrailBlocked):
            self.guardrail_events.append(event_payload(event))
            return []
        if isinstance(event, Finished) and event.index == 0:
            self.finish = event.reason
            return [*self._close_message(), *self._close_calls()]
        if isinstance(event, Usage):
            r.usage = ResponseUsage(input_tokens=event.prompt_tokens, output_tokens=event.completion_tokens,
                                    total_tokens=event.total_tokens)
        return []

    def finished(self) -> list[dict[str, Any]]:
        r = self.response
        out = [*self._close_message(), *self._close_calls()]
        reason = {"length": "max_output_tokens", "content_filter": "content_filter",
                  "abort": "interrupted"}.get(self.finish)
        r.status = "incomplete" if reason else "completed"
        r.incomplete_details = {"reason": reason} if reason else None
        r.guardrail_events = self.guardrail_events or None
        kind = "response.incomplete" if reason else "response.completed"
        return [*out, self.event(kind, response=self.snapshot())]

    def output_items(self) -> list[dict[str, Any]]:
        return [item.model_dump(mode="json", exclude_none=True) for item in self.response.output]

    def _index(self, item: Any) -> int:
        return next(i for i, o in enumerate(self.response.output) if o is item)

    def _open_message(self) -> list[dict[str, Any]]:
        if self._message is not None:
            return []
        m = self._message = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress",
                                          content=[OutputText(text="")])
        self.response.output.append(m)
        i = self._index(m)
        return [self.event("response.output_item.added", output_index=i,
                            item=m.model_copy(update={"content": []}).model_dump(exclude_none=True)),
                self.event("response.content_part.added", item_id=m.id, output_index=i, content_index=0,
                            part=OutputText(text="").model_dump())]

    def _cut(self) -> bool:
        """Whether the output stopped short: out of tokens, or withdrawn by a guard."""
        return self.finish in ("length", "content_filter", "abort")

    def _close_message(self) -> list[dict[str, Any]]:
        m = self._message
        if m is None or m.status != "in_progress":
            return []
        m.status = "incomplete" if self._cut() else "completed"
        i, part = self._index(m), m.content[0]
        return [self.event("response.output_text.done", item_id=m.id, output_index=i, content_index=0,
                            text=part.text, logprobs=[]),
                self.event("response.content_part.done", item_id=m.id, output_index=i, content_index=0,
                            part=part.model_dump()),
                self.event("response.output_item.done", output_index=i, item=m.model_dump(exclude_none=True))]

    def _close_calls(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for call in self._calls.values():
            if call.status != "in_progress":
                continue
            call.status = "incomplete" if self._cut() else "completed"
            i = self._index(call)
            out += [self.event("response.function_call_arguments.done", item_id=call.id, output_index=i,
                                name=call.name, arguments=call.arguments),
                    self.event("response.output_item.done", output_index=i, item=call.model_dump(exclude_none=True))]
        return out


@router.post("/v1/responses", response_model=ResponseObject, response_model_exclude_none=True,
             responses=_ERRORS)
async def create_response(body: ResponseCreate, request: Request, key: ModelKey, chat: ChatDep,
                          container: ContainerDep):
    params = _params(body)
    history: list[dict[str, Any]] = []
    store = _store(container)
    if body.previous_response_id:
        prev = await asyncio.to_thread(store.get, body.previous_response_id, key.id)
        if prev is None:
            raise NotFound(f"no stored response {body.previous_response_id!r} {_NOT_STORED}",
                           param="previous_response_id")
        history = prev.conversation
    items = ([MessageItem(role="user", content=body.input).model_dump(exclude_none=True)]
             if isinstance(body.input, str) else [i.model_dump(exclude_none=True) for i in body.input])
    messages = conversation([*history, *items], body.instructions, len(history))
    request_id = request.state.request_id
    chat_request = ChatRequest(
        model=body.model, messages=messages, params=params, request_id=request_id, user=key.id,
        end_user=body.user, thread=request.headers.get(THREAD_HEADER),
        scopes=getattr(request.state, "api_key_scopes", None), token_budget=token_budget(request))
    # a fresh id, never the request id: a client chooses that (X-Request-Id), and could name another's response
    builder = ResponseBuilder(f"resp_{uuid.uuid4().hex}", body)

    def keep() -> None:
        if body.store:
            store.put(StoredResponse(builder.response.id, key.id, builder.snapshot(),
                                     [*history, *items, *builder.output_items()]))

    if not body.stream:
        async def answer() -> None:
            async for event in chat.stream(chat_request, reask=True):
                builder.feed(event)
            builder.finished()
            await asyncio.to_thread(keep)

        await _unless_disconnected(request, answer())
        return builder.response
    events = aiter(chat.stream(chat_request))
    primed = await _prime(events)  # errors before the first token are HTTP errors
    return EventSourceResponse(_sse(builder, primed, events, keep), ping=15, sep="\n",
                               headers={"X-Request-Id": request_id})


async def _sse(builder: ResponseBuilder, primed: list[ChatEvent], events: AsyncIterator[ChatEvent],
               keep: Any) -> AsyncIterator[ServerSentEvent]:
    def sse(e: dict[str, Any]) -> ServerSentEvent:
        return ServerSentEvent(json.dumps(e, ensure_ascii=False), event=e["type"])

    try:
        for event in primed:
            if isinstance(event, Started):  # the model's name, before response.created
                builder.feed(event)
        for e in builder.started():
            yield sse(e)
        for event in primed:
            if not isinstance(event, Started):
                for e in builder.feed(event):
                    yield sse(e)
        async for event in events:
            for e in builder.feed(event):
                yield sse(e)
        final = builder.finished()
        # stored before the client hears it is done: it may stop reading there, or continue at once
        await asyncio.to_thread(keep)
        for e in final:
            yield sse(e)
    except Exception as exc:
        if not isinstance(exc, KeelError):
            log.exception("unexpected error mid-stream")
            exc = KeelError("internal error while streaming; the response is incomplete")
        body = keel_error_body(exc)["error"]
        yield sse(builder.event("error", code=body["code"], message=body["message"], param=body.get("param")))
    finally:
        await events.aclose()


async def _stored(container: Any, response_id: str, owner: str) -> StoredResponse:
    stored = await asyncio.to_thread(_store(container).get, response_id, owner)
    if stored is None:
        raise NotFound(f"no stored response {response_id!r} {_NOT_STORED}")
    return stored


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, response_model_exclude_none=True,
            responses=_ERRORS)
async def get_response(response_id: str, key: ChatKey, container: ContainerDep) -> dict[str, Any]:
    return (await _stored(container, response_id, key.id)).response


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=_ERRORS)
async def response_input_items(response_id: str, key: ChatKey, container: ContainerDep) -> InputItemList:
    """The items the response answered (the earlier turns and its own input), newest first as OpenAI lists them."""
    stored = await _stored(container, response_id, key.id)
    produced = len(stored.response.get("output") or [])
    items = list(reversed(stored.conversation[:len(stored.conversation) - produced]))
    ids = [i.get("id") for i in items]
    return InputItemList(data=items, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=_ERRORS)
async def delete_response(response_id: str, key: ChatKey, container: ContainerDep) -> DeletedResponse:
    if not await asyncio.to_thread(_store(container).delete, response_id, key.id):
        raise NotFound(f"no stored response {response_id!r} {_NOT_STORED}")
    return DeletedResponse(id=response_id)
