"""Evaluations over HTTP: list suites and runs, show a run, its HTML report, start a suite run.

Include with ``app.include_router(evals.router)`` in app/api/main.py. Scope: ``evals`` (admin has all).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from app.api.deps import get_container, require_scope
from app.container import Container
from app.core.errors import InvalidRequest
from app.security.keys import ApiKey
from evals.store import EvalStore

router = APIRouter(prefix="/v1/evals", tags=["evals"])
log = logging.getLogger("keel.evals")
_tasks: set[asyncio.Task] = set()


def _store(container: Container) -> EvalStore:
    return EvalStore(container.settings.evals.db_path(container.settings.home))


def _load(container: Container, name: str):
    """A suite by name from the suites folders only: a caller must not make the server read other files."""
    from evals.suite import SuiteError, find_named_suite, load_suite, suite_dirs

    suites_dir = container.settings.evals.suites_dir
    try:
        return load_suite(find_named_suite(name, suites_dir), roots=suite_dirs(suites_dir))
    except SuiteError as e:
        raise InvalidRequest(str(e), param="suite") from e


class RunIn(BaseModel):
    suite: str = Field(min_length=1, max_length=200, description="Suite name in the suites folder (evals.suites_dir "
                       "or the shipped evals/suites); not a path.")
    baseline: str | None = Field(default=None, max_length=100)
    use_cache: bool = True


@router.get("/suites")
async def list_suites(_key: ApiKey = Depends(require_scope("evals")),
                      container: Container = Depends(get_container)) -> list[dict[str, Any]]:
    from evals.suite import SuiteError, load_suite
    from evals.suite import list_suites as _list

    out = []
    for path in _list(container.settings.evals.suites_dir):
        try:
            s = load_suite(path)
            out.append({"name": s.name, "path": str(path), "cases": len(s.cases), "hash": s.hash,
                        "target": s.target.model_dump(exclude_none=True), "bind": s.gate.bind})
        except SuiteError as e:
            out.append({"name": path.stem, "path": str(path), "error": str(e)})
    return out


@router.get("/runs")
async def list_runs(suite: str | None = None, limit: int = Query(default=50, ge=1, le=500),
                    _key: ApiKey = Depends(require_scope("evals")),
                    container: Container = Depends(get_container)) -> list[dict[str, Any]]:
    store = _store(container)
    try:
        return [{k: v for k, v in r.public().items() if k != "summary"} for r in store.list_runs(suite=suite,
                                                                                                 limit=limit)]
    finally:
        store.close()


@router.get("/runs/{run_id}")
async def show_run(run_id: str, cases: bool = False, _key: ApiKey = Depends(require_scope("evals")),
                   container: Container = Depends(get_container)) -> dict[str, Any]:
    from evals.report import run_json

    store = _store(container)
    try:
        run = store.get_run(run_id)
        if not cases:
            return run.public()
        return run_json(run, store.results(run_id))
    finally:
        store.close()


@router.get("/runs/{run_id}/report.html", response_class=HTMLResponse)
async def run_report(run_id: str, _key: ApiKey = Depends(require_scope("evals")),
                     container: Container = Depends(get_container)) -> HTMLResponse:
    from evals.report import html_report

    store = _store(container)
    try:
        run = store.get_run(run_id)
        suite = _load(container, run.suite)
        base = (store.get_run(run.baseline), store.results(run.baseline)) if run.baseline else None
        return HTMLResponse(html_report(suite, run, store.results(run_id), base))
    finally:
        store.close()


@router.post("/runs", status_code=202)
async def start_run(body: RunIn, _key: ApiKey = Depends(require_scope("evals")),
                    container: Container = Depends(get_container)) -> dict[str, Any]:
    """Start a suite in the background (the server's own ChatService); poll GET /v1/evals/runs?suite=."""
    from evals.runner import EvalConfigError, EvalRunner, count_swallowed

    suite = _load(container, body.suite)
    store = _store(container)
    runner = EvalRunner(container.eval_deps(), store, use_cache=body.use_cache, progress=False)
    try:
        ident = runner.identity(suite)
    except EvalConfigError as e:
        store.close()
        raise InvalidRequest(str(e), param="suite") from e

    async def go() -> None:
        try:
            await runner.run(suite, baseline=body.baseline)
        except Exception:
            log.exception("eval run of %s failed", suite.name)
            count_swallowed(container, "background_run")
        finally:
            store.close()

    task = asyncio.create_task(go())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return {"status": "started", "suite": suite.name, "suite_hash": suite.hash, "cases": len(suite.cases),
            "target": ident.get("prompt") or ident.get("rag") or ident.get("model")}
