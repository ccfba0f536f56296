"""Several servers of one model behind one backend name (``backends.<name>.replicas``).

Each request goes to the healthy server with the fewest requests in flight from this process (ties taken in
turn), so a slow or busy replica gets less. A server that cannot be reached before the first token is marked
down (drained: no new requests) and the request goes to the next one; a server that says it does not serve the
model (a LoRA adapter not loaded there yet) passes the request on without being drained; tokens already streamed
are never retried elsewhere. Each server has its own circuit breaker (the router's breaker around the set counts
only "no server answered"). A probe reads every server's model list each ``replica_check_s``: a server that
answers is up again, and one that lacks models it should serve (:attr:`ReplicaSet.expected`: the deployed
adapters; a restart drops the adapters loaded at run time, and a deploy skips a server it cannot reach) or that
came back is reported to :attr:`ReplicaSet.on_back` (in the background, one report at a time) so the adapters are
put back. A request that succeeds marks its server up at once. While no server is up, requests still try each in
turn (a probe may just not have run yet).

Nothing here is a scheduler: vLLM batches, and each replica is one vLLM server (or a production stack / KServe
endpoint) with its own URL. Keel only spreads its own requests and steps around a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.core.errors import BackendUnavailable, ModelNotFound
from app.core.metrics import Metrics
from app.core.types import GenerationRequest, LLMEvent
from app.llm.base import LLMBackend

if TYPE_CHECKING:
    from app.llm.vllm_server import VLLMSupervisor

log = logging.getLogger("keel.llm")

_PROBE_TIMEOUT_S = 3.0


@dataclass
class Replica:
    url: str
    backend: LLMBackend
    up: bool = True
    in_flight: int = 0
    served: frozenset[str] = field(default_factory=frozenset)
    missing: frozenset[str] = field(default_factory=frozenset)  # expected models it lacked at the last probe


class ReplicaSet:
    """An :class:`~app.llm.base.LLMBackend` over several servers of the same model (see the module's doc)."""

    def __init__(self, name: str, members: Sequence[tuple[str, LLMBackend]], *, check_interval_s: float = 5.0,
                 metrics: Metrics | None = None) -> None:
        if not members:
            raise ValueError("a replica set needs at least one server")
        self.name = name
        self.replicas = [Replica(url, backend) for url, backend in members]
        self.check_interval_s = check_interval_s
        self.metrics = metrics
        #: called with the backend's name when a server came back or lacks an expected model (restore adapters)
        self.on_back: list[Callable[[str], Awaitable[None]]] = []
        #: the model names every server should serve beyond its own (the deployed adapters); read by each probe
        self.expected: Callable[[], frozenset[str]] | None = None
        self._turn = itertools.count()
        self._probe: asyncio.Task[None] | None = None
        self._report: asyncio.Task[None] | None = None
        for r in self.replicas:
            self._gauge(r)

    @property
    def supervisor(self) -> VLLMSupervisor | None:
        """The supervisor of the server this process runs, if one of them is (under its breaker's wrapper)."""
        for r in self.replicas:
            server = getattr(r.backend, "inner", r.backend)
            if getattr(server, "supervisor", None) is not None:
                return server.supervisor
        return None

    # -- requests --------------------------------------------------------------------------------------------

    def order(self) -> list[Replica]:
        """The servers to try, best first: up ones by fewest in flight (ties in turn), then the down ones."""
        turn = next(self._turn)
        n = len(self.replicas)
        rotated = [self.replicas[(turn + i) % n] for i in range(n)]
        return sorted(rotated, key=lambda r: (not r.up, r.in_flight))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        last: BackendUnavailable | ModelNotFound | None = None
        for replica in self.order():
            replica.in_flight += 1
            gen: AsyncIterator[LLMEvent] | None = None
            try:
                try:
                    gen = aiter(replica.backend.stream(request))  # may raise at once (a server not started yet)
                    first = await anext(gen)
                except StopAsyncIteration:
                    return
                except BackendUnavailable as exc:  # nothing generated: another server may answer
                    self._down(replica, exc)
                    last = exc
                    continue
                except ModelNotFound as exc:  # e.g. an adapter not loaded there (yet): not the server's health
                    last = exc if last is None else last
                    continue
                self._up(replica)
                yield first
                async for event in gen:
                    yield event
                return
            finally:
                replica.in_flight -= 1
                if gen is not None:
                    await gen.aclose()
        if isinstance(last, ModelNotFound) and not any(not r.up for r in self.replicas):
            raise last  # every server answered that it has no such model
        assert last is not None
        raise BackendUnavailable(f"backend {self.name!r}: no replica answered ({len(self.replicas)} tried); "
                                 f"last: {last.message}")

    # -- health ----------------------------------------------------------------------------------------------

    def _down(self, replica: Replica, exc: BaseException) -> None:
        if replica.up:
            log.warning("backend %r: replica %s is down (%s); drained until it answers", self.name, replica.url,
                        getattr(exc, "message", exc))
        replica.up = False
        self._gauge(replica)

    def _up(self, replica: Replica) -> None:
        if not replica.up:
            log.info("backend %r: replica %s answers again", self.name, replica.url)
            replica.up = True
            self._gauge(replica)

    def _gauge(self, replica: Replica) -> None:
        if self.metrics is not None:
            self.metrics.backend_replica_up.labels(self.name, replica.url).set(1 if replica.up else 0)

    async def check(self) -> bool:
        """Probe every server once (its model list); True when any is up. A server that came back, or lacks a model
        :attr:`expected` names, is reported to :attr:`on_back` (in the background: see :meth:`settled`)."""
        results = await asyncio.gather(*(self._served(r) for r in self.replicas))
        expected: frozenset[str] = frozenset()
        if self.expected is not None:
            try:
                expected = await asyncio.to_thread(self.expected)
            except Exception:  # the deployments cannot be read now: the servers' health is still worth updating
                log.exception("backend %r: the deployed adapters could not be read", self.name)
        report = False
        for replica, served in zip(self.replicas, results, strict=True):
            if served is None:
                self._down(replica, BackendUnavailable("no answer to the probe"))
                continue
            missing = expected - served
            # reported when it changes (one that cannot load there is not retried every probe, forever)
            if missing and missing != replica.missing:
                log.warning("backend %r: replica %s does not serve %s (restarted, or missed a deploy)", self.name,
                            replica.url, ", ".join(sorted(missing)))
            report = report or not replica.up or (bool(missing) and missing != replica.missing)
            replica.served, replica.missing = served, missing
            self._up(replica)
        if report and self.on_back and (self._report is None or self._report.done()):
            self._report = asyncio.create_task(self._call_back(), name=f"keel-replicas-{self.name}-back")
        return any(r.up for r in self.replicas)

    async def _call_back(self) -> None:
        for callback in self.on_back:
            try:
                await callback(self.name)
            except Exception:  # a failed restore is the callback's to log; the next probe reports again
                log.exception("backend %r: a replica-back callback failed", self.name)

    async def settled(self) -> None:
        """Wait for the report :meth:`check` started, if one runs (tests, shutdown)."""
        if self._report is not None:
            await asyncio.shield(self._report)

    async def _served(self, replica: Replica) -> frozenset[str] | None:
        breaker = getattr(replica.backend, "breaker", None)
        if breaker is not None and breaker.state == "open":
            return None  # its own breaker refuses requests: up only once it lets one through again
        try:
            return frozenset(await asyncio.wait_for(replica.backend.models(), _PROBE_TIMEOUT_S))
        except Exception:  # unreachable, slow, or answering nonsense: down all the same
            return None

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                await self.check()
            except Exception:  # the probe must outlive any one failure
                log.exception("backend %r: replica probe failed", self.name)

    # -- the backend protocol --------------------------------------------------------------------------------

    async def models(self) -> list[str]:
        names: dict[str, None] = {}
        for served in await asyncio.gather(*(self._served(r) for r in self.replicas if r.up)):
            names.update(dict.fromkeys(served or ()))
        return list(names)

    async def ready(self) -> bool:
        return any(await asyncio.gather(*(self._ready(r) for r in self.replicas)))

    async def _ready(self, replica: Replica) -> bool:
        try:
            return bool(await replica.backend.ready())
        except Exception:
            return False

    async def start(self) -> None:
        await asyncio.gather(*(r.backend.start() for r in self.replicas))
        if self._probe is None and self.check_interval_s > 0:
            self._probe = asyncio.create_task(self._probe_loop(), name=f"keel-replicas-{self.name}")

    async def aclose(self) -> None:
        for task in (self._probe, self._report):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._probe = self._report = None
        await asyncio.gather(*(r.backend.aclose() for r in self.replicas), return_exceptions=True)
