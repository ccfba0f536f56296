"""Agent configuration: one ``AgentSettings`` node under ``Settings.agents``.

Free of heavy imports, so loading settings never imports LangGraph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from app.core.db import postgres_url
from app.core.settings import CoreConfig


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Model alias the agents call; None means default_model.")
    checkpoint_db: Path | None = Field(
        default=None,
        description="SQLite file for checkpoints; None means <home>/agents.db (runs table: agents.runs.db).",
    )
    postgres_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:pass@host:5432/db: keep checkpoints and the runs table in Postgres, shared by "
        "every API process; None means the SQLite files.",
    )
    collection: str | None = Field(default=None, description="RAG collection searched; None means rag.collection.")
    top_k: int = Field(default=4, ge=1, le=20, description="Passages retrieved per search.")
    max_rounds: int = Field(default=2, ge=1, le=5, description="rag-qa: retrieve/answer rounds before 'I don't know'.")
    max_steps: int = Field(default=8, ge=2, le=50, description="research: supervisor decisions before the run stops.")
    recursion_limit: int = Field(default=60, ge=5, description="LangGraph super-step limit (a safety net).")
    node_timeout_s: float = Field(default=120.0, gt=0, description="Wall-clock limit for one node.")
    run_timeout_s: float = Field(
        default=300.0, gt=0,
        description="Wall-clock limit for one run (each start or resume): the run ends with status 'timed_out' "
        "and an error event 'run_timeout'; 'continue' resumes it from the last completed step.",
    )
    tool_timeout_s: float = Field(default=30.0, gt=0)
    tool_retries: int = Field(default=1, ge=0, le=5, description="Retries after a tool raised (not for bad input).")
    answer_max_tokens: int = Field(default=256, ge=16)
    decision_max_tokens: int = Field(default=96, ge=16, description="Budget for structured (JSON) decisions.")
    grounded_min_overlap: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Share of the answer's content words that must appear in the passages to count as grounded.",
    )
    risky_tools: list[str] = Field(
        default_factory=lambda: ["memory_write"],
        description="Tools that pause the run for a human's approval (in addition to tools marked risky).",
    )
    memory_collection: str = "agent-memory"
    memory_dedup_threshold: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Cosine similarity above which a new memory updates an old one."
    )
    memory_search_min_score: float = Field(default=0.35, ge=-1.0, le=1.0)

    @field_validator("postgres_url")
    @classmethod
    def _postgres_only(cls, v: SecretStr | None) -> SecretStr | None:
        return postgres_url(v, setting="agents.postgres_url", otherwise="SQLite")

    def db_path(self, home: Path) -> Path:
        return self.checkpoint_db if self.checkpoint_db is not None else home / "agents.db"


class AgentConfig(CoreConfig, Protocol):
    """What the agent service reads from the settings tree."""

    agents: AgentSettings
