"""What a continuous-training pipeline is, as data: when it runs, what it trains on, how the result is released.

A pipeline definition is YAML next to the fine-tuning job it retrains (``finetune/pipelines/*.yaml``, or a folder
in ``pipelines.dirs``), validated here and hashed; every run stores the exact definition and job spec it ran
with. The steps are fixed (trigger -> dataset -> finetune -> evaluate -> canary -> approval -> promote): what a
definition chooses is each step's parameters, not the graph.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from app.core.errors import InvalidRequest
from finetune.errors import InvalidJobSpec
from finetune.spec import JobSpec, load_spec, parse_yaml_model
from lifecycle.releases.spec import CanarySpec, MetricSpec, ReleaseSpec, Unit, VariantSpec, default_metrics

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

#: The steps of every run, in order (the graph the web page draws).
STEPS = ("trigger", "dataset", "finetune", "evaluate", "canary", "approval", "promote")


def seconds(value: float | str) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"6h"``, ``"7d"``, ``"2w"`` -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration: write seconds or a number with s, m, h, d or w (e.g. 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]


#: Seconds, written as a number or as 90s, 15m, 6h, 7d, 2w.
Duration = Annotated[float, BeforeValidator(seconds), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScheduleTrigger(_Strict):
    kind: Literal["schedule"]
    every: Duration = Field(gt=0, description="Run this often (seconds, or 6h, 7d, 2w), counted from the last run.")


class DriftTrigger(_Strict):
    kind: Literal["drift"]
    checks: list[str] = Field(default_factory=list, description="Drift checks that count (e.g. input_embedding, "
                              "topic_mix); empty: a drift verdict of any check.")


class FeedbackTrigger(_Strict):
    kind: Literal["feedback"]
    min_new: int = Field(default=50, ge=1, description="Ratings given since the last run that start a new one.")
    min_score: float | None = Field(default=None, ge=0, le=1, description="Count only ratings at least this "
                                    "good (1: thumbs up); None: every rating.")


class EvalRegressionTrigger(_Strict):
    kind: Literal["eval_regression"]
    suite: str = Field(description="An eval suite whose newest run failed after the run before it passed.")


Trigger = Annotated[ScheduleTrigger | DriftTrigger | FeedbackTrigger | EvalRegressionTrigger,
                    Field(discriminator="kind")]


class FeedbackData(_Strict):
    min_score: float = Field(default=1.0, ge=0, le=1, description="Answers rated at least this well become "
                             "training examples (1: thumbs up only).")
    max_examples: int = Field(default=1000, ge=1, le=1_000_000)
    since: Literal["last_run", "all"] = Field(default="all", description="Ratings since the pipeline's last "
                                              "run only, or every rating kept.")


class DatasetStep(_Strict):
    include_job_data: bool = Field(default=True, description="Start from the job spec's own dataset file.")
    feedback: FeedbackData | None = Field(default=None, description="Add well-rated answers from production "
                                          "traffic (their traces must hold the content: otel.capture_content).")
    min_examples: int = Field(default=8, ge=1, description="Fewer examples than this stops the run before training.")


class CanaryStep(_Strict):
    endpoint: str = Field(description="The release endpoint clients call (its name as `model`).")
    baseline: str | None = Field(default=None, description="Model alias serving today. Default: the version this "
                                 "pipeline last promoted (its alias), else the server's default model.")
    backend: str | None = Field(default=None, description="Backend that loads the adapter; default: the default "
                                "model's.")
    steps: list[float] = Field(default=[25, 50, 100], description="Canary traffic per step, in percent, ending "
                               "at 100.")
    min_requests: int = Field(default=50, ge=1)
    min_duration: Duration = Field(default=60.0, description="Seconds (or 5m, 1h) each step runs at least.")
    max_duration: Duration = Field(default=3600.0, gt=0, description="A step still undecided after this rolls "
                                   "back.")
    unit: Unit = "key"
    metrics: list[MetricSpec] = Field(default_factory=default_metrics)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"endpoint {v!r} must be 1-63 lower-case letters, digits, '.', '_' or '-'")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[float]) -> list[float]:
        return CanarySpec._increasing(v)  # the release's own rule, one message

    def release(self, *, baseline: str, candidate: str, manual: bool, description: str) -> ReleaseSpec:
        """The canary release this step starts: ``stable`` (baseline) and ``canary`` (the new adapter)."""
        return ReleaseSpec(
            name=self.endpoint, strategy="canary", unit=self.unit, description=description, metrics=self.metrics,
            variants=[VariantSpec(name="stable", model=baseline), VariantSpec(name="canary", model=candidate)],
            canary=CanarySpec(steps=self.steps, min_requests=self.min_requests, min_duration_s=self.min_duration,
                              max_duration_s=max(self.max_duration, self.min_duration),
                              promotion="manual" if manual else "auto"))


class PromoteStep(_Strict):
    approval: Literal["required", "auto"] = Field(default="required", description="required: a person approves "
                                                  "in the API, CLI or web page; auto: promote when the canary "
                                                  "passes.")
    deploy_alias: str | None = Field(default=None, description="Also serve the promoted version under this model "
                                     "alias (without a canary, this is how it reaches traffic).")


class PipelineSpec(_Strict):
    name: str
    description: str = ""
    job: Path = Field(description="The fine-tuning job spec it retrains (relative to this file); its eval suites "
                      "are the gate.")
    triggers: list[Trigger] = Field(default_factory=list, description="What starts a run on its own; a person "
                                    "can always start one.")
    paused: bool = Field(default=False, description="A paused pipeline's triggers start nothing; a person can still "
                         "start a run.")
    cooldown: Duration = Field(default=86400.0, description="No triggered run sooner than this after the last "
                               "one started (seconds, or 12h, 1d).")
    dataset: DatasetStep = Field(default_factory=DatasetStep)
    canary: CanaryStep | None = Field(default=None, description="Release the new adapter as a canary; none: the "
                                      "gate alone decides.")
    promote: PromoteStep = Field(default_factory=PromoteStep)
    poll_interval: Duration = Field(default=5.0, gt=0, description="How often a waiting step looks again.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"pipeline name {v!r} must be 1-63 lower-case letters, digits, '.', '_' or '-'")
        if v == "runs":  # /v1/pipelines/runs lists runs
            raise ValueError("'runs' is reserved: name the pipeline after what it retrains")
        return v

    def content_hash(self, job: JobSpec) -> str:
        doc = {"pipeline": self.model_dump(mode="json"), "job": job.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Definition(BaseModel):
    """A loaded pipeline: its spec, the job spec it retrains, where it came from and the hash of both."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    spec: PipelineSpec
    job: JobSpec
    source: str
    hash: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model(self) -> str:
        return self.job.model_name


