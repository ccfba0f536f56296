"""Releases API: create a release endpoint, watch its numbers, pause, promote, roll back; and user feedback.

Everything under ``/v1/releases`` needs the ``releases`` scope; overriding a failed eval gate needs ``admin``.
Feedback (``POST /v1/feedback``) needs ``chat``: the key that got an answer rates it, and only ratings by that
key count in a release's numbers (a key cannot rate another's answers into a rollback). Handlers that touch the
store are plain ``def``: FastAPI runs them in its thread pool.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.deps import ChatKey, ReleasesDep, ReleasesKey, ServingDep
from app.core.errors import PermissionDenied
from app.security.keys import ApiKey
from lifecycle.releases.service import public
from lifecycle.releases.spec import ReleaseSpec

router = APIRouter(tags=["releases"])


def actor_of(key: ApiKey) -> str:
    return f"{key.name} [{key.id}]"


class CreateReleaseIn(ReleaseSpec):
    """A release spec (as in a YAML file), plus why, and an admin's reason to start despite a failed gate."""

    reason: str = Field(default="", max_length=2000)
    override_reason: str | None = Field(default=None, max_length=2000)


class ActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000, description="Recorded with the decision.")
    variant: str | None = Field(default=None, description="promote: the variant to send all traffic to "
                                "(default: the candidate).")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, description="The chat completion's id (chatcmpl-...).")
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(default=None, ge=0, le=1, description="0 (bad) .. 1 (good), instead of rating.")
    comment: str = Field(default="", max_length=4000)

    @model_validator(mode="after")
    def _one(self) -> FeedbackIn:
        if (self.rating is None) == (self.score is None):
            raise ValueError("give either rating ('up' or 'down') or score (0..1)")
        return self


@router.get("/v1/releases")
def list_releases(releases: ReleasesDep, _: ReleasesKey) -> dict[str, Any]:
    return {"object": "list", "data": [public(r) for r in releases.store.current().values()]}


@router.post("/v1/releases", status_code=201)
def create_release(body: CreateReleaseIn, releases: ReleasesDep, key: ReleasesKey) -> dict[str, Any]:
    override = (body.override_reason or "").strip() or None
    if override and not key.allows("admin"):
        raise PermissionDenied("overriding the eval gate needs the 'admin' scope; leave override_reason out, or "
                               "ask an admin", param="override_reason")
    spec = ReleaseSpec.model_validate(body.model_dump(exclude={"reason", "override_reason"}))
    release = releases.create(spec, actor=actor_of(key), reason=body.reason, override_reason=override)
    return public(release)


@router.get("/v1/releases/{name}")
def get_release(name: str, releases: ReleasesDep, _: ReleasesKey) -> dict[str, Any]:
    return releases.report(name)


@router.get("/v1/releases/{name}/series")
def release_series(name: str, releases: ReleasesDep, _: ReleasesKey,
                   bucket_s: float = Query(default=60, ge=1, le=86_400, description="Seconds per point.")
                   ) -> dict[str, Any]:
    release = releases.get(name)
    releases.flush()
    return {"name": name, "bucket_s": bucket_s, "points": releases.store.series(release.id, bucket_s)}


@router.get("/v1/releases/{name}/shadow")
def shadow_pairs(name: str, releases: ReleasesDep, _: ReleasesKey,
                 limit: int = Query(default=50, ge=1, le=1000)) -> dict[str, Any]:
    """A shadow release's stored pairs (the primary's answer and the shadow's), newest first."""
    release = releases.get(name)
    releases.flush()
    return {"name": name, "data": [p.public() for p in releases.store.pairs(release.id, limit)]}


@router.get("/v1/releases/{name}/history")
def release_history(name: str, releases: ReleasesDep, _: ReleasesKey) -> dict[str, Any]:
    """Every release ever made on this endpoint, newest first."""
    return {"name": name, "data": [public(r) for r in releases.store.history(name)]}


@router.post("/v1/releases/{name}/pause")
def pause_release(name: str, body: ActionIn, releases: ReleasesDep, key: ReleasesKey) -> dict[str, Any]:
    return public(releases.pause(name, actor=actor_of(key), reason=body.reason))


@router.post("/v1/releases/{name}/resume")
def resume_release(name: str, body: ActionIn, releases: ReleasesDep, key: ReleasesKey) -> dict[str, Any]:
    return public(releases.resume(name, actor=actor_of(key), reason=body.reason))


@router.post("/v1/releases/{name}/promote")
async def promote_release(name: str, body: ActionIn, serving: ServingDep, key: ReleasesKey) -> dict[str, Any]:
    """All traffic to the candidate (or ``variant``). A blue/green release switches only after its readiness
    probes pass (409 ``not_ready`` otherwise, traffic unchanged)."""
    release = serving.releases.get(name)
    if release.spec.strategy == "bluegreen" and body.variant in (None, release.spec.candidate):
        return public(await serving.switch(name, actor=actor_of(key), reason=body.reason))
    return public(serving.releases.promote(name, actor=actor_of(key), reason=body.reason, variant=body.variant))


@router.post("/v1/releases/{name}/rollback")
def rollback_release(name: str, body: ActionIn, releases: ReleasesDep, key: ReleasesKey) -> dict[str, Any]:
    return public(releases.rollback(name, actor=actor_of(key), reason=body.reason))


@router.post("/v1/feedback", status_code=201, tags=["chat"])
def feedback(body: FeedbackIn, releases: ReleasesDep, key: ChatKey) -> dict[str, Any]:
    """Thumbs up/down (or a score) on an answer, by its chat completion id (the ``openai`` client's
    ``response.id``). Rating again replaces the earlier rating."""
    score = body.score if body.score is not None else (1.0 if body.rating == "up" else 0.0)
    releases.store.feedback(body.id, key.id, score, body.comment)
    return {"id": body.id, "score": score, "recorded": True}
