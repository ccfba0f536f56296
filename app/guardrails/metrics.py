"""Prometheus collectors for the guardrail layer, registered on the application's registry
(``GuardrailMetrics(metrics.registry)``) so they appear on ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)


class GuardrailMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.validator_latency = Histogram(
            "keel_guardrail_validator_duration_seconds", "Time one guardrail validator took",
            ["validator", "stage"], buckets=_FAST_BUCKETS, registry=r,
        )
        self.stage_latency = Histogram(
            "keel_guardrail_check_duration_seconds", "Time a whole guard stage added (validators run concurrently)",
            ["stage", "policy"], buckets=_FAST_BUCKETS, registry=r,
        )
        self.triggers = Counter(
            "keel_guardrail_triggers_total", "Validator failures, by the action taken",
            ["validator", "stage", "action"], registry=r,
        )
        self.decisions = Counter(
            "keel_guardrail_decisions_total", "Guard decisions per request and stage",
            ["stage", "policy", "outcome"], registry=r,
        )
        self.stream_added_ttft = Histogram(
            "keel_guardrail_stream_added_ttft_seconds",
            "Delay the streaming output guard added before the first released text", buckets=_TTFT_BUCKETS, registry=r,
        )
        self.stream_retractions = Counter(
            "keel_guardrail_stream_retractions_total",
            "Streamed answers withdrawn after the user saw part of them (a judge failed on shown text)",
            ["policy", "validator"], registry=r,
        )
        self.errors = Counter(
            "keel_guardrail_validator_errors_total", "Validators that raised (blocked or let through per on_error)",
            ["validator", "stage"], registry=r,
        )
