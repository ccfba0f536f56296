"""The fine-tuning service the API and the CLI share: submit, watch, cancel, promote, roll back.

It never trains: each submitted job goes on Keel's job queue (``finetune.train``, :mod:`finetune.dispatch`) and a
worker process (``keel finetune worker``) runs it, recording what it does in the same job store. Submission
validates the spec and the data first, so a bad dataset is refused at once with its reasons (code
``invalid_training_data``) instead of failing later.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import Conflict, InvalidRequest, KeelError
from app.core.paths import is_within, same_folder
from app.jobs.queue import JobQueue, open_queue
from app.llm.routing import CONFIGURED, RoutingTable, open_routing_table
from finetune.data import check_dataset, token_counter
from finetune.dispatch import queue_evaluation, queue_training
from finetune.errors import InvalidJobSpec
from finetune.jobs import Job, JobStore, open_job_store
from finetune.spec import (
    JobSpec,
    base_model_path,
    check_suite_names,
    load_spec,
    parse_spec,
    resolve_base_model,
)
from finetune.tracking import AdapterGate, AdapterRegistry, AdapterVersion, Promotion, Tracker

if TYPE_CHECKING:
    from finetune.serving import Deployment
    from finetune.settings import FinetuneConfig

OWNER_PREFIX = "finetune:"
log = logging.getLogger("keel.finetune")


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class FinetuneService:
    def __init__(self, settings: FinetuneConfig, store: JobStore | None = None, *,
                 gate: AdapterGate | None = None, routes: RoutingTable | None = None,
                 queue: JobQueue | None = None) -> None:
        """``routes``: the process's routing table (the container's); without one, the durable table of this
        home (or ``routing.url``) is opened on first use, so whatever this service routes the API serves too.
        ``queue``: the job queue (the container's); without one, the one ``jobs`` configures, on first use."""
        self.settings = settings
        self.fs = settings.finetune
        self.store = store or open_job_store(settings)
        self._queue = queue
        self._own_queue = False
        self._gate = gate
        self._routes = routes
        self._own_routes = False
        self._tracker: Tracker | None = None
        self._registry: AdapterRegistry | None = None
        self._hashes: dict[tuple[str, str], str | None] = {}  # (model, version) -> content hash: versions are immutable

    @property
    def routes(self) -> RoutingTable:
        if self._routes is None:
            self._routes = open_routing_table(self.settings)
            self._own_routes = True
        return self._routes

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            self._queue = open_queue(self.settings.jobs, self.settings.home)
            self._own_queue = True
        return self._queue

    def close(self) -> None:
        self.store.close()
        if self._own_routes and self._routes is not None:
            self._routes.close()
        if self._own_queue and self._queue is not None:
            self._queue.close()

    # -- jobs --------------------------------------------------------------------------------------

    def parse(self, *, spec_yaml: str | None = None, spec: dict[str, Any] | None = None,
              base_dir: Path | None = None) -> JobSpec:
        if (spec_yaml is None) == (spec is None):
            raise InvalidRequest("give exactly one of spec_yaml (YAML text) or spec (an object)", param="spec")
        import yaml

        text = spec_yaml if spec_yaml is not None else yaml.safe_dump(spec)
        return parse_spec(text, base_dir=base_dir or Path.cwd())

    def validate(self, spec: JobSpec) -> dict[str, Any]:
        """Check the base model and every record now; raises InvalidTrainingData with the reasons."""
        base = resolve_base_model(spec, self.settings.models_dir)
        report = check_dataset(spec, token_counter(_tokenizer(str(base))))
        return report.to_dict()

    def check_data_location(self, spec: JobSpec) -> None:
        """The dataset files and the base model folder must live under ``finetune.allowed_roots`` (and the
        data under ``allowed_data_dirs`` when set): a submitter must not make the server read any file."""
        data = (("dataset.path", spec.dataset.path), ("dataset.validation_path", spec.dataset.validation_path))
        roots = [Path(r).resolve() for r in self.fs.allowed_data_dirs]
        if roots:
            for field, path in data:
                if path is not None and not any(Path(path).resolve().is_relative_to(r) for r in roots):
                    raise InvalidJobSpec(f"{field} {path} is outside the allowed data folders "
                                         f"({', '.join(str(r) for r in roots)})", param=field)
        allowed = self.fs.resolved_allowed_roots(self.settings.home)
        for field, path in (*data, ("base_model", base_model_path(spec, self.settings.models_dir))):
            if path is not None and not is_within(Path(path), allowed):
                raise InvalidJobSpec(
                    f"{field} {path} is outside the folders fine-tuning may read "
                    f"({', '.join(str(r) for r in allowed)}); move it there or add its folder to the setting "
                    "finetune.allowed_roots (KEEL_FINETUNE__ALLOWED_ROOTS)", param=field)

    def submit(self, spec: JobSpec, *, submitted_by: str = "", validate_data: bool = True) -> Job:
        self.check_data_location(spec)
        report = self.validate(spec) if validate_data else None
        job = self.store.create(name=spec.name, spec_yaml=spec.to_yaml(), spec_hash=spec.spec_hash(),
                                submitted_by=submitted_by, data_report=report)
        try:
            queue_training(self.queue, job, max_attempts=self.fs.max_attempts)
        except Exception as exc:  # no half-submitted job: it would run whenever a worker next reconciles
            self.store.request_cancel(job.id)
            self.store.append_log(job.id, f"could not be queued ({type(exc).__name__}: {exc}); cancelled")
            raise
        log.info("fine-tuning job %s (%s) queued by %s", job.id, spec.name, submitted_by)
        return job

    def submit_file(self, path: str | Path, *, submitted_by: str = "", validate_data: bool = True) -> Job:
        return self.submit(load_spec(path), submitted_by=submitted_by, validate_data=validate_data)

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(self, *, state: str | None = None, limit: int = 50) -> list[Job]:
        return self.store.list(state=state, limit=limit)

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        return self.store.read_log(job_id, offset)

    def cancel(self, job_id: str, *, actor: str = "") -> Job:
        """Queued: cancelled at once. Running: its worker stops it at the next step (at once on this machine, at
        its next heartbeat on another) and it becomes ``cancelled``."""
        job = self.store.request_cancel(job_id)
        with contextlib.suppress(Conflict):  # the queue job ended meanwhile: the worker records the outcome
            task = queue_training(self.queue, job, max_attempts=self.fs.max_attempts)
            self.queue.cancel(task.id, actor=actor or "unknown")
        self.store.audit(actor=actor or "unknown", action="job.cancel", job_id=job_id)
        return job

    def evaluate(self, job_id: str, *, suites: list[str] | None = None, actor: str = "") -> Job:
        """Queue (again) the eval suites of a succeeded job's adapter; a worker runs them, never this process.
        ``suites`` replaces the spec's list for this evaluation (the gate still requires the spec's)."""
        if suites is not None and not suites:
            raise InvalidRequest("give at least one suite, or none to use the job spec's", param="suites")
        if suites is not None:
            try:
                check_suite_names(suites)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="suites") from None
        job = self.store.get(job_id)
        if suites is None and not parse_spec(job.spec_yaml, source=f"job {job_id} spec").evals:
            raise InvalidRequest(f"job {job_id}'s spec names no eval suites; give the suites to run", param="suites")
        job = self.store.queue_evals(job_id, suites=suites)
        queue_evaluation(self.queue, job, max_attempts=self.fs.max_attempts)
        self.store.audit(actor=actor or "unknown", action="job.evaluate", job_id=job_id, model=job.model_name,
                         version=job.model_version, details={"suites": suites})
        return job

    # -- registry ----------------------------------------------------------------------------------

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.fs, self.settings.home)
        return self._tracker

    @property
    def registry(self) -> AdapterRegistry:
        if self._registry is None:
            self._registry = AdapterRegistry(self.tracker, gate=self._gate, audit=self.store.audit)
        return self._registry

    def set_gate(self, gate: AdapterGate | None) -> None:
        """The eval harness plugs its gate in here (a passing bound suite on the adapter version)."""
        self._gate = gate
        if self._registry is not None:
            self._registry.set_gate(gate)

    def versions(self, model: str) -> list[AdapterVersion]:
        return self.registry.versions(model)

    def promote(self, model: str, version: str | int, *, force: bool = False, reason: str | None = None,
                actor: str = "") -> Promotion:
        return self.registry.promote(model, version, force=force, reason=reason, actor=actor or "unknown")

    def rollback(self, model: str, *, actor: str = "", reason: str = "") -> Promotion:
        return self.registry.rollback(model, actor=actor or "unknown", reason=reason)

    # -- serving -----------------------------------------------------------------------------------

    def check_alias(self, alias: str, model: str) -> None:
        """A deploy may create a new alias or move one that deploys of the same model own (the routing table is
        the record); it may not take over a configured alias (the default model's included) or an alias another
        model or component (a release) routes."""
        owner = self.routes.owner(alias)
        if owner == CONFIGURED:
            raise Conflict(f"model alias {alias!r} is configured in the settings (models.{alias}); a deploy may not "
                           "replace it: deploy under another alias, or remove it from the settings first",
                           param="deploy_alias", code="alias_not_owned")
        if owner is not None and owner != route_owner(model):
            if owner.startswith(OWNER_PREFIX):
                raise Conflict(f"model alias {alias!r} serves the adapters of {owner[len(OWNER_PREFIX):]!r}; "
                               f"{model!r} may not take it over", param="deploy_alias", code="alias_not_owned")
            raise Conflict(f"model alias {alias!r} exists and was not created by a deploy (it is routed by {owner}); "
                           "deploy under another alias", param="deploy_alias", code="alias_not_owned")

    def adapter_backend(self, backend: str | None, rank: int) -> str:
        """The backend a deploy of a LoRA of ``rank`` would load into (``backend``, else the default model's);
        InvalidRequest when it is known not to load adapters (a managed vLLM without LoRA, or a rank over its
        limit), so whoever plans a deploy hears it before training, not after."""
        default = self.routes.get(self.settings.default_model)
        name = backend or (default.backend if default else next(iter(self.settings.backends)))
        spec = self.settings.backends.get(name)
        if spec is None:
            raise InvalidRequest(f"no backend {name!r} (backends: {', '.join(self.settings.backends)})",
                                 param="backend")
        managed = getattr(spec, "managed", None)
        if spec.kind == "vllm" and managed is not None:
            if not managed.enable_lora:
                raise InvalidRequest(f"backend {name!r} is a vLLM server started without LoRA support, so it cannot "
                                     f"serve an adapter: set backends.{name}.managed.enable_lora: true (and "
                                     f"max_lora_rank >= {rank}) and restart", param="backend",
                                     code="backend_cannot_serve_adapters")
            if managed.max_lora_rank < rank:
                raise InvalidRequest(f"backend {name!r} serves LoRA ranks up to {managed.max_lora_rank}; this adapter "
                                     f"has r={rank}: raise backends.{name}.managed.max_lora_rank", param="backend",
                                     code="backend_cannot_serve_adapters")
        return name

    def adapter_behind(self, route: dict[str, Any]) -> dict[str, Any] | None:
        """The registered adapter version a route served (a lineage record's ``route``: alias, owner, model, adapter
        folder): model, version, folder and content hash, from the alias's deployment record when that record is
        still what the route served (the same LoRA name on vLLM, the same folder on transformers); else None. For
        lineage: asked within a second of the answer, off the request path."""
        if not (route.get("owner") or "").startswith(OWNER_PREFIX) and not route.get("adapter"):
            return None
        row = next((d for d in self.store.deployments() if d.get("alias") == route.get("alias")), None)
        if row is None or not (row.get("served_name") == route.get("model")
                               or same_folder(row.get("adapter_path"), route.get("adapter"))):
            return None
        key = (row["model"], str(row["version"]))
        if key not in self._hashes:
            # the registry away for a moment: this record goes without, the next one asks again
            with contextlib.suppress(KeelError):
                self._hashes[key] = self.registry.get_version(*key).tags.get("keel.adapter_hash") or None
        return {"model": row["model"], "version": str(row["version"]), "backend": row.get("backend"),
                "served_name": row.get("served_name"), "path": row.get("adapter_path"),
                "hash": self._hashes.get(key)}

    async def deploy(self, model: str, version: str | int, *, alias: str, backend: str | None = None,
                     fallback: str | None = None, actor: str = "") -> Deployment:
        """Serve ``model`` ``version`` as model ``alias`` now, and remember it for :meth:`restore_deployments`."""
        import asyncio

        from finetune import serving  # lazy: keeps `keel --help` fast: pulls httpx and the vLLM supervisor

        await asyncio.to_thread(self.check_alias, alias, model)
        default = self.routes.get(self.settings.default_model)
        backend = backend or (default.backend if default else next(iter(self.settings.backends)))
        v = await asyncio.to_thread(self.registry.get_version, model, version)
        before = self.routes.get(alias)
        dep = await serving.deploy(self.settings, v, alias=alias, backend=backend, fallback=fallback,
                                   routes=self.routes, owner=route_owner(model), actor=actor or "unknown")
        try:
            await asyncio.to_thread(
                self.store.save_deployment, alias=alias, model=v.model, version=v.version, backend=backend,
                served_name=dep.served_name, adapter_path=dep.adapter_path, fallback=fallback, actor=actor,
            )
        except Exception:
            # Without its deployment record the route would outlive a vLLM restart with nothing loaded behind it:
            # put the alias back as it was.
            undo = "deploy failed: its deployment record could not be saved"
            if before is None:
                await asyncio.to_thread(self.routes.remove, alias, owner=route_owner(model),
                                        actor=actor or "unknown", reason=undo)
            else:
                await asyncio.to_thread(self.routes.set, alias, before, owner=route_owner(model),
                                        actor=actor or "unknown", reason=undo)
            raise
        await asyncio.to_thread(self.store.audit, actor=actor or "unknown", action="deploy", model=v.model,
                                version=v.version, details={"alias": alias, "backend": backend})
        return dep

    async def undeploy(self, alias: str, *, model: str, actor: str = "", reason: str = "") -> bool:
        """Stop serving ``alias`` (one of ``model``'s deploys): its route and deployment record go, and a vLLM
        server unloads the adapter unless another alias still serves it. Returns False when it was not deployed."""
        import asyncio

        from finetune import serving  # lazy: keeps `keel --help` fast: pulls httpx and the vLLM supervisor

        record = next((d for d in await asyncio.to_thread(self.store.deployments) if d["alias"] == alias), None)
        removed = await asyncio.to_thread(self.routes.remove, alias, owner=route_owner(model),
                                          actor=actor or "unknown", reason=reason or "undeploy")
        if record is None:
            return removed
        await asyncio.to_thread(self.store.delete_deployment, alias)
        spec = self.settings.backends.get(record["backend"])
        still_used = any(r.spec.adapter is not None and str(r.spec.adapter) == record["adapter_path"]
                         for r in self.routes.routes() if r.alias != alias)
        if spec is not None and spec.kind == "vllm" and not still_used:
            await serving.unload_everywhere(self.settings, record["backend"], record["served_name"])
        await asyncio.to_thread(self.store.audit, actor=actor or "unknown", action="undeploy", model=model,
                                version=record["version"], reason=reason, details={"alias": alias})
        return True

    async def restore_deployments(self, *, backend: str | None = None) -> list[str]:
        """Re-apply every remembered deployment (aliases, and adapters into vLLM, which forgets them when
        it restarts), or those on ``backend``. Call it at API start-up once backends are ready, and after a vLLM
        restart. Returns the aliases restored; failures are logged, not raised."""
        from finetune import serving  # lazy: keeps `keel --help` fast: pulls httpx and the vLLM supervisor

        restored = []
        for d in self.store.deployments():
            if backend is not None and d["backend"] != backend:
                continue
            try:
                self.check_alias(d["alias"], d["model"])  # e.g. since configured in keel.yaml: that one wins
                v = self.registry.get_version(d["model"], d["version"])
                await serving.deploy(self.settings, v, alias=d["alias"], backend=d["backend"], fallback=d["fallback"],
                                     routes=self.routes, owner=route_owner(d["model"]), actor="system:restore")
                restored.append(d["alias"])
            except Exception as exc:
                log.error("could not restore deployment %s (%s/%s on %s): %s", d["alias"], d["model"],
                          d["version"], d["backend"], exc)
        return restored


def route_owner(model: str) -> str:
    """The routing-table owner of the aliases that serve ``model``'s adapters."""
    return OWNER_PREFIX + model


def build_finetune(settings: FinetuneConfig, *, gate: AdapterGate | None = None,
                   routes: RoutingTable | None = None, queue: JobQueue | None = None) -> FinetuneService:
    """Factory for the container (``container.finetune``, with its routing table) and the CLI. Without ``gate``
    promotion is refused until one is plugged in (``set_gate``; the container and the CLI plug in the eval
    gate)."""
    return FinetuneService(settings, gate=gate, routes=routes, queue=queue)
