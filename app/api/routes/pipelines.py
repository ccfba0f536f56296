"""Continuous-training pipelines: their definitions, runs (each step's state, log and artifacts), and a person's
approval of a run's promotion.

Reading and starting runs needs the ``finetune`` scope (a run trains and registers adapters); approving,
rejecting and cancelling also need ``releases``, because they move (or roll back) production traffic.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import FinetuneKey, PipelinesDep
from app.api.openapi import error_responses
from app.core.errors import PermissionDenied
from app.security.keys import ApiKey

router = APIRouter(tags=["pipelines"], responses=error_responses({
    503: "Pipelines are off on this server (pipelines.enabled), or their store is unavailable."}))
_RUN = error_responses({404: "No such run (code pipeline_run_not_found), or not a run id."})
_DECIDE = error_responses({
    404: "No such run.", 409: "The run is not in a state this allows (code pipeline_run_state: e.g. not waiting for "
    "approval, or not failed on an error) or is finished (pipeline_run_finished)."})


def _actor(key: ApiKey) -> str:
    return f"{key.name} [{key.id}]"


def _releases_too(key: ApiKey, what: str) -> None:
    if not key.allows("releases"):
        raise PermissionDenied(f"{what} a pipeline run moves production traffic: it needs the 'releases' scope too "
                               f"(this key has: {', '.join(sorted(key.scopes))})", param="authorization")


class StartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000, description="Why (recorded with the run).")


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000, description="Recorded with the decision.")


@router.get("/v1/pipelines")
def list_pipelines(pipelines: PipelinesDep, _: FinetuneKey) -> dict[str, Any]:
    """Every definition with its last run; ``errors``: definition files that do not load, and why."""
    data = pipelines.summaries()
    return {"object": "list", "data": data, "errors": pipelines.errors}


@router.get("/v1/pipelines/runs")
def list_runs(pipelines: PipelinesDep, _: FinetuneKey, pipeline: str | None = Query(default=None, max_length=63),
              state: Literal["queued", "running", "waiting", "succeeded", "failed", "cancelled"] | None = None,
              limit: int = Query(default=50, ge=1, le=500)) -> dict[str, Any]:
    runs = pipelines.list(pipeline=pipeline, state=state, limit=limit)
    return {"object": "list", "data": [r.public(logs=False) for r in runs]}


@router.get("/v1/pipelines/runs/{run_id}", responses=_RUN)
def get_run(run_id: str, pipelines: PipelinesDep, _: FinetuneKey) -> dict[str, Any]:
    run = pipelines.get(run_id)
    events = pipelines.store.audit_events(subject_ref=run.id)
    return {**run.public(), "audit": [{**asdict(e), "details": dict(e.details)} for e in events]}


@router.get("/v1/pipelines/{name}", responses=error_responses({404: "No such pipeline (pipeline_not_found)."}))
def get_pipeline(name: str, pipelines: PipelinesDep, _: FinetuneKey) -> dict[str, Any]:
    d = pipelines.definition(name)
    return {"name": d.name, "model": d.model, "source": d.source, "hash": d.hash,
            "definition": d.spec.model_dump(mode="json"), "job": d.job.model_dump(mode="json"),
            "runs": [r.public(logs=False) for r in pipelines.list(pipeline=name, limit=20)]}


@router.post("/v1/pipelines/{name}/runs", status_code=201, responses=error_responses({
    404: "No such pipeline (pipeline_not_found).", 409: "The pipeline has an open run (pipeline_run_open)."}))
async def start_run(name: str, body: StartIn, pipelines: PipelinesDep, key: FinetuneKey) -> dict[str, Any]:
    """Start a run now (a person's start ignores the cooldown); 409 ``pipeline_run_open`` while one is open. A
    pipeline that releases a canary, or promotes without a person, needs the ``releases`` scope too."""
    return (await pipelines.start(name, actor=_actor(key), reason=body.reason,
                                  can_release=key.allows("releases"))).public()


@router.post("/v1/pipelines/runs/{run_id}/approve", responses=_DECIDE)
async def approve_run(run_id: str, body: DecisionIn, pipelines: PipelinesDep, key: FinetuneKey) -> dict[str, Any]:
    """Promote the run's adapter (the canary to 100%, the registry's production alias); 409 unless it waits."""
    _releases_too(key, "approving")
    return (await pipelines.decide(run_id, approve=True, actor=_actor(key), reason=body.reason)).public()


@router.post("/v1/pipelines/runs/{run_id}/reject", responses=_DECIDE)
async def reject_run(run_id: str, body: DecisionIn, pipelines: PipelinesDep, key: FinetuneKey) -> dict[str, Any]:
    """End the run without promoting: its canary rolls back."""
    _releases_too(key, "rejecting")
    return (await pipelines.decide(run_id, approve=False, actor=_actor(key), reason=body.reason)).public()


@router.post("/v1/pipelines/runs/{run_id}/cancel", responses=_DECIDE)
async def cancel_run(run_id: str, body: DecisionIn, pipelines: PipelinesDep, key: FinetuneKey) -> dict[str, Any]:
    """Stop an open run and what it started (its fine-tuning job, its canary)."""
    _releases_too(key, "cancelling")
    return (await pipelines.cancel(run_id, actor=_actor(key), reason=body.reason)).public()


@router.post("/v1/pipelines/runs/{run_id}/retry", responses=_DECIDE)
async def retry_run(run_id: str, body: DecisionIn, pipelines: PipelinesDep, key: FinetuneKey) -> dict[str, Any]:
    """Resume a run that failed on an error at its failed step (a decision — gate, contract, canary, a person —
    stands: 409)."""
    return (await pipelines.retry(run_id, actor=_actor(key), reason=body.reason,
                                  can_release=key.allows("releases"))).public()
