"""The application's long-lived objects, built once in the API lifespan (or a CLI command)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agents import build_agents
from agents.service import AgentService
from agents.tools import ToolContext, ToolRegistry
from app.core.errors import Unauthenticated
from app.core.metrics import Metrics
from app.core.tracing import Tracing
from app.guardrails.embeddings import SharedEmbedder, default_model_path
from app.guardrails.engine import GuardrailEngine
from app.guardrails.offline import configure_offline
from app.jobs import JobRunner
from app.llm.base import LLMBackend
from app.llm.router import ModelRouter
from app.llm.routing import open_routing_table
from app.security.keys import ApiKeys, open_key_store
from app.security.ratelimit import RateLimits, TokenMeter, open_rate_limiter
from app.services.chat import ChatService
from app.services.grounding import Grounder
from app.services.ingest_jobs import IngestJobs
from app.services.response_store import ResponseStore
from app.settings import Settings
from evals.gate import policy_gate, prompt_gate, rag_gate, workflow_fingerprint, workflow_gate
from evals.jobs import EvalJobs, load_named_suite, submit_run
from evals.online import OnlineJudge
from evals.runner import EvalDeps, agent_identity
from evals.store import EvalStoreBase, open_eval_store
from evals.suite import suite_summaries
from finetune import build_finetune
from finetune.gate import adapter_gate, runs_on_adapter
from finetune.service import FinetuneService
from ingest import build_rag
from ingest.factory import RagServices
from lifecycle.batch.service import BatchService
from lifecycle.batch.store import BatchStore
from lifecycle.features.export import Sources as FeatureSources
from lifecycle.features.service import FeatureService
from lifecycle.lineage import Lineage, LineageRecorder, open_lineage_store
from lifecycle.monitor.drift import DriftMonitor, build_monitor
from lifecycle.pipeline.service import PipelineDeps, PipelineService
from lifecycle.pipeline.store import open_pipeline_store
from lifecycle.releases.service import ReleaseService
from lifecycle.releases.serving import ReleaseGateway, variant_check, variant_gate
from lifecycle.releases.store import open_release_store
from lifecycle.tools import LifecycleServices, ToolAudit, lifecycle_tools, open_tool_audit
from lifecycle.tools.mcp import build_server as build_mcp_server
from lifecycle.tools.remote import connect_servers
from prompts.factory import build_registry
from prompts.registry import PromptRegistry

log = logging.getLogger("keel")


@dataclass
class Container:
    settings: Settings
    metrics: Metrics
    keys: ApiKeys
    rate_limiter: RateLimits
    llm: ModelRouter
    chat: ChatService
    prompts: PromptRegistry
    rag: RagServices
    ingest_jobs: IngestJobs
    guards: GuardrailEngine | None
    agents: AgentService
    finetune: FinetuneService
    evals: EvalStoreBase
    _closers: list = field(default_factory=list)
    _tasks: set = field(default_factory=set)
    #: Durable jobs (ingest, API-started eval runs); the API lifespan starts it, resuming what a stop left.
    jobs: JobRunner | None = None
    #: Release endpoints (A/B, canary, shadow, blue/green) and the chat path through them; None: releases off.
    releases: ReleaseService | None = None
    serving: ReleaseGateway | None = None
    #: The chat path as clients reach it (releases, then lineage recording) and the lineage reader.
    front: LineageRecorder | None = None
    lineage: Lineage | None = None
    tracing: Tracing | None = None
    monitor: DriftMonitor | None = None
    #: The tools agents and MCP clients share (built-ins plus the lifecycle's) and their audit trail.
    tools: ToolRegistry | None = None
    tool_audit: ToolAudit | None = None
    #: Files and batches (the OpenAI Batch API) on the job runner; None: batch.enabled is off.
    batches: BatchService | None = None
    #: Continuous-training pipelines (runs on the job runner, triggers checked by the lifespan); None: off.
    pipelines: PipelineService | None = None
    #: Stored responses of /v1/responses (their conversations, for previous_response_id).
    responses: ResponseStore | None = None
    #: The feature store (Feast, imported on first use); None: features.enabled is off.
    features: FeatureService | None = None
    #: Each answer's model tokens, taken from its key's token budget.
    token_meter: TokenMeter | None = None

    @classmethod
    async def build(
        cls, settings: Settings, *, backends: dict[str, LLMBackend] | None = None, rag: RagServices | None = None,
        guards: GuardrailEngine | None = None, start_backends: bool = True, metrics: Metrics | None = None,
        tracing: Tracing | None = None, schema_only: bool = False,
    ) -> Container:
        """``backends`` replaces the configured backend of the same name, ``rag`` the RAG services and
        ``guards`` the guardrail engine (tests, embedding Keel in another application); ``metrics`` and
        ``tracing``: the API's, when it built them before the container (its HTTP instrumentation needs them).
        ``schema_only``: open every store (their migrations run) and nothing that acts: no backends, no external
        MCP servers, no sweep of other processes' agent runs (``keel migrate``)."""
        start_backends = start_backends and not schema_only
        settings.home.mkdir(parents=True, exist_ok=True)
        metrics = metrics or Metrics()
        tracing = tracing or Tracing(settings.otel, settings.home, dropped=metrics.trace_dropped)
        keys_url = settings.auth.url.get_secret_value() if settings.auth.url else None
        keys = open_key_store(keys_url, settings.db_path)
        rate_limiter = open_rate_limiter(keys_url, shared=settings.auth.shared_rate_limits,
                                         fail_open=settings.auth.rate_limit_fail_open,
                                         on_store_error=metrics.rate_limit_store_errors.inc)
        # What serves traffic: the configured models plus the routes and prompt labels written at run time, durable
        # and shared by every process on this home (or this Postgres).
        routes = open_routing_table(settings)
        prompts = build_registry(settings, routes=routes)
        eval_store = open_eval_store(settings)
        if settings.evals.gate_enabled:
            # Nothing reaches a protected label (production) without a passing eval run of that exact version.
            prompts.set_gate(prompt_gate(eval_store, prompts, suites_dir=settings.evals.suites_dir,
                                         max_age_days=settings.evals.gate_max_age_days))
        embedder = shared_embedder(settings) if rag is None else None
        rag = rag or build_rag(settings, embedder=embedder)
        llm = ModelRouter(settings, metrics, backends, routes=routes, tracer_provider=tracing.provider)
        if start_backends:
            await llm.start()
            # Loads the embedding model and opens the vector store now, not on the first question.
            await asyncio.to_thread(rag.warm_up)
        elif schema_only:
            await asyncio.to_thread(rag.snapshots.list, None, 1)  # the snapshot store opens (and migrates) on use
        if guards is None and settings.guardrails.enabled:
            guards = build_guards(settings, metrics, embedder=embedder if _same_model(settings) else None)
            if start_backends:
                await asyncio.to_thread(guards.warm_up)
            elif schema_only:
                await asyncio.to_thread(lambda: guards.audit)  # its store opens (and migrates) with warm-up
        agents = build_agents(settings, llm, rag, prompts, tracer=tracing.tracer)
        await agents.start(sweep=not schema_only)
        runner = JobRunner.from_settings(settings.jobs, settings.home, tracer=tracing.tracer)
        finetune = build_finetune(settings, routes=routes, queue=runner.queue)
        if settings.evals.gate_enabled:
            # An adapter version reaches production only with passing runs of its job's suites on that adapter.
            finetune.set_gate(adapter_gate(eval_store, max_age_days=settings.evals.gate_max_age_days))
        # Its sources (lineage, feedback) are built below; Feast is imported on the first lookup, not here.
        features = FeatureService(settings.features, settings.home) if settings.features.enabled else None
        # each answer's tokens, from its key's token budget (auth.default_tokens_per_minute, a key's own limit)
        meter = TokenMeter(keys, rate_limiter, settings.auth.default_tokens_per_minute)
        agents.on_usage = meter.record  # an agent run's model calls count against its key's budget too
        chat = ChatService(settings, llm, metrics, prompts, Grounder(rag, prompts), guards, agents,
                           tracer=tracing.tracer, capture_content=settings.otel.capture_content,
                           features=features.online if features is not None else None, on_usage=meter.record)
        jobs = IngestJobs(rag, settings.home / "uploads", runner)
        releases = serving = None
        if settings.releases.enabled:
            url = settings.releases.url
            judge = OnlineJudge.from_config(settings, embedder=rag.embedder, metrics=metrics)
            releases = ReleaseService(
                open_release_store(url.get_secret_value() if url else None, settings.home),
                check_interval_s=settings.releases.check_interval_s, check_variant=variant_check(chat),
                gate=_release_gate(settings, chat, eval_store, rag) if settings.evals.gate_enabled else None,
                name_taken=lambda name: (llm.routes.get(name) is not None or agents.is_agent_model(name)
                                         or name.startswith("rag:")),
                check_judge=judge.check, routes=routes)  # the endpoints' splits: written to the routing table
            serving = ReleaseGateway(chat, releases, metrics, similarity=_similarity(rag), judge=judge)
        front = lineage = monitor = None
        if settings.monitor.lineage:
            front = LineageRecorder(serving or chat, open_lineage_store(settings), routes,
                                    default_model=settings.default_model,
                                    variant_model=_variant_model(releases) if releases is not None else None,
                                    embed=rag.embedder.embed_documents if settings.monitor.embed_sample > 0 else None,
                                    embed_sample=settings.monitor.embed_sample, adapter_of=finetune.adapter_behind)
            lineage = Lineage(front, verdicts=_verdicts(guards), prompt_runs=lambda name, version: [
                _run(r) for r in eval_store.prompt_runs(name, version)], adapter_runs=lambda v: [
                _run(r) for r in runs_on_adapter(eval_store, path=v["path"], content_hash=v.get("hash"))],
                feedback=releases.store.feedback_for if releases is not None else None)
            monitor = build_monitor(settings, front.store, metrics, rag.embedder, releases=releases,
                                    flush=front.flush)
        container = cls(settings, metrics, keys, rate_limiter, llm, chat, prompts, rag, jobs, guards, agents, finetune,
                        eval_store, jobs=runner, releases=releases, serving=serving, front=front, lineage=lineage,
                        tracing=tracing, monitor=monitor, token_meter=meter)
        EvalJobs(container.eval_deps).register(runner, slots=settings.jobs.eval_slots)
        container.responses = ResponseStore(settings.home, url=settings.database_url)
        if settings.batch.enabled:
            container.batches = BatchService(BatchStore(settings.home, url=settings.batch.url), runner, settings.batch,
                                             load=lambda: chat.active - chat.background)
            container.batches.register(runner)
        if settings.pipelines.enabled:
            container.pipelines = PipelineService(
                open_pipeline_store(settings), runner, settings.pipelines, PipelineDeps(
                    finetune=finetune, default_model=settings.default_model, releases=releases,
                    spans=tracing.store, drift_results=monitor.store.list if monitor is not None else None,
                    eval_runs=eval_store.list_runs), home=settings.home)
            container.pipelines.register(runner)
        if features is not None:
            features.sources = FeatureSources(
                lineage=(lambda n: front.store.recent(limit=n)) if front is not None else None,
                ratings=(lambda: releases.store.ratings(limit=10_000_000)) if releases is not None else None,
                snapshots=getattr(rag, "snapshots", None))
            container.features = features
        container._register_tools()
        for server in await connect_servers(settings.mcp.servers if not schema_only else {}):
            for tool in server.tools:
                container.tools.register(tool, replace=True)
            container._closers.append(server.aclose)
        if embedder is not None:
            async def close_embedder() -> None:
                embedder.close()

            container._closers.append(close_embedder)
        if start_backends:
            container._background(container._restore_adapters())
            container.llm.on_server_restart(container._restore_after_restart)
            container.llm.expect_models(container._deployed_adapters)
        return container

    def _register_tools(self) -> None:
        """The lifecycle's tools join the agents' registry: one registry for Keel's agents and its MCP server,
        every call audited on the ``tools`` trail."""
        registry = self.agents.deps.tools
        self.tool_audit = open_tool_audit(self.settings.home, self.settings.database_url)
        registry.audit = self.tool_audit.record
        settings = self.settings

        async def submit_eval(suite: str, *, baseline: str | None = None, owner: str = "") -> dict:
            return await submit_run(self.jobs, self.eval_deps(), self.evals,
                                    load_named_suite(settings.evals.suites_dir, suite), baseline=baseline,
                                    owner=owner)

        for tool in lifecycle_tools(LifecycleServices(
                releases=self.releases, serving=self.serving, monitor=self.monitor,
                traces=self.tracing.store if self.tracing is not None else None, finetune=self.finetune,
                eval_store=self.evals, submit_eval=submit_eval if self.jobs is not None else None,
                eval_suites=lambda: suite_summaries(settings.evals.suites_dir), prompts=self.prompts,
                snapshots=getattr(self.rag, "snapshots", None), pipelines=self.pipelines, features=self.features)):
            registry.register(tool, replace=True)
        self.tools = registry

    def tool_context(self, principal: str, scopes: frozenset[str] | None) -> ToolContext:
        """What a tool call from outside an agent run (an MCP client) runs with: the key's own memory
        namespace, the retriever and the prompt registry, checked against the key's scopes."""
        return self.agents.deps.tool_context({"namespace": ["users", principal or "operator"],
                                              "principal": principal,
                                              "scopes": sorted(scopes) if scopes is not None else None})

    def mcp_server(self, *, key: str | None = None, http: bool = False):
        """The MCP server over the tools. ``http``: each request's API key decides who calls (auth off: every
        caller is the dev admin); otherwise (stdio) every call acts for ``key``, or the operator without one."""
        verify = identity = None
        default_limit = self.settings.auth.default_rate_limit_per_minute
        limits: dict[str, int] = {}  # each key's own limit, as verified
        if http and self.settings.auth.enabled:
            def verify(raw: str) -> tuple[str, frozenset[str]] | None:
                found = self.keys.verify(raw)
                if found is None:
                    return None
                limits[found.id] = found.rate_limit_per_minute or default_limit
                return found.id, found.scopes
        elif http:
            identity = ("dev", None)
        elif key is not None:
            found = self.keys.verify(key)
            if found is None:
                raise Unauthenticated("invalid or revoked API key (--key / KEEL_API_KEY)")
            identity = (found.id, found.scopes)

        def check_rate(principal: str) -> None:
            self.rate_limiter.check(principal, limits.get(principal, default_limit))

        return build_mcp_server(self.tools, self.tool_context, verify=verify, identity=identity,
                                check_rate=check_rate if verify is not None else None)

    def eval_deps(self) -> EvalDeps:
        """The ports an eval run reads: chat answers exactly as the API gives them (same guards, same RAG)."""
        guarded = self.guards is not None and self.settings.guardrails.enabled
        return EvalDeps(chat=self.chat, config=self.settings, models=self.llm.aliases, prompts=self.prompts,
                        rag=self.rag,
                        agents=self.agents, guardrails=self.guards.policy.version_tag if guarded else None,
                        policies=tuple(self.guards.policy.file.policies) if guarded else (),
                        metrics=self.metrics, tracer=self.tracing.tracer if self.tracing is not None else None)

    def start_release_controller(self) -> None:
        """Judge running canaries and A/B tests every ``releases.decide_interval_s`` (the API lifespan calls this;
        every process may run it: a decision lands once)."""
        if self.releases is not None:
            self._background(self._decide_releases())

    def start_pipeline_triggers(self) -> None:
        """Start the runs whose triggers fired, every ``pipelines.check_interval_s`` (the API lifespan calls this)."""
        if self.pipelines is not None and self.settings.pipelines.triggers:
            self._background(self.pipelines.loop())

    def start_drift_monitor(self) -> None:
        """Compare the last ``monitor.window_s`` of traffic with its reference every ``monitor.interval_s``."""
        if self.monitor is not None and self.settings.monitor.interval_s > 0:
            self._background(self.monitor.loop())

    async def _decide_releases(self) -> None:
        interval = self.settings.releases.decide_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.releases.tick)
            except Exception:  # a bad tick must not end the loop: the next one tries again
                log.exception("the release controller failed this round; retrying in %.0f s", interval)

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_for_managed_backends(self, timeout_s: float = 900.0, poll_s: float = 1.0) -> list[str]:
        """Wait until the vLLM servers Keel started itself answer (a first start compiles the model for
        minutes); returns the names still not ready at the timeout. Remote backends are not waited for:
        they are up or not, and requests to them fail fast with a clear error."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            info = await self.llm.readiness()
            pending = [n for n, i in info.items() if "server" in i and not i["ready"]]
            if not pending or asyncio.get_running_loop().time() >= deadline:
                return pending
            await asyncio.sleep(poll_s)

    async def _restore_adapters(self) -> None:
        """Promoted LoRA adapters are loaded into vLLM at run time, so a fresh server has none: put them
        back once the backends answer."""
        if not self.finetune.store.deployments():
            return
        for _ in range(600):
            if all(info["ready"] for info in (await self.llm.readiness()).values()):
                break
            await asyncio.sleep(1)
        restored = await self.finetune.restore_deployments()
        if restored:
            log.info("restored adapter deployments: %s", ", ".join(restored))

    def _deployed_adapters(self, backend: str) -> frozenset[str]:
        """The adapter names every server of ``backend`` should serve (a replica missing one gets them back)."""
        return frozenset(d["served_name"] for d in self.finetune.store.deployments()
                         if d["backend"] == backend and d.get("served_name"))

    async def _restore_after_restart(self, backend: str) -> None:
        """A vLLM server that restarted has forgotten the adapters loaded into it at run time: load them again."""
        restored = await self.finetune.restore_deployments(backend=backend)
        if restored:
            log.info("restored adapter deployments after vLLM %s restarted: %s", backend, ", ".join(restored))

    async def aclose(self) -> None:
        """Close everything, in order, each closer even when an earlier one failed (a store that failed to
        flush must not leave the others open). Failures are logged, each with its step, not raised: by now
        there is nobody to hand them to but the log, and raising made uvicorn skip the rest of its shutdown."""
        for task in list(self._tasks):
            task.cancel()
        steps: list[tuple[str, Callable[[], object]]] = [
            *((("jobs", self.jobs.aclose),) if self.jobs is not None else ()), ("agents", self.agents.aclose),
            *((("drift monitor", self.monitor.close),) if self.monitor is not None else ()),
            *((("lineage", self.front.close),) if self.front is not None else ()),
            *((("release shadows", self.serving.aclose),) if self.serving is not None else ()),
            *((("releases", self.releases.close),) if self.releases is not None else ()),
            *((("tool audit", self.tool_audit.close),) if self.tool_audit is not None else ()),
            *((("batch store", self.batches.store.close),) if self.batches is not None else ()),
            *((("response store", self.responses.close),) if self.responses is not None else ()),
            *((("pipeline store", self.pipelines.store.close),) if self.pipelines is not None else ()),
            ("fine-tune jobs", self.finetune.close), ("eval store", self.evals.close),
            *((f"closer {getattr(c, '__name__', c)}", c) for c in reversed(self._closers)),
            ("model backends", self.llm.aclose), ("routing table", self.llm.routes.close),
            *((("guardrails", self.guards.aclose),) if self.guards is not None else ()),
            ("prompt registry", self.prompts.close), ("vector store", self.rag.close),
            *((("token usage", self.token_meter.drain),) if self.token_meter is not None else ()),
            ("API keys", self.keys.close), ("rate limits", self.rate_limiter.close),
            *((("traces", self.tracing.close),) if self.tracing is not None else ()),
        ]
        failed = 0
        for name, close in steps:
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.error("shutdown: closing the %s failed: %s", name, exc, exc_info=exc)
                failed += 1
        if failed:
            log.error("shutdown finished with %d of %d steps failed (see above)", failed, len(steps))


def _release_gate(settings: Settings, chat: ChatService, evals: EvalStoreBase, rag: RagServices):
    """A canary (or green) starts only once every artifact of its variant passed its eval gate: the prompt version
    as label promotions gate it, and the collection, workflow and policy on runs that evaluated them as they are
    now."""
    age = settings.evals.gate_max_age_days
    deps = EvalDeps(chat=chat, config=settings, prompts=chat.prompts, rag=rag, agents=chat.agents)
    guarded = chat.guards is not None and settings.guardrails.enabled
    return variant_gate(
        chat, rag=rag_gate(evals, lambda c: (s.id, s.status) if (s := rag.snapshots.current(c)) else None,
                     max_age_days=age),
        workflow=workflow_gate(evals, lambda w: workflow_fingerprint(agent_identity(deps, w)), max_age_days=age),
        policy=policy_gate(evals, chat.guards.policy.version_tag, max_age_days=age) if guarded else None)


def _variant_model(releases: ReleaseService):
    def model(release: str, variant: str) -> str | None:
        r = releases.active(release)
        if r is None or variant not in {v.name for v in r.spec.variants}:
            return None
        v = r.spec.variant(variant)
        return f"agent:{v.workflow}" if v.workflow else v.model

    return model


def _verdicts(guards: GuardrailEngine | None):
    if guards is None:
        return None

    def verdicts(request_id: str) -> list[dict]:
        return [asdict(r) for r in guards.query_audit(request_id=request_id)]

    return verdicts


def _run(r) -> dict:
    return {"id": r.id, "suite": r.suite, "passed": r.passed, "prompt_hash": r.prompt_hash,
            "finished_at": r.finished_at}


def _similarity(rag: RagServices):
    """Cosine similarity of two answers on the RAG embedder (already loaded): how alike a shadow's answer is."""

    def similarity(a: str, b: str) -> float:
        va, vb = rag.embedder.embed_documents([a, b])
        return float(va @ vb / ((float(np.linalg.norm(va)) * float(np.linalg.norm(vb))) or 1.0))

    return similarity


