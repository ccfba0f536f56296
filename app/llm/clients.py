"""The one client layer for OpenAI-compatible servers: every HTTP client Keel opens to a model server.

Two shapes, built from the same :class:`BackendSettings` fields:

* :func:`http_client`: plain httpx, what :class:`~app.llm.openai_backend.OpenAIBackend` (and so the vLLM backend)
  streams chat and agent calls with (the ``openai`` SDK's request building costs ~1.4 ms per call on that path);
* :func:`openai_client`: an ``openai.AsyncOpenAI`` over such an httpx client, for callers that need the SDK (the
  eval judge: ragas' instructor LLM takes one).

Both get the backend's connect and read timeouts, the same connection limits, the bearer key read per request
(a vLLM server Keel runs gets a new key each start), an ``X-Request-Id`` on every request (vLLM logs it) and
``keel_backend_request_duration_seconds{backend, outcome}`` for every request. A backend's retries and circuit
breaker are applied around its stream by :class:`~app.llm.resilience.ResilientBackend` (the router); a client
with nothing like that around it (the SDK client) gets them per request here, with the same policy
(:func:`~app.llm.resilience.retrying`, :func:`~app.llm.resilience.breaker_for`): connection failures and 502/503
are retried, a breaker opened by repeated failures makes later calls fail at once with the URL in the error.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.trace import TracerProvider

from app.core.errors import (
    BackendError,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    KeelError,
    ModelNotFound,
)
from app.core.metrics import Metrics
from app.core.settings import BackendSettings
from app.llm.resilience import CircuitBreaker, circuit_open, retrying

if TYPE_CHECKING:
    from openai import AsyncOpenAI

#: The connection pool of every client to a model server (a burst of concurrent streams shares it).
LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=128)

#: Failures that happen before the server has the request (or a kept-alive connection it had closed): retried.
_CONNECTION_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class Bearer(httpx.Auth):
    """``Authorization: Bearer <key>`` with the key read per request (none sent while ``key()`` is None)."""

    def __init__(self, key: Callable[[], str | None]) -> None:
        self._key = key

    def auth_flow(self, request: httpx.Request):
        key = self._key()
        if key:
            request.headers["Authorization"] = f"Bearer {key}"
        yield request


def timeout(cfg: BackendSettings) -> httpx.Timeout:
    """Connect within ``connect_timeout_s``; then ``read_timeout_s`` between bytes."""
    return httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s)


def map_status_error(status: int, message: str) -> KeelError:
    """Translate an upstream HTTP error into Keel's error with a message the client can act on. Its class is
    also the resilience policy: :class:`BackendUnavailable` (502, 503) is retried, any other
    :class:`BackendError` counts against the circuit breaker, a request error (400, 404, 422) does not."""
    if status in (400, 422):
        lowered = message.lower()
        if "context length" in lowered or "maximum context" in lowered or "too long" in lowered:
            return ContextLengthExceeded(message)
        return InvalidRequest(message)
    if status == 404:
        return ModelNotFound(message)
    if status in (502, 503):
        return BackendUnavailable(f"backend unavailable: {message}")
    return BackendError(f"backend answered HTTP {status}: {message}")


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "http_4xx" if status < 500 else "http_5xx"


class _Busy(Exception):
    """A 502/503 answer that the next attempt may get past."""


class BackendClient(httpx.AsyncClient):
    """An httpx client to one model server that counts each request in
    ``keel_backend_request_duration_seconds{backend=label, outcome}`` and, given a ``breaker``, applies the
    backend's retries and circuit breaker to each request (see the module's doc)."""

    def __init__(self, *, label: str, what: str, metrics: Metrics | None = None,
                 breaker: CircuitBreaker | None = None, retries: int = 0, backoff_s: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label
        self.what = what
        self.metrics = metrics
        self.breaker = breaker
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def url(self) -> str:
        """The server's base URL, as configured."""
        return str(self.base_url).rstrip("/")

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        breaker = self.breaker
        if breaker is None:
            return await self._attempt(request, **kwargs)
        if not breaker.allow():
            self._observe("circuit_open", 0.0)
            raise circuit_open(f"{self.what} at {self.url}", breaker)
        await request.aread()  # a body in memory can be sent again
        try:
            async for attempt in retrying(self.retries, self.backoff_s, (*_CONNECTION_ERRORS, _Busy), breaker):
                with attempt:
                    response = await self._attempt(request, **kwargs)
                    if response.status_code in (502, 503) and attempt.retry_state.attempt_number <= self.retries:
                        await response.aclose()
                        raise _Busy(response.status_code)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            breaker.record_failure()
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            tries = attempt.retry_state.attempt_number
            raise BackendUnavailable(f"{self.what} unreachable at {self.url} ({detail}; "
                                     f"{tries} attempt{'s' if tries > 1 else ''})") from exc
        except httpx.TransportError:  # reached the server: timed out or dropped the connection
            breaker.record_failure()
            raise
        except BaseException:  # cancelled, or a bug: nothing learnt about the server
            breaker.release_probe()
            raise
        error = map_status_error(response.status_code, "") if response.status_code >= 400 else None
        if error is None:
            breaker.record_success()
        elif isinstance(error, BackendError):
            breaker.record_failure()
        else:
            breaker.release_probe()  # the request's fault, not the server's
        return response

    async def _attempt(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        t0 = time.perf_counter()
        outcome = "error"
        try:
            response = await super().send(request, **kwargs)
            outcome = _outcome(response.status_code)
            return response
        except (httpx.ConnectError, httpx.ConnectTimeout):
            outcome = "unreachable"
            raise
        except httpx.TimeoutException:
            outcome = "timeout"
            raise
        except httpx.TransportError:
            outcome = "disconnected"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._observe(outcome, time.perf_counter() - t0)

    def _observe(self, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.backend_requests.labels(self.label, outcome).observe(seconds)


def _request_id_hook(prefix: str) -> Callable[[httpx.Request], Any]:
    async def hook(request: httpx.Request) -> None:
        if "x-request-id" not in request.headers:
            request.headers["X-Request-Id"] = f"{prefix}-{uuid.uuid4().hex[:12]}"

    return hook


def http_client(cfg: BackendSettings, *, label: str, base_url: str | None = None,
                api_key: Callable[[], str | None] | None = None, metrics: Metrics | None = None,
                breaker: CircuitBreaker | None = None, what: str | None = None,
                transport: httpx.AsyncBaseTransport | None = None,
                tracer_provider: TracerProvider | None = None) -> BackendClient:
    """The httpx client to the server at ``base_url`` (default ``cfg.base_url``) that ``cfg`` describes.

    ``label``: the backend's name in metrics, and the prefix of the request ids it makes up for requests that
    bring none. ``api_key``: read per request (default: ``cfg.api_key``). ``breaker``: apply ``cfg``'s retries
    and this breaker per request (only for a client no :class:`ResilientBackend` wraps). ``what``: how errors
    name the server (default ``backend '<label>'``). ``transport``: tests script the server with one.
    ``tracer_provider``: every request (each attempt) is an HTTP client span of OpenTelemetry's httpx
    instrumentation, child of the context current when it is sent, whose ``traceparent`` the server receives."""
    key = api_key or (lambda: cfg.api_key.get_secret_value() if cfg.api_key else None)
    client = BackendClient(
        label=label, what=what or f"backend {label!r}", metrics=metrics, breaker=breaker, retries=cfg.retries,
        backoff_s=cfg.retry_backoff_s,
        base_url=(base_url or cfg.base_url or "").rstrip("/"), auth=Bearer(key), timeout=timeout(cfg),
        limits=LIMITS, transport=transport, event_hooks={"request": [_request_id_hook(label)]},
    )
    if tracer_provider is not None:
        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=tracer_provider)
    return client


def openai_client(cfg: BackendSettings, *, label: str, base_url: str | None = None,
                  api_key: Callable[[], str | None] | None = None, metrics: Metrics | None = None,
                  breaker: CircuitBreaker | None = None, what: str | None = None,
                  transport: httpx.AsyncBaseTransport | None = None) -> AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` over :func:`http_client` (same arguments). The SDK's own retries are off: a
    ``breaker`` makes this layer retry what never reached the server, and nothing else is retried."""
    from openai import AsyncOpenAI  # about a second to import (2-core box); the chat path never needs it

    http = http_client(cfg, label=label, base_url=base_url, api_key=api_key, metrics=metrics, breaker=breaker,
                       what=what, transport=transport)
    # The SDK sends its own Authorization header from api_key; the client's Bearer auth then replaces it with
    # the key current at each request.
    first_key = (api_key() if api_key else None) or (cfg.api_key.get_secret_value() if cfg.api_key else None)
    return AsyncOpenAI(base_url=http.url, api_key=first_key or "unused", timeout=timeout(cfg),
                       max_retries=0, http_client=http)
