"""Settings for the eval harness (``Settings.evals``; env ``KEEL_EVALS__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field, SecretStr, field_validator

from app.core.db import postgres_url
from app.core.settings import CoreConfig
from app.guardrails.settings import GuardrailSettings
from ingest.settings import RagSettings


class EvalSettings(BaseModel):
    db_name: str = Field(default="evals.db", description="SQLite file under the Keel home folder.")
    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the eval store (runs, case results, the response cache) instead of <home>/evals.db: "
        "every API process then gates promotions on the same runs. database_url fills it when unset."))
    suites_dir: Path = Field(default=Path("evals/suites"), description="Where `keel eval run NAME` looks.")
    concurrency: int = Field(default=4, ge=1, le=256, description="Cases in flight at once.")
    cache: bool = Field(default=True, description="Reuse stored answers whose whole identity matches.")
    embedding_model: Path | None = Field(
        default=None, description="sentence-transformers folder for semantic metrics; default: the RAG embedder's."
    )
    judge_model: str | None = Field(
        default=None, description="Served model name of the LLM judge (ragas metrics); default: the default "
        "model alias's backend model.")
    judge_base_url: str | None = Field(
        default=None, description="OpenAI-compatible /v1 URL of the judge; default: the default model's vLLM or "
        "OpenAI-compatible backend.")
    judge_api_key: SecretStr | None = Field(default=None, description="Bearer key for the judge, if it needs one.")
    judge_temperature: float = Field(
        default=0.7, ge=0, le=2,
        description="Judge sampling temperature. Above 0 so that a metric's repeated samples (samples: N) measure "
        "the judge's own uncertainty; 0 gives a reproducible single-sample judge.")
    judge_max_tokens: int = Field(
        default=512, ge=16, le=8192, description="Budget for one structured judge answer; a truncated answer is a "
        "recorded judge error for that sample.")
    judge_frequency_penalty: float = Field(
        default=0.5, ge=-2, le=2,
        description="Under guided decoding the small judge tends to repeat list items until judge_max_tokens; this "
        "penalty breaks the loops (on the golden suite's hardest cases: 4 of 8 judge answers truncated without it, "
        "1 of 8 with 0.5) at the cost of a slight bias against repeating the same verdict. 0 turns it off.")
    judge_timeout_s: float = Field(default=120.0, gt=0, description="Limit for one judge call.")
    judge_retries: int = Field(
        default=0, ge=0, le=5, description="Re-asks after an invalid structured answer (each costs a judge call).")
    gate_enabled: bool = Field(default=True, description="Plug the eval gate into the prompt registry.")
    gate_max_age_days: float | None = Field(default=None, description="Ignore passing runs older than this.")

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="evals.url", otherwise="<home>/evals.db")

    def db_path(self, home: Path) -> Path:
        return home / self.db_name


class EvalConfig(CoreConfig, Protocol):
    """What an eval run reads from the settings tree: its own section, and the guardrail and RAG sections its
    runs are identified by."""

    evals: EvalSettings
    guardrails: GuardrailSettings
    rag: RagSettings