def shared_embedder(settings: Settings):
    """The one MiniLM the API process loads: it embeds RAG queries and ingest batches and serves the guardrail
    validators. Short texts (a question, a guard input) run as a direct forward pass on a pinned one-thread
    worker, which keeps request latency steady on a busy machine; ingest batches use every core."""
    g = settings.guardrails
    return SharedEmbedder(settings.rag.embedding_model, device=settings.rag.embedding_device,
                          threads=g.embedding_threads, dtype=g.embedding_dtype, runtime=g.embedding_runtime,
                          cache_dir=g.cache_dir())


def _same_model(settings: Settings) -> bool:
    def resolved(p):
        return Path(p).resolve() if p else default_model_path().resolve()

    return resolved(settings.rag.embedding_model) == resolved(settings.guardrails.embedding_model)


def build_guards(settings: Settings, metrics: Metrics, *, embedder=None) -> GuardrailEngine:
    """The guardrail engine, offline and with its metrics on the app's registry (not warmed up)."""
    configure_offline(settings.home / "cache")
    cfg = settings.guardrails
    if not cfg.policy_path.is_absolute() and not cfg.policy_path.exists():
        # The shipped policy lives in the project tree; find it whatever the working directory.
        cfg = cfg.model_copy(update={"policy_path": _PROJECT_ROOT / cfg.policy_path})
    return GuardrailEngine(cfg, home=settings.home, registry=metrics.registry, embedder=embedder)


_PROJECT_ROOT = Path(__file__).resolve().parents[1]  # app/container.py -> the project root
