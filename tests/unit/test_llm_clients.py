"""The shared client layer for OpenAI-compatible servers (app.llm.clients), against httpx's mock transport."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from app.core.errors import BackendUnavailable
from app.core.metrics import Metrics
from app.core.settings import BackendSettings
from app.core.types import ChatMessage, GenerationRequest
from app.llm.clients import LIMITS, http_client, openai_client
from app.llm.openai_backend import OpenAIBackend
from app.llm.resilience import CircuitBreaker, ResilientBackend, breaker_for
from tests.fakes.llm import ScriptedBackend

REQ = GenerationRequest(model="m", messages=(ChatMessage("user", "hi"),))
CFG = BackendSettings(kind="openai", base_url="http://up/v1", connect_timeout_s=1.5, read_timeout_s=42.0,
                      retries=2, retry_backoff_s=0.001, breaker_failures=2, breaker_reset_s=60.0)


def count(metrics: Metrics, backend: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value("keel_backend_request_duration_seconds_count",
                                              {"backend": backend, "outcome": outcome})
    return value or 0.0


class Script:
    """A transport answering with ``replies`` in order (an exception instance is raised)."""

    def __init__(self, *replies: httpx.Response | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def ok() -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})


async def test_a_backend_client_has_the_settings_timeouts_limits_key_and_request_ids() -> None:
    script = Script(ok())
    keys = iter(["first", "second"])
    client = http_client(CFG, label="remote", api_key=lambda: next(keys), transport=script.transport)
    assert client.timeout == httpx.Timeout(42.0, connect=1.5) and str(client.base_url) == "http://up/v1/"
    assert LIMITS.max_connections == 512 and LIMITS.max_keepalive_connections == 128
    await client.get("/models")
    await client.get("/models", headers={"X-Request-Id": "rid-1"})
    first, second = script.requests
    assert first.headers["authorization"] == "Bearer first" and second.headers["authorization"] == "Bearer second"
    assert first.headers["x-request-id"].startswith("remote-") and second.headers["x-request-id"] == "rid-1"


async def test_the_backends_client_counts_requests_and_does_not_retry_by_itself() -> None:
    """OpenAIBackend's client comes from the layer: same metrics family; retries stay ResilientBackend's."""
    metrics = Metrics()
    b = OpenAIBackend("local", CFG, metrics=metrics)
    script = Script(httpx.ConnectError("refused"), ok())
    b.client._transport = script.transport
    assert not await b.ready()  # one attempt, no retry here
    assert await b.models() == ["m"]
    assert len(script.requests) == 2
    assert count(metrics, "local", "unreachable") == 1 and count(metrics, "local", "ok") == 1


async def test_a_client_with_a_breaker_retries_connection_errors_and_busy_answers() -> None:
    metrics = Metrics()
    script = Script(httpx.ConnectError("refused"), httpx.Response(503, text="loading"), ok())
    client = http_client(CFG, label="judge", what="judge", metrics=metrics, transport=script.transport,
                         breaker=breaker_for("judge", CFG, metrics))
    r = await client.get("/models")
    assert r.status_code == 200 and len(script.requests) == 3
    assert client.breaker.state == "closed"
    assert [count(metrics, "judge", o) for o in ("unreachable", "http_5xx", "ok")] == [1, 1, 1]


async def test_request_errors_and_read_timeouts_are_not_retried() -> None:
    script = Script(httpx.Response(400, json={"error": {"message": "bad"}}))
    client = http_client(CFG, label="j", transport=script.transport, breaker=CircuitBreaker(1, 60))
    for _ in range(3):
        assert (await client.get("/models")).status_code == 400
    assert len(script.requests) == 3 and client.breaker.state == "closed"  # the request's fault, not the server's

    metrics = Metrics()
    script = Script(httpx.ReadTimeout("slow"))
    client = http_client(CFG, label="j", metrics=metrics, transport=script.transport, breaker=CircuitBreaker(1, 60))
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/models")
    assert len(script.requests) == 1 and client.breaker.state == "open"  # it reached the server: counted, once
    assert count(metrics, "j", "timeout") == 1


async def test_a_dead_server_opens_the_breaker_and_later_calls_fail_fast_naming_the_url() -> None:
    metrics = Metrics()
    script = Script(httpx.ConnectError("refused"))
    client = http_client(CFG, label="judge", what="judge", metrics=metrics, transport=script.transport,
                         breaker=breaker_for("judge", CFG, metrics))
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match=r"judge unreachable at http://up/v1 \(ConnectError: refused; "
                                                     r"3 attempts\)"):
            await client.get("/models")
    assert len(script.requests) == 6
    with pytest.raises(BackendUnavailable, match="judge at http://up/v1 is failing; circuit open"):
        await client.get("/models")
    assert len(script.requests) == 6  # not sent
    assert count(metrics, "judge", "unreachable") == 6 and count(metrics, "judge", "circuit_open") == 1
    assert metrics.registry.get_sample_value("keel_circuit_open", {"backend": "judge"}) == 1


async def test_retries_stop_once_the_breaker_opened() -> None:
    """A call in back-off against a server that other calls found dead meanwhile fails now."""
    breaker = CircuitBreaker(1, 60)
    attempts = []

    def handle(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        breaker.record_failure()  # another call to the same server failed while this one was in flight
        raise httpx.ConnectError("refused")

    client = http_client(CFG.model_copy(update={"retries": 5}), label="j", transport=httpx.MockTransport(handle),
                         breaker=breaker)
    with pytest.raises(BackendUnavailable, match=r"\(ConnectError: refused; 1 attempt\)"):
        await client.get("/models")
    assert len(attempts) == 1


async def test_the_sdk_client_shares_the_layer() -> None:
    metrics = Metrics()
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}))
    cfg = CFG.model_copy(update={"api_key": SecretStr("sk-1")})
    sdk = openai_client(cfg, label="judge", metrics=metrics, transport=script.transport,
                        breaker=breaker_for("judge", cfg, metrics))
    assert sdk.max_retries == 0 and sdk.timeout == httpx.Timeout(42.0, connect=1.5)
    out = await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "hi" and len(script.requests) == 2
    assert script.requests[-1].headers["authorization"] == "Bearer sk-1"
    assert script.requests[-1].headers["x-request-id"].startswith("judge-")
    assert count(metrics, "judge", "unreachable") == 1 and count(metrics, "judge", "ok") == 1


async def test_a_resilient_backend_from_settings_reports_its_breaker() -> None:
    metrics = Metrics()
    rb = ResilientBackend.from_settings("local", ScriptedBackend(fail_connect=100), CFG, metrics)
    assert (rb.retries, rb.backoff_s, rb.breaker.failure_threshold, rb.breaker.reset_after_s) == (2, 0.001, 2, 60.0)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            _ = [e async for e in rb.stream(REQ)]
    assert metrics.registry.get_sample_value("keel_circuit_open", {"backend": "local"}) == 1
