"""Backend for any OpenAI-compatible server (vLLM, or a hosted OpenAI-style API)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.utils import suppress_http_instrumentation
from opentelemetry.propagate import extract
from opentelemetry.trace import TracerProvider

from app.core.errors import BackendError, BackendTimeout, BackendUnavailable
from app.core.metrics import Metrics
from app.core.settings import BackendSettings
from app.core.types import (
    ChatMessage,
    Finished,
    GenerationParams,
    GenerationRequest,
    LLMEvent,
    TextDelta,
    TokenLogprobs,
    ToolCallDelta,
    Usage,
)
from app.llm.clients import http_client, map_status_error

__all__ = ["OpenAIBackend", "build_payload", "map_status_error"]


_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "tool_calls": "tool_calls", "content_filter": "stop"}


def wire_message(m: ChatMessage) -> dict[str, Any]:
    """A message as OpenAI's chat API takes it (an assistant turn's calls, a tool turn's call id)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["content"] = m.content or None
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tools(p: GenerationParams) -> dict[str, Any]:
    if not p.tools:
        return {}
    tools = []
    for t in p.tools:
        fn: dict[str, Any] = {"name": t.name}
        if t.description is not None:
            fn["description"] = t.description
        if t.parameters is not None:
            fn["parameters"] = dict(t.parameters)
        if t.strict is not None:
            fn["strict"] = t.strict
        tools.append({"type": "function", "function": fn})
    body: dict[str, Any] = {"tools": tools}
    choice = p.tool_choice
    if choice is not None:
        # a named function and "required" are guided decoding on vLLM: valid arguments for any model
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.mode == "function"
                               else choice.mode)
    if p.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = p.parallel_tool_calls
    return body


def build_payload(request: GenerationRequest) -> dict[str, Any]:
    """The chat.completions arguments for ``request`` (also used by the benchmark and tests)."""
    p = request.params
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [wire_message(m) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    optional = {
        "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "seed": p.seed,
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if p.stop:
        body["stop"] = list(p.stop)
    if p.n != 1:
        body["n"] = p.n
    fmt = p.response_format
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        # vLLM turns this into guided decoding: the output is valid against the schema by construction.
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": fmt.schema, "strict": fmt.strict},
        }
    body.update(_tools(p))
    if p.logprobs:
        body["logprobs"] = True
        if p.top_logprobs is not None:
            body["top_logprobs"] = p.top_logprobs
    return body


def _error_message(payload: object, fallback: str) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if payload.get("message"):
            return str(payload["message"])
    return fallback


class OpenAIBackend:
    """Streams chat completions from an OpenAI-compatible endpoint over plain httpx.

    Not the ``openai`` SDK: its request building cost ~1.4 ms per call (measured,
    bench/serving.py), which a burst of concurrent requests turns into tens of
    milliseconds of added time to first token. The wire format is small and stable.
    No automatic retries here: retrying only on connection errors, and only before
    the first token, is the resilience layer's job. The client comes from :mod:`app.llm.clients`, like every
    client to a model server (the eval judge's too): same timeouts, limits, request ids and, with ``metrics``,
    ``keel_backend_request_duration_seconds{backend=name}``.
    """

    def __init__(self, name: str, settings: BackendSettings, base_url: str | None = None, *,
                 metrics: Metrics | None = None, tracer_provider: TracerProvider | None = None) -> None:
        self.name = name
        self.settings = settings
        self.base_url = (base_url or settings.base_url or "").rstrip("/")
        self.metrics = metrics
        self.tracer_provider = tracer_provider
        self._client: httpx.AsyncClient | None = None

    def api_key(self) -> str | None:
        """The bearer key sent with every request (read per request: a managed server's key changes when
        Keel starts it again)."""
        return self.settings.api_key.get_secret_value() if self.settings.api_key else None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = http_client(self.settings, label=self.name, base_url=self.base_url,
                                       api_key=self.api_key, metrics=self.metrics,
                                       tracer_provider=self.tracer_provider)
        return self._client

    async def start(self) -> None:
        _ = self.client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def models(self) -> list[str]:
        try:
            # readiness polls and replica probes ask often: not a span each (they would be traces of their own)
            with suppress_http_instrumentation():
                r = await self.client.get("/models", timeout=5.0)
            r.raise_for_status()
            return [m["id"] for m in r.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise BackendUnavailable(f"backend {self.name!r} cannot list models: {exc}") from exc

    async def ready(self) -> bool:
        try:
            return bool(await self.models())
        except BackendUnavailable:
            return False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        headers = {"X-Request-Id": request.request_id} if request.request_id else {}
        headers.update(request.trace_headers)
        # The caller's span (in the request's trace headers) is the parent of the HTTP client span the httpx
        # instrumentation makes, which then sends its own traceparent; uninstrumented, the headers go as they are.
        joined = otel_context.attach(extract(dict(request.trace_headers))) if request.trace_headers else None
        try:
            upstream = await self.client.send(
                self.client.build_request("POST", "/chat/completions", json=build_payload(request), headers=headers),
                stream=True,
            )
        except httpx.TimeoutException as exc:
            raise BackendUnavailable(f"backend {self.name!r} did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"backend {self.name!r} is unreachable at {self.base_url}") from exc
        finally:
            if joined is not None:
                otel_context.detach(joined)
        try:
            if upstream.status_code != 200:
                await upstream.aread()
                try:
                    payload = upstream.json()
                except ValueError:
                    payload = None
                raise map_status_error(upstream.status_code, _error_message(payload, upstream.text[:300]))
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    # vLLM reports failures that happen after the stream started as an error event.
                    raise BackendError(
                        f"backend {self.name!r} failed mid-stream: {_error_message(chunk, 'unknown error')}"
                    )
                for choice in chunk.get("choices") or ():
                    index = choice.get("index", 0)
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text:
                        yield TextDelta(text, index)
                    logprobs = (choice.get("logprobs") or {}).get("content")
                    if logprobs:
                        yield TokenLogprobs(tuple(logprobs), index)
                    for call in delta.get("tool_calls") or ():
                        fn = call.get("function") or {}
                        yield ToolCallDelta(call.get("index", 0), call.get("id"), fn.get("name"),
                                            fn.get("arguments") or "", index)
                    reason = choice.get("finish_reason")
                    if reason:
                        yield Finished(_FINISH.get(reason, "stop"), index)
                usage = chunk.get("usage")
                if usage:
                    yield Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        except httpx.TimeoutException as exc:
            raise BackendTimeout(
                f"backend {self.name!r} sent nothing for {self.settings.read_timeout_s:.0f} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendError(
                f"connection to backend {self.name!r} was lost mid-stream ({type(exc).__name__})",
                code="backend_disconnected",
            ) from exc
        except ValueError as exc:
            raise BackendError(f"backend {self.name!r} sent a malformed stream event: {exc}") from exc
        finally:
            # Closing the response closes the connection: that is what makes vLLM abort the request.
            await upstream.aclose()
