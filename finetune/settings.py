"""Fine-tuning settings (mounted as ``Settings.finetune``).

Kept free of imports from ``app.core.settings`` so that module can import this one.
Every path left as ``None`` resolves under Keel's home folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, SecretStr, field_validator

from app.core.audit import AuditRetention
from app.core.db import postgres_url
from app.jobs.settings import JobSettings
from evals.settings import EvalConfig
from prompts.settings import PromptConfig

# The Keel home's folders fine-tuning may read by default: training data users put there, the prepared models,
# the datasets continuous-training pipelines build.
DATA_DIRS = ("datasets", "models", "pipelines")


class FinetuneSettings(BaseModel):
    jobs_db: Path | None = Field(default=None, description="SQLite job store; None means <home>/finetune/jobs.db.")
    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the fine-tuning job store (jobs, deployments, their audit trail) instead of the SQLite "
        "file under the home: every API process and worker then sees the same jobs. jobs.url (a job queue shared "
        "by processes on one home volume) fills it when unset and jobs_db is not set: the jobs run on that queue "
        "and their files are that home's."))
    runs_dir: Path | None = Field(
        default=None, description="One folder per job (checkpoints, adapter, log); None means <home>/finetune/runs."
    )
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI (a server URL for teams); None means sqlite:///<home>/mlflow.db."
    )
    registry_uri: str | None = Field(default=None, description="MLflow registry URI; None means the tracking URI.")
    artifact_location: str | None = Field(
        default=None,
        description="Where MLflow stores artifacts (a folder or s3://...); None means <home>/mlflow-artifacts.",
    )
    experiment: str = "keel-finetune"
    tracking_enabled: bool = Field(default=True, description="false: no MLflow run and no registered version.")
    model_prefix: str = Field(default="", description="Prefix for registered model names (e.g. 'keel-').")
    poll_interval_s: float = Field(default=2.0, gt=0, description="How often an idle worker looks for queued jobs.")
    heartbeat_interval_s: float = Field(default=5.0, gt=0, description=(
        "How often a worker beats the heartbeat of the job it runs, and so how soon it learns of a cancel sent "
        "from another machine (at most a third of jobs.lease_s is used: a job whose worker is silent for "
        "jobs.lease_s is taken back by the job queue and resumed by another worker)."))
    max_attempts: int = Field(default=3, ge=1, description="Runs of one job (first run plus crash recoveries).")
    allowed_roots: list[Path] | None = Field(
        default=None,
        description="Folders a job's dataset files and base model folder must live in (whoever may submit a job "
        "must not make the server read, or train on, any file it can read). None: the project's finetune/jobs "
        "folder and, in the Keel home, datasets/ (put training data there), models/ (the prepared models) and "
        "pipelines/ (the datasets continuous training builds) — never the whole home, which holds key files and "
        "databases. ['/'] allows any path.",
    )
    allowed_data_dirs: list[Path] = Field(
        default_factory=list,
        description="If set, submitted datasets must live under one of these folders (API users cannot make "
        "the server read arbitrary files). Empty: any path the server can read.",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N; a job's spec may override it.")
    auto_eval: bool = Field(
        default=True, description="This worker runs the eval suites of succeeded jobs on their adapters (in process, "
        "transformers + peft). false: training only; another worker with auto_eval evaluates them.",
    )
    eval_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32", description="dtype of the in-process model that answers the eval suites."
    )
    audit_retention: AuditRetention = Field(
        default_factory=AuditRetention, description="How long the adapters audit trail (promotions, rollbacks, "
        "deploys, job cancels and evaluations) is kept. Unset limits keep everything, as before.")

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="finetune.url", otherwise="the SQLite file <home>/finetune/jobs.db")

    def resolved_allowed_roots(self, home: Path) -> list[Path]:
        if self.allowed_roots is not None:
            return list(self.allowed_roots)
        return [Path(__file__).resolve().parent / "jobs", *(home / d for d in DATA_DIRS)]

    def home_dir(self, home: Path) -> Path:
        return home / "finetune"

    def resolved_jobs_db(self, home: Path) -> Path:
        return self.jobs_db if self.jobs_db is not None else self.home_dir(home) / "jobs.db"

    def resolved_runs_dir(self, home: Path) -> Path:
        return self.runs_dir if self.runs_dir is not None else self.home_dir(home) / "runs"

    def resolved_tracking_uri(self, home: Path) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(home / 'mlflow.db').resolve()}"

    def resolved_registry_uri(self, home: Path) -> str:
        return self.registry_uri or self.resolved_tracking_uri(home)

    def resolved_artifact_location(self, home: Path) -> str:
        if self.artifact_location:
            return self.artifact_location
        return str((home / "mlflow-artifacts").resolve())


class FinetuneConfig(EvalConfig, PromptConfig, Protocol):
    """What fine-tuning reads from the settings tree: its own section and what evaluating an adapter needs."""

    finetune: FinetuneSettings
    jobs: JobSettings  # the job queue the jobs run on, shared with the API
