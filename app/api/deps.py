"""FastAPI dependencies: the service container, the services routes use, authentication and scopes.

Routes take what they use through the typed aliases below, never through ``request.app.state`` (the style of
FastAPI's full-stack template: ``SessionDep = Annotated[Session, Depends(get_db)]``)::

    @router.get("/things")
    async def things(key: ChatKey, chat: ChatDep, limit: int = 50) -> ...

* services: ``ContainerDep`` (the whole container, for a route that needs several parts of it), ``SettingsDep``,
  ``MetricsDep``, ``KeysDep``, ``LlmDep``, ``ChatDep``, ``RagDep``, ``IngestJobsDep``, ``PromptsDep``,
  ``AgentsDep``, ``FinetuneDep``, ``GuardsDep`` (``None``: guardrails are off) and ``EvalStoreDep`` (an eval
  store opened for the request and closed after it);
* the caller's API key, once it is known to hold a scope: ``ChatKey``, ``PromptsReadKey``, ``PromptsWriteKey``,
  ``IngestKey``, ``EvalsKey``, ``FinetuneKey`` (``require_scope(scope)`` for a router's ``dependencies=``).

Every service dependency reads the container through :func:`get_container`, so a test that overrides that one
(``app.dependency_overrides[get_container]``) overrides them all; ``get_prompt_registry``, ``get_finetune``,
... can be overridden one by one. A feature the server runs without (agents, fine-tuning, the prompt registry)
answers 503 ``backend_unavailable`` from its dependency, before the route runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from opentelemetry import trace

from agents.service import AgentService
from app.container import Container
from app.core.errors import BackendUnavailable, KeelError, PermissionDenied, Unauthenticated
from app.core.metrics import Metrics
from app.guardrails.engine import GuardrailEngine
from app.llm.router import ModelRouter
from app.security.keys import SCOPES, ApiKey, ApiKeys
from app.services.chat import ChatService
from app.services.ingest_jobs import IngestJobs
from app.settings import Settings
from evals.store import EvalStoreBase
from finetune.service import FinetuneService
from ingest.factory import RagServices
from lifecycle.lineage import Lineage, LineageRecorder
from lifecycle.pipeline.service import PipelineService
from lifecycle.releases.service import ReleaseService
from lifecycle.releases.serving import ReleaseGateway
from prompts.registry import PromptRegistry

DEV_PRINCIPAL = ApiKey(
    id="dev", name="dev-mode (auth disabled)", scopes=frozenset({"admin"}), rate_limit_per_minute=None,
    created_at="",
)


# Dependencies are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a worker
# thread, and three thread hops per request showed up in the TTFT benchmark.


async def get_container(request: Request) -> Container:
    return request.app.state.keel


ContainerDep = Annotated[Container, Depends(get_container)]


# -- services ------------------------------------------------------------------------------------------


async def get_settings(container: ContainerDep) -> Settings:
    return container.settings


async def get_metrics(container: ContainerDep) -> Metrics:
    return container.metrics


async def get_keys(container: ContainerDep) -> ApiKeys:
    return container.keys


async def get_llm(container: ContainerDep) -> ModelRouter:
    return container.llm


def chat_path(container: Any) -> ChatService | ReleaseGateway | LineageRecorder:
    """The chat path as clients reach it: through the release endpoints when releases are on."""
    return getattr(container, "front", None) or getattr(container, "serving", None) or container.chat


async def get_chat(container: ContainerDep) -> ChatService | ReleaseGateway | LineageRecorder:
    return chat_path(container)


async def get_pipelines(container: ContainerDep) -> PipelineService:
    svc = getattr(container, "pipelines", None)
    if svc is None:
        raise BackendUnavailable("continuous-training pipelines are off on this server (pipelines.enabled)")
    return svc


async def get_releases(container: ContainerDep) -> ReleaseService:
    svc = getattr(container, "releases", None)
    if svc is None:
        raise BackendUnavailable("releases are off on this server (releases.enabled)")
    return svc


async def get_lineage(container: ContainerDep) -> Lineage:
    svc = getattr(container, "lineage", None)
    if svc is None:
        raise BackendUnavailable("lineage is not recorded on this server")
    return svc


async def get_serving(container: ContainerDep) -> ReleaseGateway:
    svc = getattr(container, "serving", None)
    if svc is None:
        raise BackendUnavailable("releases are off on this server (releases.enabled)")
    return svc


async def get_rag(container: ContainerDep) -> RagServices:
    return container.rag


async def get_ingest_jobs(container: ContainerDep) -> IngestJobs:
    return container.ingest_jobs


async def get_guards(container: ContainerDep) -> GuardrailEngine | None:
    """The server's guardrail engine; None when guardrails are off (routes then run unguarded, as chat does)."""
    return getattr(container, "guards", None)


async def get_prompt_registry(container: ContainerDep) -> PromptRegistry:
    registry = getattr(container, "prompts", None)
    if registry is None:
        raise BackendUnavailable("the prompt registry is not configured on this server")
    return registry


async def get_agents(container: ContainerDep) -> AgentService:
    svc = getattr(container, "agents", None)
    if svc is None:
        raise BackendUnavailable("agents are not configured on this server")
    return svc


async def get_finetune(container: ContainerDep) -> FinetuneService:
    svc = getattr(container, "finetune", None)
    if svc is None:
        raise BackendUnavailable("fine-tuning is not configured on this server")
    return svc


