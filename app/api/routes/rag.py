"""Documents: ingest (background jobs), retrieval with citations, collections and snapshots."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from app.api.deps import ChatKey, IngestJobsDep, IngestKey, RagDep, SettingsDep
from app.api.openapi import error_responses
from app.core.errors import ClientGone, InvalidRequest, PayloadTooLarge, PermissionDenied
from app.security.keys import ApiKey
from app.services.ingest_jobs import UploadBatch
from ingest.settings import GroupBy

router = APIRouter(prefix="/v1", tags=["rag"])
_MAX_FIELD = 64 * 1024  # text fields of an upload form (the collection name)
_IDEMPOTENCY = Header(default=None, alias="Idempotency-Key", max_length=200, description=(
    "Sending the same key again (a retried request) returns the job of the first request instead of a new one."))


def _owner(key: ApiKey) -> str | None:
    """Whose jobs the caller sees: its own, or every job for an admin (None)."""
    return None if "admin" in key.scopes else key.id


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


_INGEST_ERRORS = error_responses({
    409: "The Idempotency-Key was used for another request.", 413: "Upload over limits.max_body_bytes."})


class IngestPathsIn(BaseModel):
    # no NUL: no file system path holds one (the job failed on it, three times, instead of the request)
    paths: list[Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]] = Field(
        min_length=1, description="Files, folders or globs on the server's disk.")
    collection: str | None = None
    prune: bool = Field(default=False, description="Remove chunks of files under these paths that are gone.")


@router.post("/retrieve", responses=error_responses({404: "The collection does not exist."}))
async def retrieve(_key: ChatKey, rag: RagDep, body: RetrieveIn) -> dict:
    result = await asyncio.to_thread(
        rag.retriever.retrieve, body.query, collection=body.collection, top_k=body.top_k,
        filters=body.filters, score_threshold=body.score_threshold, mmr=body.mmr, group_by=body.group_by,
    )
    return result.model_dump()


_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Documents: .md .txt .html .pdf .json .jsonl"},
        "collection": {"type": "string", "description": "Target collection (default: rag.collection)."}}}}}}}


@router.post("/ingest", status_code=202, openapi_extra=_UPLOAD_FORM, responses=_INGEST_ERRORS)
async def ingest_upload(key: IngestKey, settings: SettingsDep, jobs: IngestJobsDep, request: Request,
                        idempotency_key: str | None = _IDEMPOTENCY) -> dict:
    """Upload documents; they are ingested by a background job (poll ``GET /v1/ingest/jobs/{id}``). The job is
    durable: queued or interrupted by a restart, it runs after the next start.

    Up to ``limits.max_upload_bytes`` per request (not the small ``limits.max_body_bytes`` of other
    routes): files stream to disk as they arrive, so a large upload never sits in memory."""
    limit = settings.limits.max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _upload_too_large(limit)
    batch = jobs.new_upload()
    try:
        fields = await _stream_form(request, batch, limit)
        if not batch.files:
            raise InvalidRequest("no files: send documents as multipart/form-data field 'files'", param="files")
        collection = fields.get("collection") or settings.rag.collection
        saved = jobs.commit_upload(batch, collection)
    finally:
        batch.discard()  # whatever was not committed: a refused or broken upload leaves no file behind
    job = await jobs.submit(collection, list(saved), names=saved, owner=key.id, idempotency_key=idempotency_key)
    return job.public()


def _upload_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"upload is larger than {limit} bytes, the limit per request (limits.max_upload_bytes, env "
        "KEEL_LIMITS__MAX_UPLOAD_BYTES): send the files in several requests, or raise the limit", param="files")


async def _stream_form(request: Request, batch: UploadBatch, limit: int) -> dict[str, str]:
    """Parse multipart/form-data as it arrives: file parts go straight into ``batch``'s part files, small
    text fields (``collection``) are returned. The limit counts the whole request, Content-Length or not."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequest("upload documents as multipart/form-data, in the field 'files'", param="files")
    fields: dict[str, str] = {}
    part: dict[str, Any] = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, name=b"", value=b"", text=bytearray(), file=False)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["name"].lower()] = part["value"]
        part["name"], part["value"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(part["headers"].get(b"content-disposition"))
        part["field"] = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            part["file"] = True
            batch.open(opts[b"filename"].decode("utf-8", "replace"))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part["file"]:
            # Written here, not in a thread: each piece is one receive()'s worth (tens of KiB) into the page
            # cache, cheaper than a thread hop per piece.
            batch.write(data[start:end])
        elif len(part["text"]) + end - start > _MAX_FIELD:
            raise InvalidRequest(f"form field {part['field']!r} is over {_MAX_FIELD} bytes", param=part["field"])
        else:
            part["text"] += data[start:end]

    def on_part_end() -> None:
        if part["file"]:
            batch.close_file()
        else:
            fields[part["field"]] = part["text"].decode("utf-8", "replace")

    ended: list[bool] = []
    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": lambda: ended.append(True)})
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _upload_too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise InvalidRequest(f"malformed multipart/form-data body: {e}", param="files") from None
    except ClientDisconnect:
        raise ClientGone("the client left during the upload; nothing was kept") from None
    if not ended:
        # the parser's finalize() does not check this: a body cut short would otherwise be ingested as whole
        raise InvalidRequest("the multipart/form-data body ends before its closing boundary (a cut-off upload); "
                             "nothing was kept: send it again", param="files")
    return fields


@router.post("/ingest/paths", status_code=202, responses=_INGEST_ERRORS)
async def ingest_paths(key: IngestKey, settings: SettingsDep, jobs: IngestJobsDep, body: IngestPathsIn,
                       idempotency_key: str | None = _IDEMPOTENCY) -> dict:
    """Ingest files already on the server. Reading the server's disk is for admins only."""
    if "admin" not in key.scopes:
        raise PermissionDenied("ingesting server-side paths needs the 'admin' scope; upload files instead")
    job = await jobs.submit(body.collection or settings.rag.collection, body.paths, body.prune, owner=key.id,
                            idempotency_key=idempotency_key)
    return job.public()


@router.get("/ingest/jobs")
async def list_jobs(key: IngestKey, jobs: IngestJobsDep, limit: int = Query(500, ge=1, le=1000)) -> list[dict]:
    """The caller's ingest jobs, newest first (an admin sees everyone's)."""
    return [j.public() for j in await jobs.list(owner=_owner(key), limit=limit)]


@router.get("/ingest/jobs/{job_id}")
async def get_job(key: IngestKey, jobs: IngestJobsDep, job_id: str,
                  wait_s: float = Query(0, ge=0, le=60, description="Long-poll until done.")) -> dict:
    if wait_s:
        return (await jobs.wait(job_id, wait_s, owner=_owner(key))).public()
    return (await jobs.get(job_id, owner=_owner(key))).public()


@router.post("/ingest/jobs/{job_id}/cancel")
async def cancel_job(key: IngestKey, jobs: IngestJobsDep, job_id: str, request: Request) -> dict:
    """Cancel an ingest job: a queued one at once (``cancelled``); a running one stops after its current batch
    (``cancel_requested`` until then): what it wrote is kept, every document whole. 409 if it already ended."""
    job = await jobs.cancel(job_id, owner=_owner(key), actor=key.id,
                            request_id=getattr(request.state, "request_id", None))
    return job.public()


@router.get("/collections")
async def collections(_key: ChatKey, rag: RagDep) -> list[dict]:
    return await asyncio.to_thread(rag.list_collections)


@router.get("/snapshots")
async def snapshots(_key: IngestKey, rag: RagDep, collection: str | None = None,
                    limit: int = Query(50, ge=1, le=500)) -> list[dict]:
    items = await asyncio.to_thread(rag.snapshots.list, collection, limit)
    return [s.model_dump() for s in items]


@router.get("/snapshots/diff", responses=error_responses({404: "A snapshot the diff names does not exist."}))
async def snapshot_diff(_key: IngestKey, rag: RagDep, base: str, target: str) -> dict:
    if base == target:
        raise InvalidRequest("base and target are the same snapshot", param="target")
    return (await asyncio.to_thread(rag.snapshots.diff, base, target)).model_dump()


@router.get("/snapshots/{snapshot_id}")
async def snapshot(_key: IngestKey, rag: RagDep, snapshot_id: str) -> dict:
    return (await asyncio.to_thread(rag.snapshots.get, snapshot_id)).model_dump()
