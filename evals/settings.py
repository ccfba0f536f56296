"""Settings for the eval harness (``Settings.evals``; env ``KEEL_EVALS__*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class EvalSettings(BaseModel):
    db_name: str = Field(default="evals.db", description="SQLite file under the Keel home folder.")
    suites_dir: Path = Field(default=Path("evals/suites"), description="Where `keel eval run NAME` looks.")
    concurrency: int = Field(default=4, ge=1, le=256, description="Cases in flight at once.")
    cache: bool = Field(default=True, description="Reuse stored answers whose whole identity matches.")
    embedding_model: Path | None = Field(
        default=None, description="sentence-transformers folder for semantic metrics; default: the RAG embedder's."
    )
    judge_model: str | None = Field(default=None, description="Served model name of the LLM judge (ragas metrics).")
    judge_base_url: str | None = Field(default=None, description="OpenAI-compatible /v1 URL of the judge.")
    gate_enabled: bool = Field(default=True, description="Plug the eval gate into the prompt registry.")
    gate_max_age_days: float | None = Field(default=None, description="Ignore passing runs older than this.")

    def db_path(self, home: Path) -> Path:
        return home / self.db_name
