"""Several servers of one model behind one backend name (``backends.<name>.replicas``).

Each request goes to the healthy server with the fewest requests in flight from this process (ties taken in
turn), so a slow or busy replica gets less. A server that cannot be reached before the first token is marked
down (drained: no new requests) and the request goes to the next one; tokens already streamed are never
retried elsewhere. A probe reads every server's model list each ``replica_check_s``: a server that answers is
up again, and one that came back, or lost model names it served (a restart between two probes drops the LoRA
adapters loaded into it at run time), is reported to :attr:`ReplicaSet.on_back` so the adapters are put back.
While no server is up, requests still try each in turn (a probe may just not have run yet).

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

from app.core.errors import BackendUnavailable
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
        #: called with the backend's name when a server came back or lost models it served (restore adapters)
        self.on_back: list[Callable[[str], Awaitable[None]]] = []
        self._turn = itertools.count()
        self._probe: asyncio.Task[None] | None = None
        for r in self.replicas:
            self._gauge(r)

    @property
    def supervisor(self) -> VLLMSupervisor | None:
        """The supervisor of the server this process runs, if one of them is."""
        return next((s for r in self.replicas if (s := getattr(r.backend, "supervisor", None)) is not None), None)

    # -- requests --------------------------------------------------------------------------------------------

    def order(self) -> list[Replica]:
        """The servers to try, best first: up ones by fewest in flight (ties in turn), then the down ones."""
        turn = next(self._turn)
        n = len(self.replicas)
        rotated = [self.replicas[(turn + i) % n] for i in range(n)]
        return sorted(rotated, key=lambda r: (not r.up, r.in_flight))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        last: BackendUnavailable | None = None
        for replica in self.order():
            replica.in_flight += 1
            gen = aiter(replica.backend.stream(request))
            try:
                try:
                    first = await anext(gen)
                except StopAsyncIteration:
                    return
                except BackendUnavailable as exc:  # nothing generated: another server may answer
                    self._down(replica, exc)
                    last = exc
                    continue
                yield first
                async for event in gen:
                    yield event
                return
            finally:
                replica.in_flight -= 1
                await gen.aclose()
        assert last is not None
        raise BackendUnavailable(f"backend {self.name!r}: no replica answered ({len(self.replicas)} tried); "
                                 f"last: {last.message}")

    # -- health ----------------------------------------------------------------------------------------------

    def _down(self, replica: Replica, exc: BaseException) -> None:
        if replica.up:
            log.warning("backend %r: replica %s is down (%s); drained until it answers a probe", self.name,
                        replica.url, getattr(exc, "message", exc))
        replica.up = False
        self._gauge(replica)

    def _gauge(self, replica: Replica) -> None:
        if self.metrics is not None:
            self.metrics.backend_replica_up.labels(self.name, replica.url).set(1 if replica.up else 0)

    async def check(self) -> bool:
        """Probe every server once (its model list); True when any is up. Reports comebacks to :attr:`on_back`."""
        results = await asyncio.gather(*(self._served(r) for r in self.replicas))
        back = False
        for replica, served in zip(self.replicas, results, strict=True):
            if served is None:
                self._down(replica, BackendUnavailable("no answer to the probe"))
                continue
            came_back = not replica.up
            lost = replica.served - served
            if came_back:
                log.info("backend %r: replica %s answers again", self.name, replica.url)
            elif lost:
                log.warning("backend %r: replica %s no longer serves %s (restarted?)", self.name, replica.url,
                            ", ".join(sorted(lost)))
            back = back or came_back or bool(lost)
            replica.up, replica.served = True, served
            self._gauge(replica)
        if back:
            for callback in self.on_back:
                try:
                    await callback(self.name)
                except Exception:  # a failed restore is the callback's to log; the probe goes on
                    log.exception("backend %r: a replica-back callback failed", self.name)
        return any(r.up for r in self.replicas)

    async def _served(self, replica: Replica) -> frozenset[str] | None:
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
        for r in self.replicas:
            if r.up:
                with contextlib.suppress(BackendUnavailable):
                    names.update(dict.fromkeys(await r.backend.models()))
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
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        await asyncio.gather(*(r.backend.aclose() for r in self.replicas), return_exceptions=True)
