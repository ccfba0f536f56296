"""Settings of the durable job system (``Settings.jobs`` once the settings tree has the section; env
``KEEL_JOBS__*``). Until then the container uses these defaults: ``<home>/jobs.db``, one eval at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from app.core.db import postgres_url


class JobSettings(BaseModel):
    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL: one queue for API processes on several machines (claims with SELECT ... FOR UPDATE "
        "SKIP LOCKED); unset: a SQLite file (one machine)."))
    db_path: Path | None = Field(default=None, description="SQLite queue file; None means <home>/jobs.db.")
    lease_s: float = Field(default=60.0, gt=0, le=3600, description=(
        "A running job whose worker has not beaten its heartbeat for this long is taken back (queued again, or "
        "failed once max_attempts runs are used): the worker is presumed dead."))
    heartbeat_s: float = Field(default=10.0, gt=0, description=(
        "How often a running job's worker beats its heartbeat (and learns of a cancel request from another "
        "process); a cancel sent to the process running the job acts at once."))
    progress_interval_s: float = Field(default=1.0, gt=0, description=(
        "Progress reported by a running job is written at most this often."))
    poll_s: float = Field(default=1.0, gt=0, le=60, description=(
        "How often idle workers look for jobs enqueued by other processes (a job enqueued in this process "
        "wakes them at once)."))
    max_attempts: int = Field(default=3, ge=1, le=100, description=(
        "Runs of a job before it fails for good: failures that may pass (a 5xx, an unexpected error, a dead "
        "worker) are retried; a refused request (4xx) is not."))
    retry_backoff_s: float = Field(default=5.0, ge=0, description="Wait before the first retry; doubles each retry.")
    retry_backoff_max_s: float = Field(default=300.0, ge=0, description="Longest wait between two retries.")
    eval_slots: int = Field(default=1, ge=1, le=64, description=(
        "Eval runs (POST /v1/evals/runs) at once in one API process; each runs its cases evals.concurrency at a "
        "time. Ingest jobs run one at a time (the embedded vector store has one writer)."))
    shutdown_grace_s: float = Field(default=30.0, ge=0, description=(
        "At shutdown, running jobs are asked to stop at a safe point (an ingest after its current batch, an eval "
        "run at once: its answered cases are stored) and waited for this long; either way they go back to the "
        "queue and resume at the next start."))
    retention_days: float | None = Field(default=30.0, gt=0, description=(
        "Finished jobs (succeeded, failed, cancelled) older than this are deleted; None keeps them."))

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="jobs.url", otherwise="<home>/jobs.db")

    @model_validator(mode="after")
    def _check(self) -> JobSettings:
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError(f"jobs.heartbeat_s ({self.heartbeat_s}) must be at most half of jobs.lease_s "
                             f"({self.lease_s}): a live worker would otherwise lose its jobs")
        return self

    def resolved_db_path(self, home: Path) -> Path:
        return self.db_path if self.db_path is not None else Path(home) / "jobs.db"
