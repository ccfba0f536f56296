"""Experiment tracking and the model registry, on MLflow.

* Every job is an MLflow run (experiment ``keel-finetune``): params from the spec, the spec
  and data hashes, per-step ``loss``/``eval_loss``/``learning_rate``, the data report and the
  adapter folder as artifacts (``adapter/``).
* Every adapter becomes a version of a registered model named after the job
  (``spec.register_as`` or ``spec.name``), with alias ``candidate`` on creation.
* :meth:`AdapterRegistry.promote` moves ``production`` to a version after the eval gate
  passes (or with ``force`` and a reason, audited); :meth:`AdapterRegistry.rollback`
  moves it back to the version it pointed at before.

Default store: ``sqlite:///<home>/mlflow.db`` with artifacts in ``<home>/mlflow-artifacts``
(``mlflow-skinny`` + ``sqlalchemy`` + ``alembic``; no server needed). For a team, set
``finetune.tracking_uri`` to a tracking server URL. Offline: MLflow's usage telemetry is
switched off here (``MLFLOW_DISABLE_TELEMETRY=true``) before MLflow is imported.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import Conflict, InvalidRequest
from finetune.errors import AdapterNotFound, PromotionRefused
from prompts.registry import GateVerdict

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from finetune.settings import FinetuneSettings
    from finetune.spec import JobSpec
    from finetune.verdicts import AdapterEvaluation

log = logging.getLogger("keel.finetune.tracking")

CANDIDATE = "candidate"
PRODUCTION = "production"
_HISTORY_TAG = "keel.production_history"
_OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 sends usage telemetry from a background thread otherwise
    "GIT_PYTHON_REFRESH": "quiet",  # gitpython (an MLflow dependency) complains when git is missing
}


def configure_offline() -> None:
    for k, v in _OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One registered adapter version, as the eval gate and the serving layer see it."""

    model: str
    version: str
    source: str
    run_id: str | None
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.model}/{self.version}"

    def local_path(self) -> Path:
        """The adapter folder on this machine (downloaded first when artifacts are remote)."""
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=self.source))


# The eval harness plugs in here: called with the version about to become `production`.
AdapterGate = Callable[[AdapterVersion], GateVerdict]


def no_gate(version: AdapterVersion) -> GateVerdict:
    return GateVerdict(passed=False, reason="no eval gate configured")


@dataclass(frozen=True, slots=True)
class Promotion:
    model: str
    alias: str
    from_version: str | None
    to_version: str
    verdict: GateVerdict | None
    forced: bool
    changed: bool = True


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = ",".join(str(v) for v in value)
    else:
        out[prefix] = "" if value is None else str(value)
    return out


