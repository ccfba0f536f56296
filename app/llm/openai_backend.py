"""Backend for any OpenAI-compatible server (vLLM, or a hosted OpenAI-style API)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai

from app.core.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    KeelError,
    ModelNotFound,
)
from app.core.settings import BackendSettings
from app.core.types import Finished, GenerationRequest, LLMEvent, TextDelta, Usage

_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "tool_calls": "stop", "content_filter": "stop"}


def build_payload(request: GenerationRequest) -> dict[str, Any]:
    """The chat.completions arguments for ``request`` (also used by the benchmark and tests)."""
    p = request.params
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
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
    return body


def map_status_error(exc: openai.APIStatusError) -> KeelError:
    """Translate an upstream HTTP error into Keel's error with a message the client can act on."""
    message = _upstream_message(exc)
    status = exc.status_code
    if status == 400 or status == 422:
        lowered = message.lower()
        if "context length" in lowered or "maximum context" in lowered or "too long" in lowered:
            return ContextLengthExceeded(message)
        return InvalidRequest(message)
    if status == 404:
        return ModelNotFound(message)
    if status in (502, 503):
        return BackendUnavailable(f"backend unavailable: {message}")
    return BackendError(f"backend answered HTTP {status}: {message}")


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return exc.message


class OpenAIBackend:
    """Streams chat completions from an OpenAI-compatible endpoint.

    The client never retries by itself (``max_retries=0``): retrying only on
    connection errors is the resilience layer's job, and it knows whether any
    token was already sent to the caller.
    """

    def __init__(self, name: str, settings: BackendSettings, base_url: str | None = None) -> None:
        self.name = name
        self.settings = settings
        self.base_url = base_url or settings.base_url or ""
        self._client: openai.AsyncOpenAI | None = None

    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            timeout = httpx.Timeout(self.settings.read_timeout_s, connect=self.settings.connect_timeout_s)
            key = self.settings.api_key.get_secret_value() if self.settings.api_key else "not-needed"
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout,
                http_client=httpx.AsyncClient(
                    timeout=timeout, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
                ),
            )
        return self._client

    async def start(self) -> None:
        _ = self.client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def models(self) -> list[str]:
        try:
            page = await self.client.models.list()
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            raise BackendUnavailable(f"backend {self.name!r} cannot list models: {exc}") from exc
        return [m.id for m in page.data]

    async def ready(self) -> bool:
        try:
            return bool(await self.models())
        except BackendUnavailable:
            return False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        body = build_payload(request)
        headers = {"X-Request-Id": request.request_id} if request.request_id else None
        try:
            upstream = await self.client.chat.completions.create(**body, extra_headers=headers)
        except openai.APITimeoutError as exc:
            raise BackendUnavailable(f"backend {self.name!r} did not answer in time: {exc}") from exc
        except openai.APIConnectionError as exc:
            raise BackendUnavailable(f"backend {self.name!r} is unreachable at {self.base_url}") from exc
        except openai.APIStatusError as exc:
            raise map_status_error(exc) from exc
        try:
            async for chunk in upstream:
                if chunk.usage is not None:
                    yield Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        yield TextDelta(text, choice.index)
                    if choice.finish_reason:
                        yield Finished(_FINISH.get(choice.finish_reason, "stop"), choice.index)
        except openai.APIError as exc:
            # vLLM reports errors that happen after the stream started as an error event.
            raise BackendError(f"backend {self.name!r} failed mid-stream: {exc.message}") from exc
        except httpx.TimeoutException as exc:
            raise BackendTimeout(
                f"backend {self.name!r} sent nothing for {self.settings.read_timeout_s:.0f} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendError(
                f"connection to backend {self.name!r} was lost mid-stream ({type(exc).__name__})",
                code="backend_disconnected",
            ) from exc
        finally:
            # Closing the HTTP response is what makes vLLM abort the request when our client left.
            await upstream.close()
