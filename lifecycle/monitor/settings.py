"""Settings of the ``monitor`` section."""

from __future__ import annotations

from pydantic import BaseModel, Field


class MonitorSettings(BaseModel):
    """What the drift monitor records and compares (``lifecycle.monitor``)."""

    embed_sample: float = Field(default=1.0, ge=0, le=1, description=(
        "Share of questions whose embedding is kept for input-drift checks (computed off the request path by "
        "the lineage writer; the text itself is never stored). 0: no embeddings."))
