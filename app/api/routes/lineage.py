"""GET /v1/lineage/{completion_id}: what produced an answer (scope ``chat``: a key reads the lineage of the answers
it received; ``admin`` reads any)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import ChatKey, LineageDep

router = APIRouter(tags=["observability"])


@router.get("/v1/lineage/{completion_id}")
def get_lineage(completion_id: str, lineage: LineageDep, key: ChatKey) -> dict[str, Any]:
    """The prompt version and hash, the model route and adapter, the release variant, the passages (document,
    chunk, snapshot), the guardrail policy and every verdict, the eval runs of the prompt version and the feedback
    of the answer whose chat completion ``id`` this is."""
    return lineage.get(completion_id, owner=None if key.allows("admin") else key.id)
