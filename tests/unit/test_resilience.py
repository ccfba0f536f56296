import pytest

from app.core.errors import BackendError, BackendUnavailable, InvalidRequest
from app.core.metrics import Metrics
from app.core.types import ChatMessage, Finished, GenerationParams, GenerationRequest, TextDelta, Usage
from app.llm.resilience import CircuitBreaker, ResilientBackend
from app.llm.router import ModelRouter
from app.settings import load_settings
from tests.fakes.llm import ScriptedBackend

REQ = GenerationRequest(model="m", messages=(ChatMessage("user", "hi"),))


async def collect(gen) -> list:
    return [e async for e in gen]


def test_breaker_opens_at_threshold_then_half_opens_after_reset() -> None:
    now = [0.0]
    b = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    now[0] = 10.0
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_failure()
    assert b.state == "open"  # failed probe re-opens at once
    now[0] = 20.0
    assert b.allow()
    b.record_success()
    assert b.state == "closed"


def resilient(backend: ScriptedBackend, retries: int = 2, threshold: int = 3) -> ResilientBackend:
    return ResilientBackend(backend, retries=retries, backoff_s=0.001, breaker=CircuitBreaker(threshold, 60))


async def test_connection_errors_are_retried_before_the_first_token() -> None:
    fake = ScriptedBackend(fail_connect=2)
    events = await collect(resilient(fake).stream(REQ))
    assert fake.calls == 3
    assert isinstance(events[0], TextDelta) and isinstance(events[-1], Usage)


async def test_retries_are_bounded() -> None:
    fake = ScriptedBackend(fail_connect=5)
    with pytest.raises(BackendUnavailable):
        await collect(resilient(fake, retries=1).stream(REQ))
    assert fake.calls == 2


async def test_errors_after_the_first_token_are_not_retried() -> None:
    fake = ScriptedBackend(fail_after=2, error=BackendError("engine died"))
    got = []
    with pytest.raises(BackendError):
        async for e in resilient(fake).stream(REQ):
            got.append(e)
    assert fake.calls == 1 and len(got) == 2


async def test_request_errors_are_not_retried_and_do_not_trip_the_breaker() -> None:
    fake = ScriptedBackend(fail_after=0, error=InvalidRequest("bad"))
    rb = resilient(fake, threshold=1)
    for _ in range(3):
        with pytest.raises(InvalidRequest):
            await collect(rb.stream(REQ))
    assert rb.breaker.state == "closed"


async def test_open_breaker_fails_fast_without_calling_the_backend() -> None:
    fake = ScriptedBackend(fail_connect=100)
    rb = resilient(fake, retries=0, threshold=2)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            await collect(rb.stream(REQ))
    calls = fake.calls
    with pytest.raises(BackendUnavailable, match="circuit open"):
        await collect(rb.stream(REQ))
    assert fake.calls == calls


async def test_closing_the_stream_early_closes_the_backend_stream() -> None:
    fake = ScriptedBackend(reply="one two three four five six")
    gen = resilient(fake).stream(REQ)
    assert isinstance(await anext(gen), TextDelta)
    await gen.aclose()
    assert fake.closed_early == 1


def _router(primary: ScriptedBackend, fallback: ScriptedBackend) -> ModelRouter:
    settings = load_settings(
        backends={"local": {"kind": "openai", "base_url": "http://x/v1", "retries": 0},
                  "spare": {"kind": "openai", "base_url": "http://y/v1"}},
        models={"main": {"backend": "local", "model": "big", "fallback": "backup"},
                "backup": {"backend": "spare", "model": "small"}},
        default_model="main",
    )
    return ModelRouter(settings, Metrics(), backends={"local": primary, "spare": fallback})


async def test_router_fails_over_to_the_fallback_alias_and_maps_model_names() -> None:
    primary, spare = ScriptedBackend(fail_connect=1), ScriptedBackend(reply="from spare")
    router = _router(primary, spare)
    events = await collect(router.stream("main", REQ))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "from spare"
    assert primary.requests[0].model == "big" and spare.requests[0].model == "small"
    assert any(isinstance(e, Finished) for e in events)


async def test_router_does_not_fail_over_after_tokens_were_sent() -> None:
    primary = ScriptedBackend(fail_after=1, error=BackendUnavailable("gone"))
    router = _router(primary, ScriptedBackend())
    with pytest.raises(BackendUnavailable):
        await collect(router.stream("main", REQ))


async def test_n_choices_are_indexed() -> None:
    fake = ScriptedBackend(reply="a b")
    req = GenerationRequest(model="m", messages=REQ.messages, params=GenerationParams(n=2))
    events = await collect(resilient(fake).stream(req))
    assert {e.index for e in events if isinstance(e, Finished)} == {0, 1}
