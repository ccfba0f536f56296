"""Models, health, readiness and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import AgentsDep, ChatKey, ContainerDep, LlmDep, MetricsDep, RagDep, SettingsDep
from app.api.routes.embeddings import model_card as embedding_card
from app.api.schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, tags=["chat"])
async def list_models(_key: ChatKey, settings: SettingsDep, llm: LlmDep, rag: RagDep, agents: AgentsDep,
                      container: ContainerDep) -> ModelList:
    # the routing table's aliases: the configured ones and those deployed at run time (adapters, releases)
    cards = [ModelCard(id=name, description=spec.description, owned_by=spec.backend)
             for name, spec in llm.aliases.items()]
    # Every document collection is also a grounded "model": answers cite its passages.
    collections = await asyncio.to_thread(rag.store.list_collections)
    cards += [ModelCard(id=f"rag:{c}", owned_by="keel",
                        description=f"{settings.default_model} answering from collection {c!r} with citations")
              for c in collections]
    cards += [ModelCard(id=m["id"], owned_by="keel", description=m["description"]) for m in agents.chat_models()]
    cards.append(embedding_card(rag.embedder))  # POST /v1/embeddings (and batches of it) take this name
    # Release endpoints: a name clients call, answered by the release's variants.
    releases = getattr(container, "releases", None)
    if releases is not None:
        for name in releases.names():
            r = releases.active(name)
            if r is not None:
                split = ", ".join(f"{v} {w:g}%" for v, w in r.weights.items() if w)
                cards.append(ModelCard(id=name, owned_by="keel",
                                       description=f"release ({r.spec.strategy}, {r.status}): {split}"))
    return ModelList(data=cards)


@router.get("/healthz", tags=["system"])
async def healthz(settings: SettingsDep) -> dict:
    """Liveness: the API process answers. Says loudly when auth is off."""
    return {"status": "ok", "auth": "enabled" if settings.auth.enabled else "DISABLED (dev mode)"}


@router.get("/readyz", tags=["system"])
async def readyz(llm: LlmDep, settings: SettingsDep) -> JSONResponse:
    """Ready when the default model's backend can serve a request now.

    Unauthenticated (load balancers call it), so it says ready or not per backend and nothing else: the
    server details (command line, pid, log path, last error) are for admins, at GET /v1/admin/backends."""
    backends = await llm.readiness()
    default = settings.models.get(settings.default_model)
    ready = default is not None and bool(backends.get(default.backend, {}).get("ready"))
    return JSONResponse({"ready": ready, "default_model": settings.default_model,
                         "backends": {name: {"ready": bool(info.get("ready"))} for name, info in backends.items()}},
                        status_code=200 if ready else 503)


@router.get("/metrics", tags=["system"], response_class=Response, responses={200: {
    "description": "Prometheus' text exposition format.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(llm: LlmDep, metrics_registry: MetricsDep) -> Response:
    await llm.readiness()  # refresh keel_backend_up
    return Response(metrics_registry.render(), media_type=CONTENT_TYPE_LATEST)
