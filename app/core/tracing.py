"""Traces: OpenTelemetry spans of every request, in an embedded store and/or a collector of the user's choice.

Each process builds one :class:`Tracing` (the container does) and hands its tracer to the services: no global
provider is set, so two Keel instances in one process (tests, an embedding application) never write into each
other's store, and a library that sets its own global provider is left alone. Spans follow the OpenTelemetry
GenAI semantic conventions (``gen_ai.*``) where they describe a model call.

Export never slows a request: spans go through the SDK's ``BatchSpanProcessor`` (a bounded queue, written by
a background thread); a full queue drops spans and counts them (``keel_trace_spans_dropped_total``), a store
or collector that fails costs the spans of that batch, counted the same way. :meth:`Tracing.flush` waits for
the embedded store only, never for the collector; :meth:`Tracing.close` gives the collector at most the export
timeout (``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`` / ``OTEL_EXPORTER_OTLP_TIMEOUT``, seconds as the Python SDK reads
them; default 5) and counts what it could not deliver.

The embedded store is ``<home>/traces.db`` (SQLite, WAL): ``keel traces``, ``GET /v1/traces`` and the Traces
page read it; spans older than ``otel.retention_days`` are deleted as new ones arrive.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, Tracer

from app.core.db import SqliteFile
from app.core.errors import InvalidRequest
from app.core.migrate import Migrations
from app.core.settings import OtelSettings

log = logging.getLogger("keel.tracing")

MIGRATIONS = Migrations(Path(__file__).with_name("trace_migrations"), "alembic_version_traces")
_HEX = frozenset("0123456789abcdef")


def traceparent(span: Span) -> dict[str, str]:
    """W3C trace-context headers that make ``span`` the parent of the callee's spans (vLLM's, a collector's)."""
    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def trace_id_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def _timeout(env: Mapping[str, str], default: float = 5.0) -> float:
    """The OTLP export timeout in seconds, from the standard variables (seconds, as the Python exporter reads
    them): one export's limit, and the most that shutdown waits for a collector."""
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    try:
        value = float(raw) if raw else default
    except ValueError:
        log.warning("OTEL_EXPORTER_OTLP_TIMEOUT=%r is not a number of seconds, using %s", raw, default)
        return default
    return value if value > 0 else default


def check_trace_id(trace_id: str) -> str:
    if len(trace_id) != 32 or not set(trace_id) <= _HEX:
        raise InvalidRequest("a trace id is 32 lower-case hex digits (as `keel traces list` shows)", param="trace_id")
    return trace_id


