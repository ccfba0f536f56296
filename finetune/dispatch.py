"""Fine-tuning on Keel's job queue: each submitted job is a ``finetune.train`` job there, each evaluation of its
adapter a ``finetune.evals`` job. The queue decides who runs what (claim, lease, heartbeat, recovery of a lost
worker, cancel); the job store (:mod:`finetune.jobs`) keeps what the job is and what it did.

The queue jobs are keyed by the fine-tuning job (``train:<id>``, ``evals:<id>:<seq>``), so queueing one again
returns the one already there: :func:`reconcile` can be run at any time by any worker to queue what the store
says needs work (a job submitted by a release before the queue, or whose queueing failed half-way) and to
record on the store what the queue decided while no worker ran it (it gave up, or someone cancelled it).
"""

from __future__ import annotations

import logging
import time

from app.jobs.queue import Job as QueueJob
from app.jobs.queue import JobQueue
from finetune.jobs import Job, JobStore

log = logging.getLogger("keel.finetune")

TRAIN = "finetune.train"
EVALS = "finetune.evals"
OWNER = "system:finetune"  # the queue's owner of every fine-tuning job (the submitter is on the job itself)
# A running job that showed a sign of life this recently is left alone: before fine-tuning ran on the queue, its
# workers beat the job itself (every 5 s, recovered after 120 s); one may still be training it during an upgrade.
LEGACY_BEAT_S = 120.0


def _legacy(job: Job) -> bool:
    """Running under a worker of the release before the queue (its ids were ``host:pid``; the queue's are
    ``host:pid:token``)."""
    return job.state == "running" and (job.worker or "").count(":") == 1


def queue_training(queue: JobQueue, job: Job, *, max_attempts: int) -> QueueJob:
    """The queue job that trains ``job`` (queued now, or the one queued before)."""
    return queue.enqueue(TRAIN, {"job_id": job.id}, owner=OWNER, idempotency_key=f"train:{job.id}",
                         max_attempts=max_attempts)


def queue_evaluation(queue: JobQueue, job: Job, *, max_attempts: int) -> QueueJob:
    """The queue job for the job's current evaluation (each :meth:`JobStore.queue_evals` starts a new one)."""
    seq = int((job.evals or {}).get("seq", 0))
    return queue.enqueue(EVALS, {"job_id": job.id, "seq": seq}, owner=OWNER,
                         idempotency_key=f"evals:{job.id}:{seq}", max_attempts=max_attempts)


def reconcile(store: JobStore, queue: JobQueue, *, max_attempts: int, now: float | None = None) -> list[Job]:
    """Queue what the store says needs work and is not queued; record on the store what the queue ended on its
    own. Returns the fine-tuning jobs that changed."""
    now = time.time() if now is None else now
    changed: list[Job] = []
    for job in store.unfinished():
        training = job.state in ("queued", "running")
        if _legacy(job) and now - (job.heartbeat_at or 0) < LEGACY_BEAT_S:
            continue  # a worker of the release before the queue trains it still, beating the job itself
        queued = (queue_training if training else queue_evaluation)(queue, job, max_attempts=max_attempts)
        if queued.state in ("queued", "running"):
            continue
        if queued.state == "succeeded":
            why = "its job on the queue finished without recording an outcome here"
        else:
            why = (queued.error or {}).get("message") or f"the job queue {queued.state} it"
        if queued.state == "cancelled" and training and not job.cancel_requested:
            store.request_cancel(job.id)  # cancelled on the queue directly (an admin's /v1/jobs cancel)
        after = store.fail_lost(job.id, why, evals_seq=None if training else int(queued.payload.get("seq", 0)))
        if after is not None:
            log.warning("fine-tuning job %s: %s (now %s, evals %s)", job.id, why, after.state, after.evals_state)
            changed.append(after)
    return changed
