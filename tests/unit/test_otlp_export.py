"""OTLP export against a real OTLP/HTTP receiver on localhost: the collector gets the same spans as the embedded
store, from the setting or the standard ``OTEL_EXPORTER_OTLP_*`` variables; a collector that is down or slow
costs the request path nothing (export runs in the batch processor's thread, failed spans are counted) and
never holds shutdown longer than the exporter's timeout."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from app.core.metrics import Metrics
from app.core.settings import OtelSettings
from app.core.tracing import Tracing
from tests.unit.test_tracing import _env, ask, h, spans_of

HOLD_S = 60  # a slow collector holds each export this long at most (the tests release it sooner)


class Collector:
    """An OTLP/HTTP trace receiver in a thread: decodes every POST as ``ExportTraceServiceRequest``. With
    ``slow``, each request is held until :attr:`release` is set (at most HOLD_S)."""

    def __init__(self, *, slow: bool = False) -> None:
        self.requests: list[tuple[str, str, ExportTraceServiceRequest]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.slow = slow
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                outer.requests.append((self.path, self.headers.get("Content-Type", ""), msg))
                outer.arrived.set()
                if outer.slow:
                    outer.release.wait(HOLD_S)
                out = ExportTraceServiceResponse().SerializeToString()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:  # the exporter gave up waiting and closed the connection
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> dict[str, dict]:
        """span id -> what the collector got: trace id, parent, name, attributes, service.name."""
        out = {}
        for _, _, msg in self.requests:
            for rs in msg.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out[s.span_id.hex()] = {
                            "trace_id": s.trace_id.hex(), "parent_id": s.parent_span_id.hex() or None,
                            "name": s.name, "service": resource.get("service.name"),
                            "attributes": {a.key: _value(a.value) for a in s.attributes}}
        return out

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


@pytest.fixture
def slow_collector():
    c = Collector(slow=True)
    yield c
    c.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _otlp(tracing: Tracing):
    (proc,) = [p for p in tracing.provider._active_span_processor._span_processors if p.where == "otlp"]
    return proc


def dropped(metrics: Metrics, where: str = "otlp") -> float:
    return metrics.trace_dropped.labels(where)._value.get()


async def _closing(env) -> None:
    await env["c"].aclose()
    await env["container"].aclose()


async def _chat_and_compare(env, collector: Collector) -> None:
    answer = await ask(env)
    stored = await spans_of(env, answer["id"])  # the embedded store's copy of the request's trace
    assert env["container"].tracing.provider.force_flush(10_000)
    got = collector.spans()
    assert {(p, t) for p, t, _ in collector.requests} == {("/v1/traces", "application/x-protobuf")}
    (trace_id,) = {got[s["span_id"]]["trace_id"] for s in stored.values() if s["span_id"] in got}
    exported = {name: {**s, "span_id": sid} for sid, s in got.items() if s["trace_id"] == trace_id
                for name in [s["name"]]}
    assert exported.keys() == stored.keys()  # the same spans, no more, no fewer
    for name, s in stored.items():
        e = exported[name]
        assert (e["span_id"], e["parent_id"], e["service"]) == (s["span_id"], s["parent_id"], "keel"), name
        assert e["attributes"] == s["attributes"], name  # the store keeps them as JSON: same values
    assert exported["chat fake-model"]["attributes"]["gen_ai.response.id"] == answer["id"]
    assert exported["POST /v1/chat/completions"]["parent_id"] is None


async def test_the_collector_gets_the_same_trace_as_the_store_via_the_setting(tmp_path: Path, collector) -> None:
    env = await _env(tmp_path, endpoint=collector.url)
    try:
        await _chat_and_compare(env, collector)
        assert dropped(env["container"].metrics) == 0
    finally:
        await _closing(env)


async def test_the_standard_endpoint_variable_sends_the_same_trace(tmp_path: Path, collector, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url + "/")
    env = await _env(tmp_path)
    try:
        await _chat_and_compare(env, collector)
    finally:
        await _closing(env)


def test_endpoint_precedence_and_the_signal_specific_variable(tmp_path: Path, collector) -> None:
    """``otel.endpoint`` wins over the variables; OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the full URL, used
    as-is (as the OTLP exporter spec says), OTEL_EXPORTER_OTLP_ENDPOINT a base that gets /v1/traces."""
    cases = [({"endpoint": collector.url}, {"OTEL_EXPORTER_OTLP_ENDPOINT": closed_port_url()}, "/v1/traces"),
             ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url + "/custom/traces",
                   "OTEL_EXPORTER_OTLP_ENDPOINT": closed_port_url()}, "/custom/traces"),
             ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url + "/base"}, "/base/v1/traces")]
    for i, (otel, environ, path) in enumerate(cases):
        tracing = Tracing(OtelSettings(store=False, **otel), tmp_path / str(i), dropped=Metrics().trace_dropped,
                          environ=environ)
        tracing.tracer.start_span(f"span {i}").end()
        assert tracing.provider.force_flush(10_000)
        tracing.close()
        assert collector.requests[-1][0] == path
        assert [s["name"] for s in collector.spans().values()][-1] == f"span {i}"
    assert Tracing(OtelSettings(store=False), tmp_path / "none", dropped=Metrics().trace_dropped,
                   environ={}).provider._active_span_processor._span_processors == ()


async def test_a_slow_collector_never_holds_a_request(tmp_path: Path, slow_collector, monkeypatch) -> None:
    """While the collector holds an export (the exporter's timeout is far longer), chat requests and the
    Traces listing complete: the export runs in the batch processor's own thread, not the request's."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", str(HOLD_S))
    baseline = await _env(tmp_path / "baseline")
    env = await _env(tmp_path / "slow", endpoint=slow_collector.url)
    exporter = _otlp(env["container"].tracing).inner._batch_processor._exporter
    threads, returned = [], threading.Event()
    export = exporter.export

    def spy(spans):
        threads.append(threading.current_thread().name)
        try:
            return export(spans)
        finally:
            returned.set()

    monkeypatch.setattr(exporter, "export", spy)
    try:
        await ask(env)
        assert slow_collector.arrived.wait(10)  # the batch processor sent it: the collector now holds it
        results = {}
        for name, e in (("baseline", baseline), ("slow", env)):
            answers = [await ask(e, f"question {i}") for i in range(5)]
            listed = await e["c"].get("/v1/traces", params={"limit": 100}, headers=h(e, "admin"))
            assert listed.status_code == 200
            results[name] = [sorted(await spans_of(e, a["id"])) for a in answers]
        assert not returned.is_set() and not slow_collector.release.is_set()  # the first export is still held
        assert results["slow"] == results["baseline"]  # same requests, same traces, as with no collector at all
        assert threads and all(t.startswith("OtelBatch") for t in threads)
    finally:
        slow_collector.release.set()
        await _closing(baseline)
        await _closing(env)


