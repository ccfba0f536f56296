"""Durable jobs: one queue (SQLite on one machine, Postgres across machines) and the in-process runner the API
starts. Ingest jobs and API-started eval runs run on it; see :mod:`app.jobs.queue` and :mod:`app.jobs.runner`.

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
from app.jobs.runner import JobContext, JobRunner
from app.jobs.settings import JobSettings

__all__ = ["ACTIVE", "STATES", "TERMINAL", "Job", "JobCancelled", "JobContext", "JobQueue", "JobRunner",
           "JobSettings", "JobState", "LeaseLost", "PostgresJobQueue", "SqliteJobQueue", "open_queue"]