def parse_pipeline(text: str, *, base_dir: Path, source: str = "pipeline") -> Definition:
    """Parse a definition and load the job spec it names; raise InvalidRequest (``invalid_pipeline``) with
    every problem."""
    spec = parse_yaml_model(text, PipelineSpec, source=source, error=InvalidPipeline)
    job_path = spec.job if spec.job.is_absolute() else (base_dir / spec.job).resolve()
    try:
        job = load_spec(job_path)
    except InvalidRequest as exc:
        raise InvalidPipeline(f"{source}: its job {spec.job}: {exc.message}") from None
    if not job.evals:
        raise InvalidPipeline(f"{source}: its job {spec.job} names no eval suites; a pipeline promotes nothing "
                              "without a gate (add evals: [...] to the job spec)")
    spec = spec.model_copy(update={"job": job_path})
    return Definition(spec=spec, job=job, source=source, hash=spec.content_hash(job))


def load_pipeline(path: Path) -> Definition:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidPipeline(f"cannot read pipeline {path}: {exc}") from None
    return parse_pipeline(text, base_dir=path.resolve().parent, source=str(path))


class InvalidPipeline(InvalidJobSpec):
    code = "invalid_pipeline"

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None, param: str | None = None):
        super().__init__(message, errors=errors, param=param)
