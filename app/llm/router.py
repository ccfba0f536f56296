"""Model aliases -> backends, with failover to an alias's fallback. Which alias runs where is the routing
table's (:mod:`app.llm.routing`): the configured aliases plus the routes written at run time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.trace import TracerProvider

from app.core.errors import BackendUnavailable, ModelNotFound
from app.core.metrics import Metrics
from app.core.settings import BackendSettings, CoreConfig, ModelAlias
from app.core.types import GenerationRequest, LLMEvent
from app.llm.base import LLMBackend
from app.llm.openai_backend import OpenAIBackend
from app.llm.replicas import ReplicaSet
from app.llm.resilience import ResilientBackend
from app.llm.routing import RoutingTable, memory_table
from app.llm.vllm_backend import VLLMBackend

log = logging.getLogger("keel.llm")


def build_backend(name: str, cfg: BackendSettings, settings: CoreConfig, metrics: Metrics | None = None,
                  tracer_provider: TracerProvider | None = None) -> LLMBackend:
    """Construct (cheaply, nothing loaded) the backend implementation for ``cfg.kind``; ``tracer_provider``
    makes each HTTP request to a model server a client span."""
    if cfg.kind in ("vllm", "openai") and cfg.replicas:
        first, *more = cfg.server_urls()
        servers = [_server(name, cfg, settings, metrics, tracer_provider),
                   *(OpenAIBackend(name, cfg, url, metrics=metrics, tracer_provider=tracer_provider) for url in more)]
        # each server its own breaker and no retries: the set sends a failed request to the next server instead
        shown = [_shown(url) for url in (first, *more)]  # what logs and metric labels name: no credentials
        return ReplicaSet(name, [(url, ResilientBackend.from_settings(f"{name} {url}", server, cfg, metrics, retries=0))
                                 for url, server in zip(shown, servers, strict=True)],
                          check_interval_s=cfg.replica_check_s, metrics=metrics)
    if cfg.kind in ("vllm", "openai"):
        return _server(name, cfg, settings, metrics, tracer_provider)
    if cfg.kind == "transformers":
        from app.llm.transformers_backend import TransformersBackend  # lazy: loads torch and transformers

        return TransformersBackend(name, cfg)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")


def _shown(url: str) -> str:
    """A server's URL without credentials, for metric labels."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def _server(name: str, cfg: BackendSettings, settings: CoreConfig, metrics: Metrics | None,
            tracer_provider: TracerProvider | None) -> OpenAIBackend:
    if cfg.kind == "vllm":
        on_restart = metrics.backend_restarts.labels(name).inc if metrics else None
        return VLLMBackend(name, cfg, settings.logs_dir, on_restart=on_restart, metrics=metrics,
                           tracer_provider=tracer_provider)
    return OpenAIBackend(name, cfg, metrics=metrics, tracer_provider=tracer_provider)


@dataclass(frozen=True)
class Route:
    alias: str
    backend: ResilientBackend
    spec: ModelAlias


class ModelRouter:
    """Resolves a client-facing model name to a backend and streams from it, failing over
    to the alias's ``fallback`` when the primary cannot be reached before any token."""

    def __init__(self, settings: CoreConfig, metrics: Metrics, backends: dict[str, LLMBackend] | None = None, *,
                 routes: RoutingTable | None = None, tracer_provider: TracerProvider | None = None) -> None:
        """``routes``: the process's routing table (the container opens the durable one); without it, a table
        of the configured aliases only, in memory. ``tracer_provider``: the process's (see :func:`build_backend`)."""
        self.settings = settings
        self.metrics = metrics
        self._owns_routes = routes is None
        self.routes = routes or memory_table(settings.models, settings.backends)
        self.backends: dict[str, ResilientBackend] = {}
        self._was_ready: dict[str, bool] = {}
        for name, cfg in settings.backends.items():
            inner = (backends or {}).get(name) or build_backend(name, cfg, settings, metrics, tracer_provider)
            # around a replica set, the breaker opens only when no server answers (each has its own breaker)
            self.backends[name] = ResilientBackend.from_settings(name, inner, cfg, metrics,
                                                                 only_unavailable=isinstance(inner, ReplicaSet))

    @property
    def aliases(self) -> dict[str, ModelAlias]:
        return self.routes.aliases()

    def route(self, alias: str) -> Route:
        spec = self.routes.get(alias)
        if spec is None:
            known = ", ".join(sorted(self.routes.aliases())) or "none"
            raise ModelNotFound(f"model {alias!r} does not exist; available models: {known}", param="model")
        return Route(alias, self.backends[spec.backend], spec)

    async def stream(self, alias: str, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        tried: list[str] = []
        current = alias
        while True:
            route = self.route(current)
            req = replace(
                request, model=route.spec.model,
                adapter=str(route.spec.adapter) if route.spec.adapter else request.adapter,
            )
            tried.append(current)
            gen = aiter(route.backend.stream(req))
            try:
                first = await anext(gen)
            except StopAsyncIteration:
                return
            except BackendUnavailable as exc:
                await gen.aclose()
                fallback = route.spec.fallback
                if fallback is None or fallback in tried:
                    raise
                log.warning("model %r unavailable (%s); falling back to %r", current, exc, fallback)
                self.metrics.fallbacks.labels(alias, fallback).inc()
                current = fallback
                continue
            try:
                yield first
                async for event in gen:
                    yield event
            finally:
                await gen.aclose()
            return

    def on_server_restart(self, callback: Callable[[str], Awaitable[None]]) -> None:
        """Call ``callback(backend)`` each time a vLLM server Keel supervises is ready again after a restart, or a
        replica came back or lost models it served (either way it has lost the adapters loaded at run time)."""
        for name, backend in self.backends.items():
            sup = getattr(backend.inner, "supervisor", None)
            if sup is not None:
                sup.on_ready_again.append(partial(callback, name))
            if isinstance(backend.inner, ReplicaSet):
                backend.inner.on_back.append(callback)

    def expect_models(self, expected: Callable[[str], frozenset[str]]) -> None:
        """``expected(backend)``: the model names (deployed adapters) every server of a backend with replicas should
        serve; each replica probe compares (a server missing one is reported to :meth:`on_server_restart`'s
        callbacks). Called off the event loop."""
        for name, backend in self.backends.items():
            if isinstance(backend.inner, ReplicaSet):
                backend.inner.expected = partial(expected, name)

    async def start(self) -> None:
        await asyncio.gather(*(b.start() for b in self.backends.values()))

    async def aclose(self) -> None:
        await asyncio.gather(*(b.aclose() for b in self.backends.values()), return_exceptions=True)
        if self._owns_routes:
            self.routes.close()

    async def readiness(self) -> dict[str, dict[str, object]]:
        async def one(name: str, b: ResilientBackend) -> tuple[str, dict[str, object]]:
            try:
                ok = await asyncio.wait_for(b.ready(), 3.0)
            except Exception as exc:  # readiness must answer, whatever the backend does
                ok = False
                # keel_backend_up says it; the log says why, once per outage (load balancers poll often).
                if self._was_ready.get(name, True):
                    log.warning("readiness check of backend %r raised %s: %s", name, type(exc).__name__, exc)
            self._was_ready[name] = ok
            self.metrics.backend_up.labels(name).set(1 if ok else 0)
            info: dict[str, object] = {"ready": ok, "kind": self.settings.backends[name].kind,
                                       "circuit": b.breaker.state}
            sup = getattr(b.inner, "supervisor", None)
            if sup is not None:
                info["server"] = sup.status()
            return name, info

        return dict(await asyncio.gather(*(one(n, b) for n, b in self.backends.items())))
