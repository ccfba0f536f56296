"""Continuous training: trigger -> dataset -> fine-tune -> eval gate -> canary -> approval -> promote.

A run is a durable job (kind ``pipeline``) on Keel's job runner. Each step records its state, log and artifacts
in the pipeline store *before* it waits on anything (the fine-tuning job it submitted, the release it started),
so a run stopped by a restart or a crash resumes at its step and reattaches to what that step already started,
instead of starting it twice. A step that fails records why and ends the run (``failed``, with an outcome:
``contract_failed``, ``gate_failed``, ``rolled_back``, ``rejected`` or ``error``); nothing is retried behind
anyone's back — ``retry`` resumes an ``error`` at its failed step when a person asks.

Training runs in Keel's fine-tuning worker (``keel finetune worker``, one per GPU machine), evaluation in a worker
with ``finetune.auto_eval``, the canary in the release controller: a run orchestrates services that already do
the work; it does not schedule compute of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.audit import AuditEvent
from app.core.errors import Conflict, InvalidRequest, KeelError, NotFound, PermissionDenied
from app.jobs.queue import Job
from app.jobs.runner import JobContext, JobRunner
from finetune.data import InvalidTrainingData, prompt_key
from finetune.spec import JobSpec
from lifecycle.pipeline.dataset import Spans, read_jsonl, traced_example, write_snapshot
from lifecycle.pipeline.settings import PipelineSettings
from lifecycle.pipeline.spec import STEPS, Definition, InvalidPipeline, PipelineSpec, load_pipeline
from lifecycle.pipeline.store import TRAIL, PipelineStore, Run, check_run_id
from lifecycle.releases.controller import is_ready

if TYPE_CHECKING:
    from finetune.service import FinetuneService
    from lifecycle.releases.service import ReleaseService

log = logging.getLogger("keel.pipeline")
KIND = "pipeline"
_WAIT = "wait"
_ATTEMPTS = 50  # crashes a run's job survives: every attempt resumes the run at its step


class _Stop(Exception):
    """The run was cancelled, or another job drives it now: this job stops without touching it."""


class StepFailed(Exception):
    """A step's expected way to stop a run: ``outcome`` says which decision or problem ended it."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


@dataclass
class PipelineDeps:
    """What the steps and triggers call: the services the API uses, nothing of their own."""

    finetune: FinetuneService
    default_model: str
    releases: ReleaseService | None = None
    spans: Spans | None = None
    #: drift results newest first (``DriftStore.list``)
    drift_results: Callable[..., list[dict[str, Any]]] | None = None
    #: eval runs of a suite, newest first (``EvalStore.list_runs``)
    eval_runs: Callable[..., list[Any]] | None = None


