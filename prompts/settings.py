"""Prompt-registry settings (mounted as ``Settings.prompts``).

Kept free of imports from ``app.core.settings`` so that module can import this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field, SecretStr, field_validator

from app.core.audit import AuditRetention
from app.core.db import postgres_url
from app.core.settings import CoreConfig


class PromptLimits(BaseModel):
    """Bounds that keep one template from exhausting memory or CPU on the hot path."""

    max_messages: int = Field(default=32, ge=1)
    max_message_chars: int = Field(default=20_000, ge=1)
    max_template_chars: int = Field(default=60_000, ge=1, description="All messages of one version together.")
    max_variables: int = Field(default=64, ge=0)
    max_nesting: int = Field(default=6, ge=1, description="Nested {% for/if/with/macro %} blocks.")
    max_include_depth: int = Field(default=4, ge=0, description="Partials including partials.")
    max_render_chars: int = Field(default=200_000, ge=1, description="Rendered output of all messages.")
    max_range: int = Field(default=1_000, ge=1, description="Largest range() a template may build.")
    max_steps: int = Field(
        default=200_000, ge=1, description="Loop iterations plus calls one render may spend (CPU bound)."
    )


class PromptSettings(BaseModel):
    db_path: Path | None = Field(default=None, description="SQLite file; None means <home>/prompts.db.")
    url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:pass@host:5432/db: keep the registry in Postgres (several API instances "
        "share it); None means the SQLite file (db_path).",
    )
    protected_labels: list[str] = Field(
        default_factory=lambda: ["production"],
        description="Moving these labels goes through the promotion gate.",
    )
    change_check_interval_s: float = Field(
        default=0.5, ge=0.0, description="How often a worker checks the store for changes by others."
    )
    seed_library: bool = Field(
        default=True, description="Import the shipped starter templates when the registry is empty."
    )
    audit_retention: AuditRetention = Field(
        default_factory=AuditRetention, description="How long the registry's audit trail (versions, label moves, "
        "overrides) is kept. Unset limits keep everything, as before.")
    limits: PromptLimits = Field(default_factory=PromptLimits)

    @field_validator("url")
    @classmethod
    def _postgres_only(cls, v: SecretStr | None) -> SecretStr | None:
        return postgres_url(v, setting="prompts.url", otherwise="the SQLite file")

    def resolved_db_path(self, home: Path) -> Path:
        return self.db_path if self.db_path is not None else home / "prompts.db"


class PromptConfig(CoreConfig, Protocol):
    """What the prompt registry reads from the settings tree."""

    prompts: PromptSettings
