"""Evaluations over HTTP: list suites and runs, show a run, its HTML report, start a suite run (a durable job:
list, show and cancel eval jobs).

Include with ``app.include_router(evals.router)`` in app/api/main.py. Scope: ``evals`` (admin has all).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from app.api.deps import ContainerDep, EvalsKey, EvalStoreDep, SettingsDep
from app.jobs import JobState
from app.security.keys import ApiKey
from app.settings import Settings
from evals import jobs as eval_jobs
from evals.report import html_report, run_json
from evals.suite import suite_summaries

router = APIRouter(prefix="/v1/evals", tags=["evals"])
log = logging.getLogger("keel.evals")


def _load(settings: Settings, name: str):
    """A suite by name from the suites folders only: a caller must not make the server read other files."""
    return eval_jobs.load_named_suite(settings.evals.suites_dir, name)


class RunIn(BaseModel):
    suite: str = Field(min_length=1, max_length=200, description="Suite name in the suites folder (evals.suites_dir "
                       "or the shipped evals/suites); not a path.")
    baseline: str | None = Field(default=None, max_length=100)
    use_cache: bool = True


@router.get("/suites")
async def list_suites(_key: EvalsKey, settings: SettingsDep) -> list[dict[str, Any]]:
    return suite_summaries(settings.evals.suites_dir)


@router.get("/runs")
def list_runs(_key: EvalsKey, store: EvalStoreDep, suite: str | None = None,
              limit: int = Query(default=50, ge=1, le=500)) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.public().items() if k != "summary"} for r in store.list_runs(suite=suite, limit=limit)]


@router.get("/runs/{run_id}")
def show_run(_key: EvalsKey, store: EvalStoreDep, run_id: str, cases: bool = False) -> dict[str, Any]:
    run = store.get_run(run_id)
    if not cases:
        return run.public()
    return run_json(run, store.results(run_id))


@router.get("/runs/{run_id}/report.html", response_class=HTMLResponse)
def run_report(_key: EvalsKey, settings: SettingsDep, store: EvalStoreDep, run_id: str) -> HTMLResponse:
    run = store.get_run(run_id)
    suite = _load(settings, run.suite)
    base = (store.get_run(run.baseline), store.results(run.baseline)) if run.baseline else None
    return HTMLResponse(html_report(suite, run, store.results(run_id), base))


@router.post("/runs", status_code=202)
async def start_run(key: EvalsKey, container: ContainerDep, store: EvalStoreDep, body: RunIn,
                    idempotency_key: str | None = Header(default=None, alias="Idempotency-Key", max_length=200)
                    ) -> dict[str, Any]:
    """Start a suite in the background (the server's own ChatService) as a durable job: poll
    ``GET /v1/evals/jobs/{job_id}`` (its run's id is in ``progress.run_id`` once it runs) or
    ``GET /v1/evals/runs?suite=``; cancel with ``POST /v1/evals/jobs/{job_id}/cancel``. A job interrupted by a
    restart runs again after the next start and resumes its run. ``Idempotency-Key``: a retried request returns
    the job of the first one."""
    suite = _load(container.settings, body.suite)  # a name, never a path: refused before any service is touched
    return await eval_jobs.submit_run(container.jobs, container.eval_deps(), store, suite,
                                      baseline=body.baseline, use_cache=body.use_cache, owner=key.id,
                                      idempotency_key=idempotency_key)


def _owner(key: ApiKey) -> str | None:
    """Whose jobs the caller sees: its own, or every job for an admin (None)."""
    return None if "admin" in key.scopes else key.id


@router.get("/jobs")
async def list_jobs(key: EvalsKey, container: ContainerDep, state: JobState | None = None,
                    limit: int = Query(default=50, ge=1, le=500)) -> list[dict[str, Any]]:
    """The caller's eval jobs (runs started through the API), newest first; an admin sees everyone's."""
    jobs = await container.jobs.list(kinds=[eval_jobs.KIND], owner=_owner(key),
                                     states=[state] if state else None, limit=limit)
    return [j.public() for j in jobs]


@router.get("/jobs/{job_id}")
async def show_job(key: EvalsKey, container: ContainerDep, job_id: str,
                   wait_s: float = Query(0, ge=0, le=60, description="Long-poll until done.")) -> dict[str, Any]:
    if wait_s:
        job = await container.jobs.wait(job_id, wait_s, owner=_owner(key), kinds=[eval_jobs.KIND])
    else:
        job = await container.jobs.get(job_id, owner=_owner(key), kinds=[eval_jobs.KIND])
    return job.public()


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(key: EvalsKey, container: ContainerDep, job_id: str, request: Request) -> dict[str, Any]:
    """Cancel an eval job: a queued one at once; a running one stops now (its run is left ``interrupted``, the
    cases answered so far kept). 409 if it already ended. Audited (trail ``jobs``)."""
    job = await container.jobs.cancel(job_id, owner=_owner(key), kinds=[eval_jobs.KIND], actor=key.id,
                                      request_id=getattr(request.state, "request_id", None))
    return job.public()
