"""Documents: ingest (background jobs), retrieval with citations, collections and snapshots."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from pydantic import BaseModel, Field

from app.api.deps import get_container, require_scope
from app.core.errors import InvalidRequest, PermissionDenied
from app.security.keys import ApiKey
from app.services.container import Container
from ingest.settings import GroupBy

router = APIRouter(prefix="/v1", tags=["rag"])


class RetrieveIn(BaseModel):
    query: str = Field(min_length=1, max_length=10_000)
    collection: str | None = None
    top_k: int | None = Field(default=None, ge=1, le=100, description=(
        "How many results: chunks (one document can fill several places), or documents with "
        "group_by='document'. Default: rag.retrieval.top_k."))
    filters: dict[str, Any] | None = None
    score_threshold: float | None = None
    mmr: bool | None = None
    group_by: GroupBy | None = Field(default=None, description=(
        "'document': at most one chunk per document, its best, so top_k counts documents (fewer only when "
        "fewer documents match)."))


class IngestPathsIn(BaseModel):
    paths: list[str] = Field(min_length=1, description="Files, folders or globs on the server's disk.")
    collection: str | None = None
    prune: bool = Field(default=False, description="Remove chunks of files under these paths that are gone.")


@router.post("/retrieve")
async def retrieve(body: RetrieveIn, _key: ApiKey = Depends(require_scope("chat")),
                   container: Container = Depends(get_container)) -> dict:
    result = await asyncio.to_thread(
        container.rag.retriever.retrieve, body.query, collection=body.collection, top_k=body.top_k,
        filters=body.filters, score_threshold=body.score_threshold, mmr=body.mmr, group_by=body.group_by,
    )
    return result.model_dump()


@router.post("/ingest", status_code=202)
async def ingest_upload(
    files: list[UploadFile] = File(..., description="Documents: .md .txt .html .pdf .json .jsonl"),
    collection: str | None = Form(None),
    _key: ApiKey = Depends(require_scope("ingest")),
    container: Container = Depends(get_container),
) -> dict:
    """Upload documents; they are ingested by a background job (poll ``GET /v1/ingest/jobs/{id}``)."""
    collection = collection or container.settings.rag.collection
    saved = {}
    for f in files:
        path = container.ingest_jobs.save_upload(collection, f.filename or "", await f.read())
        saved[str(path)] = path.name
    return container.ingest_jobs.submit(collection, list(saved), names=saved).public()


@router.post("/ingest/paths", status_code=202)
async def ingest_paths(body: IngestPathsIn, key: ApiKey = Depends(require_scope("ingest")),
                       container: Container = Depends(get_container)) -> dict:
    """Ingest files already on the server. Reading the server's disk is for admins only."""
    if "admin" not in key.scopes:
        raise PermissionDenied("ingesting server-side paths needs the 'admin' scope; upload files instead")
    return container.ingest_jobs.submit(body.collection or container.settings.rag.collection,
                                        body.paths, body.prune).public()


@router.get("/ingest/jobs")
async def list_jobs(_key: ApiKey = Depends(require_scope("ingest")),
                    container: Container = Depends(get_container)) -> list[dict]:
    return [j.public() for j in container.ingest_jobs.list()]


@router.get("/ingest/jobs/{job_id}")
async def get_job(job_id: str, wait_s: float = Query(0, ge=0, le=60, description="Long-poll until done."),
                  _key: ApiKey = Depends(require_scope("ingest")),
                  container: Container = Depends(get_container)) -> dict:
    if wait_s:
        return (await container.ingest_jobs.wait(job_id, wait_s)).public()
    return container.ingest_jobs.get(job_id).public()


@router.get("/collections")
async def collections(_key: ApiKey = Depends(require_scope("chat")),
                      container: Container = Depends(get_container)) -> list[dict]:
    return await asyncio.to_thread(container.rag.list_collections)


@router.get("/snapshots")
async def snapshots(collection: str | None = None, limit: int = Query(50, ge=1, le=500),
                    _key: ApiKey = Depends(require_scope("ingest")),
                    container: Container = Depends(get_container)) -> list[dict]:
    items = await asyncio.to_thread(container.rag.snapshots.list, collection, limit)
    return [s.model_dump() for s in items]


@router.get("/snapshots/diff")
async def snapshot_diff(base: str, target: str, _key: ApiKey = Depends(require_scope("ingest")),
                        container: Container = Depends(get_container)) -> dict:
    if base == target:
        raise InvalidRequest("base and target are the same snapshot", param="target")
    return (await asyncio.to_thread(container.rag.snapshots.diff, base, target)).model_dump()


@router.get("/snapshots/{snapshot_id}")
async def snapshot(snapshot_id: str, _key: ApiKey = Depends(require_scope("ingest")),
                   container: Container = Depends(get_container)) -> dict:
    return (await asyncio.to_thread(container.rag.snapshots.get, snapshot_id)).model_dump()