class PipelineService:
    def __init__(self, store: PipelineStore, runner: JobRunner, settings: PipelineSettings, deps: PipelineDeps, *,
                 home: Path) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        self.deps = deps
        self.runs_dir = Path(home) / "pipelines"
        self.errors: dict[str, str] = {}  # definition files that do not load, and why

    def register(self, runner: JobRunner) -> None:
        # interruptible: every wait is an await, and every step resumes from what it recorded
        runner.register(KIND, self._handle, slots=self.settings.slots, interruptible=True)

    # -- definitions ---------------------------------------------------------------------------------------

    def definitions(self) -> dict[str, Definition]:
        """Every pipeline in the configured folders (read each time: editing a file needs no restart). A file that
        does not load is left out and reported in :attr:`errors`; two files of one name: the first folder wins."""
        found: dict[str, Definition] = {}
        errors: dict[str, str] = {}
        for folder in self.settings.folders():
            for path in sorted(Path(folder).glob("*.yaml")) if Path(folder).is_dir() else ():
                try:
                    d = load_pipeline(path)
                except InvalidPipeline as exc:
                    errors[str(path)] = exc.message
                    continue
                found.setdefault(d.name, d)
        self.errors = errors
        return found

    def definition(self, name: str) -> Definition:
        d = self.definitions().get(name)
        broken = next((m for path, m in self.errors.items() if Path(path).stem == name), None)
        if d is None and broken is not None:  # its file is there but does not load: say why, not "no pipeline"
            raise InvalidPipeline(broken)
        if d is None:
            raise NotFound(f"no pipeline {name!r} (GET /v1/pipelines lists them; definitions live in "
                           f"{', '.join(str(f) for f in self.settings.folders())})", param="name",
                           code="pipeline_not_found")
        return d

    def summaries(self) -> list[dict[str, Any]]:
        out = []
        for d in self.definitions().values():
            last = self.store.last_run(d.name)
            out.append({"name": d.name, "description": d.spec.description, "model": d.model, "source": d.source,
                        "hash": d.hash, "job": str(d.spec.job), "evals": d.job.evals,
                        "triggers": [t.model_dump() for t in d.spec.triggers], "paused": d.spec.paused,
                        "cooldown_s": d.spec.cooldown,
                        "canary": d.spec.canary.endpoint if d.spec.canary else None,
                        "approval": d.spec.promote.approval,
                        "last_run": last.public(logs=False) if last else None})
        return out

    # -- runs ------------------------------------------------------------------------------------------------

    async def start(self, name: str, *, actor: str, reason: str = "", trigger: Mapping[str, Any] | None = None,
                    can_release: bool = True) -> Run:
        """A run now (409 ``pipeline_run_open`` while one is open). A person's start ignores the cooldown.
        ``can_release``: whether the caller's key holds ``releases`` (a pipeline that moves traffic needs it)."""
        d = await asyncio.to_thread(self.definition, name)
        _release_scope(d.spec.model_dump(), can_release, "starting", d.name)
        await asyncio.to_thread(self.preflight, d)
        trigger = dict(trigger or {"kind": "manual", "by": actor, "reason": reason})
        definition = {"pipeline": d.spec.model_dump(mode="json"), "job": d.job.model_dump(mode="json"),
                      "source": d.source}
        run = await asyncio.to_thread(
            self.store.create, pipeline=d.name, model=d.model, trigger=trigger, definition=definition,
            definition_hash=d.hash, actor=actor, skip=() if d.spec.canary else ("canary",))
        log.info("pipeline %s: run %s started by %s (%s)", d.name, run.id, actor, trigger.get("kind"))
        return await self._enqueue(run, actor)

    def preflight(self, d: Definition) -> None:
        """What would only fail hours later, refused now: a canary without releases, an endpoint that is a model
        name, a snapshot folder fine-tuning may not read, source data outside the allowed folders."""
        releases = self.deps.releases
        if d.spec.canary is not None:
            if releases is None:
                raise InvalidPipeline(f"pipeline {d.name!r} releases through a canary, but releases are off on this "
                                      "server (releases.enabled)")
            if releases.name_taken(d.spec.canary.endpoint):
                raise InvalidPipeline(f"pipeline {d.name!r}: canary endpoint {d.spec.canary.endpoint!r} is already a "
                                      "model name clients call; a release endpoint needs a name of its own")
        ft = self.deps.finetune
        if d.spec.canary is not None or d.spec.promote.deploy_alias:
            backend = d.spec.canary.backend if d.spec.canary is not None else None
            try:
                ft.adapter_backend(backend, d.job.lora.r)
            except InvalidRequest as exc:
                raise InvalidPipeline(f"pipeline {d.name!r} serves its adapter, but {exc.message}") from None
        ft.check_data_location(d.job)
        ft.check_data_location(self._job_spec(d, str(self.runs_dir / "_" / "dataset.jsonl"), None))

    async def _enqueue(self, run: Run, actor: str) -> Run:
        """Queue a job that drives ``run`` (the job claims the run when it starts). A queue that refuses (the server
        is stopping) leaves the run for :meth:`reconcile`, which queues it again once it is back."""
        await self.runner.submit(KIND, {"run": run.id}, owner=actor, max_attempts=_ATTEMPTS)
        return await asyncio.to_thread(self.store.get, run.id)

    def get(self, run_id: str) -> Run:
        return self.store.get(check_run_id(run_id))

    def list(self, *, pipeline: str | None = None, state: str | None = None, limit: int = 50) -> list[Run]:
        return self.store.list(pipeline=pipeline, state=state, limit=limit)

    async def decide(self, run_id: str, *, approve: bool, actor: str, reason: str = "") -> Run:
        """A person's answer to a run waiting for approval; the run continues (promote) or ends (rejected)."""
        run = await asyncio.to_thread(self.get, run_id)
        decision = {"approved": approve, "by": actor, "reason": reason, "at": time.time()}
        event = AuditEvent(trail=TRAIL, action="run.approve" if approve else "run.reject", subject_kind="pipeline",
                           subject=run.pipeline, subject_ref=run.id, actor=actor, reason=reason)
        run = await asyncio.to_thread(self.store.set_run, run.id, state="queued", decision=decision, event=event,
                                      expect=frozenset({"waiting"}))
        return await self._enqueue(run, actor)

    async def retry(self, run_id: str, *, actor: str, reason: str = "", can_release: bool = True) -> Run:
        run = await asyncio.to_thread(self.get, run_id)
        _release_scope(run.definition["pipeline"], can_release, "retrying", run.pipeline)
        if run.state != "failed" or run.outcome != "error":
            raise Conflict(f"pipeline run {run.id} is {run.state}" + (f" ({run.outcome})" if run.outcome else "")
                           + "; only a run that failed on an error resumes. A decision (gate, contract, canary, "
                           "a person) stands: start a new run", param="run_id", code="pipeline_run_state")
        run = await asyncio.to_thread(self.store.reopen, run.id, actor=actor, reason=reason)
        return await self._enqueue(run, actor)

    async def cancel(self, run_id: str, *, actor: str, reason: str = "") -> Run:
        """End an open run and stop what it started: its job, its fine-tuning job, its running canary."""
        run = await asyncio.to_thread(self.get, run_id)
        if run.finished:
            raise Conflict(f"pipeline run {run.id} is already {run.state}", param="run_id",
                           code="pipeline_run_finished")
        why = reason or f"cancelled by {actor}"
        run = await asyncio.to_thread(self.store.finish, run.id, "cancelled", outcome="cancelled", error=why,
                                      actor=actor)
        if run.job_id:
            with contextlib.suppress(Conflict, NotFound):  # already finished
                await self.runner.cancel(run.job_id, actor=actor)
        await asyncio.to_thread(self._stop_started, run, actor, why)
        await self._retire_candidate(run, actor, why)
        return run

    async def _retire_candidate(self, run: Run, actor: str, reason: str) -> None:
        """A version that was not promoted stops being served under its candidate alias (``<model>-v<version>``):
        nobody may reach a rejected or rolled-back adapter by its name, and vLLM frees its slot."""
        trained = run.steps["finetune"].artifacts
        if not trained.get("model") or not trained.get("version"):
            return
        alias = run.steps["canary"].artifacts.get("candidate") or f"{trained['model']}-v{trained['version']}"
        try:
            if await self.deps.finetune.undeploy(alias, model=trained["model"], actor=actor,
                                                 reason=f"pipeline run {run.id}: {reason}"):
                log.info("pipeline run %s: %s no longer served", run.id, alias)
        except Exception:  # the run's outcome stands; the alias can be removed by hand
            log.exception("pipeline run %s: could not stop serving %s", run.id, alias)

    def _stop_started(self, run: Run, actor: str, reason: str) -> None:
        """Stop what a finished run started and left running: found by who started it (the run), not by what the
        run recorded, so a step interrupted between starting something and recording it leaves nothing behind."""
        owner = _actor(run)
        for job in self.deps.finetune.list(limit=200):
            if job.submitted_by == owner and job.state in ("queued", "running"):
                with contextlib.suppress(NotFound, Conflict):  # finished meanwhile
                    self.deps.finetune.cancel(job.id, actor=actor)
        self._roll_back_canary(run, actor, reason)

    def _roll_back_canary(self, run: Run, actor: str, reason: str) -> None:
        releases, c = self.deps.releases, run.definition["pipeline"].get("canary")
        if releases is None or not c:
            return
        for _ in range(3):  # the controller may change it between our read and our write: read again
            release = _current(releases, c["endpoint"])
            if release is None or release.created_by != _actor(run) or release.finished:
                return
            with contextlib.suppress(Conflict):
                releases.rollback(c["endpoint"], actor=actor, reason=f"pipeline run {run.id}: {reason}")
                return

    # -- triggers --------------------------------------------------------------------------------------------

    def due(self, d: Definition, *, now: float | None = None) -> dict[str, Any] | None:
        """The trigger that starts a run of ``d`` now, or None: only with no open run, past the cooldown, and on
        what happened since the last run started (or since this home first saw the pipeline)."""
        if not d.spec.triggers or d.spec.paused:
            return None
        now = time.time() if now is None else now
        last = self.store.last_run(d.name)
        if last is not None and (not last.finished or now - last.created_at < d.spec.cooldown):
            return None
        since = max(self.store.arm(d.name, now=now), last.created_at if last else 0.0)
        for t in d.spec.triggers:
            fired = self._fired(t, since, now)
            if fired is not None:
                return {"kind": t.kind, **fired}
        return None

    def _fired(self, t: Any, since: float, now: float) -> dict[str, Any] | None:
        if t.kind == "schedule":
            return {"reason": f"every {t.every:g} s"} if now - since >= t.every else None
        if t.kind == "drift" and self.deps.drift_results is not None:
            for r in self.deps.drift_results(verdict="drift", limit=20):
                if r["created"] <= since:
                    break
                checks = r.get("drifted_checks") or []
                if not t.checks or set(t.checks) & set(checks):
                    return {"reason": f"drift check {r['id']}: {', '.join(checks)}", "drift_check": r["id"],
                            "drifted": checks}
            return None
        if t.kind == "feedback" and self.deps.releases is not None:
            n = self.deps.releases.store.count_ratings(since=since, min_score=t.min_score)
            return {"reason": f"{n} new ratings", "ratings": n} if n >= t.min_new else None
        if t.kind == "eval_regression" and self.deps.eval_runs is not None:
            done = [r for r in self.deps.eval_runs(suite=t.suite, limit=10) if r.passed is not None]
            if len(done) >= 2 and not done[0].passed and done[1].passed and _epoch(done[0].started_at) > since:
                return {"reason": f"eval suite {t.suite} failed (run {done[0].id}) after passing (run {done[1].id})",
                        "eval_run": done[0].id}
        return None

    async def check_triggers(self) -> list[Run]:
        """Start a run of every pipeline whose trigger fired (every API process may call it: one run wins)."""
        started = []
        for d in (await asyncio.to_thread(self.definitions)).values():
            fired = await asyncio.to_thread(self.due, d)
            if fired is None:
                continue
            with contextlib.suppress(Conflict):  # another process started it first
                started.append(await self.start(d.name, actor=f"trigger:{fired['kind']}", trigger=fired))
        return started

    async def reconcile(self, *, grace_s: float = 60.0) -> list[str]:
        """Queue again every open run that no live job drives (its job finished or gave up, or the queue refused
        it), once it has been still for ``grace_s``: a run resumes at its step, so a second job is harmless, and a
        stale one notices it lost the run (:meth:`_handle`)."""
        queued = []
        for run in await asyncio.to_thread(self.store.list, state=None, limit=500, open_only=True):
            if run.state == "waiting" or time.time() - run.updated_at < grace_s:
                continue
            job = None
            if run.job_id:
                with contextlib.suppress(NotFound):
                    job = await self.runner.get(run.job_id)
            if job is None or job.done:
                log.warning("pipeline %s run %s had no live job (%s); queued again", run.pipeline, run.id,
                            job.state if job else "none")
                await self._enqueue(run, "system:reconcile")
                queued.append(run.id)
        return queued

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            try:
                await self.reconcile()
                await self.check_triggers()
            except Exception:  # a bad round must not end the loop
                log.exception("checking pipeline triggers failed; trying again in %.0f s",
                              self.settings.check_interval_s)

    # -- running -------------------------------------------------------------------------------------------

    async def _handle(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        run_id = job.payload["run"]
        try:
            return await self._drive(run_id, job, ctx)
        except Exception as exc:
            if ctx.stop_requested:
                raise
            # Outside any step (the store, a definition that no longer validates): the run must not stay open with
            # nobody driving it; it fails, and a person can retry it.
            log.exception("pipeline run %s failed outside its steps", run_id)
            run = await asyncio.to_thread(self.store.get, run_id)
            if not run.finished:
                step = run.current_step or STEPS[-1]
                return await self._failed(run, step, "error", f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")
            return {"run": run_id, "state": run.state}

    async def _drive(self, run_id: str, job: Job, ctx: JobContext) -> dict[str, Any]:
        run = await asyncio.to_thread(self.store.get, run_id)
        if run.finished:
            return {"run": run_id, "state": run.state}
        await asyncio.to_thread(self.store.set_run, run_id, job_id=job.id)  # this job drives the run now
        definition = Definition(spec=PipelineSpec.model_validate(run.definition["pipeline"]),
                                job=JobSpec.model_validate(run.definition["job"]), source=run.definition["source"],
                                hash=run.definition_hash)
        for name in STEPS:
            run = await asyncio.to_thread(self.store.get, run_id)
            if run.finished:  # cancelled meanwhile
                return {"run": run_id, "state": run.state}
            if run.job_id != job.id:  # a later job took the run over (reconcile, a decision): this one stops
                return {"run": run_id, "state": run.state, "superseded_by": run.job_id}
            if run.steps[name].state in ("succeeded", "skipped"):
                continue
            await asyncio.to_thread(self.store.step_started, run_id, name)
            ctx.set_progress({"run": run_id, "step": name})
            step = _Step(self, run, definition, name, ctx, job.id)
            try:
                result = await getattr(self, f"_{name}")(step)
            except _Stop as exc:
                log.info("pipeline run %s: job %s stops: %s", run_id, job.id, exc)
                return {"run": run_id, "stopped": str(exc)}
            except StepFailed as exc:
                return await self._failed(run, name, exc.outcome, exc.message)
            except Exception as exc:
                if ctx.stop_requested:  # the runner is stopping it: released or cancelled, not failed
                    raise
                if isinstance(exc, KeelError) and exc.status < 500:  # a refusal says what to fix; no traceback
                    log.warning("pipeline %s run %s: step %s refused: %s", run.pipeline, run_id, name, exc.message)
                else:
                    log.exception("pipeline %s run %s: step %s failed", run.pipeline, run_id, name)
                return await self._failed(run, name, "error", f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")
            if result == _WAIT:
                await asyncio.to_thread(self.store.step_update, run_id, name, state="waiting")
                await asyncio.to_thread(self.store.set_run, run_id, state="waiting")
                return {"run": run_id, "state": "waiting", "step": name}
            await asyncio.to_thread(self.store.step_update, run_id, name, state="succeeded", finished=True)
        run = await asyncio.to_thread(self.store.finish, run_id, "succeeded", outcome="promoted")
        log.info("pipeline %s run %s: promoted", run.pipeline, run_id)
        return {"run": run_id, "state": run.state, "outcome": run.outcome}

    async def _failed(self, run: Run, step: str, outcome: str, message: str) -> dict[str, Any]:
        await asyncio.to_thread(self.store.step_update, run.id, step, state="failed", error=message, finished=True,
                                log=_line(f"failed: {message}"))
        run = await asyncio.to_thread(self.store.finish, run.id, "failed", outcome=outcome, error=message)
        log.info("pipeline %s run %s stopped at %s (%s): %s", run.pipeline, run.id, step, outcome, message)
        if outcome in ("rolled_back", "rejected"):
            await self._retire_candidate(run, "pipeline", outcome)
        return {"run": run.id, "state": run.state, "outcome": outcome}

    # -- the steps (each resumable: it reads what it recorded before doing anything) ----------------------------

    async def _trigger(self, s: _Step) -> None:
        t = s.run.trigger
        await s.record({"trigger": t}, f"started by {s.run.created_by}: {t.get('reason') or t.get('kind')}")

    async def _dataset(self, s: _Step) -> None:
        spec = s.d.spec.dataset
        records: list[dict[str, Any]] = []
        sources: dict[str, Any] = {}
        if spec.include_job_data:
            path = s.d.job.dataset.path
            await asyncio.to_thread(self.deps.finetune.check_data_location, s.d.job)
            try:
                rows, digest = await asyncio.to_thread(read_jsonl, path)
            except ValueError as exc:
                raise StepFailed("contract_failed", f"the job's data fails its contract: {exc}") from None
            records += rows
            sources["job_data"] = {"path": str(path), "records": len(rows), "sha256": digest}
        if spec.feedback is not None:
            sources["feedback"] = await asyncio.to_thread(self._feedback_examples, s, records)
            fb = sources["feedback"]
            await s.record({}, f"feedback: {fb['rated']} rated answers, {fb['used']} used, "
                               f"{fb['without_content']} without content in their traces, "
                               f"{fb.get('already_covered', 0)} asking what the data already answers"
                               + (f" ({fb['note']})" if fb.get("note") else ""))
        if len(records) < spec.min_examples:
            raise StepFailed("contract_failed", f"the dataset has {len(records)} examples; this pipeline needs at "
                                                f"least {spec.min_examples} (dataset.min_examples)")
        manifest = await asyncio.to_thread(write_snapshot, self.runs_dir / s.run.id, records, sources)
        job = self._job_spec(s.d, manifest["path"], s.run)
        ft = self.deps.finetune
        try:
            await asyncio.to_thread(ft.check_data_location, job)
            report = await asyncio.to_thread(ft.validate, job)
        except InvalidTrainingData as exc:
            await s.record({"snapshot": manifest, "contract": exc.report.to_dict() if exc.report else None})
            raise StepFailed("contract_failed", f"the dataset fails its contract: {exc.message}") from None
        await s.record({"snapshot": manifest, "contract": _contract_summary(report)},
                       f"dataset {manifest['sha256'][:12]}: {manifest['records']} records, contract passed")

    def _feedback_examples(self, s: _Step, records: list[dict[str, Any]]) -> dict[str, Any]:
        fb = s.d.spec.dataset.feedback
        assert fb is not None
        releases, spans = self.deps.releases, self.deps.spans
        if releases is None or spans is None:
            return {"rated": 0, "used": 0, "without_content": 0, "note": "releases or tracing is off"}
        since = 0.0
        if fb.since == "last_run":  # what the production model has not learned from: since the last promotion
            last = self.store.last_finished(s.run.pipeline, outcome="promoted")
            since = last.created_at if last else 0.0
        rated = releases.store.ratings(since=since, min_score=fb.min_score, limit=fb.max_examples * 4)
        used = without = covered = 0
        seen: set[str] = set()
        # A question the data already answers keeps its curated answer: a second answer to the same prompt would be
        # a duplicate, or a leak between the training and validation splits, which the data contract refuses.
        asked = {k for k in map(_prompt_key, records) if k is not None}
        for r in rated:
            if used >= fb.max_examples or r["response_id"] in seen:
                continue
            seen.add(r["response_id"])
            example = traced_example(spans, r["response_id"])
            if example is None:
                without += 1
                continue
            key = _prompt_key(example)
            if key in asked:
                covered += 1
                continue
            asked.add(key)
            records.append(example)
            used += 1
        return {"rated": len(rated), "used": used, "without_content": without, "already_covered": covered,
                "since": since, "min_score": fb.min_score}

    def _job_spec(self, d: Definition, dataset: str, run: Run | None) -> JobSpec:
        return d.job.model_copy(update={
            "dataset": d.job.dataset.model_copy(update={"path": Path(dataset)}),
            "tags": {**d.job.tags, "pipeline": d.name, "pipeline_run": run.id if run else ""}})

    async def _finetune(self, s: _Step) -> None:
        ft = self.deps.finetune
        actor = _actor(s.run)
        job_id = s.artifacts.get("job_id") or await asyncio.to_thread(self._submitted, actor)
        if job_id is None:
            snapshot = s.run.steps["dataset"].artifacts["snapshot"]
            await s.still_open()
            job = await asyncio.to_thread(ft.submit, self._job_spec(s.d, snapshot["path"], s.run),
                                          submitted_by=actor, validate_data=False)
            job_id = job.id
            await s.record({"job_id": job_id}, f"fine-tuning job {job_id} queued")
            await s.still_open()  # cancelled while submitting: cancel() may have looked before the job existed
        elif "job_id" not in s.artifacts:
            await s.record({"job_id": job_id}, f"reattached to fine-tuning job {job_id}")
        waited = 0.0
        while True:
            job = await asyncio.to_thread(ft.get, job_id)
            if job.state == "succeeded":
                await s.record({"model": job.model_name, "version": job.model_version, "adapter": job.adapter_path,
                                "mlflow_run_id": job.mlflow_run_id, "metrics": job.metrics},
                               f"trained {job.model_name} version {job.model_version}")
                return
            if job.state in ("failed", "cancelled"):
                raise StepFailed("error", f"fine-tuning job {job_id} {job.state}: {job.error or 'no error recorded'}")
            s.progress(job=job_id, state=job.state, progress=round(job.progress, 3))
            if job.state == "queued" and waited >= 60 and not s.artifacts.get("hinted"):
                await s.record({"hinted": True}, "no fine-tuning worker has claimed the job yet: start one with "
                                                 "`keel finetune worker`")
            waited += await s.sleep()

    def _submitted(self, actor: str) -> str | None:
        """A job this run submitted before a crash kept it from recording the id (not one a retry replaces)."""
        return next((j.id for j in self.deps.finetune.list(limit=200)
                     if j.submitted_by == actor and j.state not in ("failed", "cancelled")), None)

    async def _evaluate(self, s: _Step) -> None:
        ft = self.deps.finetune
        job_id = s.run.steps["finetune"].artifacts["job_id"]
        waited = 0.0
        while True:
            job = await asyncio.to_thread(ft.get, job_id)
            if job.evals_state == "error":
                if s.attempt > 1 and not s.artifacts.get("requeued"):  # a retry evaluates again
                    await asyncio.to_thread(ft.evaluate, job_id, actor=_actor(s.run))
                    await s.record({"requeued": True}, "evaluation queued again")
                    continue
                raise StepFailed("error", f"the evaluation of job {job_id} failed to run (not a verdict): "
                                          f"{(job.evals or {}).get('error') or 'see the job log'}; retry the run")
            if job.evals_state not in (None, "pending", "running"):
                break
            s.progress(job=job_id, evals=job.evals_state)
            if waited >= 60 and not s.artifacts.get("hinted"):
                await s.record({"hinted": True}, "waiting for a fine-tuning worker with finetune.auto_eval to run "
                                                 f"the suites {', '.join(s.d.job.evals)}")
            waited += await s.sleep()
        suites = {n: {"passed": r.get("passed"), "metrics": r.get("metrics"), "run_id": r.get("run_id")}
                  for n, r in ((job.evals or {}).get("suites") or {}).items()}
        version = await asyncio.to_thread(ft.registry.get_version, job.model_name, job.model_version)
        verdict = await asyncio.to_thread(ft.registry.run_gate, version)
        await s.record({"evals_state": job.evals_state, "suites": suites,
                        "gate": {"passed": verdict.passed, "reason": verdict.reason}},
                       f"eval gate on {version.ref}: {'passed' if verdict.passed else 'refused'} ({verdict.reason})")
        if not verdict.passed:
            raise StepFailed("gate_failed", f"the eval gate refused {version.ref}: {verdict.reason}")

    async def _canary(self, s: _Step) -> None:
        c, releases = s.d.spec.canary, self.deps.releases
        assert c is not None
        if releases is None:
            raise StepFailed("error", "this pipeline releases through a canary, but releases are off on this server "
                                      "(releases.enabled)")
        trained = s.run.steps["finetune"].artifacts
        model, version = trained["model"], trained["version"]
        actor = _actor(s.run)
        alias = s.artifacts.get("candidate") or f"{model}-v{version}"
        if not s.artifacts.get("deployed"):
            await self.deps.finetune.deploy(model, version, alias=alias, backend=c.backend, actor=actor)
            await s.record({"candidate": alias, "deployed": True}, f"{model}/{version} serves as {alias}")
        release_id = s.artifacts.get("release_id")
        if release_id is None:
            current = await asyncio.to_thread(_current, releases, c.endpoint)
            if current is not None and current.created_by == actor:
                release_id = current.id  # started before a restart kept it from being recorded
            else:
                baseline = c.baseline or await asyncio.to_thread(self._baseline, model)
                spec = c.release(baseline=baseline, candidate=alias, manual=s.d.spec.promote.approval == "required",
                                 description=f"pipeline {s.run.pipeline} run {s.run.id}: {model} v{version}")
                await s.still_open()
                release_id = (await asyncio.to_thread(releases.create, spec, actor=actor,
                                                      reason=f"pipeline run {s.run.id}")).id
                await s.still_open()  # cancelled while creating it: cancel() may have looked before it existed
                await s.record({}, f"canary {c.endpoint}: {baseline} (stable) vs {alias}, steps "
                                   f"{', '.join(f'{x:g}%' for x in c.steps)}")
            started = await asyncio.to_thread(releases.get, c.endpoint)
            await s.record({"release": c.endpoint, "release_id": release_id,
                            "baseline": started.spec.variant(started.spec.baseline).model})
        logged: tuple[int, float] = (-1, 0.0)  # (release step, when): a line per step and per half minute
        while True:
            r = await asyncio.to_thread(releases.get, c.endpoint)
            if r.id != release_id:
                raise StepFailed("error", f"release {c.endpoint} was replaced by another (id {r.id}) while this "
                                          "run's canary was running")
            if r.status in ("rolled_back", "stopped"):
                reason = r.decision.reason if r.decision else r.status
                await s.record({"status": r.status})
                raise StepFailed("rolled_back", f"the canary was rolled back: {reason}")
            if r.status == "promoted" or is_ready(r):
                why = r.decision.reason if r.status == "promoted" and r.decision else r.note
                await s.record({"status": "promoted" if r.status == "promoted" else "ready", "weights": r.weights},
                               f"canary passed: {why}")
                return
            if r.note and (r.step != logged[0] or time.monotonic() - logged[1] >= 30):
                logged = (r.step, time.monotonic())
                await s.record({}, r.note)
            s.progress(release=c.endpoint, weights=r.weights, step=r.step)
            await s.sleep()

    def _baseline(self, model: str) -> str:
        """What serves today: the version this model last promoted, under its alias, else the default model."""
        prod = self.deps.finetune.registry.by_alias(model, "production")
        if prod is not None and self.deps.finetune.routes.get(f"{model}-v{prod.version}") is not None:
            return f"{model}-v{prod.version}"
        return self.deps.default_model

    async def _approval(self, s: _Step) -> str | None:
        if s.d.spec.promote.approval == "auto":
            await s.record({"decision": {"approved": True, "by": "auto"}}, "approval: automatic")
            return None
        decision = s.run.decision
        if decision is None:
            await s.record({}, "waiting for a person to approve or reject (API, `keel pipeline approve`, web page)")
            return _WAIT
        why = f": {decision['reason']}" if decision["reason"] else ""
        await s.record({"decision": decision},
                       f"{'approved' if decision['approved'] else 'rejected'} by {decision['by']}{why}")
        if not decision["approved"]:
            await asyncio.to_thread(self._roll_back_canary, s.run, decision["by"], decision["reason"] or "rejected")
            raise StepFailed("rejected", f"rejected by {decision['by']}{why}")
        return None

    async def _promote(self, s: _Step) -> None:
        ft, releases = self.deps.finetune, self.deps.releases
        trained = s.run.steps["finetune"].artifacts
        model, version = trained["model"], trained["version"]
        decision = s.run.decision or {"by": "auto", "reason": ""}
        actor = decision["by"]
        canary = s.run.steps["canary"].artifacts
        release = None
        if canary.get("release_id") and releases is not None:
            release = await asyncio.to_thread(releases.get, canary["release"])
            if release.id != canary["release_id"]:
                release = None
            elif release.status in ("rolled_back", "stopped"):
                reason = release.decision.reason if release.decision else release.status
                raise StepFailed("rolled_back", f"the canary was rolled back before the promotion: {reason}")
        await s.still_open()
        # The registry's gate first: a version it refuses must not get the traffic.
        promotion = await asyncio.to_thread(ft.promote, model, version, actor=actor,
                                            reason=f"pipeline {s.run.pipeline} run {s.run.id}")
        await s.record({"production": version, "from_version": promotion.from_version},
                       f"{model}: production {promotion.from_version or '(none)'} -> {version}" if promotion.changed
                       else f"{model}: production is already {version}")
        if release is not None:
            if release.status != "promoted":
                await asyncio.to_thread(releases.promote, canary["release"], actor=actor,
                                        reason=f"pipeline run {s.run.id} approved")
            await s.record({"release": "promoted"}, f"release {canary['release']}: all traffic on "
                                                    f"{canary['candidate']}")
        alias = s.d.spec.promote.deploy_alias
        if alias:
            await ft.deploy(model, version, alias=alias, actor=actor)
            await s.record({"deploy_alias": alias}, f"{model}/{version} serves as {alias}")


class _Step:
    """One step's view of its run: its recorded artifacts, a log, progress and the poll sleep."""

    def __init__(self, svc: PipelineService, run: Run, d: Definition, name: str, ctx: JobContext,
                 job_id: str) -> None:
        self.svc, self.run, self.d, self.name, self.ctx, self.job_id = svc, run, d, name, ctx, job_id
        self.artifacts = dict(run.steps[name].artifacts)
        self.attempt = run.steps[name].attempts + 1

    async def still_open(self) -> None:
        """Before (and right after) starting something: a cancelled run stops here, and what it just started is
        stopped with it."""
        run = await asyncio.to_thread(self.svc.store.get, self.run.id)
        if run.finished:
            await asyncio.to_thread(self.svc._stop_started, run, "pipeline", run.error or "cancelled")
            await self.svc._retire_candidate(run, "pipeline", run.error or "cancelled")
            raise _Stop(f"pipeline run {run.id} is {run.state}")
        if run.job_id != self.job_id:
            raise _Stop(f"pipeline run {run.id} is driven by job {run.job_id} now")

    async def record(self, artifacts: Mapping[str, Any], line: str | None = None) -> None:
        self.artifacts.update(artifacts)
        await asyncio.to_thread(self.svc.store.step_update, self.run.id, self.name, artifacts=artifacts,
                                log=_line(line) if line else None)

    def progress(self, **detail: Any) -> None:
        self.ctx.set_progress({"run": self.run.id, "step": self.name, **detail})

    async def sleep(self) -> float:
        await asyncio.sleep(self.d.spec.poll_interval)
        return self.d.spec.poll_interval


def _release_scope(spec: Mapping[str, Any], can_release: bool, what: str, name: str) -> None:
    """A run that starts a release, or promotes without a person, moves production traffic: whoever starts (or
    resumes) it needs the ``releases`` scope as well as ``finetune``."""
    moves = bool(spec.get("canary")) or (spec.get("promote") or {}).get("approval") == "auto"
    if moves and not can_release:
        raise PermissionDenied(f"pipeline {name!r} releases a canary or promotes on its own: {what} a run of it "
                               "needs the 'releases' scope too", param="authorization")


def _actor(run: Run) -> str:
    """Who a run's side effects are recorded as started by (fine-tuning jobs, releases): how it finds them again."""
    return f"pipeline:{run.pipeline}/{run.id}"


def _line(text: str) -> str:
    return f"{datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S')} {text}\n"


def _current(releases: ReleaseService, name: str) -> Any:
    try:
        return releases.get(name)
    except NotFound:
        return None


def _prompt_key(record: Any) -> str | None:
    try:
        return prompt_key(record["messages"])
    except (KeyError, TypeError, AttributeError):
        return None  # a malformed record: the data contract reports it with its line


def _contract_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    return {k: report.get(k) for k in ("ok", "train_examples", "validation_examples", "data_hash", "token_stats",
                                       "issue_counts")}


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0