async def test_a_collector_that_is_down_costs_counted_spans_not_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")
    env = await _env(tmp_path, endpoint=closed_port_url())
    try:
        for i in range(3):
            await ask(env, f"question {i}")
        tracing = env["container"].tracing
        tracing.provider.force_flush(10_000)
        stored = sum(t["spans"] for t in tracing.store.traces(limit=1000))
        assert stored > 0 and dropped(env["container"].metrics) == stored  # every span the collector missed
        assert dropped(env["container"].metrics, "store") == 0
    finally:
        await _closing(env)


def test_shutdown_with_a_stuck_collector_is_bounded_by_the_export_timeout(tmp_path: Path, slow_collector) -> None:
    metrics = Metrics()
    tracing = Tracing(OtelSettings(), tmp_path, dropped=metrics.trace_dropped,
                      environ={"OTEL_EXPORTER_OTLP_ENDPOINT": slow_collector.url, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert tracing.export_timeout_s == 1
    for _ in range(3000):  # several export batches, each of which the collector would hold
        tracing.tracer.start_span("x").end()
    assert slow_collector.arrived.wait(10) and tracing.flush(30)  # the store's share is written: only OTLP is left
    started = time.monotonic()
    tracing.close()
    took = time.monotonic() - started
    assert took < 1 + 3, took  # the timeout (1 s) and slack for a loaded machine; unbounded it was minutes
    worker = _otlp(tracing).inner._batch_processor._worker_thread
    worker.join(HOLD_S)  # the batch in flight at shutdown gives up at its own timeout
    assert not worker.is_alive()
    assert dropped(metrics) == 3000  # nothing reached the collector: all of it counted
    assert dropped(metrics, "store") == 0
