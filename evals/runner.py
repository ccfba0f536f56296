"""Run a suite in-process through a chat port (the :class:`ChatService`): concurrent, cached, resumable, stored.

The runner sees the system it evaluates through :class:`EvalDeps`, a handful of narrow ports the
composition root fills in (``Container.eval_deps()``; the fine-tune worker builds its own), never the
whole container.

Identity: before any case runs, the target is resolved to exactly what will answer (prompt name,
version and content hash; model alias, backend model and adapter; RAG collection, latest ingest
snapshot, RAG prompt hash and embedding model; agent workflow and its settings; guardrail policy
version) and hashed together with the suite hash and, for suites with judged metrics, the judge.
That identity key names the run and decides resumption: re-running an interrupted run of the same
identity continues it, skipping the cases already stored. The response cache is keyed by the part
of the identity that decides the answer (not the metrics, gate or judge) plus each case's input, so
changing a threshold or the judge re-scores stored answers instead of asking the model again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Tracer

from app.core.errors import KeelError
from app.core.metrics import Metrics
from app.core.paths import tree_hash
from app.core.settings import BackendSettings, ModelAlias
from app.core.types import ChatMessage, GenerationParams
from app.llm.vllm_server import server_api_key
from app.services.chat import ChatRequest, ChatResult, PromptUse
from app.services.grounding import RagUse
from evals.metrics import MetricEnv, Sample, compute, registry, verdict
from evals.report import evaluate_gate, summarize
from evals.settings import EvalConfig, EvalSettings
from evals.store import EvalStoreBase, RunRow
from evals.suite import Case, Suite

if TYPE_CHECKING:
    from agents.service import AgentService
    from ingest.factory import RagServices
    from prompts.models import TemplateVersion
    from prompts.registry import RenderedPrompt

log = logging.getLogger("keel.evals")


class EvalConfigError(ValueError):
    """The suite cannot run against this server (unknown model, prompt, collection...): exit code 2."""


@dataclass
class RunOutcome:
    run: RunRow
    executed: int  # cases answered by the model in this invocation
    cached: int  # cases answered from the response cache
    skipped: int  # cases already stored by an earlier, interrupted invocation


def _h(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# Identity fields that do not change the answer: they name the run but do not key the response cache.
_SCORING_ONLY = ("suite", "suite_hash", "judge")


class ChatPort(Protocol):
    """Answers one request, guarded and grounded as the API would answer it."""

    async def complete(self, request: ChatRequest) -> ChatResult: ...


class PromptPort(Protocol):
    def resolve(self, ref: str) -> TemplateVersion: ...

    def render(self, ref: str, variables: Mapping[str, Any]) -> RenderedPrompt: ...


@dataclass
class EvalDeps:
    """What a run reads from the system it evaluates. ``prompts``, ``rag`` and ``agents`` are needed only by
    suites that target them (a run that needs a missing one fails with :class:`EvalConfigError`);
    ``guardrails`` is the policy tag answers are checked under (None: unguarded), ``metrics`` counts the
    errors the harness absorbs (None: logged only)."""

    chat: ChatPort
    config: EvalConfig
    prompts: PromptPort | None = None
    rag: RagServices | None = None
    agents: AgentService | None = None
    guardrails: str | None = None
    policies: Collection[str] = ()  # the guardrail policies a suite's target may name (none: guardrails off)
    metrics: Metrics | None = None
    models: Mapping[str, ModelAlias] = field(default_factory=dict)
    tracer: Tracer | None = None  # a span per case (answer and scores) under the caller's: a job's trace

    def __post_init__(self) -> None:
        self.models = self.models or self.config.models

    @property
    def settings(self) -> EvalSettings:
        return self.config.evals


def judge_endpoint(settings: EvalConfig) -> tuple[str | None, str | None]:
    """(base URL, model) of the LLM judge: the configured one, else the default model's own backend
    (the local vLLM server), so ragas metrics work offline without extra configuration."""
    cfg = settings.evals
    base_url, model = cfg.judge_base_url, cfg.judge_model
    alias = settings.models.get(settings.default_model)
    backend = settings.backends.get(alias.backend) if alias else None
    if model is None and alias is not None:
        model = alias.model
    if base_url is None and backend is not None and backend.kind in ("vllm", "openai"):
        managed = backend.managed
        base_url = backend.base_url or (f"http://{managed.host}:{managed.port}/v1" if managed else None)
    return base_url, model


def judge_backend(settings: EvalConfig) -> BackendSettings | None:
    """The backend settings the judge's client takes its connect timeout, retries and breaker from: the default
    model's backend when the judge is that backend's server (no ``judge_base_url``), else the defaults."""
    if settings.evals.judge_base_url is not None:
        return None
    alias = settings.models.get(settings.default_model)
    return settings.backends.get(alias.backend) if alias else None


def count_swallowed(metrics: Metrics | None, where: str) -> None:
    """``keel_eval_swallowed_errors_total{where}``: an error the harness handled without failing the case or the
    run. A host without metrics (the fine-tune worker's) only logs it."""
    if metrics is not None:
        metrics.eval_swallowed.labels(where).inc()


def judge_api_key(settings: EvalConfig, base_url: str | None) -> str | None:
    """The configured judge key, else the key the server at ``base_url`` requires (a vLLM server refuses
    requests without it)."""
    if settings.evals.judge_api_key is not None:
        return settings.evals.judge_api_key.get_secret_value()
    return server_api_key(settings, base_url) if base_url else None


def _event(e: Any) -> dict[str, Any]:
    out = asdict(e) if is_dataclass(e) else {"repr": repr(e)}
    out["type"] = type(e).__name__
    return out


def _snapshot_id(rag: RagServices, collection: str) -> str | None:
    snap = rag.snapshots.latest(collection, with_files=False)  # the documents as the last finished ingest left them
    return snap.id if snap is not None else None


def agent_identity(d: EvalDeps, workflow: str) -> dict[str, Any]:
    """The workflow, the settings that steer it, the model it calls, and the collection, snapshot and
    answer prompt it retrieves and renders with."""
    agents = d.agents
    if agents is None:
        raise EvalConfigError("this server runs no agent service, so agent:<workflow> targets cannot run")
    if d.rag is None:
        raise EvalConfigError("this host has no RAG services, so RAG and agent targets cannot run")
    if d.prompts is None:
        raise EvalConfigError("this host has no prompt registry, so prompt and RAG targets cannot run")
    wf = agents.registry.get(workflow)  # WorkflowNotFound (a KeelError) names the available ones
    # What the running service was built with (its deps), not what the settings say now.
    a = agents.deps.settings
    out: dict[str, Any] = {"workflow": wf.name, "description": wf.description,
                           "model": getattr(agents.deps.llm, "alias", None) or a.model or d.config.default_model,
                           "settings": a.model_dump(mode="json", exclude={"checkpoint_db", "postgres_url"})}
    coll = agents.deps.collection
    out["rag"] = {"collection": coll,
                  "snapshot": _snapshot_id(d.rag, coll) if coll in d.rag.store.list_collections() else None,
                  "embedding_model": d.rag.embedder.model_id}
    try:
        rv = d.prompts.resolve("rag-answer@production")
        out["prompt"] = {"name": rv.name, "version": rv.version, "hash": rv.hash}
    except KeelError:  # the workflow falls back to its built-in answer prompt
        out["prompt"] = None
    return out


class EvalRunner:
    def __init__(self, deps: EvalDeps, store: EvalStoreBase, *, env: MetricEnv | None = None,
                 concurrency: int | None = None, use_cache: bool | None = None, progress: bool = True) -> None:
        cfg = deps.settings
        self.deps = deps
        self.store = store
        if env is None:
            base_url, model = judge_endpoint(deps.config)
            # Without a configured embedding model, share the RAG embedder already loaded (same MiniLM).
            embedder = None if cfg.embedding_model or deps.rag is None else deps.rag.embedder
            env = MetricEnv(embedder=embedder, embedding_model=cfg.embedding_model, judge_base_url=base_url,
                            judge_model=model, judge_api_key=judge_api_key(deps.config, base_url),
                            judge_temperature=cfg.judge_temperature, judge_max_tokens=cfg.judge_max_tokens,
                            judge_frequency_penalty=cfg.judge_frequency_penalty, judge_timeout_s=cfg.judge_timeout_s,
                            judge_retries=cfg.judge_retries, judge_backend=judge_backend(deps.config),
                            metrics=deps.metrics)
        self.env = env
        self.concurrency = concurrency or cfg.concurrency
        self.use_cache = cfg.cache if use_cache is None else use_cache
        self.progress = progress

    # --- identity ---------------------------------------------------------------------------------
    def identity(self, suite: Suite) -> dict[str, Any]:
        d = self.deps
        t = suite.target
        ident: dict[str, Any] = {"kind": t.kind, "suite": suite.name, "suite_hash": suite.hash,
                                 "params": t.params.model_dump(), "system": t.system, "variables": t.variables}
        model_alias = t.model
        try:
            if t.prompt:
                v = self._prompts().resolve(t.prompt)
                ident["prompt"] = {"ref": t.prompt, "name": v.name, "version": v.version, "hash": v.hash}
                model_alias = model_alias or v.content.params.model
            if t.rag_collection:
                coll = t.rag_collection
                rag = self._rag()
                if coll not in rag.store.list_collections():
                    raise EvalConfigError(f"RAG collection {coll!r} does not exist; ingest documents into it first")
                rv = self._prompts().resolve(RagUse(collection=coll).prompt_ref)
                ident["rag"] = {"collection": coll, "top_k": t.top_k or d.config.rag.retrieval.top_k,
                                "snapshot": _snapshot_id(rag, coll),
                                "embedding_model": rag.embedder.model_id,
                                "prompt": {"name": rv.name, "version": rv.version, "hash": rv.hash}}
                model_alias = None
            if t.agent_workflow:
                ident["agent"] = agent_identity(d, t.agent_workflow)
                model_alias = ident["agent"]["model"]
        except KeelError as e:
            raise EvalConfigError(e.message) from e
        alias = model_alias or d.config.default_model
        if alias not in d.models:
            raise EvalConfigError(f"unknown model alias {alias!r}; configured: {', '.join(d.models)}")
        m = d.models[alias]
        ident["model"] = {"alias": alias, "backend": m.backend, "name": m.model,
                          "adapter": str(m.adapter) if m.adapter else None,
                          "defaults": m.defaults.model_dump()}
        if m.adapter and Path(m.adapter).is_dir():
            # the content identity the adapter gate matches, whichever folder this copy lives in
            ident["model"]["adapter_hash"] = tree_hash(m.adapter)
        ident["guardrails"] = d.guardrails
        if t.policy is not None:  # only when named: every older run's identity (and cache key) stays as it was
            if t.policy not in d.policies:
                have = ", ".join(sorted(d.policies)) or "none: guardrails are off on this server"
                raise EvalConfigError(f"no guardrail policy {t.policy!r} (available: {have})")
            ident["policy"] = t.policy
        judged = sorted({m.name for m in suite.metrics if registry[m.name].judged})
        if judged and not self.env.has_judge:
            raise EvalConfigError(f"metric(s) {', '.join(judged)} need an LLM judge: set evals.judge_base_url and "
                                  "evals.judge_model (KEEL_EVALS__JUDGE_BASE_URL, KEEL_EVALS__JUDGE_MODEL)")
        ident["judge"] = self.env.judge_identity() if judged else None
        return ident

    def _prompts(self) -> PromptPort:
        if self.deps.prompts is None:
            raise EvalConfigError("this host has no prompt registry, so prompt and RAG targets cannot run")
        return self.deps.prompts

    def _rag(self) -> RagServices:
        if self.deps.rag is None:
            raise EvalConfigError("this host has no RAG services, so RAG and agent targets cannot run")
        return self.deps.rag

    def _system_prompt(self, suite: Suite, case: Case) -> str | None:
        parts = [suite.target.system] if suite.target.system else []
        if suite.target.prompt:
            try:
                rendered = self._prompts().render(suite.target.prompt, {**suite.target.variables,
                                                                        **case.variables})
                parts += [m.content for m in rendered.messages if m.role == "system"]
            except Exception as exc:
                # The case's answer call fails on the same render error, but a cached answer is scored without
                # this system prompt: the leak metrics then check less than they say. Make it visible.
                log.warning("suite %s, case %s: rendering %s for the metrics failed: %s", suite.name, case.id,
                            suite.target.prompt, exc, exc_info=exc)
                count_swallowed(self.deps.metrics, "render_system_prompt")
        return "\n".join(parts) or None

    def _request(self, suite: Suite, case: Case, ident: dict[str, Any], run_id: str) -> ChatRequest:
        t = suite.target
        messages = []
        if t.system:
            messages.append(ChatMessage("system", t.system))
        if case.input:
            messages.append(ChatMessage("user", case.input))
        prompt = None
        if t.prompt:
            p = ident["prompt"]
            # The exact version resolved at the start: a label moved mid-run changes nothing.
            prompt = PromptUse(f"{p['name']}@{p['version']}", {**t.variables, **case.variables})
        rag = RagUse(collection=t.rag_collection, top_k=t.top_k) if t.rag_collection else None
        pp = t.params
        params = GenerationParams(max_tokens=pp.max_tokens, temperature=pp.temperature, top_p=pp.top_p, seed=pp.seed)
        model = None if rag else (t.model or None)  # agent:<workflow> is routed by ChatService
        return ChatRequest(model=model, messages=tuple(messages), params=params, prompt=prompt, rag=rag,
                           policy=t.policy, background=True, request_id=f"eval-{run_id[-6:]}-{case.id}"[:120])

    # --- one case -----------------------------------------------------------------------------------
    async def _answer(self, suite: Suite, case: Case, ident: dict[str, Any], run_id: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            res = await self.deps.chat.complete(self._request(suite, case, ident, run_id))
        except KeelError as e:
            return {"error": f"{e.code}: {e.message}", "latency_ms": (time.perf_counter() - t0) * 1000}
        latency = (time.perf_counter() - t0) * 1000
        cites = res.citations or []
        return {
            "output": "".join(res.texts.get(0, [])), "latency_ms": round(latency, 3),
            "finish_reason": res.finish.get(0), "model": res.model,
            "prompt_tokens": res.usage.prompt_tokens if res.usage else 0,
            "completion_tokens": res.usage.completion_tokens if res.usage else 0,
            "citations": cites, "contexts": [c.get("text", "") for c in cites],
            "prompt_ref": res.prompt_ref, "prompt_hash": res.prompt_hash, "guardrails": res.guardrails,
            "guardrail_events": [_event(e) for e in res.guardrail_events], "error": None,
        }

    async def _score(self, suite: Suite, case: Case, record: dict[str, Any]) -> dict[str, Any]:
        sample = Sample(
            case=case, output=record.get("output", ""), citations=record.get("citations", []),
            contexts=record.get("contexts", []), latency_ms=record.get("latency_ms", 0.0),
            prompt_tokens=record.get("prompt_tokens", 0), completion_tokens=record.get("completion_tokens", 0),
            finish_reason=record.get("finish_reason"), guardrail_events=record.get("guardrail_events", []),
            system_prompt=self._system_prompt(suite, case), env=self.env,
        )
        scores: dict[str, Any] = {}
        for spec in suite.metrics:
            if not spec.applies(case):
                continue
            metric = registry[spec.name]
            threshold = suite.threshold(spec)
            try:
                s = await compute(metric, sample, spec.params, spec.samples)
            except Exception as e:  # one broken metric must not sink the run: it fails this case
                log.warning("metric %s failed on case %s: %s", spec.key, case.id, e)
                scores[spec.key] = {"value": None, "threshold": threshold, "passed": False, "uncertain": False,
                                    "error": f"{type(e).__name__}: {e}", "higher_is_better": metric.higher_is_better}
                continue
            if math.isnan(s.value):
                # The judge produced no usable sample: not a score of 0, an unknown, counted by the suite's
                # judge_errors policy.
                log.warning("judge gave no score for %s on case %s: %s", spec.key, case.id, s.reason)
                scores[spec.key] = {"value": None, "threshold": threshold, "passed": False,
                                    "uncertain": suite.gate.judge_errors == "uncertain", "judge_error": True,
                                    "judge_errors": len(s.judge_errors), "error": s.reason, "reason": s.reason,
                                    "higher_is_better": metric.higher_is_better}
                continue
            passed, uncertain = verdict(s.value, threshold, metric.higher_is_better, s.ci)
            scores[spec.key] = {"value": s.value, "threshold": threshold, "passed": passed, "uncertain": uncertain,
                                "ci": list(s.ci) if s.ci else None,
                                "samples": s.samples if len(s.samples) > 1 else None,
                                "judge_errors": len(s.judge_errors) or None,
                                "reason": s.reason, "higher_is_better": metric.higher_is_better}
        return scores

    @staticmethod
    def answer_key(ident: dict[str, Any]) -> str:
        """Hash of what decides the answers (the identity without suite, metrics, gate and judge)."""
        return _h({k: v for k, v in ident.items() if k not in _SCORING_ONLY})

    def cache_key(self, answer_key: str, suite: Suite, case: Case) -> str:
        t = suite.target
        return _h({"identity": answer_key, "input": case.input, "variables": {**t.variables, **case.variables}})

    async def _case(self, suite: Suite, case: Case, ident: dict[str, Any], answer_key: str, run_id: str,
                    sem: asyncio.Semaphore, counts: dict[str, int]) -> None:
        async with sem:
            tracer = self.deps.tracer or trace.NoOpTracer()
            with tracer.start_as_current_span("keel.eval.case", attributes={
                    "keel.eval.suite": suite.name, "keel.eval.case": case.id, "keel.eval.run_id": run_id}) as span:
                await self._case_in(suite, case, ident, answer_key, run_id, counts, span)

    async def _case_in(self, suite: Suite, case: Case, ident: dict[str, Any], answer_key: str, run_id: str,
                       counts: dict[str, int], span: Any) -> None:
        key = self.cache_key(answer_key, suite, case)
        record = await asyncio.to_thread(self.store.cache_get, key) if self.use_cache else None
        cached = record is not None
        if record is None:
            record = await self._answer(suite, case, ident, run_id)
            if record.get("error") is None and self.use_cache:
                await asyncio.to_thread(self.store.cache_put, key, record)
        scores = {} if record.get("error") else await self._score(suite, case, record)
        span.set_attributes({"keel.eval.cached": cached, "keel.eval.error": record.get("error") or "",
                             **{f"keel.eval.score.{m}": float(v["value"]) for m, v in scores.items()
                                if isinstance(v, dict) and isinstance(v.get("value"), int | float)}})
        if await asyncio.to_thread(functools.partial(
                self.store.save_result, run_id, case.id, record=record, scores=scores, error=record.get("error"),
                cached=cached)):
            counts["cached" if cached else "executed"] += 1

    # --- a run ----------------------------------------------------------------------------------------
    async def run(self, suite: Suite, *, resume: str | None = None, baseline: str | None = None,
                  fresh: bool = False) -> RunOutcome:
        # The store may be a Postgres across the network: its calls run off the event loop.
        ident = self.identity(suite)
        run, run_id, done = await asyncio.to_thread(self._open, suite, ident, resume, baseline, fresh)
        if run is not None and run.status == "completed":
            return RunOutcome(run, 0, 0, run.cases_total)
        todo = [c for c in suite.cases if c.id not in done]
        counts = {"executed": 0, "cached": 0}
        sem = asyncio.Semaphore(suite.concurrency or self.concurrency)
        completed = False
        try:
            await self._drive(suite, todo, ident, self.answer_key(ident), run_id, sem, counts, len(done))
            completed = True
        finally:
            if not completed:
                await asyncio.to_thread(self.store.set_status, run_id, "interrupted")
        await asyncio.to_thread(self.finish, suite, run_id,
                                baseline if baseline is not None else (run.baseline if run else None))
        return RunOutcome(await asyncio.to_thread(self.store.get_run, run_id), counts["executed"], counts["cached"],
                          len(done))

    def _open(self, suite: Suite, ident: dict[str, Any], resume: str | None, baseline: str | None,
              fresh: bool) -> tuple[RunRow | None, str, set[str]]:
        """The run to (re)start: (its row when it existed, its id, the cases already stored)."""
        ident_key = _h(ident)
        if baseline is not None:
            self.store.get_run(baseline)  # NotFound early
        run: RunRow | None = None
        if resume is not None:
            run = self.store.get_run(resume)
            if run.identity_key != ident_key:
                raise EvalConfigError(f"run {resume} evaluated something else (the suite, prompt, model, index or"
                                      " guardrail policy changed); start a new run instead")
        elif not fresh:
            run = self.store.unfinished_run(ident_key)
        if run is not None and run.status == "completed":
            return run, run.id, set()
        if run is None:
            run_id = self.store.create_run(suite=suite.name, suite_hash=suite.hash, identity_key=ident_key,
                                           identity=ident, cases_total=len(suite.cases), baseline=baseline)
        else:
            run_id = run.id
            self.store.set_status(run_id, "running")
            if baseline is not None:
                self.store.set_baseline(run_id, baseline)
        return run, run_id, self.store.done_cases(run_id)

    async def _drive(self, suite: Suite, todo: list[Case], ident: dict[str, Any], answer_key: str, run_id: str,
                     sem: asyncio.Semaphore, counts: dict[str, int], already: int) -> None:
        coros = [self._case(suite, c, ident, answer_key, run_id, sem, counts) for c in todo]
        if not self.progress:
            await asyncio.gather(*coros)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn()) as bar:
            task = bar.add_task(suite.name, total=already + len(todo), completed=already, info="")

            async def tracked(coro: Any) -> None:
                await coro
                bar.update(task, advance=1, info=f"cached {counts['cached']}")

            await asyncio.gather(*(tracked(c) for c in coros))

    def finish(self, suite: Suite, run_id: str, baseline: str | None) -> None:
        results = self.store.results(run_id)
        base = self.store.results(baseline) if baseline else None
        summary = summarize(suite, results)
        v = evaluate_gate(suite, results, base)
        self.store.finish_run(run_id, passed=v["passed"], summary=summary, verdict=v)
