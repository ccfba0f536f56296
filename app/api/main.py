"""The FastAPI application: built by :func:`create_app`, services wired in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from starlette.routing import Route

from app.api.errors import install_error_handlers
from app.api.mcp import McpEndpoint, RunningMcp
from app.api.middleware import RequestContextMiddleware
from app.api.openapi import document_errors
from app.api.routes import (
    admin,
    agents,
    batches,
    chat,
    embeddings,
    evals,
    finetune,
    lineage,
    monitor,
    pipelines,
    rag,
    releases,
    responses,
    studio,
    system,
    traces,
)
from app.api.routes import prompts as prompt_routes
from app.api.routes.batches import batch_responder
from app.container import Container
from app.core import heap
from app.core.metrics import Metrics
from app.core.tracing import Tracing
from app.settings import Settings, load_settings
from lifecycle.tools.mcp import http_app as mcp_http_app

log = logging.getLogger("keel")
# Probes, metrics scrapes and the web pages' static files (not /v1/...): no trace for them.
_UNTRACED = (r"/healthz$,/readyz$,/metrics$,://[^/]+/studio(/|$),://[^/]+/releases(/|$),://[^/]+/traces(/|$),"
             r"/v1/traces(/|\?|$)")  # reading traces must not make more of them


def create_app(settings: Settings | None = None, container: Container | None = None, *,
               owns_process: bool = False) -> FastAPI:
    """``container`` lets tests inject pre-built services; otherwise the lifespan builds them. ``owns_process``:
    the app is the process's server (``keel serve``), so it may change process-wide state: the garbage
    collector's pauses are timed (``keel_gc_pause_seconds``) and, with ``server.gc_freeze``, the start-up heap is
    taken out of its scans (:mod:`app.core.heap`); an app built inside another program or a test suite does
    neither."""
    settings = settings or (container.settings if container else load_settings())
    # Built before the container: the HTTP instrumentation below needs the tracer provider at creation.
    metrics = container.metrics if container else Metrics()
    tracing = container.tracing if container else Tracing(settings.otel, settings.home,
                                                           dropped=metrics.trace_dropped)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth.enabled:
            log.warning("=" * 72)
            log.warning("AUTH IS DISABLED (KEEL_AUTH__ENABLED=false): every caller is admin. Dev only!")
            log.warning("=" * 72)
        owned = container is None
        app.state.keel = container or await Container.build(settings, metrics=metrics, tracing=tracing)
        if app.state.keel.batches is not None:
            app.state.keel.batches.respond = batch_responder(app.state.keel)
        if app.state.keel.jobs is not None:
            await app.state.keel.jobs.start()  # runs the jobs a stopped process left queued or running
        app.state.keel.start_release_controller()
        app.state.keel.start_drift_monitor()
        app.state.keel.start_pipeline_triggers()
        mcp = None
        if settings.mcp.enabled and app.state.keel.tools is not None:
            mcp = app.state.mcp = await RunningMcp(mcp_http_app(app.state.keel.mcp_server(http=True))).start()
        unwatch = None
        try:
            if owns_process:
                # bound now: labels() takes the metric's lock, which a collection may interrupt (heap.watch)
                pauses = {g: app.state.keel.metrics.gc_pause.labels(str(g)) for g in (0, 1, 2)}
                unwatch = heap.watch(lambda generation, seconds: pauses[generation].observe(seconds))
                if settings.server.gc_freeze:
                    heap.freeze()  # last: everything start-up loaded is in it
            yield
        finally:
            if unwatch is not None:
                unwatch()
            app.state.mcp = None
            if mcp is not None:
                await mcp.stop()
            if owned:
                await app.state.keel.aclose()

    app = FastAPI(
        title="Keel", version="0.1.0", lifespan=lifespan,
        description="OpenAI-compatible chat over vLLM, with the LLMOps lifecycle around it.",
    )
    if container is not None:
        app.state.keel = container  # usable without running the lifespan (ASGI test clients)
        if container.batches is not None:
            container.batches.respond = batch_responder(container)
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        metrics_getter=lambda: getattr(getattr(app.state, "keel", None), "metrics", None),
        max_body_bytes_getter=lambda: settings.limits.max_body_bytes,
    )
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(embeddings.router)
    app.include_router(batches.router)
    app.include_router(system.router)
    app.include_router(admin.router)
    app.include_router(prompt_routes.router)
    app.include_router(rag.router)
    app.include_router(agents.router)
    app.include_router(finetune.router)
    app.include_router(evals.router)
    app.include_router(releases.router)
    app.include_router(pipelines.router)
    app.include_router(lineage.router)
    app.include_router(traces.router)
    app.include_router(monitor.router)
    app.include_router(studio.router)
    app.router.routes.append(Route("/mcp", McpEndpoint(), methods=["GET", "POST", "DELETE"],
                                   include_in_schema=False))
    document_errors(app)
    if tracing is not None and tracing.provider is not None:
        # Server spans per request (the parent of each chat's spans; an incoming traceparent joins the caller's
        # trace), without a span per ASGI message (a streamed answer would make hundreds).
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracing.provider, exclude_spans=["receive", "send"],
                                           excluded_urls=_UNTRACED)
    return app
