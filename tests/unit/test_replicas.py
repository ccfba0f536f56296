"""Several servers behind one backend name (``app.llm.replicas``): least in flight first, a dead server drained and
the request answered by another before any token, a probe that brings it back and reports it (its adapters are
put back), adapters loaded on every server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.core.errors import BackendError, BackendTimeout, BackendUnavailable, ModelNotFound
from app.core.metrics import Metrics
from app.core.types import ChatMessage, GenerationParams, GenerationRequest, LLMEvent, TextDelta
from app.llm.replicas import ReplicaSet
from app.llm.router import ModelRouter, build_backend
from app.settings import Settings
from finetune import serving
from tests.fakes.llm import ScriptedBackend


@dataclass
class Server(ScriptedBackend):
    """A scripted server that can be down: then it refuses connections and answers no probe."""

    down: bool = False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        if self.down:
            self.calls += 1
            raise BackendUnavailable(f"{self.name} refused the connection")
        async for event in super().stream(request):
            yield event

    async def models(self) -> list[str]:
        if self.down:
            raise BackendUnavailable(f"{self.name} is down")
        return list(self.served)

    async def ready(self) -> bool:
        return not self.down


REQ = GenerationRequest(model="m", messages=(ChatMessage("user", "hi"),), params=GenerationParams(max_tokens=3))


async def text(backend, request: GenerationRequest = REQ) -> str:
    return "".join([e.text async for e in backend.stream(request) if isinstance(e, TextDelta)])


def replica_set(*servers: Server, metrics: Metrics | None = None) -> ReplicaSet:
    return ReplicaSet("local", [(f"http://{s.name}/v1", s) for s in servers], check_interval_s=0, metrics=metrics)


async def test_each_request_goes_to_the_server_with_the_fewest_in_flight() -> None:
    a, b = Server("a", delay_s=0.05), Server("b", delay_s=0.05)
    pool = replica_set(a, b)
    assert await asyncio.gather(*(text(pool) for _ in range(6))) == ["The capital of"] * 6
    assert (a.calls, b.calls) == (3, 3)
    # a busy server gets the next request only once the other is as busy (whoever's turn it is)
    pool.replicas[0].in_flight = 1
    await text(pool)
    await text(pool)
    assert (a.calls, b.calls) == (3, 5)
    pool.replicas[0].in_flight = 0
    await asyncio.gather(text(pool), text(pool))  # now as busy: one each
    assert (a.calls, b.calls) == (4, 6)


async def test_a_server_that_cannot_be_reached_is_drained_and_another_answers_before_any_token() -> None:
    metrics = Metrics()
    a, b = Server("a", down=True), Server("b")
    pool = replica_set(a, b, metrics=metrics)
    answers = [await text(pool) for _ in range(5)]
    assert answers == ["The capital of"] * 5
    assert a.calls == 1 and b.calls == 5  # tried once, then drained
    assert metrics.backend_replica_up.labels("local", "http://a/v1")._value.get() == 0
    assert metrics.backend_replica_up.labels("local", "http://b/v1")._value.get() == 1


async def test_a_probe_brings_a_drained_server_back_and_reports_it() -> None:
    a, b = Server("a", down=True), Server("b")
    pool = replica_set(a, b)
    back: list[str] = []

    async def restore(name: str) -> None:
        back.append(name)

    pool.on_back.append(restore)
    await text(pool)
    assert not pool.replicas[0].up
    assert await pool.check() and back == []  # still down: nothing to report
    a.down = False
    assert await pool.check()
    await pool.settled()  # the report runs in the background: a slow restore must not hold the probe
    assert pool.replicas[0].up and back == ["local"]
    await asyncio.gather(*(text(pool) for _ in range(4)))
    assert a.calls >= 3  # takes requests again (1 refused + its share)


async def test_a_server_missing_a_deployed_adapter_is_reported() -> None:
    """A restart between two probes, or a deploy that could not reach it: the server answers, without the adapter
    every server should serve; an adapter undeployed everywhere is no report."""
    a = Server("a", served=["smollm2", "demo-v1"])
    pool = replica_set(a, Server("b", served=["smollm2", "demo-v1"]))
    deployed = {"demo-v1"}
    pool.expected = lambda: frozenset(deployed)
    back: list[str] = []

    async def restore(name: str) -> None:
        back.append(name)

    pool.on_back.append(restore)
    await pool.check()
    await pool.settled()
    assert back == []
    a.served = ["smollm2"]
    await pool.check()
    await pool.settled()
    assert back == ["local"]
    await pool.check()  # still missing (it cannot load there?): reported once, not at every probe
    await pool.settled()
    assert back == ["local"]
    deployed.clear()
    for s in (a, pool.replicas[1].backend):
        s.served = ["smollm2"]
    await pool.check()
    await pool.settled()
    assert back == ["local"]


async def test_a_server_that_does_not_serve_the_model_passes_the_request_on_without_being_drained() -> None:
    a, b = Server("a"), Server("b")
    pool = replica_set(a, b)

    async def not_here(request):
        raise ModelNotFound("The model `demo-v1` does not exist.")
        yield  # an async generator, as a backend's stream is

    a.stream = not_here
    assert [await text(pool) for _ in range(3)] == ["The capital of"] * 3
    assert pool.replicas[0].up  # not the server's health
    b.stream = not_here
    with pytest.raises(ModelNotFound, match="demo-v1"):  # every server said so
        await text(pool)
    c = Server("c", down=True)
    pool = replica_set(Server("a"), c)
    pool.replicas[0].backend.stream = not_here
    with pytest.raises(BackendUnavailable):  # the one that may have it is down: retryable, not "no such model"
        await text(pool)


async def test_a_server_whose_stream_fails_at_once_is_drained_without_leaking_a_request() -> None:
    """A managed vLLM not started yet raises when its stream is called, before any iteration."""
    a, b = Server("a"), Server("b")
    pool = replica_set(a, b)

    def refuses(request):
        raise BackendUnavailable("vLLM local is starting")

    a.stream = refuses
    assert [await text(pool) for _ in range(3)] == ["The capital of"] * 3
    assert not pool.replicas[0].up and pool.replicas[0].in_flight == 0 and b.calls == 3


async def test_one_failing_server_opens_its_own_breaker_not_the_backends() -> None:
    """Through the router: each server has a breaker; the backend's opens only when no server answers."""
    s = Settings(backends={"local": {"kind": "openai", "base_url": "http://a/v1", "replicas": ["http://b/v1"],
                                     "breaker_failures": 2, "replica_check_s": 0}},
                 models={"m": {"backend": "local", "model": "smollm2"}}, default_model="m")
    router = ModelRouter(s, Metrics())
    pool = router.backends["local"].inner
    # a times out before its first token: not failed over (it may be generating), counted against a alone
    a = Server("a", fail_after=0, error=BackendTimeout("backend 'local' sent nothing for 60 s"))
    b = Server("b")
    for replica, server in zip(pool.replicas, (a, b), strict=True):
        replica.backend.inner = server  # the scripted servers under the router's own breakers
    outcomes = []
    for _ in range(8):
        try:
            outcomes.append(await text(router.backends["local"], REQ))
        except BackendTimeout:
            outcomes.append("timeout")
    assert outcomes.count("timeout") == 2 and outcomes[-4:] == ["The capital of"] * 4
    assert pool.replicas[0].backend.breaker.state == "open"  # a's own, after its 2 failures
    assert router.backends["local"].breaker.state == "closed"  # the backend's: b answers
    assert not pool.replicas[0].up  # its open breaker refuses at once: drained, b takes the rest
    assert await router.backends["local"].ready()


