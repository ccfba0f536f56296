"""Evaluations over HTTP: list suites and runs, show a run, its HTML report, start a suite run.

Include with ``app.include_router(evals.router)`` in app/api/main.py. Scope: ``evals`` (admin has all).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from app.api.deps import ContainerDep, EvalsKey, EvalStoreDep, SettingsDep
from app.core.errors import InvalidRequest
from app.settings import Settings
from evals.report import html_report, run_json
from evals.runner import EvalConfigError, EvalRunner, count_swallowed
from evals.store import EvalStore
from evals.suite import SuiteError, find_named_suite, load_suite, suite_dirs
from evals.suite import list_suites as suite_files

router = APIRouter(prefix="/v1/evals", tags=["evals"])
log = logging.getLogger("keel.evals")
_tasks: set[asyncio.Task] = set()


def _load(settings: Settings, name: str):
    """A suite by name from the suites folders only: a caller must not make the server read other files."""
    suites_dir = settings.evals.suites_dir
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
async def list_suites(_key: EvalsKey, settings: SettingsDep) -> list[dict[str, Any]]:
    out = []
    for path in suite_files(settings.evals.suites_dir):
        try:
            s = load_suite(path)
            out.append({"name": s.name, "path": str(path), "cases": len(s.cases), "hash": s.hash,
                        "target": s.target.model_dump(exclude_none=True), "bind": s.gate.bind})
        except SuiteError as e:
            out.append({"name": path.stem, "path": str(path), "error": str(e)})
    return out


@router.get("/runs")
async def list_runs(_key: EvalsKey, store: EvalStoreDep, suite: str | None = None,
                    limit: int = Query(default=50, ge=1, le=500)) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.public().items() if k != "summary"} for r in store.list_runs(suite=suite, limit=limit)]


@router.get("/runs/{run_id}")
async def show_run(_key: EvalsKey, store: EvalStoreDep, run_id: str, cases: bool = False) -> dict[str, Any]:
    run = store.get_run(run_id)
    if not cases:
        return run.public()
    return run_json(run, store.results(run_id))


@router.get("/runs/{run_id}/report.html", response_class=HTMLResponse)
async def run_report(_key: EvalsKey, settings: SettingsDep, store: EvalStoreDep, run_id: str) -> HTMLResponse:
    run = store.get_run(run_id)
    suite = _load(settings, run.suite)
    base = (store.get_run(run.baseline), store.results(run.baseline)) if run.baseline else None
    return HTMLResponse(html_report(suite, run, store.results(run_id), base))


@router.post("/runs", status_code=202)
async def start_run(_key: EvalsKey, container: ContainerDep, body: RunIn) -> dict[str, Any]:
    """Start a suite in the background (the server's own ChatService); poll GET /v1/evals/runs?suite=."""
    settings = container.settings
    suite = _load(settings, body.suite)
    # The run outlives the request: it writes through a store of its own (EvalStoreDep's closes with the
    # request), closed when the run ends.
    store = EvalStore(settings.evals.db_path(settings.home))
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
            count_swallowed(container.metrics, "background_run")
        finally:
            store.close()

    task = asyncio.create_task(go())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return {"status": "started", "suite": suite.name, "suite_hash": suite.hash, "cases": len(suite.cases),
            "target": ident.get("prompt") or ident.get("rag") or ident.get("model")}
