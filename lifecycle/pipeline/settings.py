"""Settings of the ``pipelines`` section: continuous-training pipelines on the job runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator

from app.core.db import postgres_url

#: The pipelines Keel ships (next to the fine-tuning jobs they retrain).
SHIPPED = Path(__file__).resolve().parents[2] / "finetune" / "pipelines"


class PipelineSettings(BaseModel):
    """Continuous training (``lifecycle.pipeline``): trigger -> dataset -> fine-tune -> eval gate -> canary ->
    approval -> promote, each run a durable job."""

    enabled: bool = Field(default=True, description="Serve /v1/pipelines, run pipeline jobs and check triggers.")
    dirs: list[Path] = Field(default_factory=list, description=(
        "Folders of pipeline definitions (*.yaml), looked in first; the shipped finetune/pipelines comes last."))
    check_interval_s: float = Field(default=30.0, gt=0, description=(
        "How often each API process checks the pipelines' triggers (drift, feedback, eval regressions, "
        "schedules); one run starts however many processes see it."))
    triggers: bool = Field(default=True, description="false: runs start only when a person starts them.")
    slots: int = Field(default=4, ge=1, le=64, description=(
        "Pipeline runs one API process drives at once (they mostly wait on workers and canaries)."))

    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the pipeline store (runs, steps, their audit trail) instead of <home>/pipelines.db: "
        "every API process and worker then sees and drives the same runs. jobs.url (a job queue shared by processes "
        "on one home volume) fills it when unset: a run is driven through the queue that holds its job."))

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="pipelines.url", otherwise="<home>/pipelines.db")

    def folders(self) -> list[Path]:
        return [*self.dirs, SHIPPED]