class Tracker:
    """MLflow runs for jobs and registered versions for adapters."""

    def __init__(self, settings: FinetuneSettings, home: Path) -> None:
        configure_offline()
        from mlflow import MlflowClient

        self.settings = settings
        self.tracking_uri = settings.resolved_tracking_uri(home)
        self.registry_uri = settings.resolved_registry_uri(home)
        self.artifact_location = settings.resolved_artifact_location(home)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client: MlflowClient = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        self._experiment_id: str | None = None

    # -- runs --------------------------------------------------------------------------------------

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = self.settings.experiment
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(name, artifact_location=self.artifact_location)
                except Exception:  # another process created it first
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def start_run(self, *, job_id: str, spec: JobSpec, existing_run_id: str | None = None) -> str:
        """A new run for the job, or its earlier run again when a recovered job resumes."""
        from mlflow.entities import RunStatus

        if existing_run_id:
            try:
                self.client.update_run(existing_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                return existing_run_id
            except Exception:
                log.warning("MLflow run %s of job %s is gone; starting a new one", existing_run_id, job_id)
        tags = {"keel.job_id": job_id, "keel.spec_hash": spec.spec_hash(), "keel.base_model": spec.base_model,
                "keel.registered_model": spec.model_name, "mlflow.note.content": spec.description,
                **{f"spec.{k}": v for k, v in spec.tags.items()}}
        run = self.client.create_run(self.experiment_id, run_name=f"{spec.name}-{job_id}", tags=tags)
        run_id = run.info.run_id
        params = flatten("", spec.model_dump(mode="json", exclude={"description", "tags"}), {})
        params["spec_hash"] = spec.spec_hash()
        self.log_params(run_id, params)
        self.client.log_text(run_id, spec.to_yaml(), "spec.yaml")
        return run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_data(self, run_id: str, report: dict[str, Any]) -> None:
        self.client.set_tag(run_id, "keel.data_hash", report.get("data_hash", ""))
        self.log_params(run_id, {"data_hash": report.get("data_hash", ""),
                                 "train_examples": str(report.get("train_examples")),
                                 "validation_examples": str(report.get("validation_examples"))})
        self.client.log_dict(run_id, report, "data_report.json")

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])

    def end_run(self, run_id: str, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    # -- registry ----------------------------------------------------------------------------------

    def register_adapter(self, run_id: str, adapter_dir: Path, model_name: str,
                         tags: dict[str, str] | None = None) -> AdapterVersion:
        """Log the adapter folder as the run's ``adapter`` artifact and register it (alias ``candidate``)."""
        self.client.log_artifacts(run_id, str(adapter_dir), "adapter")
        run = self.client.get_run(run_id)
        source = f"{run.info.artifact_uri}/adapter"
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model_name, description="Keel LoRA adapters",
                                                tags={"keel.kind": "lora-adapter"})
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        mv = self.client.create_model_version(model_name, source=source, run_id=run_id, tags=tags or {})
        self.client.set_registered_model_alias(model_name, CANDIDATE, mv.version)
        log.info("registered %s version %s (%s)", model_name, mv.version, source)
        return self.get_version(model_name, mv.version)

    def log_evaluation(self, run_id: str | None, evaluation: AdapterEvaluation, *, step: int = 0) -> None:
        """The eval verdicts on the job's run (metrics ``eval.<suite>.<metric>`` = mean, ``eval.<suite>.passed``;
        tags with the eval run ids) and on the registered version (``keel.eval.<suite>``, ``keel.evals.state``),
        where ``keel finetune versions`` and the MLflow UI show them next to the promotion records."""
        import time

        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        if run_id:
            metrics = [Metric("eval.passed", float(evaluation.passed), ts, step)]
            tags = [RunTag("keel.evals.state", evaluation.state)]
            for s in evaluation.suites:
                metrics.append(Metric(f"eval.{s.suite}.passed", float(s.passed), ts, step))
                metrics += [Metric(f"eval.{s.suite}.{k}", float(v), ts, step) for k, v in s.metrics.items()
                            if v is not None]
                if s.pass_rate is not None:
                    metrics.append(Metric(f"eval.{s.suite}.pass_rate", float(s.pass_rate), ts, step))
                tags.append(RunTag(f"keel.eval.{s.suite}.run_id", s.run_id or ""))
                tags.append(RunTag(f"keel.eval.{s.suite}.verdict", "error" if s.error else
                                   "pass" if s.passed else "fail"))
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
        for s in evaluation.suites:
            record = {"run_id": s.run_id, "passed": s.passed, "failing_metrics": s.failing_metrics,
                      "metrics": s.metrics, "error": s.error}
            self.client.set_model_version_tag(evaluation.model, evaluation.version, f"keel.eval.{s.suite}",
                                              json.dumps(record)[:4900])
        self.client.set_model_version_tag(evaluation.model, evaluation.version, "keel.evals.state", evaluation.state)

    def get_version(self, model: str, version: str | int) -> AdapterVersion:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(model, str(version))
        except MlflowException as exc:
            raise AdapterNotFound(f"no registered adapter {model!r} version {version}", param="version") from exc
        return _to_version(mv)


