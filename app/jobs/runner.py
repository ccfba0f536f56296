"""The in-process job runner: claims jobs from the queue and runs them in this process's event loop.

The API starts one (``Container.jobs``) in its lifespan; each job kind has a handler and a number of slots
(jobs of that kind running at once in this process)::

    runner = JobRunner(queue)
    runner.register("ingest", ingest_handler, slots=1)                    # one writer: the embedded store
    runner.register("eval", eval_handler, slots=2, interruptible=True)
    await runner.start()            # recovers jobs of dead workers, then claims
    job = await runner.submit("eval", {"suite": "smoke"}, owner=key.id)
    ...
    await runner.aclose()           # stop claiming; running jobs stop at a safe point, back to the queue

A handler is ``async def handler(job, ctx) -> dict | None``; what it returns is the job's result. While it
runs, the runner beats the job's heartbeat and writes the progress it reports (:meth:`JobContext.set_progress`,
thread-safe: a handler's worker thread may call it). A handler stops early when asked to, for one of three
reasons (:attr:`JobContext.stop_reason`): ``cancel`` (the job's cancel was requested: from this process at
once, from another at the next heartbeat), ``shutdown`` (this runner is closing) or ``lease_lost`` (the queue
gave the job to another worker). How it is told depends on how it was registered:

* ``interruptible=True``: the runner cancels the handler's task (``asyncio.CancelledError``); for handlers
  whose work unwinds cleanly on cancellation and is resumable (an eval run: its answered cases are stored);
* otherwise the handler checks the flag at its safe points (:meth:`JobContext.check` raises, or
  :attr:`JobContext.stop_requested`); for work that runs in a thread, which a task cancellation would leave
  running (an ingest: it stops after its current batch, every document whole).

Outcomes: a return completes the job; a raise fails it (retried with backoff while attempts remain, unless the
error is a refused request: a :class:`~app.core.errors.KeelError` with a 4xx status, or :class:`JobFailed`: the
handler recorded the failure itself); a stop for ``cancel`` (or a :class:`~app.jobs.queue.JobCancelled` the handler
raised on learning of the cancel another way) cancels it; a stop for ``shutdown`` releases it to the queue, so
the next start runs it again (handlers make a second run resume the first: ingest skips unchanged documents, the
eval runner resumes a run of the same identity). At shutdown the runner waits ``shutdown_grace_s`` for handlers
to stop, then cancels the tasks of those still running and releases their jobs.

The first :meth:`JobRunner.submit` starts the runner when nobody did, so a process that builds the services
without the API lifespan (tests, an application embedding Keel) still runs what it submits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import StatusCode, Tracer

from app.core.errors import KeelError, ShuttingDown
from app.jobs.queue import ACTIVE, Job, JobCancelled, JobQueue, LeaseLost, new_worker_id, open_queue, retire_worker
from app.jobs.settings import JobSettings

log = logging.getLogger("keel.jobs")

StopReason = Literal["cancel", "shutdown", "lease_lost"]
Handler = Callable[[Job, "JobContext"], Awaitable[Mapping[str, Any] | None]]
T = TypeVar("T")


class JobFailed(Exception):
    """Raised by a handler that has recorded why its job failed where its own domain keeps it: the job fails at
    once, without the retries an unexpected error gets (a training run that crashed would crash again)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class JobContext:
    """What a running handler sees of the runner: its job, a progress sink and the stop signal."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.stop_reason: StopReason | None = None
        self._stop = threading.Event()
        self._stopped = asyncio.Event()
        self._lock = threading.Lock()
        self._progress: dict[str, Any] | None = None

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """Report progress (JSON); the latest is written within ``progress_interval_s``. Any thread."""
        with self._lock:
            self._progress = dict(progress)

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        """Raise if the job must stop (call it at a safe point): :class:`~app.jobs.queue.JobCancelled`,
        :class:`~app.core.errors.ShuttingDown` or :class:`~app.jobs.queue.LeaseLost`. Any thread."""
        if not self._stop.is_set():
            return
        if self.stop_reason == "cancel":
            raise JobCancelled(f"job {self.job.id} was cancelled; what it finished before is kept")
        if self.stop_reason == "shutdown":
            raise ShuttingDown(f"the server shut down during job {self.job.id}; what it finished is kept and the "
                               "job resumes at the next start")
        raise LeaseLost(f"job {self.job.id} was taken back from this worker (its heartbeat lapsed)")

    async def wait_stop(self) -> StopReason:
        await self._stopped.wait()
        assert self.stop_reason is not None
        return self.stop_reason

    def _request_stop(self, reason: StopReason) -> bool:
        """First reason wins; True if this call set it. Event-loop thread only."""
        if self._stop.is_set():
            return False
        self.stop_reason = reason
        self._stop.set()
        self._stopped.set()
        return True

    def _take_progress(self) -> dict[str, Any] | None:
        with self._lock:
            progress, self._progress = self._progress, None
        return progress


@dataclass
class _Kind:
    handler: Handler
    slots: int
    interruptible: bool
    running: dict[str, _Running] = field(default_factory=dict)


@dataclass
class _Running:
    job: Job
    ctx: JobContext
    kind: _Kind
    task: asyncio.Task | None = None  # the handler
    supervisor: asyncio.Task | None = None  # runs the handler, beats, records the outcome
    unbeaten: bool = False  # stopped by this runner because its heartbeats failed (the lease may still hold)


class JobRunner:
    def __init__(self, queue: JobQueue, *, worker_id: str | None = None, heartbeat_s: float = 10.0,
                 progress_interval_s: float = 1.0, poll_s: float = 1.0, shutdown_grace_s: float | None = 30.0,
                 retention_s: float | None = None, close_queue: bool = True, tracer: Tracer | None = None,
                 max_running: int | None = None) -> None:
        """``tracer``: each attempt of a job is a trace (``keel.job <kind>``); what the handler does (an eval run's
        chats, an ingest's steps) nests under it. ``max_running``: jobs at once in this runner whatever their kind
        (a fine-tuning worker holds one GPU job at a time); kinds are then claimed in the order they were
        registered, so the first has priority. None: each kind is limited by its own slots only.
        ``shutdown_grace_s`` None: at shutdown, wait for running handlers however long they take (for work in a
        thread that a cancellation cannot stop: giving its job back while the thread runs would let another
        worker run it beside this one)."""
        self.max_running = max_running
        self.tracer = tracer or trace.NoOpTracer()
        self.queue = queue
        self.worker_id = worker_id or new_worker_id()
        self.heartbeat_s = heartbeat_s
        self.progress_interval_s = progress_interval_s
        self.poll_s = poll_s
        self.shutdown_grace_s = shutdown_grace_s
        self.retention_s = retention_s
        self._close_queue = close_queue
        self._kinds: dict[str, _Kind] = {}
        self._wake = asyncio.Event()
        self._tick = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._closing = False
        self._closed = False
        # The queue's calls block (SQLite's busy wait, a Postgres round trip): they run on threads of their own,
        # so a busy default executor (ingest, guardrails) never delays a heartbeat.
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="keel-jobs")

    @classmethod
    def from_settings(cls, settings: JobSettings, home: Path, *, tracer: Tracer | None = None) -> JobRunner:
        return cls(open_queue(settings, home), tracer=tracer, heartbeat_s=settings.heartbeat_s,
                   progress_interval_s=settings.progress_interval_s, poll_s=settings.poll_s,
                   shutdown_grace_s=settings.shutdown_grace_s,
                   retention_s=settings.retention_days * 86400 if settings.retention_days else None)

    def register(self, kind: str, handler: Handler, *, slots: int = 1, interruptible: bool = False) -> None:
        if slots < 1:
            raise ValueError("a job kind needs at least one slot")
        if kind in self._kinds:
            raise ValueError(f"job kind {kind!r} already has a handler")
        self._kinds[kind] = _Kind(handler, slots, interruptible)
        self._wake.set()

    @property
    def kinds(self) -> list[str]:
        return list(self._kinds)

    @property
    def started(self) -> bool:
        return self._dispatcher is not None

    def running(self) -> list[Job]:
        """The jobs this process runs now."""
        return [r.job for k in self._kinds.values() for r in k.running.values()]

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, partial(fn, *args, **kwargs))

    # -- submitters ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take back the jobs of dead workers and start claiming. Idempotent."""
        if self._dispatcher is not None or self._closing:
            return
        self._dispatcher = asyncio.create_task(self._dispatch(), name="keel-jobs-dispatch")

    async def submit(self, kind: str, payload: Mapping[str, Any], *, owner: str = "",
                     idempotency_key: str | None = None, max_attempts: int | None = None) -> Job:
        if self._closing:
            raise ShuttingDown("the server is shutting down; submit the job again once it is back")
        job = await self._call(self.queue.enqueue, kind, payload, owner=owner, idempotency_key=idempotency_key,
                               max_attempts=max_attempts)
        if kind in self._kinds:
            await self.start()
            self._wake.set()
        self._changed()
        return job

    async def get(self, job_id: str, *, owner: str | None = None, kinds: Sequence[str] | None = None) -> Job:
        return await self._call(self.queue.get, job_id, owner=owner, kinds=kinds)

    async def list(self, *, kinds: Sequence[str] | None = None, owner: str | None = None,
                   states: Sequence[str] | None = None, limit: int = 50) -> list[Job]:
        return await self._call(self.queue.list, kinds=kinds, owner=owner, states=states, limit=limit)

    async def cancel(self, job_id: str, *, owner: str | None = None, kinds: Sequence[str] | None = None,
                     actor: str = "", request_id: str | None = None) -> Job:
        """Cancel a job: a queued one at once; a running one is asked to stop (here at once, in another
        process at its next heartbeat) and is ``cancelled`` once it has. Audited (``actor``, trail ``jobs``)."""
        job = await self._call(self.queue.cancel, job_id, owner=owner, kinds=kinds, actor=actor,
                               request_id=request_id)
        entry = self._entry(job.id)
        if entry is not None and job.cancel_requested:
            self._stop(entry, "cancel")
        self._changed()
        return job

    async def wait(self, job_id: str, timeout_s: float, *, owner: str | None = None,
                   kinds: Sequence[str] | None = None) -> Job:
        """The job once it has finished, or as it is after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            tick = self._tick
            job = await self.get(job_id, owner=owner, kinds=kinds)
            left = deadline - time.monotonic()
            if job.state not in ACTIVE or left <= 0:
                return job
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), min(left, self.poll_s))

    def _changed(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    def _entry(self, job_id: str) -> _Running | None:
        for kind in self._kinds.values():
            if job_id in kind.running:
                return kind.running[job_id]
        return None

    # -- the dispatcher ------------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        next_recovery = next_prune = 0.0
        while not self._closing:
            self._wake.clear()
            try:
                now = time.monotonic()
                if now >= next_recovery:
                    for job in await self._call(self.queue.recover_stale):
                        log.warning("job %s (%s) taken back from a lost worker: %s", job.id, job.kind,
                                    (job.error or {}).get("message", job.state))
                    next_recovery = now + max(self.heartbeat_s, self.queue.lease_s / 4)
                if self.retention_s and now >= next_prune:
                    pruned = await self._call(self.queue.prune, older_than_s=self.retention_s)
                    if pruned:
                        log.info("deleted %d finished jobs older than %.0f days", pruned, self.retention_s / 86400)
                    next_prune = now + 3600
                await self._claim_all()
            except Exception as exc:  # the queue is unavailable for a moment: try again at the next poll
                log.warning("job dispatcher: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _claim_all(self) -> None:
        while not self._closing:
            free = [name for name, k in self._kinds.items() if len(k.running) < k.slots]
            if not free or (self.max_running is not None and len(self.running()) >= self.max_running):
                return
            job = None
            for kinds in ([k] for k in free) if self.max_running is not None else [free]:
                job = await self._call(self.queue.claim, kinds, self.worker_id)
                if job is not None:
                    break
            if job is None:
                return
            if self._closing:  # claimed while closing: give it straight back
                await self._call(self.queue.release, job.id, self.worker_id)
                return
            self._launch(job)

    def _launch(self, job: Job) -> None:
        kind = self._kinds[job.kind]
        entry = _Running(job, JobContext(job), kind)
        kind.running[job.id] = entry
        entry.supervisor = asyncio.create_task(self._supervise(entry), name=f"keel-job-{job.kind}-{job.id}")
        self._changed()

    async def _supervise(self, entry: _Running) -> None:
        job, ctx = entry.job, entry.ctx
        log.info("job %s (%s) started, attempt %d of %d", job.id, job.kind, job.attempts, job.max_attempts)
        span = self.tracer.start_span(f"keel.job {job.kind}", context=otel_context.Context(), attributes={
            "keel.job.id": job.id, "keel.job.kind": job.kind, "keel.job.attempt": job.attempts,
            "keel.job.worker": self.worker_id})
        with trace.use_span(span, end_on_exit=False):  # the handler's task (and its spans) runs under this span
            entry.task = asyncio.create_task(entry.kind.handler(job, ctx), name=f"keel-job-handler-{job.id}")
        beat = asyncio.create_task(self._beat(entry))
        result: Mapping[str, Any] | None = None
        error: BaseException | None = None
        interrupted = False
        try:
            try:
                result = await entry.task
            except asyncio.CancelledError:
                if not entry.task.cancelled():
                    raise  # this supervisor was cancelled (the loop is closing): the lease will lapse
                interrupted = True
            except Exception as exc:
                error = exc
            finally:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
            await self._record(entry, result, error, interrupted)
        finally:
            outcome = ("error" if error is not None else "interrupted" if interrupted else
                       entry.ctx.stop_reason or "succeeded")
            span.set_attribute("keel.job.outcome", outcome)
            if error is not None:
                span.set_status(StatusCode.ERROR, str(error)[:500])
            span.end()
            entry.kind.running.pop(job.id, None)
            self._wake.set()
            self._changed()

    async def _record(self, entry: _Running, result: Mapping[str, Any] | None, error: BaseException | None,
                      interrupted: bool) -> None:
        job, reason = entry.job, entry.ctx.stop_reason
        last = entry.ctx._take_progress()
        try:
            if last is not None and reason != "lease_lost":
                await self._call(self.queue.progress, job.id, self.worker_id, last)
            if reason == "lease_lost" and entry.unbeaten:
                # An attempt spent, as if the worker had died: a queue that keeps refusing beats ends the job.
                error = {"code": "heartbeat_failed", "message": f"attempt {job.attempts} stopped: its heartbeats "
                         "failed, so it was stopped before its lease lapsed"}
                with contextlib.suppress(LeaseLost):  # unless the lease lapsed meanwhile: then recovery has it
                    await self._call(self.queue.fail, job.id, self.worker_id, error, retry=True)
                log.warning("job %s (%s) stopped: its heartbeats failed", job.id, job.kind)
            elif reason == "lease_lost":
                log.warning("job %s (%s) stopped: another worker took it over", job.id, job.kind)
            elif error is None and not interrupted:
                await self._call(self.queue.complete, job.id, self.worker_id, result)
                log.info("job %s (%s) succeeded", job.id, job.kind)
            elif reason == "cancel" or isinstance(error, JobCancelled):  # the handler may learn of it first
                await self._call(self.queue.confirm_cancel, job.id, self.worker_id)
                log.info("job %s (%s) cancelled", job.id, job.kind)
            elif reason == "shutdown" or interrupted:
                await self._call(self.queue.release, job.id, self.worker_id)
                log.info("job %s (%s) stopped for the shutdown: back in the queue", job.id, job.kind)
            else:
                assert error is not None
                refused = isinstance(error, KeelError) and 400 <= error.status < 500
                retry = not (refused or isinstance(error, JobFailed))
                if isinstance(error, JobFailed):
                    error = error.error
                if not isinstance(error, KeelError):
                    log.error("job %s (%s) failed", job.id, job.kind, exc_info=error)
                after = await self._call(self.queue.fail, job.id, self.worker_id, error, retry=retry)
                log.warning("job %s (%s) attempt %d failed (%s: %s): %s", job.id, job.kind, job.attempts,
                            type(error).__name__, error,
                            f"retried in {after.run_after - time.time():.0f} s" if after.state == "queued"
                            else after.state)
        except LeaseLost as exc:
            log.warning("job %s (%s): outcome not recorded: %s", job.id, job.kind, exc.message)
        except Exception as exc:  # the queue is down: the lease lapses and recovery runs the job again
            log.error("job %s (%s): could not record its outcome (%s: %s); it runs again once its lease lapses",
                      job.id, job.kind, type(exc).__name__, exc)

    async def _beat(self, entry: _Running) -> None:
        job, ctx = entry.job, entry.ctx
        last = time.monotonic()
        tick = min(self.heartbeat_s, self.progress_interval_s)
        while True:
            await asyncio.sleep(tick)
            progress = ctx._take_progress()
            if progress is None and time.monotonic() - last < self.heartbeat_s:
                continue
            # The queue stamps the beat when the call starts (it may wait for a lock), so the lease runs from here.
            beat_at = time.monotonic()
            try:
                if progress is None:
                    cancel = await self._call(self.queue.heartbeat, job.id, self.worker_id)
                else:
                    cancel = await self._call(self.queue.progress, job.id, self.worker_id, progress)
                    self._changed()
                last = beat_at
            except LeaseLost:
                self._stop(entry, "lease_lost")
                return
            except Exception as exc:  # a blip: keep running and beat again; a long outage costs the lease
                silent = time.monotonic() - last
                log.warning("job %s (%s): heartbeat failed (%.0f s without one): %s: %s", job.id, job.kind, silent,
                            type(exc).__name__, exc)
                if silent >= self.queue.lease_s / 2:
                    # Stop before the lease lapses and another worker takes the job: two must never run it at once.
                    # The job goes back to the queue once it has stopped, if the queue can be reached by then.
                    log.error("job %s (%s): no heartbeat for %.0f s; stopping it before the queue gives it to another "
                              "worker", job.id, job.kind, silent)
                    entry.unbeaten = True
                    self._stop(entry, "lease_lost")
                    return
                if progress is not None:
                    with ctx._lock:
                        ctx._progress = ctx._progress or progress
                continue
            if cancel:
                self._stop(entry, "cancel")

    def _stop(self, entry: _Running, reason: StopReason) -> None:
        if entry.ctx._request_stop(reason) and entry.kind.interruptible and entry.task is not None:
            entry.task.cancel()

    # -- shutdown ------------------------------------------------------------------------------------------

    async def aclose(self, grace_s: float | None = None) -> None:
        """Stop claiming; ask running jobs to stop and wait up to ``grace_s`` (default ``shutdown_grace_s``);
        cancel the handlers still running then; every job stopped goes back to the queue. Closes the queue."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        grace = self.shutdown_grace_s if grace_s is None else grace_s
        if self._dispatcher is not None:
            await self._dispatcher
        entries = [r for k in self._kinds.values() for r in k.running.values()]
        for entry in entries:
            self._stop(entry, "shutdown")
        supervisors = [e.supervisor for e in entries if e.supervisor is not None]
        if supervisors:
            _, late = await asyncio.wait(supervisors, timeout=grace)
            for entry in entries:
                if entry.supervisor in late and entry.task is not None:
                    log.error("job %s (%s) did not stop within %.0f s; cancelling it (it runs again at the next "
                              "start)", entry.job.id, entry.job.kind, grace)
                    entry.task.cancel()
            if late:
                await asyncio.wait(late, timeout=10)
        self._closed = True
        retire_worker(self.worker_id)
        self._io.shutdown(wait=True)
        if self._close_queue:
            self.queue.close()
