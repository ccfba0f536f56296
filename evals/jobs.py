"""Eval runs as durable jobs (kind ``eval``, :mod:`app.jobs`): what ``POST /v1/evals/runs`` starts.

The job's payload names the suite (in the suites folders, never a path), the baseline and the cache switch;
the handler loads the suite when the job runs and drives :class:`~evals.runner.EvalRunner`. A job interrupted
by a shutdown or a crash runs again after the next start, and the runner resumes the interrupted run of the
same identity (its answered cases are stored), so the job's run keeps its id. Progress while it runs:
``{"run_id", "cases_done", "cases_total"}``; result: the run's id, status and verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from app.core.errors import InvalidRequest, KeelError
from app.jobs import Job, JobContext, JobRunner
from evals.runner import EvalConfigError, EvalDeps, EvalRunner, count_swallowed
from evals.store import EvalStoreBase, open_eval_store
from evals.suite import Suite, SuiteError, find_named_suite, load_suite, suite_dirs

KIND = "eval"
PROGRESS_EVERY_S = 1.0


def load_named_suite(suites_dir: Any, name: str) -> Suite:
    """A suite by name from the suites folders only: a caller must not make the server read other files."""
    try:
        return load_suite(find_named_suite(name, suites_dir), roots=suite_dirs(suites_dir))
    except SuiteError as e:
        raise InvalidRequest(str(e), param="suite") from e


def payload(suite: str, *, baseline: str | None = None, use_cache: bool = True) -> dict[str, Any]:
    return {"suite": suite, "baseline": baseline, "use_cache": use_cache}


async def submit_run(runner: JobRunner, deps: EvalDeps, store: EvalStoreBase, suite: Suite, *,
                     baseline: str | None = None, use_cache: bool = True, owner: str = "",
                     idempotency_key: str | None = None) -> dict[str, Any]:
    """Start a suite run (loaded with :func:`load_named_suite`) as a durable job: what ``POST /v1/evals/runs``
    and the ``eval_run`` tool do. Checked now, so that a suite that cannot run here is a clear error, not a
    failed job."""
    try:
        ident = EvalRunner(deps, store, use_cache=use_cache, progress=False).identity(suite)
    except EvalConfigError as e:
        raise InvalidRequest(str(e), param="suite") from e
    if baseline is not None:
        await asyncio.to_thread(store.get_run, baseline)  # not found now rather than a failed job
    job = await runner.submit(KIND, payload(suite.name, baseline=baseline, use_cache=use_cache), owner=owner,
                              idempotency_key=idempotency_key)
    return {"status": "started", "suite": suite.name, "suite_hash": suite.hash, "cases": len(suite.cases),
            "target": ident.get("prompt") or ident.get("rag") or ident.get("model"), "job_id": job.id,
            "job": job.public()}


class EvalJobs:
    """The ``eval`` handler. ``deps`` builds the ports a run reads (``Container.eval_deps``), called when a
    job starts so that it sees the settings and services as they are then."""

    def __init__(self, deps: Callable[[], EvalDeps]) -> None:
        self.deps = deps

    def register(self, runner: JobRunner, *, slots: int = 1) -> None:
        # Interruptible: a cancel or the shutdown cancels the run's task; the runner marks the run interrupted
        # and keeps its answered cases, so the next attempt resumes it.
        runner.register(KIND, self, slots=slots, interruptible=True)

    async def __call__(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        deps = self.deps()
        cfg = deps.config
        p = job.payload
        suite = load_named_suite(cfg.evals.suites_dir, p["suite"])
        store = open_eval_store(cfg)
        watch: asyncio.Task | None = None
        try:
            runner = EvalRunner(deps, store, use_cache=p.get("use_cache", True), progress=False)
            try:
                ident = runner.identity(suite)
            except EvalConfigError as e:
                raise InvalidRequest(str(e), param="suite") from e
            watch = asyncio.create_task(self._watch(store, suite, ident, ctx))
            try:
                outcome = await runner.run(suite, baseline=p.get("baseline"))
            except EvalConfigError as e:
                raise InvalidRequest(str(e), param="suite") from e
            except (KeelError, asyncio.CancelledError):
                raise
            except Exception:
                count_swallowed(deps.metrics, "background_run")
                raise
            run = outcome.run
            ctx.set_progress({"run_id": run.id, "cases_done": run.cases_total, "cases_total": run.cases_total})
            return {"run_id": run.id, "suite": run.suite, "status": run.status, "passed": run.passed,
                    "executed": outcome.executed, "cached": outcome.cached, "skipped": outcome.skipped}
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            store.close()

    @staticmethod
    async def _watch(store: EvalStoreBase, suite: Suite, ident: dict[str, Any], ctx: JobContext) -> None:
        """Report the run's id and the cases stored so far, once the runner has created (or resumed) it."""
        stored = json.loads(json.dumps(ident, sort_keys=True))  # the identity as the store keeps it
        run_id: str | None = None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            if run_id is None:  # the store may be a Postgres across the network: off the event loop
                runs = await asyncio.to_thread(store.list_runs, suite=suite.name, limit=20)
                run_id = next((r.id for r in runs if r.status == "running" and r.identity == stored), None)
            if run_id is not None:
                done = await asyncio.to_thread(store.done_cases, run_id)
                ctx.set_progress({"run_id": run_id, "cases_done": len(done), "cases_total": len(suite.cases)})