class AdapterRegistry:
    """Reads and alias moves on registered adapter versions (production promotion and rollback)."""

    def __init__(self, tracker: Tracker, *, gate: AdapterGate | None = None,
                 audit: Callable[..., None] | None = None) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.gate: AdapterGate = gate or no_gate
        self._audit = audit

    def set_gate(self, gate: AdapterGate | None) -> None:
        """The eval harness plugs its gate in here; None restores the refuse-all default."""
        self.gate = gate or no_gate

    def get_version(self, model: str, version: str | int) -> AdapterVersion:
        return self.tracker.get_version(model, version)

    def by_alias(self, model: str, alias: str) -> AdapterVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(model, alias)
        except MlflowException:
            return None
        return _to_version(mv)

    def _registered(self, model: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(model)
        except MlflowException as exc:
            raise AdapterNotFound(f"no registered adapter model {model!r}", param="model") from exc

    def versions(self, model: str) -> list[AdapterVersion]:
        from dataclasses import replace

        aliases = self._registered(model).aliases or {}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        # search_model_versions leaves aliases out; fill them in from the registered model.
        mvs = self.client.search_model_versions(f"name = '{model}'")
        return sorted((replace(_to_version(mv), aliases=tuple(sorted(by_version.get(str(mv.version), []))))
                       for mv in mvs), key=lambda v: int(v.version))

    def models(self) -> list[str]:
        return sorted(m.name for m in self.client.search_registered_models())

    def _history(self, model: str) -> list[str]:
        rm = self._registered(model)
        return json.loads(rm.tags.get(_HISTORY_TAG, "[]"))

    def run_gate(self, version: AdapterVersion, gate: AdapterGate | None = None) -> GateVerdict:
        gate = gate or self.gate
        try:
            verdict = gate(version)
        except Exception as exc:  # a broken gate fails closed
            log.exception("eval gate raised for %s", version.ref)
            return GateVerdict(passed=False, reason=f"the gate raised {type(exc).__name__}: {exc}")
        if not isinstance(verdict, GateVerdict):
            return GateVerdict(passed=False, reason=f"the gate returned {type(verdict).__name__}, not a verdict")
        return verdict

    def promote(self, model: str, version: str | int, *, gate: AdapterGate | None = None, force: bool = False,
                reason: str | None = None, actor: str = "unknown", alias: str = PRODUCTION) -> Promotion:
        """Point ``alias`` (default ``production``) at ``version`` if the eval gate passes.

        A refused promotion goes through only with ``force=True`` and a non-empty ``reason``;
        both the verdict and the override are recorded (model-version tags and the audit log)."""
        target = self.get_version(model, version)
        current = self.by_alias(model, alias)
        if current is not None and current.version == target.version:
            return Promotion(model, alias, current.version, target.version, None, False, changed=False)
        verdict = self.run_gate(target, gate)
        forced = False
        if not verdict.passed:
            if not force:
                raise PromotionRefused(
                    f"the eval gate refused {target.ref} for {alias!r}: {verdict.reason}. Fix what the gate "
                    "reports, or force it with a reason (audited)", reason=verdict.reason, details=verdict.details,
                )
            if not (reason and reason.strip()):
                raise InvalidRequest("forcing a promotion past the eval gate needs a reason", param="reason")
            forced = True
        history = self._history(model)
        if current is not None:
            history.append(current.version)
        self.client.set_registered_model_alias(model, alias, target.version)
        if alias == PRODUCTION:
            self.client.set_registered_model_tag(model, _HISTORY_TAG, json.dumps(history[-50:]))
        record = {"actor": actor, "alias": alias, "from": current.version if current else None,
                  "verdict": verdict.model_dump(), "forced": forced, "reason": (reason or "").strip()}
        self.client.set_model_version_tag(model, target.version, f"keel.promotion.{alias}", json.dumps(record))
        self._record(actor=actor, action="promote.forced" if forced else "promote", model=model,
                     version=target.version, reason=(reason or "").strip(), details=record)
        log.info("%s: %s %s -> %s by %s%s", model, alias, current.version if current else None, target.version,
                 actor, " (gate overridden)" if forced else "")
        return Promotion(model, alias, current.version if current else None, target.version, verdict, forced)

    def rollback(self, model: str, *, actor: str = "unknown", reason: str = "") -> Promotion:
        """Move ``production`` back to the version it pointed at before the last promotion."""
        history = self._history(model)
        current = self.by_alias(model, PRODUCTION)
        if not history:
            raise Conflict(f"{model!r} has no earlier production version to roll back to", code="nothing_to_rollback")
        previous = history.pop()
        self.client.set_registered_model_alias(model, PRODUCTION, previous)
        self.client.set_registered_model_tag(model, _HISTORY_TAG, json.dumps(history))
        details = {"from": current.version if current else None, "to": previous}
        self._record(actor=actor, action="rollback", model=model, version=previous, reason=reason, details=details)
        log.info("%s: production rolled back %s -> %s by %s", model, details["from"], previous, actor)
        return Promotion(model, PRODUCTION, details["from"], previous, None, False)

    def _record(self, **entry: Any) -> None:
        if self._audit is not None:
            self._audit(**entry)


def _to_version(mv: Any) -> AdapterVersion:
    return AdapterVersion(model=mv.name, version=str(mv.version), source=mv.source, run_id=mv.run_id,
                          aliases=tuple(getattr(mv, "aliases", None) or ()), tags=dict(mv.tags or {}))
