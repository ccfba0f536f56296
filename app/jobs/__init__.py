"""Durable jobs: one queue (SQLite on one machine, Postgres across machines) and the in-process runner the API
starts. Ingest jobs, API-started eval runs, pipelines, batches and fine-tuning (in its own worker process) run on
it; see :mod:`app.jobs.queue` and :mod:`app.jobs.runner`.

Backend layer: imports only the kernel (``app.core``) and libraries; the features register their handlers.
"""

from app.jobs.queue import (
    ACTIVE,
    STATES,
    TERMINAL,
    Job,
    JobCancelled,
    JobQueue,
    JobState,
    LeaseLost,
    PostgresJobQueue,
    SqliteJobQueue,
    open_queue,
)
from app.jobs.runner import JobContext, JobFailed, JobRunner
from app.jobs.settings import JobSettings

__all__ = ["ACTIVE", "STATES", "TERMINAL", "Job", "JobCancelled", "JobContext", "JobFailed", "JobQueue", "JobRunner",
           "JobSettings", "JobState", "LeaseLost", "PostgresJobQueue", "SqliteJobQueue", "open_queue"]
