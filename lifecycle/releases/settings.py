"""Settings of the ``releases`` section."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator

from app.core.db import postgres_url


class ReleaseSettings(BaseModel):
    """Releases (``lifecycle.releases``): A/B tests, canaries, shadows and blue/green switches of endpoints."""

    enabled: bool = Field(default=True, description="Serve release endpoints and run the release controller.")
    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL: one set of releases for every API process on several machines; unset: "
        "<home>/releases.db (one machine)."))
    check_interval_s: float = Field(default=1.0, ge=0, le=60, description=(
        "How stale a process's copy of the releases may be: a decision made elsewhere is served within this."))
    decide_interval_s: float = Field(default=5.0, gt=0, le=3600, description=(
        "How often the controller judges running canaries and A/B tests (in every API process; one decision "
        "lands per change)."))

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="releases.url", otherwise="<home>/releases.db")