async def get_eval_store(container: ContainerDep) -> EvalStoreBase:
    """The process's eval store (the container's: one connection, or one Postgres pool, for every request)."""
    return container.evals


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
KeysDep = Annotated[ApiKeys, Depends(get_keys)]
LlmDep = Annotated[ModelRouter, Depends(get_llm)]
ChatDep = Annotated[ChatService | ReleaseGateway | LineageRecorder, Depends(get_chat)]
LineageDep = Annotated[Lineage, Depends(get_lineage)]
ReleasesDep = Annotated[ReleaseService, Depends(get_releases)]
PipelinesDep = Annotated[PipelineService, Depends(get_pipelines)]
ServingDep = Annotated[ReleaseGateway, Depends(get_serving)]
RagDep = Annotated[RagServices, Depends(get_rag)]
IngestJobsDep = Annotated[IngestJobs, Depends(get_ingest_jobs)]
GuardsDep = Annotated[GuardrailEngine | None, Depends(get_guards)]
PromptsDep = Annotated[PromptRegistry, Depends(get_prompt_registry)]
AgentsDep = Annotated[AgentService, Depends(get_agents)]
FinetuneDep = Annotated[FinetuneService, Depends(get_finetune)]
EvalStoreDep = Annotated[EvalStoreBase, Depends(get_eval_store)]


# -- authentication and scopes -------------------------------------------------------------------------


async def authenticate(request: Request, container: ContainerDep) -> ApiKey:
    """Resolve the caller's API key from ``Authorization: Bearer`` (or ``X-API-Key``) and rate-limit it."""
    if not container.settings.auth.enabled:
        return DEV_PRINCIPAL
    raw = _bearer(request)
    if raw is None:
        raise Unauthenticated(
            "missing API key: send 'Authorization: Bearer <key>' (create one with `keel keys create`)"
        )
    tracing = getattr(container, "tracing", None)  # an application mounting Keel's routes may bring no tracing
    # A span of a traced request only: the routes left untraced (reading traces, health, metrics) would
    # otherwise each leave a one-span trace of their own.
    traced = tracing is not None and trace.get_current_span().get_span_context().is_valid
    tracer = tracing.tracer if traced else trace.NoOpTracer()
    with tracer.start_as_current_span("keel.auth", record_exception=False, set_status_on_exception=False) as span:
        key = await container.keys.averify(raw)
        if key is None:
            span.set_attribute("keel.auth.outcome", "invalid_key")
            raise Unauthenticated("invalid or revoked API key")
        span.set_attribute("keel.auth.key_id", key.id)  # the key's id, never the key
        limit = key.rate_limit_per_minute or container.settings.auth.default_rate_limit_per_minute
        try:
            await container.rate_limiter.acheck(key.id, limit)
        except KeelError as e:
            span.set_attribute("keel.auth.outcome", e.code)
            raise
        span.set_attribute("keel.auth.outcome", "ok")
    request.state.api_key_id = key.id
    request.state.api_key_scopes = key.scopes
    # the key's model tokens per minute: what the routes that reach a model count its answers against
    request.state.api_key_token_budget = key.tokens_per_minute or container.settings.auth.default_tokens_per_minute
    return key


def token_budget(request: Request) -> int | None:
    """The caller's key's model tokens per minute (None: not limited), as :func:`authenticate` found it."""
    return getattr(request.state, "api_key_token_budget", None)


def require_scope(scope: str) -> Callable[..., ApiKey]:
    """A dependency that returns the caller's key if it holds ``scope`` (``admin`` holds them all), else 403."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def dependency(key: Annotated[ApiKey, Depends(authenticate)]) -> ApiKey:
        if not key.allows(scope):
            raise PermissionDenied(
                f"this API key lacks the '{scope}' scope (it has: {', '.join(sorted(key.scopes))})"
            )
        return key

    dependency.keel_scope = scope  # type: ignore[attr-defined]  # the OpenAPI document names the 403 it can answer
    return dependency


ChatKey = Annotated[ApiKey, Depends(require_scope("chat"))]


async def model_access(key: ChatKey, request: Request, container: ContainerDep) -> ApiKey:
    """A ``chat`` key on a route that makes the model answer (chat, Responses, agent runs, a batch): refused while
    the key's model tokens are spent (its other routes, reading results or cancelling, stay open)."""
    budget = token_budget(request)
    if budget:
        await container.rate_limiter.acheck_tokens(key.id, budget)
    return key


#: The caller's key on a route that reaches a model: scope ``chat`` and tokens left in its budget.
ModelKey = Annotated[ApiKey, Depends(model_access)]
PromptsReadKey = Annotated[ApiKey, Depends(require_scope("prompts:read"))]
PromptsWriteKey = Annotated[ApiKey, Depends(require_scope("prompts:write"))]
IngestKey = Annotated[ApiKey, Depends(require_scope("ingest"))]
EvalsKey = Annotated[ApiKey, Depends(require_scope("evals"))]
FinetuneKey = Annotated[ApiKey, Depends(require_scope("finetune"))]
ReleasesKey = Annotated[ApiKey, Depends(require_scope("releases"))]
MonitorKey = Annotated[ApiKey, Depends(require_scope("monitor"))]
AdminKey = Annotated[ApiKey, Depends(require_scope("admin"))]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key")
