"""Evaluate a registered adapter version on eval suites, in the worker process.

The adapter is served in process by the transformers backend with peft (the base model folder
plus the version's adapter folder), under a model alias of its own (``<model>-v<version>``);
each suite's target model is overridden with that alias and the suite runs through
:class:`evals.runner.EvalRunner`, so the runs land in the same eval store as any other, with
the adapter folder in their identity, where :func:`finetune.gate.adapter_gate` finds them.

The worker does not build a full :class:`~app.container.Container`: that would start
the agent service (which marks the API's in-flight agent runs as stalled), open the vector store
(one writer) and the guardrails. A suite evaluates the model itself, so guardrails are off here
(``identity["guardrails"]`` is None on these runs); RAG targets are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import InvalidRequest, KeelError
from app.core.metrics import Metrics
from app.core.settings import BackendSettings, ModelAlias
from app.llm.router import ModelRouter
from app.services.chat import ChatService
from evals.runner import EvalConfigError, EvalDeps, EvalRunner
from evals.suite import SuiteError, find_named_suite, load_suite, suite_dirs
from finetune.serving import lora_name
from finetune.verdicts import AdapterEvaluation, SuiteResult
from prompts.factory import build_registry

if TYPE_CHECKING:
    from app.llm.base import LLMBackend
    from evals.store import EvalStoreBase
    from evals.suite import Suite
    from finetune.settings import FinetuneConfig
    from finetune.tracking import AdapterVersion

log = logging.getLogger("keel.finetune.evaluate")

EVAL_BACKEND = "finetune-eval"


class EvalInterrupted(Exception):
    """The worker is shutting down; the evaluation goes back to the queue (its runs resume)."""


def eval_alias(version: AdapterVersion) -> str:
    return lora_name(version)


def eval_settings(settings: FinetuneConfig, *, base_model: Path, adapter: Path, alias: str) -> FinetuneConfig:
    """A copy of ``settings`` with one in-process backend serving ``adapter`` on ``base_model`` as ``alias``."""
    fs = settings.finetune
    backend = BackendSettings(kind="transformers", model_path=base_model, device=fs.device, dtype=fs.eval_dtype,
                              retries=0)
    model = ModelAlias(backend=EVAL_BACKEND, model=base_model.name, adapter=adapter,
                       description=f"adapter under evaluation ({adapter})")
    guardrails = settings.guardrails.model_copy(update={"enabled": False})
    return settings.model_copy(update={"backends": {EVAL_BACKEND: backend}, "models": {alias: model},
                                       "default_model": alias, "guardrails": guardrails})


def suite_for(suite: Suite, alias: str) -> Suite:
    """The suite with its target model replaced by ``alias`` (prompt targets keep their template)."""
    model = suite.target.model or ""
    if model.startswith(("rag:", "agent:")):
        # Replacing these with the adapter's alias would silently evaluate something else.
        raise InvalidRequest(f"suite {suite.name!r} targets {model!r}; an adapter is evaluated with a model or "
                             "prompt target", param="evals", code="invalid_eval_suite")
    return suite.model_copy(update={"target": suite.target.model_copy(update={"model": alias})})


def _result(suite: str, run: Any) -> SuiteResult:
    verdict = run.verdict or {}
    summary = run.summary or {}
    metrics = {k: m.get("mean") for k, m in (summary.get("metrics") or {}).items()}
    return SuiteResult(suite=suite, passed=bool(run.passed), run_id=run.id, metrics=metrics,
                       pass_rate=summary.get("pass_rate"), failing_metrics=list(verdict.get("failing_metrics", [])),
                       reasons=list(verdict.get("reasons", [])))


async def evaluate_adapter(settings: FinetuneConfig, version: AdapterVersion, suites: Sequence[str], *,
                           base_model: Path,
                           store: EvalStoreBase, backend: LLMBackend | None = None,
                           should_stop: Callable[[], bool] | None = None, poll_s: float = 0.5) -> AdapterEvaluation:
    """Run ``suites`` (names or files) on ``version`` and return each suite's verdict.

    ``backend`` replaces the in-process transformers backend (tests). ``should_stop`` is polled
    while a suite runs; when it turns true the run is cancelled (the runner marks it interrupted
    and resumes it next time) and :class:`EvalInterrupted` is raised."""
    adapter = version.local_path()
    alias = eval_alias(version)
    es = eval_settings(settings, base_model=base_model, adapter=adapter, alias=alias)
    loaded: list[tuple[str, Suite | None, str | None]] = []
    for name in suites:
        try:
            # by name from the suites folders only, as the API loads them: a job spec is remote input too
            path = find_named_suite(name, settings.evals.suites_dir)
            suite = load_suite(path, roots=suite_dirs(settings.evals.suites_dir))
            loaded.append((name, suite_for(suite, alias), None))
        except (SuiteError, KeelError) as exc:
            loaded.append((name, None, getattr(exc, "message", None) or str(exc)))
    prompts = None
    if any(s is not None and s.target.prompt for _, s, _ in loaded):
        prompts = build_registry(es)
    router = ModelRouter(es, Metrics(), {EVAL_BACKEND: backend} if backend is not None else None)
    # guardrails off and no RAG or agents: a suite evaluates the model itself (see the module docstring)
    deps = EvalDeps(chat=ChatService(es, router, router.metrics, prompts), config=es, prompts=prompts)
    runner = EvalRunner(deps, store, progress=False)
    results: list[SuiteResult] = []
    try:
        for name, suite, error in loaded:
            if suite is None:
                results.append(SuiteResult(suite=name, passed=False, error=error))
                continue
            log.info("evaluating %s on suite %s (%d cases)", version.ref, suite.name, len(suite.cases))
            try:
                outcome = await _until_stopped(runner.run(suite), should_stop, poll_s)
            except (EvalConfigError, KeelError) as exc:
                results.append(SuiteResult(suite=suite.name, passed=False,
                                           error=getattr(exc, "message", None) or str(exc)))
                continue
            results.append(_result(suite.name, outcome.run))
    finally:
        await router.aclose()
        if prompts is not None:
            prompts.close()
    return AdapterEvaluation(model=version.model, version=version.version, alias=alias, adapter=str(adapter),
                             suites=results)


async def _until_stopped(coro: Any, should_stop: Callable[[], bool] | None, poll_s: float) -> Any:
    task = asyncio.ensure_future(coro)
    if should_stop is None:
        return await task
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and should_stop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise EvalInterrupted("the worker is shutting down")
    return task.result()
