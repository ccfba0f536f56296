"""Drift detection over the API (scope ``monitor``, which admin includes: a check reads every key's traffic).

* ``POST /v1/monitor/drift`` runs a check now (in a worker thread; checks run one at a time) and returns it;
* ``GET /v1/monitor/drift`` lists the stored checks, newest first; ``GET /v1/monitor/drift/{id}`` returns one;
* ``GET /v1/monitor/drift/{id}/report`` is its Evidently HTML report.

The body names the current window (``window_s``: the last that many seconds, or ``since``/``until`` in unix
seconds; default the last ``monitor.window_s``) and the reference: ``{"kind": "window"}`` (the window before,
or ``since``/``until``), ``{"kind": "release", "release": NAME}`` (its baseline arm vs its candidate;
``compare: "earlier"``: the baseline vs its own earlier window) or ``{"kind": "suite", "suite": NAME}`` (an eval
suite's inputs).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.deps import ContainerDep, MonitorKey
from app.api.openapi import error_responses
from app.core.errors import BackendUnavailable
from app.security.keys import ApiKey
from lifecycle.monitor.drift import DriftMonitor, ReferenceSpec

router = APIRouter(prefix="/v1/monitor", tags=["monitoring"])


async def get_monitor(container: ContainerDep) -> DriftMonitor:
    monitor = getattr(container, "monitor", None)
    if monitor is None:
        raise BackendUnavailable("the drift monitor is not running on this server")
    return monitor


MonitorDep = Annotated[DriftMonitor, Depends(get_monitor)]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"


class ReferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["window", "release", "suite"] = Field(default="window", description=(
        "window: another window of traffic; release: a release's baseline arm; suite: an eval suite's inputs."))
    since: float | None = Field(default=None, description="window/release: the reference window's start (unix s).")
    until: float | None = Field(default=None, description="... and end; default: the window before the current "
                                "one (release, compare=candidate: the current window itself).")
    release: str | None = Field(default=None, pattern=_NAME, description="release: its name.")
    variant: str | None = Field(default=None, pattern=_NAME, description="release: the baseline arm (default: the "
                                "release's baseline).")
    current_variant: str | None = Field(default=None, pattern=_NAME, description=(
        "release, compare=candidate: the arm compared with the baseline (default: the candidate)."))
    compare: Literal["candidate", "earlier"] = Field(default="candidate", description=(
        "release: the baseline vs the candidate over the same window, or the baseline vs its earlier window."))
    suite: str | None = Field(default=None, pattern=_NAME, description="suite: its name (evals.suites_dir).")


class DriftCheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window_s: float | None = Field(default=None, gt=0, description="The current window: the last that many seconds.")
    since: float | None = Field(default=None, description="... or from since (unix s) ...")
    until: float | None = Field(default=None, description="... to until (default: now).")
    reference: ReferenceIn = Field(default_factory=ReferenceIn)
    min_rows: int | None = Field(default=None, ge=2, le=1_000_000, description=(
        "Rows each window (and each check) needs; default monitor.min_rows."))

    @model_validator(mode="after")
    def _one_window(self) -> DriftCheckIn:
        if self.window_s is not None and (self.since is not None or self.until is not None):
            raise ValueError("give either window_s or since/until for the current window, not both")
        if self.until is not None and self.since is None:
            raise ValueError("until needs since (or give window_s)")
        return self


def actor_of(key: ApiKey) -> str:
    return f"{key.name} [{key.id}]"


@router.post("/drift", responses=error_responses({404: "The release or eval suite the check names does not exist."}))
def run_drift_check(body: DriftCheckIn, monitor: MonitorDep, key: MonitorKey) -> dict[str, Any]:
    """Compare the current window with the reference now. ``verdict`` is drift, no_drift or not_enough_data;
    ``checks`` has each test's method, statistic, threshold and state; ``report_url`` the HTML report."""
    current = body.window_s if body.window_s is not None else (
        (body.since, body.until) if body.since is not None else None)
    ref = ReferenceSpec(**body.reference.model_dump())
    return monitor.check(current, ref, actor=actor_of(key), min_rows=body.min_rows).public()


@router.get("/drift")
def list_drift_checks(monitor: MonitorDep, _: MonitorKey, limit: int = Query(50, ge=1, le=1000),
                      before: float | None = Query(None, description="Page back: checks made before this unix time."),
                      verdict: Literal["drift", "no_drift", "not_enough_data"] | None = None,
                      reference: Literal["window", "release", "suite"] | None = Query(
                          None, description="Only checks against this kind of reference.")) -> dict[str, Any]:
    return {"object": "list", "data": monitor.list(limit=limit, before=before, verdict=verdict,
                                                   reference_kind=reference)}


@router.get("/drift/{check_id}")
def get_drift_check(check_id: str, monitor: MonitorDep, _: MonitorKey) -> dict[str, Any]:
    return monitor.get(check_id)


@router.get("/drift/{check_id}/report", response_class=FileResponse)
def get_drift_report(check_id: str, monitor: MonitorDep, _: MonitorKey) -> FileResponse:
    """The check's Evidently HTML report (self-contained: open it in a browser)."""
    return FileResponse(monitor.report_path(check_id), media_type="text/html; charset=utf-8")