class SpanStore:
    """Spans by trace, in SQLite. Readers and the exporter thread share one connection under a lock."""

    def __init__(self, path: Path | str, *, retention_days: float = 7.0) -> None:
        self._file = SqliteFile(path, MIGRATIONS, what="the trace store", timeout_s=10)
        self.path = self._file.path
        self.retention_s = retention_days * 86_400
        self._pruned = 0.0

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        rows = [_row(s) for s in spans]
        with self._file.tx() as db:
            db.executemany("INSERT OR REPLACE INTO spans (span_id, trace_id, parent_id, name, kind, start_ns, "
                           "end_ns, status, status_message, attributes, events, service, response_id, request_id) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            now = time.time()
            if now - self._pruned > 60:
                self._pruned = now
                db.execute("DELETE FROM spans WHERE start_ns < ?", (int((now - self.retention_s) * 1e9),))

    def traces(self, *, limit: int = 50, before_ns: int | None = None, name: str | None = None,
               response_id: str | None = None) -> list[dict[str, Any]]:
        """Newest first: one row per trace with its root span, duration, span count and errors."""
        where, args = ["1 = 1"], []
        if before_ns is not None:
            where.append("t.start_ns < ?")
            args.append(before_ns)
        if response_id:
            where.append("t.trace_id IN (SELECT trace_id FROM spans WHERE response_id = ?)")
            args.append(response_id)
        if name:
            where.append("t.trace_id IN (SELECT trace_id FROM spans WHERE name LIKE ?)")
            args.append(f"%{name}%")
        sql = (f"SELECT t.trace_id, MIN(t.start_ns), MAX(t.end_ns), COUNT(*), "
               f"SUM(CASE WHEN t.status = 'ERROR' THEN 1 ELSE 0 END), MAX(t.response_id), MAX(t.request_id) "
               f"FROM spans t WHERE {' AND '.join(where)} GROUP BY t.trace_id ORDER BY MIN(t.start_ns) DESC LIMIT ?")
        rows = self._file.read(sql, (*args, limit))
        roots = {r[0]: r[1] for r in self._file.read(
            f"SELECT trace_id, name FROM spans WHERE parent_id IS NULL AND trace_id IN ({', '.join('?' * len(rows))})",
            [r[0] for r in rows])} if rows else {}
        return [{"trace_id": tid, "root": roots.get(tid), "start_ns": start, "duration_ms": (end - start) / 1e6,
                 "spans": n, "errors": int(err or 0), "response_id": resp, "request_id": req}
                for tid, start, end, n, err, resp, req in rows]

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        rows = self._file.read(
            "SELECT span_id, parent_id, name, kind, start_ns, end_ns, status, status_message, attributes, events, "
            "service FROM spans WHERE trace_id = ? ORDER BY start_ns", (trace_id,))
        return [{"span_id": sid, "parent_id": pid, "name": name, "kind": kind, "start_ns": start, "end_ns": end,
                 "duration_ms": (end - start) / 1e6, "status": status, "status_message": msg,
                 "attributes": json.loads(attrs), "events": json.loads(events), "service": service}
                for sid, pid, name, kind, start, end, status, msg, attrs, events, service in rows]

    def close(self) -> None:
        self._file.close()


def _row(s: ReadableSpan) -> tuple[Any, ...]:
    ctx = s.context
    attrs = dict(s.attributes or {})
    return (f"{ctx.span_id:016x}", f"{ctx.trace_id:032x}", f"{s.parent.span_id:016x}" if s.parent else None, s.name,
            s.kind.name, s.start_time or 0, s.end_time or s.start_time or 0, s.status.status_code.name,
            s.status.description, json.dumps(attrs, default=str, separators=(",", ":")),
            json.dumps([{"name": e.name, "at_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                        for e in s.events], default=str, separators=(",", ":")),
            s.resource.attributes.get("service.name", ""), attrs.get("gen_ai.response.id"),
            attrs.get("keel.request_id"))


class _StoreExporter(SpanExporter):
    def __init__(self, store: SpanStore, dropped: Any) -> None:
        self.store = store
        self.dropped = dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.store.write(spans)
            return SpanExportResult.SUCCESS
        except Exception as e:  # a locked or full store loses this batch, counted; requests never see it
            log.warning("trace store write failed, %d spans dropped: %s", len(spans), e)
            self.dropped.labels("store").inc(len(spans))
            return SpanExportResult.FAILURE


class _CountFailures(SpanExporter):
    """An exporter (the OTLP one) whose failed batches are counted: the SDK's batch processor ignores them."""

    def __init__(self, inner: SpanExporter, dropped: Any, where: str) -> None:
        self.inner = inner
        self.dropped = dropped
        self.where = where

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as e:  # the SDK would log it and lose the batch uncounted
            log.warning("trace export to the collector failed, %d spans dropped: %s", len(spans), e)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.dropped.labels(self.where).inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Counted(SpanProcessor):
    """A BatchSpanProcessor that counts the spans its full queue refuses."""

    def __init__(self, inner: BatchSpanProcessor, queue_size: int, dropped: Any, where: str,
                 shutdown_timeout_s: float | None = None) -> None:
        self.inner = inner
        self.queue_size = queue_size
        self.dropped = dropped
        self.where = where
        self.shutdown_timeout_s = shutdown_timeout_s

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(getattr(self.inner, "_batch_processor", None), "_queue", None)
        if queue is not None and len(queue) >= self.queue_size:
            self.dropped.labels(self.where).inc()
            return
        self.inner.on_end(span)

    def shutdown(self) -> None:
        batch = getattr(self.inner, "_batch_processor", None)
        if self.shutdown_timeout_s is None or batch is None:
            self.inner.shutdown()
            return
        # The SDK waits up to 30 s for the queue to drain, one export timeout per batch: bound it, and count
        # what a collector that is down or stuck never got (the batch in flight counts when it gives up).
        batch.shutdown(timeout_millis=self.shutdown_timeout_s * 1000)
        if left := len(batch._queue):
            log.warning("trace export stopped at shutdown, %d spans dropped", left)
            self.dropped.labels(self.where).inc(left)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Tracing:
    """One process's tracer provider, its exporters and (by default) the embedded store."""

    def __init__(self, settings: OtelSettings, home: Path, *, dropped: Any, service: str = "keel",
                 version: str = "0.1.0", environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.settings = settings
        self.store: SpanStore | None = None
        self._store_processor: SpanProcessor | None = None
        self.export_timeout_s = _timeout(env)
        self.capture_content = settings.capture_content
        self.enabled = settings.enabled
        if not settings.enabled:
            self.provider = None
            self.tracer: Tracer = trace.NoOpTracer()
            return
        self.provider = TracerProvider(resource=Resource.create({"service.name": service, "service.version": version}),
                                       sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
        if settings.store:
            self.store = SpanStore(Path(home) / "traces.db", retention_days=settings.retention_days)
            self._store_processor = self._add(_StoreExporter(self.store, dropped), dropped, "store")
        # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the signal's full URL, used as-is; the others are a base URL.
        endpoint = settings.endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") if not settings.endpoint else None
        if not url and endpoint:
            url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
        if url:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = _CountFailures(OTLPSpanExporter(endpoint=url, timeout=self.export_timeout_s), dropped, "otlp")
            self._add(exporter, dropped, "otlp", shutdown_timeout_s=self.export_timeout_s)
            log.info("exporting traces over OTLP to %s", url)
        self.tracer = self.provider.get_tracer("keel", version)

    def _add(self, exporter: SpanExporter, dropped: Any, where: str,
             shutdown_timeout_s: float | None = None) -> SpanProcessor:
        size = self.settings.queue_size
        batch = BatchSpanProcessor(exporter, max_queue_size=size, schedule_delay_millis=200,
                                   max_export_batch_size=min(512, size))
        processor = _Counted(batch, size, dropped, where, shutdown_timeout_s)
        self.provider.add_span_processor(processor)
        return processor

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Write the spans ended so far to the embedded store (read your writes). The collector is not waited
        for: a slow one would hold the caller (``GET /v1/traces`` is a request); :meth:`close` drains it."""
        return self._store_processor.force_flush(int(timeout_s * 1000)) if self._store_processor else True

    def close(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
        if self.store is not None:
            self.store.close()
