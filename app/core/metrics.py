"""Prometheus metrics, one registry per application instance (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "keel_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "keel_http_request_duration_seconds", "HTTP request latency (to the last byte)",
            ["method", "route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter("keel_errors_total", "Errors returned to clients", ["code"], registry=r)
        self.rag_answers = Counter(
            "keel_rag_answers_total", "Grounded answers by outcome: answered, not_in_sources (the sources do not "
            "answer it), withdrawn (by the groundedness guard)", ["collection", "outcome"], registry=r)
        self.rag_citations = Counter(
            "keel_rag_citations_total", "Citation markers in grounded answers: written by the model, or attributed "
            "by Keel to the passage that supports the sentence", ["by"], registry=r)
        self.ttft = Histogram(
            "keel_chat_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.tokens = Counter("keel_chat_tokens_total", "Tokens processed", ["model", "kind"], registry=r)
        self.inflight = Gauge("keel_chat_inflight_requests", "Chat requests in progress", registry=r)
        self.backend_up = Gauge("keel_backend_up", "1 when the backend serves requests", ["backend"], registry=r)
        self.backend_replica_up = Gauge(
            "keel_backend_replica_up", "1 when a server of a backend with replicas takes requests (0: drained)",
            ["backend", "replica"], registry=r)
        self.rate_limit_store_errors = Counter(
            "keel_rate_limit_store_errors_total", "Requests whose shared rate limit could not be checked (the "
            "database was unreachable; let through or refused as auth.rate_limit_fail_open says)", registry=r)
        self.backend_restarts = Counter(
            "keel_backend_restarts_total", "Supervised backend restarts", ["backend"], registry=r
        )
        self.fallbacks = Counter(
            "keel_fallback_total", "Requests served by a fallback alias", ["model", "fallback"], registry=r
        )
        self.backend_requests = Histogram(
            "keel_backend_request_duration_seconds",
            "HTTP requests to model servers (chat and agent backends, the eval judge: backend=\"judge\"), time "
            "to the response headers, by outcome (ok, http_4xx, http_5xx, unreachable, timeout, disconnected, "
            "cancelled, circuit_open)", ["backend", "outcome"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.breaker_open = Gauge(
            "keel_circuit_open", "1 while the backend's circuit breaker is open", ["backend"], registry=r
        )
        self.eval_swallowed = Counter(
            "keel_eval_swallowed_errors_total", "Errors the eval harness handled without failing a case or run",
            ["where"], registry=r,
        )
        self.release_requests = Counter(
            "keel_release_requests_total", "Requests to release endpoints, by the variant that answered and the "
            "outcome (ok, blocked by the guardrails, error)", ["release", "variant", "outcome"], registry=r,
        )
        self.release_latency = Histogram(
            "keel_release_request_duration_seconds", "Release endpoint requests, to the last token, by variant",
            ["release", "variant"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.release_shadow = Counter(
            "keel_release_shadow_total", "Shadow requests by outcome (stored, error, dropped: queue full, unpaired: "
            "the primary failed)", ["release", "variant", "outcome"], registry=r,
        )
        self.gc_pause = Histogram(
            "keel_gc_pause_seconds", "Pauses of the garbage collector, by generation: every request in flight waits "
            "them out (a full collection of an unfrozen start-up heap: ~0.5 s; server.gc_freeze)", ["generation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r,
        )
        self.trace_dropped = Counter(
            "keel_trace_spans_dropped_total", "Spans not exported: the export queue was full or the store/collector "
            "failed (where: store, otlp)", ["where"], registry=r,
        )
        self.release_judged = Counter(
            "keel_release_judged_total", "Answers of release variants scored by the online judge, by outcome "
            "(scored, failed, skipped: its queue was full)", ["release", "variant", "outcome"], registry=r,
        )
        # The drift monitor (lifecycle.monitor.drift): the latest check's verdict per check, and every run.
        self.drift_detected = Gauge(
            "keel_drift_detected", "1 when the latest drift check found this check drifted, 0 when it ran and did "
            "not (input_embedding, topic_mix, question_length, refusal, guard:<validator>, ...)", ["check"],
            registry=r,
        )
        self.drift_share = Gauge(
            "keel_drift_share", "Share of the latest drift check's tests that drifted (0..1)", registry=r,
        )
        self.drift_runs = Counter(
            "keel_drift_runs_total", "Drift checks by outcome (drift, no_drift, not_enough_data, error)", ["outcome"],
            registry=r,
        )
        self.drift_last_run = Gauge(
            "keel_drift_last_run_timestamp_seconds", "Unix time of the latest completed drift check", registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