async def test_tokens_already_streamed_are_not_retried_elsewhere() -> None:
    a = Server("a", fail_after=1, error=BackendError("lost mid-stream"))
    b = Server("b")
    pool = replica_set(a, b)
    pool._turn = iter([0])  # a first
    with pytest.raises(BackendError, match="mid-stream"):
        await text(pool)
    assert b.calls == 0 and pool.replicas[0].in_flight == 0


async def test_no_server_answering_is_backend_unavailable_and_all_are_tried() -> None:
    a, b = Server("a", down=True), Server("b", down=True)
    pool = replica_set(a, b)
    with pytest.raises(BackendUnavailable, match="no replica answered"):
        await text(pool)
    assert (a.calls, b.calls) == (1, 1)
    assert not await pool.check() and not await pool.ready()
    with pytest.raises(BackendUnavailable):  # still tried: a probe may not have run yet
        await text(pool)
    assert (a.calls, b.calls) == (2, 2)


def test_settings_build_a_replica_set_and_refuse_what_cannot_work() -> None:
    s = Settings(backends={"local": {"kind": "vllm", "base_url": "http://v1:8000/v1", "api_key": "k",
                                     "replicas": ["http://v2:8000/v1", "http://v3:8000/v1/"]}})
    backend = build_backend("local", s.backends["local"], s)
    assert isinstance(backend, ReplicaSet)
    assert [r.url for r in backend.replicas] == ["http://v1:8000/v1", "http://v2:8000/v1", "http://v3:8000/v1"]
    assert s.backends["local"].server_urls() == ["http://v1:8000/v1", "http://v2:8000/v1", "http://v3:8000/v1"]
    with pytest.raises(ValueError, match="distinct"):
        Settings(backends={"local": {"kind": "vllm", "base_url": "http://v1/v1", "replicas": ["http://v1/"]}})
    with pytest.raises(ValueError, match="the server Keel runs"):  # the managed one, filled in by the settings
        Settings(backends={"local": {"kind": "vllm", "managed": {"port": 8123},
                                     "replicas": ["http://127.0.0.1:8123/v1"]}})
    with pytest.raises(ValueError, match="transformers"):
        Settings(backends={"tf": {"kind": "transformers", "model_path": "/m", "replicas": ["http://v/v1"]}})


