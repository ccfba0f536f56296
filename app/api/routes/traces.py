"""Traces in the embedded store (``otel.store``): ``GET /v1/traces`` and ``GET /v1/traces/{trace_id}``.

Scope ``monitor`` (admin includes it): traces span every key's requests. A key finds the trace of its own
answer through its lineage (``GET /v1/lineage/{completion_id}`` names the ``trace_id``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from app.api.deps import ContainerDep, MonitorKey
from app.api.schemas import SQL_INT_MAX
from app.core.errors import NotFound
from app.core.tracing import SpanStore, check_trace_id

router = APIRouter(prefix="/v1/traces", tags=["observability"])


def _store(container: Any) -> SpanStore:
    tracing = getattr(container, "tracing", None)
    if tracing is None or tracing.store is None:
        raise NotFound("this server keeps no traces (otel.enabled and otel.store)", code="traces_off")
    tracing.flush(5.0)  # read your writes: spans are exported in batches
    return tracing.store


@router.get("")
def list_traces(container: ContainerDep, _: MonitorKey, limit: int = Query(50, ge=1, le=1000),
                before_ns: int | None = Query(None, ge=0, le=SQL_INT_MAX,
                                               description="Page back: traces that started before this."),
                name: str | None = Query(None, max_length=200, description="Traces with a span named like this."),
                response_id: str | None = Query(None, max_length=200, description="The chat completion id."),
                ) -> dict[str, Any]:
    return {"object": "list", "data": _store(container).traces(limit=limit, before_ns=before_ns, name=name,
                                                              response_id=response_id)}


@router.get("/{trace_id}")
def get_trace(trace_id: str, container: ContainerDep, _: MonitorKey) -> dict[str, Any]:
    spans = _store(container).trace(check_trace_id(trace_id))
    if not spans:
        raise NotFound(f"no trace {trace_id} (spans are kept otel.retention_days)", param="trace_id",
                       code="trace_not_found")
    return {"trace_id": trace_id, "spans": spans}
