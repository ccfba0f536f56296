"""The OpenAI Files and Batch APIs (scope ``chat``; the key decides whose files and batches they are, ``admin``
sees all), run by :mod:`lifecycle.batch` on the job runner:

* ``POST /v1/files`` (multipart: ``file``, ``purpose=batch``), ``GET /v1/files``, ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``;
* ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``, ``metadata``),
  ``GET /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

The unchanged ``openai`` client works against them (``client.files.create``, ``client.batches.create``, ...).
Each request line is answered by :func:`batch_responder`: the chat route's own path and wire format.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.deps import ChatKey, ContainerDep, ModelKey, chat_path
from app.api.errors import describe_validation, error_body, keel_error_body
from app.api.openapi import error_responses
from app.api.routes.chat import completion, to_domain
from app.api.routes.embeddings import embed
from app.api.schemas import ChatCompletionRequest, EmbeddingRequest
from app.core.errors import InvalidRequest, KeelError, NotFound
from app.security.keys import ApiKey
from lifecycle.batch.service import BatchService, Respond, public_file

router = APIRouter(tags=["batch"])
_CHUNK = 1 << 20


def _owner(key: ApiKey) -> str | None:
    return None if key.allows("admin") else key.id


def _batches(container: Any) -> BatchService:
    svc = getattr(container, "batches", None)
    if svc is None:
        raise NotFound("batches are off on this server (batch.enabled)", code="batches_off")
    return svc


# -- files -------------------------------------------------------------------------------------------


_FILE = error_responses({404: "No such file of this key's (file_not_found), or batches are off (batches_off)."})
_BATCH = error_responses({404: "No such batch of this key's (batch_not_found), or batches are off (batches_off)."})


@router.post("/v1/files", tags=["batch"], responses=error_responses({
    400: "Not a batch request file: empty, over batch.max_file_bytes, or another purpose.",
    404: "Batches are off on this server (batches_off).", 413: "The upload is over the server's body limit."}))
async def upload_file(key: ChatKey, container: ContainerDep, file: UploadFile = File(...),
                      purpose: str = Form(...)) -> dict[str, Any]:
    svc = _batches(container)
    limit = svc.settings.max_file_bytes
    data = bytearray()
    while chunk := await file.read(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise InvalidRequest(f"the file is larger than batch.max_file_bytes ({limit} bytes): split it",
                                 param="file")
    # the bytes go to disk or, shared, to Postgres: off the event loop
    return await asyncio.to_thread(svc.create_file, owner=key.id, filename=file.filename or "upload.jsonl",
                                   purpose=purpose, data=bytes(data))


@router.get("/v1/files")
def list_files(key: ChatKey, container: ContainerDep, purpose: str | None = None,
               limit: int = Query(default=100, ge=1, le=10_000)) -> dict[str, Any]:
    return {"object": "list", "data": _batches(container).files(owner=_owner(key), purpose=purpose, limit=limit)}


@router.get("/v1/files/{file_id}", responses=_FILE)
def get_file(file_id: str, key: ChatKey, container: ContainerDep) -> dict[str, Any]:
    return public_file(_batches(container).file(file_id, owner=_owner(key)))


@router.get("/v1/files/{file_id}/content", response_class=FileResponse, responses=_FILE)
def file_content(file_id: str, key: ChatKey, container: ContainerDep) -> FileResponse:
    row, path = _batches(container).content(file_id, owner=_owner(key))
    return FileResponse(path, media_type="application/jsonl", filename=row["filename"])


@router.delete("/v1/files/{file_id}", responses=_FILE)
def delete_file(file_id: str, key: ChatKey, container: ContainerDep) -> dict[str, Any]:
    return _batches(container).delete_file(file_id, owner=_owner(key))


# -- batches -----------------------------------------------------------------------------------------


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=200)
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings"] = Field(description="The endpoint every line calls.")
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


@router.post("/v1/batches", responses=error_responses({
    400: "A bad batch: unknown endpoint or completion window, a file of another purpose, too many requests.",
    404: "No such input file (file_not_found), or batches are off (batches_off)."}))
async def create_batch(body: BatchIn, key: ModelKey, container: ContainerDep) -> dict[str, Any]:
    return await _batches(container).create(owner=key.id, scopes=key.scopes, input_file_id=body.input_file_id,
                                            endpoint=body.endpoint, completion_window=body.completion_window,
                                            metadata=body.metadata)


@router.get("/v1/batches")
def list_batches(key: ChatKey, container: ContainerDep, after: str | None = None,
                 limit: int = Query(default=20, ge=1, le=100)) -> dict[str, Any]:
    data = _batches(container).list(owner=_owner(key), after=after, limit=limit + 1)
    return {"object": "list", "data": data[:limit], "first_id": data[0]["id"] if data else None,
            "last_id": data[:limit][-1]["id"] if data else None, "has_more": len(data) > limit}


@router.get("/v1/batches/{batch_id}", responses=_BATCH)
def get_batch(batch_id: str, key: ChatKey, container: ContainerDep) -> dict[str, Any]:
    return _batches(container).get(batch_id, owner=_owner(key))


@router.post("/v1/batches/{batch_id}/cancel", responses=_BATCH)
async def cancel_batch(batch_id: str, key: ChatKey, container: ContainerDep) -> dict[str, Any]:
    return await _batches(container).cancel(batch_id, owner=_owner(key), actor=f"{key.name} [{key.id}]")


# -- one line of a batch, as the chat route answers it ----------------------------------------------


def batch_responder(container: Any) -> Respond:
    """Each batch line through the chat path clients reach (releases, guardrails, traces, lineage) and the
    chat route's wire format; errors in the API's error shape, with the status the route would give."""

    async def respond(url: str, body: dict[str, Any], owner: str, scopes: frozenset[str] | None,
                      request_id: str) -> tuple[int, dict[str, Any]]:
        if url == "/v1/embeddings":
            return await embeddings_line(body)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as e:  # the message the chat route's 400 would give
            message, param, code = describe_validation(e)
            return 400, error_body(message, "invalid_request_error", code, param)
        if req.stream:
            return 400, error_body("stream must be false in a batch: each answer is written whole",
                                   "invalid_request_error", "invalid_request", "stream")
        chat = chat_path(container)
        meter = getattr(container, "token_meter", None)
        try:
            budget = await asyncio.to_thread(meter.budget_of, owner) if meter is not None else None
            result = await chat.complete(to_domain(req, request_id or uuid.uuid4().hex, owner, None, scopes, budget))
        except KeelError as e:
            return e.status, keel_error_body(e)
        return 200, completion(req, result).model_dump(mode="json", exclude_none=True)

    async def embeddings_line(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            req = EmbeddingRequest.model_validate(body)
        except ValidationError as e:
            message, param, code = describe_validation(e)
            return 400, error_body(message, "invalid_request_error", code, param)
        try:
            return 200, json.loads(await embed(container, req))
        except KeelError as e:
            return e.status, keel_error_body(e)

    return respond