async def test_the_router_restores_adapters_when_a_replica_comes_back() -> None:
    s = Settings(backends={"local": {"kind": "openai", "base_url": "http://v1/v1", "replicas": ["http://v2/v1"]}},
                 models={"m": {"backend": "local", "model": "smollm2"}}, default_model="m")
    a, b = Server("a"), Server("b")
    router = ModelRouter(s, Metrics(), {"local": replica_set(a, b)})
    back: list[str] = []

    async def restore(name: str) -> None:
        back.append(name)

    router.on_server_restart(restore)
    router.expect_models(lambda backend: frozenset({"demo-v1"}) if backend == "local" else frozenset())
    pool = router.backends["local"].inner
    a.served = b.served = ["smollm2", "demo-v1"]
    await pool.check()
    await pool.settled()
    assert back == []
    b.down = True
    await pool.check()
    b.down = False
    await pool.check()
    await pool.settled()
    assert back == ["local"]


async def test_adapters_are_loaded_on_every_server_that_answers(monkeypatch, tmp_path: Path) -> None:
    s = Settings(home=tmp_path, backends={"local": {"kind": "vllm", "base_url": "http://v1:8000/v1", "api_key": "k",
                                                    "replicas": ["http://v2:8000/v1", "http://v3:8000/v1"]}})
    loaded: list[tuple[str, str, str | None]] = []

    async def load_adapter(url: str, name: str, path, *, api_key=None, **_) -> bool:
        if "v3" in url:
            raise BackendUnavailable(f"cannot reach vLLM at {url}")
        loaded.append((url, name, api_key))
        return True

    monkeypatch.setattr(serving, "load_adapter", load_adapter)
    await serving.load_everywhere(s, "local", "demo-v1", "/a/1")
    assert loaded == [("http://v1:8000/v1", "demo-v1", "k"), ("http://v2:8000/v1", "demo-v1", "k")]

    async def nowhere(url: str, *_, **__) -> bool:
        raise BackendUnavailable(f"cannot reach vLLM at {url}")

    monkeypatch.setattr(serving, "load_adapter", nowhere)
    with pytest.raises(BackendUnavailable, match="v1:8000"):
        await serving.load_everywhere(s, "local", "demo-v1", "/a/1")


async def test_the_probe_keeps_a_server_whose_breaker_is_open_drained_and_survives_an_unreadable_deployment_list(
        ) -> None:
    s = Settings(backends={"local": {"kind": "openai", "base_url": "http://a/v1", "replicas": ["http://b/v1"],
                                     "replica_check_s": 0}})
    pool = build_backend("local", s.backends["local"], s)
    a, b = Server("a"), Server("b")
    for replica, server in zip(pool.replicas, (a, b), strict=True):
        replica.backend.inner = server
    for _ in range(s.backends["local"].breaker_failures):
        pool.replicas[0].backend.breaker.record_failure()

    def unreadable() -> frozenset[str]:
        raise OSError("database is locked")

    pool.expected = unreadable
    assert await pool.check()
    assert [r.up for r in pool.replicas] == [False, True]  # a answers its model list, but its breaker refuses
