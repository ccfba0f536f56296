"""Settings of the ``features`` section: the feature store (Feast) and what Keel derives into it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class FeatureSettings(BaseModel):
    """Feast (``lifecycle.features``): per-user and per-document features derived from Keel's own data, online
    lookups for prompts and agents, point-in-time joins for training sets."""

    enabled: bool = Field(default=True, description="Offer the feature store (CLI, tools, prompt features).")
    dir: Path | None = Field(default=None, description="The feature repo's folder (registry, online store, "
                             "exported sources); None: <home>/features.")
    online_store: dict[str, Any] | None = Field(default=None, description=(
        "Feast's online_store config; None: SQLite in the repo folder. Scaled out: e.g. {type: redis, "
        "connection_string: 'redis:6379'} or {type: postgres, host: ..., database: ...}."))
    offline_store: dict[str, Any] | None = Field(default=None, description=(
        "Feast's offline_store config; None: the exported Parquet files (type file). E.g. {type: duckdb}."))
    registry: str | None = Field(default=None, description="Feast registry path or URL; None: registry.db in the "
                                 "repo folder (a SQL registry URL when several processes apply).")
    ttl_days: float = Field(default=30.0, gt=0, description="How old a feature value may be and still be served.")
    max_records: int = Field(default=200_000, ge=100, description="Most lineage records read per export.")

    def folder(self, home: Path) -> Path:
        return self.dir if self.dir is not None else Path(home) / "features"
