"""Fine-tuning API: submit, list, inspect, follow and cancel LoRA jobs; list, promote and roll back
registered adapter versions (optionally deploying the production version under a model alias).

Every route needs the ``finetune`` scope; forcing a promotion past the eval gate needs ``admin``.
Job handlers are plain ``def`` (FastAPI runs them in its thread pool): they touch SQLite and, at
submit, read and tokenize the dataset. Training itself never runs here: a worker process
(``keel finetune worker``) picks queued jobs up.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.deps import FinetuneDep, FinetuneKey
from app.api.openapi import error_responses
from app.api.schemas import SQL_INT_MAX
from app.core.errors import PermissionDenied
from app.security.keys import ApiKey
from finetune.jobs import Job
from finetune.service import FinetuneService

router = APIRouter(prefix="/v1/finetune", tags=["finetune"])


class SubmitIn(BaseModel):
    spec_yaml: str | None = Field(default=None, description="The job spec as YAML text.")
    spec: dict[str, Any] | None = Field(default=None, description="The job spec as an object.")
    validate_data: bool = Field(default=True, description="Check the dataset now and refuse bad data (400).")


class JobOut(BaseModel):
    id: str
    name: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    step: int
    max_steps: int
    attempts: int
    spec_hash: str
    data_hash: str | None
    submitted_by: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    error: str | None
    error_code: str | None
    metrics: dict[str, Any]
    model_name: str | None
    model_version: str | None
    adapter_path: str | None
    mlflow_run_id: str | None
    evals_state: Literal["pending", "running", "passed", "failed", "error"] | None = Field(
        default=None, description="The adapter's evaluation (training's outcome stays in `state`).")
    evals: dict[str, Any] | None = Field(default=None, description="Per-suite eval runs and verdicts.")
    data_report: dict[str, Any] | None = None
    spec_yaml: str | None = None

    @classmethod
    def of(cls, job: Job, *, detail: bool = False) -> JobOut:
        data = job.to_dict(with_spec=detail)
        if not detail:
            data.pop("data_report", None)
        return cls.model_validate(data)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]


class LogsOut(BaseModel):
    job_id: str
    text: str
    next_offset: int
    state: str


def _actor(key: ApiKey) -> str:
    return f"{key.name} [{key.id}]"


@router.post("/jobs", response_model=JobOut, status_code=201)
def submit_job(key: FinetuneKey, svc: FinetuneDep, body: SubmitIn) -> JobOut:
    spec = svc.parse(spec_yaml=body.spec_yaml, spec=body.spec)
    job = svc.submit(spec, submitted_by=_actor(key), validate_data=body.validate_data)
    return JobOut.of(job, detail=True)


@router.get("/jobs", response_model=JobList)
def list_jobs(
    key: FinetuneKey, svc: FinetuneDep,
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    limit: int = Query(default=50, ge=1, le=500),
) -> JobList:
    return JobList(data=[JobOut.of(j) for j in svc.list(state=state, limit=limit)])


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(key: FinetuneKey, svc: FinetuneDep, job_id: str) -> JobOut:
    return JobOut.of(svc.get(job_id), detail=True)


class EvaluateIn(BaseModel):
    suites: list[str] | None = Field(default=None, description="Suites to run instead of the job spec's "
                                     "(the promotion gate still requires the spec's).")


@router.post("/jobs/{job_id}/evaluate", response_model=JobOut, status_code=202)
def evaluate_job(key: FinetuneKey, svc: FinetuneDep, job_id: str, body: EvaluateIn | None = None) -> JobOut:
    """Queue (again) the eval suites of a succeeded job's adapter; a fine-tune worker runs them."""
    return JobOut.of(svc.evaluate(job_id, suites=body.suites if body else None, actor=_actor(key)))


@router.get("/jobs/{job_id}/logs", response_model=LogsOut)
def job_logs(
    key: FinetuneKey, svc: FinetuneDep, job_id: str,
    offset: int = Query(default=0, ge=0, le=SQL_INT_MAX, description="Byte offset: pass next_offset to follow."),
) -> LogsOut:
    text, next_offset = svc.logs(job_id, offset)
    return LogsOut(job_id=job_id, text=text, next_offset=next_offset, state=svc.get(job_id).state)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(key: FinetuneKey, svc: FinetuneDep, job_id: str) -> JobOut:
    return JobOut.of(svc.cancel(job_id, actor=_actor(key)))


