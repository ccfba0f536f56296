"""Retries on connection errors and a circuit breaker around any backend.

One policy, applied in two places: :class:`ResilientBackend` wraps a backend's stream (chat and agents, through
the router), and :class:`app.llm.clients.BackendClient` wraps each HTTP request of a client built with a breaker by
:func:`app.llm.clients.openai_client` (the eval judge). Both retry with :func:`retrying`, fail fast with
:func:`circuit_open` and build their breaker with :func:`breaker_for`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from app.core.errors import BackendError, BackendUnavailable
from app.core.metrics import Metrics
from app.core.settings import BackendSettings
from app.core.types import GenerationRequest, LLMEvent
from app.llm.base import LLMBackend

log = logging.getLogger("keel.llm")

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Stops sending requests to a backend that keeps failing, then lets one probe through.

    Without it every request would wait out connect timeouts and retries
    against a dead server before failing over.
    """

    def __init__(
        self, failure_threshold: int, reset_after_s: float, clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self._state: BreakerState = "closed"
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_after_s:
            return "half_open"
        return self._state

    def retry_in(self) -> float:
        return max(0.0, self.reset_after_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        self._set("closed")

    def release_probe(self) -> None:
        """The probe ended without telling anything about the backend's health."""
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._probe_in_flight = False
        self._failures += 1
        # A failed half-open probe re-opens at once; a closed breaker opens at the threshold.
        if self._state == "open" or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set("open")

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            log.warning("circuit breaker %s", state)
            if self._on_change:
                self._on_change(state)


def breaker_for(label: str, cfg: BackendSettings, metrics: Metrics | None = None) -> CircuitBreaker:
    """``cfg``'s breaker, reporting its state as ``keel_circuit_open{backend=label}``."""
    on_change = (lambda state: metrics.breaker_open.labels(label).set(state == "open")) if metrics else None
    return CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s, on_change=on_change)


def retrying(retries: int, backoff_s: float, retry_on: type[BaseException] | tuple[type[BaseException], ...],
             breaker: CircuitBreaker | None = None) -> AsyncRetrying:
    """``retries`` more attempts after the first, with jittered exponential back-off (capped at 2 s), on
    ``retry_on`` only; the last error is raised as is. No further attempt once ``breaker`` is open (other
    calls to the same server found it dead meanwhile): the call fails now instead of after its back-off."""
    stop = stop_after_attempt(retries + 1)
    if breaker is not None:
        stop = stop | (lambda _state: breaker.state == "open")
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop,
        wait=wait_exponential_jitter(initial=backoff_s, max=2.0, jitter=backoff_s),
        reraise=True,
    )


def circuit_open(what: str, breaker: CircuitBreaker) -> BackendUnavailable:
    """The error for a call the open ``breaker`` refused (``what`` names the backend)."""
    return BackendUnavailable(f"{what} is failing; circuit open, next probe in {breaker.retry_in():.0f} s")


class ResilientBackend:
    """Wraps a backend: retries connection failures that happen before the first event,
    trips a circuit breaker on repeated failures. Errors after the first event are
    passed through: tokens already sent cannot be taken back, so they are not retried."""

    def __init__(
        self, inner: LLMBackend, *, retries: int, backoff_s: float, breaker: CircuitBreaker,
        only_unavailable: bool = False,
    ) -> None:
        """``only_unavailable``: the breaker counts only a :class:`BackendUnavailable` before the first event
        (around a set of servers with breakers of their own, which count the rest per server)."""
        self.inner = inner
        self.name = inner.name
        self.retries = retries
        self.backoff_s = backoff_s
        self.breaker = breaker
        self.only_unavailable = only_unavailable

    @classmethod
    def from_settings(cls, label: str, inner: LLMBackend, cfg: BackendSettings, metrics: Metrics | None = None,
                      *, retries: int | None = None, only_unavailable: bool = False) -> ResilientBackend:
        """``inner`` with ``cfg``'s retries (or ``retries``) and breaker (its state in
        ``keel_circuit_open{backend=label}``)."""
        return cls(inner, retries=cfg.retries if retries is None else retries, backoff_s=cfg.retry_backoff_s,
                   breaker=breaker_for(label, cfg, metrics), only_unavailable=only_unavailable)

    def _failed(self, exc: BackendError, *, started: bool) -> None:
        if self.only_unavailable and (started or not isinstance(exc, BackendUnavailable)):
            self.breaker.release_probe()
        else:
            self.breaker.record_failure()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        if not self.breaker.allow():
            raise circuit_open(f"backend {self.name!r}", self.breaker)
        gen: AsyncIterator[LLMEvent] | None = None
        first: LLMEvent | None = None
        try:
            async for attempt in retrying(self.retries, self.backoff_s, BackendUnavailable, self.breaker):
                with attempt:
                    gen = aiter(self.inner.stream(request))
                    try:
                        first = await anext(gen)
                    except BaseException:
                        await gen.aclose()
                        raise
        except StopAsyncIteration:
            self.breaker.record_success()
            return
        except BackendError as exc:
            self._failed(exc, started=False)
            raise
        except BaseException:
            # Request errors (4xx) and cancellation say nothing about the backend's health.
            self.breaker.release_probe()
            raise
        self.breaker.record_success()
        assert gen is not None and first is not None
        try:
            yield first
            async for event in gen:
                yield event
        except BackendError as exc:
            self._failed(exc, started=True)
            raise
        finally:
            await gen.aclose()

    async def models(self) -> list[str]:
        return await self.inner.models()

    async def ready(self) -> bool:
        return self.breaker.state != "open" and await self.inner.ready()

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()
