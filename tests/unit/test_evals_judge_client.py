"""The eval judge calls through the shared client layer (app.llm.clients): connection retries, the circuit breaker
and the backend request metrics, labelled ``backend="judge"``."""

from __future__ import annotations

import asyncio
import math
import socket
import time

import httpx

from app.core.metrics import Metrics
from app.core.settings import BackendSettings
from app.llm.clients import openai_client
from app.llm.resilience import breaker_for
from evals.metrics import MetricEnv, compute, registry
from ingest.embedding import HashingEmbedder
from tests.unit.test_evals import GOOD_JUDGE, ScriptedJudge, judged

FAST = BackendSettings(kind="openai", base_url="http://judge.test/v1", retries=2, retry_backoff_s=0.001,
                       breaker_failures=2, breaker_reset_s=60.0)


def count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("keel_backend_request_duration_seconds_count",
                                              {"backend": "judge", "outcome": outcome})
    return value or 0.0


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class FlakyFirst(httpx.AsyncBaseTransport):
    """Refuses the first ``n`` connections, then lets the scripted judge answer; keeps the request headers."""

    def __init__(self, inner: httpx.AsyncBaseTransport, n: int) -> None:
        self.inner, self.n, self.headers = inner, n, []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(dict(request.headers))
        if self.n:
            self.n -= 1
            raise httpx.ConnectError("connection refused")
        return await self.inner.handle_async_request(request)


def test_the_judge_retries_a_connection_error_then_scores_and_is_counted() -> None:
    judge = ScriptedJudge(GOOD_JUDGE)
    flaky = FlakyFirst(judge.client_transport, 1)
    metrics = Metrics()
    client = openai_client(FAST, label="judge", what="judge", metrics=metrics, transport=flaky,
                           breaker=breaker_for("judge", FAST, metrics))
    env = MetricEnv(embedder=HashingEmbedder(), judge_model="judge-model", judge_client=client, metrics=metrics)
    r = asyncio.run(compute(registry["context_recall"], judged(env), {}))
    assert r.value == 0.5 and r.judge_errors == []
    assert len(flaky.headers) == 2 and len(judge.requests) == 1  # one refused attempt, retried once
    assert count(metrics, "unreachable") == 1 and count(metrics, "ok") == 1
    assert all(h["x-request-id"].startswith("judge-") for h in flaky.headers)


def test_a_dead_judge_opens_the_breaker_and_later_samples_fail_fast() -> None:
    metrics = Metrics()
    url = f"http://127.0.0.1:{closed_port()}/v1"
    env = MetricEnv(embedder=HashingEmbedder(), judge_base_url=url, judge_model="m", judge_backend=FAST,
                    metrics=metrics)
    r = asyncio.run(compute(registry["faithfulness"], judged(env), {}, samples=2))
    assert math.isnan(r.value) and len(r.judge_errors) == 2
    assert all(e.startswith(f"judge unreachable at {url} (ConnectError") for e in r.judge_errors)
    assert env.judge_breaker is not None and env.judge_breaker.state == "open"
    assert count(metrics, "unreachable") == 6  # two calls, three attempts each
    assert metrics.registry.get_sample_value("keel_circuit_open", {"backend": "judge"}) == 1

    t0 = time.perf_counter()
    later = asyncio.run(compute(registry["faithfulness"], judged(env), {}, samples=3))
    assert time.perf_counter() - t0 < 1.0
    assert math.isnan(later.value) and len(later.judge_errors) == 3
    assert all(e.startswith(f"judge unreachable: judge at {url} is failing; circuit open") for e in later.judge_errors)
    assert count(metrics, "unreachable") == 6 and count(metrics, "circuit_open") == 3  # nothing sent


def test_the_judge_gets_the_backend_timeouts_and_key() -> None:
    env = MetricEnv(judge_base_url="http://judge.test/v1", judge_model="m", judge_api_key="sk-j", judge_timeout_s=30)
    client = env.judge
    assert client is env.judge and client.max_retries == 0
    assert client.timeout == httpx.Timeout(30.0, connect=BackendSettings.model_fields["connect_timeout_s"].default)
    assert str(client.base_url) == "http://judge.test/v1/" and client.api_key == "sk-j"
    assert env.judge_identity()["base_url"] == "http://judge.test/v1"