# -- registered adapter versions -------------------------------------------------------------------


class VersionOut(BaseModel):
    model: str
    version: str
    aliases: list[str]
    source: str
    run_id: str | None
    tags: dict[str, str]


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionOut]


class PromoteIn(BaseModel):
    version: str
    force: bool = Field(default=False, description="Promote even if the eval gate refuses (admin only).")
    reason: str | None = Field(default=None, description="Required with force; recorded in the audit log.")
    deploy_alias: str | None = Field(default=None, description="Also serve the version as this model alias.")
    backend: str | None = Field(default=None, description="Backend for deploy_alias (default: the default "
                                "model's backend).")


class RollbackIn(BaseModel):
    reason: str = ""
    deploy_alias: str | None = None
    backend: str | None = None


class PromotionOut(BaseModel):
    model: str
    alias: str
    from_version: str | None
    to_version: str
    changed: bool
    forced: bool
    verdict: dict[str, Any] | None
    deployed_as: str | None = None
    served_name: str | None = None
    deploy_seconds: float | None = None


def _version_out(v: Any) -> VersionOut:
    return VersionOut(model=v.model, version=v.version, aliases=list(v.aliases), source=v.source, run_id=v.run_id,
                      tags=v.tags)


async def _deploy(svc: FinetuneService, model: str, version: str, alias: str, backend: str | None,
                  out: PromotionOut, actor: str) -> PromotionOut:
    dep = await svc.deploy(model, version, alias=alias, backend=backend, actor=actor)
    out.deployed_as, out.served_name, out.deploy_seconds = alias, dep.served_name, round(dep.seconds, 3)
    return out


@router.get("/models/{model}/versions", response_model=VersionList)
def list_versions(key: FinetuneKey, svc: FinetuneDep, model: str) -> VersionList:
    return VersionList(data=[_version_out(v) for v in svc.versions(model)])


@router.post("/models/{model}/promote", response_model=PromotionOut, responses=error_responses({
    409: "The gate refuses the version (force overrides it), or it is already in production."}))
async def promote_version(key: FinetuneKey, svc: FinetuneDep, model: str, body: PromoteIn) -> PromotionOut:
    if body.force and not key.allows("admin"):
        raise PermissionDenied("forcing a promotion past the eval gate needs the 'admin' scope", param="force")
    if body.deploy_alias:  # before the label moves: a refused alias must not leave a half-done promotion
        await asyncio.to_thread(svc.check_alias, body.deploy_alias, model)
    p = await asyncio.to_thread(svc.promote, model, body.version, force=body.force, reason=body.reason,
                                actor=_actor(key))
    out = PromotionOut(model=p.model, alias=p.alias, from_version=p.from_version, to_version=p.to_version,
                       changed=p.changed, forced=p.forced, verdict=p.verdict.model_dump() if p.verdict else None)
    if body.deploy_alias:
        out = await _deploy(svc, model, p.to_version, body.deploy_alias, body.backend, out, _actor(key))
    return out


@router.post("/models/{model}/rollback", response_model=PromotionOut, responses=error_responses({
    409: "No earlier production version to roll back to."}))
async def rollback_version(key: FinetuneKey, svc: FinetuneDep, model: str, body: RollbackIn) -> PromotionOut:
    if body.deploy_alias:
        await asyncio.to_thread(svc.check_alias, body.deploy_alias, model)
    p = await asyncio.to_thread(svc.rollback, model, actor=_actor(key), reason=body.reason)
    out = PromotionOut(model=p.model, alias=p.alias, from_version=p.from_version, to_version=p.to_version,
                       changed=p.changed, forced=False, verdict=None)
    if body.deploy_alias:
        out = await _deploy(svc, model, p.to_version, body.deploy_alias, body.backend, out, _actor(key))
    return out
