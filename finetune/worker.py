"""The fine-tuning worker: a separate process that runs fine-tuning jobs from Keel's job queue, one at a time.

    keel finetune worker          # run jobs as they are queued, until stopped
    keel finetune worker --once   # run what is queued (and what lost workers left), then exit

The worker is a :class:`~app.jobs.runner.JobRunner` for two kinds (:mod:`finetune.dispatch`): ``finetune.evals``
first (a new adapter is evaluated before the next training starts), then ``finetune.train``, one job at a time
(one GPU). The queue gives it claims with a lease and takes back the job of a worker that died (its process is
gone, or its heartbeat stopped for ``jobs.lease_s``): the next worker resumes it from its last checkpoint, until
``finetune.max_attempts`` runs are used. Several workers (one per GPU machine) may share one queue. SIGTERM/SIGINT
stop the current job at its next step and give it back to the queue, so a restart resumes it instead of losing
it; a cancel (from any process) stops it at its next step too.

After a job succeeds, its adapter version is evaluated on the spec's ``evals`` suites
(``finetune.evaluate``), here in the worker, never in the API process. The verdicts go on the job, on its MLflow
run and on the registered version; a failing suite leaves the job ``succeeded`` and the adapter unpromotable
(``finetune.gate.adapter_gate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Tracer

from app.core.errors import KeelError
from app.core.paths import tree_hash
from app.jobs.queue import Job as QueueJob
from app.jobs.queue import JobCancelled, JobQueue, new_worker_id, open_queue
from app.jobs.runner import JobContext, JobFailed, JobRunner
from evals.store import open_eval_store
from finetune.data import InvalidTrainingData
from finetune.dispatch import EVALS, TRAIN, queue_evaluation, reconcile
from finetune.errors import JobNotFound, JobStateConflict
from finetune.jobs import Job, JobOwnershipLost, JobStore, open_job_store
from finetune.spec import parse_spec, resolve_base_model
from finetune.tracking import Tracker

if TYPE_CHECKING:
    from app.llm.base import LLMBackend
    from finetune.settings import FinetuneConfig

log = logging.getLogger("keel.finetune.worker")
LOGGED_EVENTS = 100  # logged training steps kept as events on the training's span
_JOB_LOGGERS = ("keel.finetune", "transformers", "peft", "py.warnings")
_RECONCILE_S = 30.0  # how often a running worker re-reads the store for work nobody queued


class Worker:
    def __init__(self, settings: FinetuneConfig, *, store: JobStore | None = None, queue: JobQueue | None = None,
                 tracker: Tracker | None = None, worker_id: str | None = None, eval_backend: LLMBackend | None = None,
                 tracer: Tracer | None = None) -> None:
        """``tracer``: each training and each evaluation of a job is a trace (``keel.finetune.train|eval``).
        ``queue``: Keel's job queue (default: the one ``jobs`` configures, which the API shares)."""
        self.tracer = tracer or trace.NoOpTracer()
        self.settings = settings
        self.fs = settings.finetune
        self.store = store or open_job_store(settings)
        self._own_queue = queue is None
        self.queue = queue if queue is not None else open_queue(settings.jobs, settings.home)
        self._tracker = tracker
        self.eval_backend = eval_backend  # replaces the in-process transformers model in evals (tests)
        self.worker_id = worker_id or new_worker_id()
        self.shutdown = threading.Event()
        self.trained = 0
        self._served = False

    @property
    def tracker(self) -> Tracker | None:
        if self._tracker is None and self.fs.tracking_enabled:
            self._tracker = Tracker(self.fs, self.settings.home)
        return self._tracker

    @property
    def kinds(self) -> list[str]:
        """What this worker runs, the first first: evaluations (with ``finetune.auto_eval``), then training."""
        return [EVALS, TRAIN] if self.fs.auto_eval else [TRAIN]

    def reconcile(self) -> list[Job]:
        changed = reconcile(self.store, self.queue, max_attempts=self.fs.max_attempts)
        for job in changed:
            if job.state in ("failed", "cancelled") and job.mlflow_run_id:
                self._end_run(job.mlflow_run_id, "FAILED" if job.state == "failed" else "KILLED")
        return changed

    def run(self, *, once: bool = False) -> int:
        """Run jobs until shut down (or, with ``once``, until none is left to claim). Returns trainings run."""
        return asyncio.run(self.serve(once=once))

    async def serve(self, *, once: bool = False) -> int:
        if self._served:  # the id of an earlier serve() is retired: a job still claimed by it looks abandoned
            self.worker_id = new_worker_id()
        self._served = True
        # No shutdown grace: training runs in a thread that only stops at its next step; giving its job back to the
        # queue before then would let another worker train it beside this one. (SIGKILL ends both at once.)
        runner = JobRunner(self.queue, worker_id=self.worker_id, close_queue=False, max_running=1,
                           heartbeat_s=min(self.fs.heartbeat_interval_s, self.queue.lease_s / 3),
                           poll_s=self.fs.poll_interval_s, shutdown_grace_s=None)
        if self.fs.auto_eval:
            runner.register(EVALS, self._evaluate)
        runner.register(TRAIN, self._train)
        log.info("fine-tuning worker %s started (store %s, runs %s)", self.worker_id,
                 self.store.path or "in Postgres (finetune.url)", ", ".join(self.kinds))
        before = self.trained
        try:
            await asyncio.to_thread(self.reconcile)
            await runner.start()
            next_reconcile = time.monotonic() + _RECONCILE_S
            while not self.shutdown.is_set():
                await asyncio.sleep(min(0.2, self.fs.poll_interval_s))
                if once and not runner.running() and not await asyncio.to_thread(self._claimable):
                    await asyncio.to_thread(self.reconcile)  # a lost worker's job the queue just took back
                    if not await asyncio.to_thread(self._claimable):
                        break
                if time.monotonic() >= next_reconcile:
                    await asyncio.to_thread(self.reconcile)
                    next_reconcile = time.monotonic() + _RECONCILE_S
        finally:
            await runner.aclose()
            if self._own_queue:
                self.queue.close()
        return self.trained - before

    def _claimable(self) -> bool:
        """Work for this worker: a job it may claim now, or one it has just claimed (not yet running here)."""
        self.queue.recover_stale()
        now = time.time()
        return any(j.run_after <= now if j.state == "queued" else j.claimed_by == self.worker_id
                   for j in self.queue.list(kinds=self.kinds, states=["queued", "running"]))

    # -- the two handlers --------------------------------------------------------------------------------------

    async def _train(self, task: QueueJob, ctx: JobContext) -> dict[str, Any]:
        job_id = task.payload["job_id"]
        lost = (task.error or {}).get("code") in ("worker_lost", "heartbeat_failed")
        note = f"recovery: {task.error['message']}; requeued to resume from its last checkpoint" if lost else ""
        try:
            job = await asyncio.to_thread(self.store.start, job_id, self.worker_id, attempt=task.attempts, note=note)
        except JobNotFound as exc:
            raise JobFailed(exc) from None
        except JobStateConflict as exc:  # cancelled (or ended: a worker died after recording it) meanwhile
            ended = await asyncio.to_thread(self.store.get, job_id)
            if ended.state == "cancelled":
                raise JobCancelled(exc.message) from None
            if ended.state == "failed":
                error = KeelError(ended.error or exc.message, code=ended.error_code or "training_failed")
                raise JobFailed(error) from None
            return {"skipped": exc.message}
        with self._span("keel.finetune.train", job, task) as span:
            after = await asyncio.to_thread(self.run_job, job, ctx)
            span.set_attribute("keel.finetune.state", after.state)
        self.trained += 1
        return await self._outcome(after, ctx, training=True)

    async def _evaluate(self, task: QueueJob, ctx: JobContext) -> dict[str, Any]:
        try:
            job = await asyncio.to_thread(self.store.start_evals, task.payload["job_id"], self.worker_id)
        except JobNotFound as exc:
            raise JobFailed(exc) from None
        except JobStateConflict as exc:  # evaluated meanwhile (this evaluation's job ran twice)
            return {"skipped": exc.message}
        with self._span("keel.finetune.eval", job, task) as span:
            after = await asyncio.to_thread(self.run_evals, job, ctx)
            span.set_attribute("keel.finetune.evals_state", after.evals_state or "")
        return await self._outcome(after, ctx, training=False)

    async def _outcome(self, job: Job, ctx: JobContext, *, training: bool) -> dict[str, Any]:
        """The queue job's outcome from the fine-tuning job's (recorded on it already)."""
        unfinished = job.state in ("queued", "running") if training else job.evals_state in ("pending", "running")
        if unfinished:
            ctx.check()  # stopped for the shutdown (the runner gives the job back) or by a lost lease: it raises
            # Stopped without being asked (a CANCEL file is a cancel; this is something else): try again later,
            # so that the queue job and the fine-tuning job never disagree on whether it is done.
            raise KeelError(f"fine-tuning job {job.id} stopped before it finished; it runs again", code="interrupted")
        if training and job.state == "cancelled":
            raise JobCancelled(f"fine-tuning job {job.id} was cancelled")
        if training and job.state == "failed":
            raise JobFailed(KeelError(job.error or "training failed", code=job.error_code or "training_failed"))
        if not training and job.evals_state == "error":
            raise JobFailed(KeelError((job.evals or {}).get("error") or "evals failed", code="eval_failed"))
        if training and job.state == "succeeded" and job.evals_state == "pending":
            await asyncio.to_thread(queue_evaluation, self.queue, job, max_attempts=self.fs.max_attempts)
        return {"state": job.state, "evals_state": job.evals_state, "model": job.model_name,
                "version": job.model_version}

    @contextlib.contextmanager
    def _span(self, name: str, job: Job, task: QueueJob):
        span = self.tracer.start_span(name, context=otel_context.Context(), attributes={
            "keel.finetune.job_id": job.id, "keel.finetune.attempt": task.attempts, "keel.finetune.worker":
            self.worker_id, "keel.job.id": task.id})
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
                yield span
        finally:
            span.end()

    def run_job(self, job: Job, ctx: JobContext | None = None) -> Job:
        """Train a job this worker has started (:meth:`JobStore.start`); ``ctx`` says when to stop (a cancel, the
        worker's shutdown, or the queue gave the job to another worker)."""
        # lazy: only the worker process trains: keeps `keel --help` and `import app.api.main` ~4 ms lighter
        from finetune.train import CANCEL_FILE, TrainHooks, run_training

        handler = logging.FileHandler(job.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
        saved_levels = {}
        for name in _JOB_LOGGERS:
            lg = logging.getLogger(name)
            saved_levels[name] = lg.level
            lg.addHandler(handler)
            if name == "keel.finetune":
                lg.setLevel(logging.INFO)
        logging.captureWarnings(True)
        run_id = job.mlflow_run_id
        mine = self.worker_id  # every state change checks the job is still this worker's
        try:
            spec = parse_spec(job.spec_yaml, source=f"job {job.id} spec")
            model_name = self.fs.model_prefix + spec.model_name
            tracker = self.tracker
            if tracker is not None:
                run_id = tracker.start_run(job_id=job.id, spec=spec, existing_run_id=job.mlflow_run_id)
                self.store.update(job.id, mlflow_run_id=run_id, model_name=model_name)
            else:
                self.store.update(job.id, model_name=model_name)

            # The training runs in a thread under the job's trace span (keel.finetune.train): the data check and
            # the registered version are attributes of it, each logged step an event (the first LOGGED_EVENTS:
            # a span keeps 128 events and drops the oldest; the last losses are attributes too).
            span = trace.get_current_span()
            logged = 0

            def on_start(info: dict[str, Any]) -> None:
                report = info["data"]
                span.set_attributes({
                    "keel.finetune.data_hash": report["data_hash"],
                    **{f"keel.finetune.{k}": v for k, v in report.items()
                       if k in ("train_examples", "validation_examples") and isinstance(v, int)}})
                self.store.update(job.id, data_report=report, data_hash=report["data_hash"])
                if tracker is not None and run_id:
                    tracker.log_data(run_id, report)

            def on_log(step: int, values: dict[str, float]) -> None:
                nonlocal logged
                numbers = {f"keel.finetune.{k}": float(v) for k, v in values.items() if isinstance(v, int | float)}
                if logged < LOGGED_EVENTS:
                    span.add_event("keel.finetune.log", {"keel.finetune.step": step, **numbers})
                logged += 1
                span.set_attributes({"keel.finetune.last_step": step,
                                     **{k.replace("keel.finetune.", "keel.finetune.last_"): v
                                        for k, v in numbers.items()}})
                latest = {f"last_{k}": v for k, v in values.items()}
                if step == 0 and "eval_loss" in values:
                    latest["eval_loss_initial"] = values["eval_loss"]
                self.store.merge_metrics(job.id, latest)
                if tracker is not None and run_id:
                    try:
                        tracker.log_metrics(run_id, step, values)
                    except Exception as exc:  # tracking must not kill a training run
                        log.warning("MLflow metric logging failed: %s", exc)

            def on_progress(step: int, max_steps: int) -> None:
                # the job's heartbeat_at is the worker's last sign of life on it (its lease is the queue's)
                self.store.update(job.id, step=step, max_steps=max_steps, heartbeat_at=time.time())

            def should_cancel() -> bool:
                return self._stopping(ctx) or self.store.get(job.id).cancel_requested

            hooks = TrainHooks(on_start=on_start, on_log=on_log, on_progress=on_progress, should_cancel=should_cancel)
            result = run_training(spec, Path(job.run_dir), models_dir=self.settings.models_dir,
                                  device=self.fs.device, hooks=hooks)
            if result.status == "cancelled":
                if ctx is not None and ctx.stop_reason == "lease_lost":
                    raise JobOwnershipLost(f"job {job.id} stopped at step {result.global_step}: its heartbeat "
                                           "failed, so another worker may run it")
                asked = self.store.get(job.id).cancel_requested or (ctx is not None and ctx.stop_reason == "cancel")
                if asked or (Path(job.run_dir) / CANCEL_FILE).exists():  # the file: a cancel by hand, documented
                    self._end_run(run_id, "KILLED")
                    self.store.append_log(job.id, f"cancelled at step {result.global_step}")
                    return self.store.transition(job.id, "cancelled", owner=mine, worker=None)
                self.store.append_log(job.id, f"worker shutting down: requeued at step {result.global_step}")
                return self.store.transition(job.id, "queued", owner=mine, worker=None, heartbeat_at=None)

            fields: dict[str, Any] = {"adapter_path": str(result.adapter_dir), "step": result.global_step,
                                      "max_steps": result.max_steps}
            if tracker is not None and run_id and result.adapter_dir is not None:
                tracker.log_metrics(run_id, result.global_step, {k: v for k, v in result.metrics.items()
                                                                 if k.startswith(("s_per", "train_tok"))})
                version = tracker.register_adapter(
                    run_id, result.adapter_dir, model_name,
                    tags={"keel.job_id": job.id, "keel.spec_hash": result.spec_hash,
                          "keel.data_hash": result.data_report.data_hash if result.data_report else "",
                          "keel.base_model": result.base_model, "keel.evals": ",".join(spec.evals),
                          "keel.adapter_hash": tree_hash(result.adapter_dir)},
                )
                fields.update(model_name=version.model, model_version=version.version)
                span.set_attributes({"keel.finetune.model": version.model,
                                     "keel.finetune.version": str(version.version)})
                if spec.evals:
                    fields.update(evals_state="pending", evals={"suites_requested": list(spec.evals), "attempts": 0})
                self._end_run(run_id, "FINISHED")
            self.store.merge_metrics(job.id, result.metrics)
            self.store.append_log(job.id, "succeeded" + (f": registered {fields['model_name']} version "
                                                         f"{fields['model_version']} (alias candidate)"
                                                         if "model_version" in fields else "")
                                  + (f"; evals queued: {', '.join(spec.evals)}" if "evals_state" in fields else ""))
            return self.store.transition(job.id, "succeeded", owner=mine, worker=None, **fields)
        except JobOwnershipLost as exc:
            # Not this worker's job any more: leave its state to whoever holds it now (no requeue, no failure).
            log.error("job %s: %s; this worker leaves it alone", job.id, exc.message)
            with contextlib.suppress(OSError):
                self.store.append_log(job.id, f"worker {mine} let go of the job: {exc.message}")
            return self.store.get(job.id)
        except InvalidTrainingData as exc:
            return self._fail(job, run_id, exc, report=exc.report.to_dict() if exc.report else None)
        except KeelError as exc:
            return self._fail(job, run_id, exc)
        except Exception as exc:
            log.exception("job %s crashed", job.id)
            return self._fail(job, run_id, KeelError(f"{type(exc).__name__}: {exc}", code="training_failed"))
        finally:
            for name in _JOB_LOGGERS:
                lg = logging.getLogger(name)
                lg.removeHandler(handler)
                lg.setLevel(saved_levels[name])
            handler.close()

    def run_evals(self, job: Job, ctx: JobContext | None = None) -> Job:
        """Evaluate a succeeded job's adapter version on its spec's suites (started with ``start_evals``)."""
        # lazy: keeps `keel --help` fast: the eval runner, chat service and router (numpy, httpx), ~0.25 s
        from finetune.evaluate import EvalInterrupted, evaluate_adapter

        started = time.time()
        store = None
        try:
            spec = parse_spec(job.spec_yaml, source=f"job {job.id} spec")
            suites = list((job.evals or {}).get("suites_requested") or spec.evals)
            tracker = self.tracker
            if tracker is None or not job.model_name or not job.model_version:
                raise KeelError("the job has no registered adapter version to evaluate (tracking is off)",
                                code="eval_failed")
            version = tracker.get_version(job.model_name, job.model_version)
            self.store.append_log(job.id, f"evaluating {version.ref} on {', '.join(suites)}")
            store = open_eval_store(self.settings)
            evaluation = asyncio.run(evaluate_adapter(
                self.settings, version, suites, base_model=resolve_base_model(spec, self.settings.models_dir),
                store=store, backend=self.eval_backend,
                should_stop=lambda: self._stopping(ctx)))
        except EvalInterrupted:
            # a lost lease stops the evals like a shutdown: another worker evaluates the job now
            if ctx is not None and ctx.stop_reason == "lease_lost":
                log.error("evals of job %s stopped: the job is no longer this worker's; its state is left alone",
                          job.id)
                return self.store.get(job.id)
            why = "cancelled on the job queue" if ctx is not None and ctx.stop_reason == "cancel" else "shutdown"
            self.store.append_log(job.id, f"evals interrupted by {why}: queued again (the runs resume)")
            return self.store.finish_evals(job.id, "pending", {})
        except Exception as exc:
            message = exc.message if isinstance(exc, KeelError) else f"{type(exc).__name__}: {exc}"
            log.exception("evals of job %s failed to run", job.id)
            self.store.append_log(job.id, f"evals could not run: {message}")
            return self.store.finish_evals(job.id, "error", {"error": message, "finished_at": time.time()})
        finally:
            if store is not None:
                store.close()
        record = {**evaluation.to_dict(), "error": None, "started_at": started, "finished_at": time.time()}
        try:
            tracker.log_evaluation(job.mlflow_run_id, evaluation, step=job.step)
        except Exception as exc:  # the verdicts are in the eval store and on the job either way
            log.warning("could not record the evals of job %s in MLflow: %s", job.id, exc)
            record["tracking_error"] = str(exc)
        self.store.append_log(job.id, f"evals {evaluation.state}: {evaluation.summary()}")
        return self.store.finish_evals(job.id, evaluation.state, record)

    def _fail(self, job: Job, run_id: str | None, exc: KeelError, report: dict | None = None) -> Job:
        self.store.append_log(job.id, f"failed ({exc.code}): {exc.message}")
        self._end_run(run_id, "FAILED")
        fields: dict[str, Any] = {"error": exc.message, "error_code": exc.code, "worker": None}
        if report is not None:
            fields["data_report"] = report
        try:
            return self.store.transition(job.id, "failed", owner=self.worker_id, **fields)
        except JobOwnershipLost as lost:
            log.error("job %s failed here (%s), but %s; its state is left alone", job.id, exc.message, lost.message)
            return self.store.get(job.id)

    def _stopping(self, ctx: JobContext | None) -> bool:
        """Under the runner only its stop counts (the worker's shutdown reaches the job through it, so that the job
        goes back to the queue); called directly (tests), the worker's own shutdown flag."""
        return ctx.stop_requested if ctx is not None else self.shutdown.is_set()

    def _end_run(self, run_id: str | None, status: str) -> None:
        if run_id and self.tracker is not None:
            try:
                self.tracker.end_run(run_id, status)
            except Exception as exc:
                log.warning("could not end MLflow run %s: %s", run_id, exc)


class WorkerProcess:
    """The worker as a child process of the API (optional): ``start()`` in the lifespan, ``stop()`` on
    shutdown. The child dies with its parent (PR_SET_PDEATHSIG); a job it was running is recovered
    by the next worker. The child reads settings like any entry point (``KEEL_*``, keel.yaml), with
    ``KEEL_HOME`` set to this process's home so both use the same job store."""

    def __init__(self, settings: FinetuneConfig, *, python: str | None = None, once: bool = False) -> None:
        self.settings = settings
        self.python = python or sys.executable
        self.once = once
        self.proc: Any = None
        self.log_path = settings.logs_dir / "finetune-worker.log"

    def start(self) -> None:
        import os
        import subprocess

        from app.llm.vllm_server import _die_with_parent  # lazy: keeps `keel --help` fast: pulls httpx

        if self.alive:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KEEL_HOME": str(Path(self.settings.home).resolve())}
        cmd = [self.python, "-m", "app.cli", "finetune", "worker"] + (["--once"] if self.once else [])
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent, cwd=Path(__file__).resolve().parents[1])
        log.info("started fine-tuning worker pid %d (log %s)", self.proc.pid, self.log_path)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM: the worker stops at the next training step and requeues its job; SIGKILL after timeout."""
        import subprocess

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
