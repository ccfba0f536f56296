"""Settings of the ``batch`` section: the OpenAI Batch API (files and batches) on the job runner."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator

from app.core.db import postgres_url


class BatchSettings(BaseModel):
    """Batches (``lifecycle.batch``): JSONL request files answered in the background, behind interactive traffic."""

    enabled: bool = Field(default=True, description="Serve /v1/files and /v1/batches and run batch jobs.")
    concurrency: int = Field(default=4, ge=1, le=256, description=(
        "Requests of one batch in flight at once while no interactive request is (the model server batches "
        "them: size it like a client's concurrency)."))
    concurrency_under_load: int = Field(default=1, ge=1, le=256, description=(
        "Requests of one batch in flight while interactive requests are: batch work yields to them."))
    yield_s: float = Field(default=2.0, ge=0, le=600, description=(
        "How long batch work stays at concurrency_under_load after interactive requests were last seen: a "
        "conversation's next request (seconds later) then finds the model server without a fresh wave of batch "
        "requests ahead of it."))
    slots: int = Field(default=1, ge=1, le=16, description="Batches run at once by one API process.")
    max_file_bytes: int = Field(default=100 * 1024 * 1024, ge=1, description="Largest request file accepted.")
    max_requests: int = Field(default=50_000, ge=1, description="Most requests (lines) in one batch.")
    max_attempts: int = Field(default=3, ge=1, le=10, description=(
        "How often a batch job is tried after a crash (each attempt resumes at the unanswered lines)."))
    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the batch store (files, their bytes, batches, each line's outcome) instead of "
        "<home>/batches.db and <home>/files/: every API process then serves every batch and file; a batch is "
        "run by the process whose job queue took it, and cancelled through any. database_url fills it when unset."))

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="batch.url", otherwise="<home>/batches.db")
