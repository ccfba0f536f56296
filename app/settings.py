"""The whole settings tree: the kernel's fields plus every feature's section. Only the composition root and
the entry points (API, CLI, workers) import this module; features read their own section.

Nothing here runs at import time: call :func:`load_settings` once in an entry point and pass the result down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator

from agents.settings import AgentSettings
from app.core.settings import CoreSettings
from app.guardrails.settings import GuardrailSettings
from app.jobs.settings import JobSettings
from evals.settings import EvalSettings
from finetune.settings import FinetuneSettings
from ingest.settings import RagSettings
from lifecycle.batch.settings import BatchSettings
from lifecycle.features.settings import FeatureSettings
from lifecycle.monitor.settings import MonitorSettings
from lifecycle.pipeline.settings import PipelineSettings
from lifecycle.releases.settings import ReleaseSettings
from lifecycle.tools.settings import McpSettings
from prompts.settings import PromptSettings


class Settings(CoreSettings):
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    rag: RagSettings = Field(default_factory=RagSettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    agents: AgentSettings = Field(default_factory=AgentSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    evals: EvalSettings = Field(default_factory=EvalSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    releases: ReleaseSettings = Field(default_factory=ReleaseSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    mcp: McpSettings = Field(default_factory=McpSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    pipelines: PipelineSettings = Field(default_factory=PipelineSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)

    @model_validator(mode="after")
    def _one_database(self) -> Settings:
        """``database_url`` is the URL of every feature store that lives wholly in Postgres whose own is unset (the
        kernel's, keys and routing, are filled in by :class:`CoreSettings`). Not the job queue's: the jobs on it
        read and write files under the home (ingest uploads, fine-tuning datasets and adapters, pipeline
        datasets), so a queue shared by processes with homes of their own would hand a job to a process that
        cannot see its files; ``jobs.url`` is for processes that share the home (one volume). The stores of the
        work that runs on that queue, fine-tuning jobs and pipeline runs, follow the queue: shared when it is
        (their runs are driven by whichever process's queue holds their job, and their files are the home's)."""
        url = self.database_url
        if url is not None:
            self.prompts.url = self.prompts.url or url
            self.releases.url = self.releases.url or url
            self.evals.url = self.evals.url or url
            self.monitor.url = self.monitor.url or url
            self.batch.url = self.batch.url or url
            self.rag.snapshots_url = self.rag.snapshots_url or url
            if self.guardrails.audit_db is None:  # a file named on purpose is the store's own setting: it wins
                self.guardrails.audit_url = self.guardrails.audit_url or url
            self.agents.postgres_url = self.agents.postgres_url or url
        # Prompt labels and release splits live in the routing table: where prompts or releases are shared, so is
        # it (else each machine would keep labels and splits of its own in <home>/routing.db).
        self.routing.url = self.routing.url or self.prompts.url or self.releases.url
        queue = self.jobs.url
        if queue is not None:
            self.pipelines.url = self.pipelines.url or queue
            if self.finetune.jobs_db is None:
                self.finetune.url = self.finetune.url or queue
        return self


    def store_urls(self) -> dict[str, SecretStr | None]:
        """Every store URL setting by name (after ``database_url`` filled them): what is kept in Postgres."""
        return {"auth.url": self.auth.url, "prompts.url": self.prompts.url, "routing.url": self.routing.url,
                "releases.url": self.releases.url, "evals.url": self.evals.url, "monitor.url": self.monitor.url,
                "guardrails.audit_url": self.guardrails.audit_url, "agents.postgres_url": self.agents.postgres_url,
                "jobs.url": self.jobs.url, "pipelines.url": self.pipelines.url, "batch.url": self.batch.url,
                "finetune.url": self.finetune.url, "rag.snapshots_url": self.rag.snapshots_url}


def load_settings(**overrides: Any) -> Settings:
    """Build the settings tree once; entry points call this and pass it down."""
    config = os.environ.get("KEEL_CONFIG")
    if config and not Path(config).is_file():
        raise FileNotFoundError(f"KEEL_CONFIG points at {config!r}, which is not a file")
    return Settings(**overrides)
