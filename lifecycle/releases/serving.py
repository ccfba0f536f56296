"""Releases on the live chat path: a request to a release endpoint is answered by the variant its unit is
assigned to, exactly as a request naming that variant's model, prompt, collection and policy would be (same
guards, same streaming), and what it served is recorded for the release's decision.

A shadow release also sends a sampled share of its requests to the shadow variant, in the background: a bounded
queue per release (full: the request is dropped and counted, the primary never waits) worked by a few tasks;
the shadow's answer is never returned to anyone, only stored next to the primary's and compared. A shadow that
is an agent workflow runs in shadow mode: its tools that can change something are not executed and it never
waits for approval (``AgentService.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from app.core.errors import ClientGone, Conflict, InvalidRequest, KeelError, ModelNotFound
from app.core.metrics import Metrics
from app.core.types import ChatMessage, Citations, Finished, Started, TextDelta, Usage
from app.guardrails.types import GuardrailBlocked, GuardrailRedaction, GuardrailRetraction
from app.services.chat import ChatEvent, ChatRequest, ChatService, PromptUse, collect
from app.services.grounding import RagUse
from evals.gate import ArtifactGate
from lifecycle.releases.service import Assignment, ReleaseService, VariantGate
from lifecycle.releases.spec import VariantSpec
from lifecycle.releases.store import JudgeScore, Observation, Release, ShadowPair

log = logging.getLogger("keel.releases")

#: How alike two answers are, 0..1 (the shared embedder's cosine similarity); runs off the event loop.
Similarity = Callable[[str, str], float]


class Judge(Protocol):
    """Scores a live answer with an eval metric (:class:`evals.online.OnlineJudge`); None: could not score."""

    async def score(self, metric: str, question: str, answer: str, *, contexts: Sequence[str] = (),
                    params: dict[str, Any] | None = None, finish_reason: str | None = None) -> float | None: ...


def apply_variant(request: ChatRequest, variant: VariantSpec, release: str, **also: Any) -> ChatRequest:
    """The request as the variant answers it (and with ``also`` changed: one copy, not two, on the hot path).
    What the variant decides, the request may not also set."""
    if variant.prompt and request.prompt is not None:
        raise InvalidRequest(f"release {release!r} sets the prompt of each variant; drop 'prompt'", param="prompt")
    if (variant.rag or variant.workflow) and request.rag is not None:
        raise InvalidRequest(f"release {release!r} decides how each variant answers; drop 'rag'", param="rag")
    model = f"agent:{variant.workflow}" if variant.workflow else variant.model
    prompt = request.prompt
    if variant.prompt:
        prompt = PromptUse(variant.prompt, {})
    elif prompt is not None and variant.workflow:
        raise InvalidRequest(f"release {release!r} answers with an agent workflow; drop 'prompt'", param="prompt")
    rag = RagUse(collection=variant.rag) if variant.rag else request.rag
    return replace(request, model=model, prompt=prompt, rag=rag, policy=variant.policy or request.policy, **also)


def unit_of(request: ChatRequest, unit: str) -> str:
    """The value assignment sticks to; without it (no `user` field, no thread header) the API key."""
    key = request.user or "anonymous"
    if unit == "user":
        return request.end_user or key
    if unit == "thread":
        return request.thread or key
    if unit == "request":
        return request.request_id or key
    return key


@dataclass
class _Primary:
    """What the primary answered, for its shadow's comparison and the online judge."""

    text: str = ""
    latency_ms: float | None = None
    tokens: int = 0
    blocked: bool = False
    finish: str | None = None
    contexts: list[str] = field(default_factory=list)


class ReleaseGateway:
    """The chat service as clients reach it: release endpoints resolved to variants, everything else passed on
    untouched (no extra layer on a request that names no release)."""

    def __init__(self, chat: ChatService, releases: ReleaseService, metrics: Metrics,
                 similarity: Similarity | None = None, judge: Judge | None = None) -> None:
        self.chat = chat
        self.releases = releases
        self.metrics = metrics
        self.similarity = similarity
        self.judge = judge
        self._queues: dict[tuple[str, int], _WorkQueue] = {}

    # the rest of ChatService's surface, for callers that take either
    def __getattr__(self, name: str):
        return getattr(self.chat, name)

    def stream(self, request: ChatRequest, *, reask: bool = False) -> AsyncIterator[ChatEvent]:
        release = self.releases.active(request.model)
        if release is None:
            return self.chat.stream(request, reask=reask)
        return self._released(request, self.releases.assign(release, unit_of(request, release.spec.unit)), reask)

    async def complete(self, request: ChatRequest):
        return await collect(self.stream(request, reask=True))

    async def _released(self, request: ChatRequest, a: Assignment, reask: bool) -> AsyncIterator[ChatEvent]:
        release, variant = a.release, a.variant
        # On the request's keel.chat span (a span of its own cost ~0.15 ms of CPU per request: bench/releases.py)
        served = apply_variant(request, variant, release.name, trace_attributes=(
            ("keel.release", release.name), ("keel.release.id", release.id),
            ("keel.release.strategy", release.spec.strategy), ("keel.release.variant", variant.name),
            ("keel.release.unit", release.spec.unit), ("keel.release.status", release.status)))
        shadow = self._shadow_for(release, variant, request)
        judged = release.spec.judge is not None and self.judge is not None and not release.finished and (
            random.random() < release.spec.judge.sample)
        primary = _Primary() if shadow is not None or judged else None
        t0 = time.perf_counter()
        ttft: float | None = None
        blocked = redacted = False
        usage = Usage(0, 0)
        response_id = ""
        text: list[str] = []
        outcome = "ok"
        try:
            async with contextlib.aclosing(self.chat.stream(served, reask=reask)) as events:
                async for event in events:
                    if isinstance(event, Started):
                        response_id = event.id
                        event = replace(event, model=release.name, release=release.name, variant=variant.name)
                    elif isinstance(event, TextDelta):
                        if ttft is None:
                            ttft = (time.perf_counter() - t0) * 1000
                        if primary is not None and event.index == 0:
                            text.append(event.text)
                    elif isinstance(event, GuardrailBlocked | GuardrailRetraction) or (
                            isinstance(event, Finished) and event.reason == "content_filter"):
                        blocked = True
                    elif isinstance(event, GuardrailRedaction):
                        redacted = True
                    elif isinstance(event, Usage):
                        usage = event
                    elif isinstance(event, Citations) and primary is not None:
                        primary.contexts = [c.get("text", "") for c in event.items if c.get("text")]
                    elif isinstance(event, Finished) and primary is not None and event.index == 0:
                        primary.finish = event.reason
                    yield event
        except (ClientGone, asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"  # the client left: not the variant's doing, nothing to count
            raise
        except Exception as exc:
            # A server-side failure, or the variant's own configuration failing (its model gone): the variant's
            # error. A request the client got wrong is not.
            if isinstance(exc, KeelError) and exc.status < 500 and not isinstance(exc, ModelNotFound):
                outcome = "rejected"
            else:
                outcome = "error"
            raise
        finally:
            latency_ms = (time.perf_counter() - t0) * 1000
            if outcome in ("ok", "error"):
                if outcome == "ok" and blocked:
                    outcome = "blocked"
                self.metrics.release_requests.labels(release.name, variant.name, outcome).inc()
                self.metrics.release_latency.labels(release.name, variant.name).observe(latency_ms / 1000)
                self.releases.observe(Observation(
                    release.id, variant.name, time.time(), response_id or f"failed-{request.request_id}",
                    request.user or "", a.unit, outcome == "error", blocked, latency_ms, ttft,
                    usage.prompt_tokens, usage.completion_tokens, redacted))
            if primary is not None:
                primary.text, primary.latency_ms = "".join(text), latency_ms
                primary.tokens, primary.blocked = usage.completion_tokens, blocked
                if shadow is not None:
                    shadow.primary_done(primary if outcome in ("ok", "blocked") else None, response_id)
                if judged and outcome == "ok" and primary.text:
                    self._judge_later(release, variant.name, request, primary, response_id)

    # -- shadow -------------------------------------------------------------------------------------------

    def _shadow_for(self, release: Release, variant: VariantSpec, request: ChatRequest) -> _ShadowJob | None:
        spec = release.spec
        if spec.strategy != "shadow" or release.finished or variant.name != spec.baseline:
            return None
        if spec.shadow.sample < 1 and random.random() >= spec.shadow.sample:
            return None
        queue = self._queue("shadow", release, spec.shadow.queue, spec.shadow.concurrency, self._run_shadow)
        if queue.queue.full() or not queue.offer(job := _ShadowJob(release, request,
                                                                   asyncio.get_running_loop().create_future())):
            self.metrics.release_shadow.labels(release.name, spec.candidate, "dropped").inc()
            return None
        return job

    def _queue(self, kind: str, release: Release, size: int, concurrency: int,
               run: Callable[[Any], Awaitable[None]]) -> _WorkQueue:
        queue = self._queues.get((kind, release.id))
        if queue is None:
            queue = self._queues[(kind, release.id)] = _WorkQueue(f"{kind}-{release.name}", size, concurrency, run)
        return queue

    # -- online judge ---------------------------------------------------------------------------------------

    def _judge_later(self, release: Release, variant: str, request: ChatRequest, primary: _Primary,
                     response_id: str) -> None:
        cfg = release.spec.judge
        question = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        job = _JudgeJob(release, variant, response_id, question, primary)
        if not self._queue("judge", release, cfg.queue, cfg.concurrency, self._run_judge).offer(job):
            self.metrics.release_judged.labels(release.name, variant, "skipped").inc()

    async def _run_judge(self, job: _JudgeJob) -> None:
        cfg = job.release.spec.judge
        try:
            score = await self.judge.score(cfg.metric, job.question, job.primary.text, contexts=job.primary.contexts,
                                           params=cfg.params, finish_reason=job.primary.finish)
        except Exception:  # a judge failure is never the user's problem
            log.exception("online judge failed for %s", job.response_id)
            score = None
        if score is None:
            self.metrics.release_judged.labels(job.release.name, job.variant, "failed").inc()
            return
        self.releases.record_score(JudgeScore(job.release.id, job.variant, time.time(), job.response_id,
                                              cfg.metric, score))
        self.metrics.release_judged.labels(job.release.name, job.variant, "scored").inc()

    async def _run_shadow(self, job: _ShadowJob) -> None:
        release = job.release
        spec = release.spec
        cand = spec.candidate_spec
        # the operator's experiment, not the caller's traffic: not counted against the caller's token budget; an
        # agent workflow runs in shadow mode (its tools that act are not executed)
        req = apply_variant(replace(job.request, request_id=f"{job.request.request_id}-shadow", token_budget=None,
                                    shadow=True), cand, release.name)
        t0 = time.perf_counter()
        text, blocked, tokens, error = "", False, 0, None
        try:
            result = await asyncio.wait_for(self.chat.complete(req), spec.shadow.timeout_s)
            text = "".join(result.texts.get(0, []))
            blocked = any(isinstance(e, GuardrailBlocked | GuardrailRetraction) for e in result.guardrail_events)
            tokens = result.usage.completion_tokens if result.usage else 0
        except TimeoutError:
            error = f"timed out after {spec.shadow.timeout_s:g} s"
        except Exception as exc:
            error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        latency_ms = (time.perf_counter() - t0) * 1000
        try:
            primary, response_id = await asyncio.wait_for(job.primary, spec.shadow.timeout_s)
        except TimeoutError:
            primary, response_id = None, ""
        if primary is None:
            self.metrics.release_shadow.labels(release.name, cand.name, "unpaired").inc()
            return
        similarity = None
        if self.similarity is not None and error is None and text and primary.text:
            try:
                similarity = await asyncio.to_thread(self.similarity, primary.text, text)
            except Exception:
                log.exception("shadow similarity failed")
        question = next((m.content for m in reversed(job.request.messages) if m.role == "user"), "")
        self.releases.record_shadow(ShadowPair(
            release.id, cand.name, time.time(), response_id, question[:4000], primary.text, text, similarity,
            primary.latency_ms, latency_ms if error is None else None, primary.tokens, tokens, primary.blocked,
            blocked, error))
        self.metrics.release_shadow.labels(release.name, cand.name, "error" if error else "stored").inc()

    # -- blue/green -----------------------------------------------------------------------------------------

    async def switch(self, name: str, *, actor: str, reason: str = "") -> Release:
        """Blue/green: check that the green bundle answers every probe, then send all traffic to it at once."""
        release = self.releases.get(name)
        if release.spec.strategy != "bluegreen":
            raise InvalidRequest(f"release {name!r} is a {release.spec.strategy} release; switch is for blue/green "
                                 "(use promote)", param="name")
        report = await self.probe(release, release.spec.candidate_spec)
        failed = [r for r in report if not r["ok"]]
        if failed:
            raise Conflict(f"{release.spec.candidate} is not ready: {len(failed)} of {len(report)} probes failed "
                           f"({failed[0]['error']}); traffic stays on {release.spec.baseline}",
                           param="name", code="not_ready")
        slowest = max(r["latency_ms"] for r in report)
        note = f"readiness: {len(report)}/{len(report)} probes answered (slowest {slowest:.0f} ms)"
        return self.releases.promote(name, actor=actor, reason=f"{reason + '; ' if reason else ''}{note}")

    async def probe(self, release: Release, variant: VariantSpec) -> list[dict]:
        out = []
        for i, question in enumerate(release.spec.probes):
            # nobody sees a probe's answer either: an agent workflow's tools that act are not executed
            req = apply_variant(ChatRequest(model=None, messages=(ChatMessage("user", question),),
                                            request_id=f"probe-{release.id}-{i}", user="keel-probe", shadow=True),
                                variant, release.name)
            t0 = time.perf_counter()
            try:
                result = await self.chat.complete(req)
                answer = "".join(result.texts.get(0, []))
                finish = result.finish.get(0, "stop")
                error = None if answer.strip() and finish != "content_filter" else (
                    f"probe {i + 1} was refused by the guardrails" if finish == "content_filter"
                    else f"probe {i + 1} got an empty answer")
            except KeelError as exc:
                error = f"probe {i + 1}: {exc.message}"
            out.append({"question": question, "ok": error is None, "error": error,
                        "latency_ms": (time.perf_counter() - t0) * 1000})
        return out

    async def aclose(self) -> None:
        for queue in self._queues.values():
            await queue.aclose()
        self._queues.clear()


@dataclass
class _ShadowJob:
    release: Release
    request: ChatRequest
    primary: asyncio.Future

    def primary_done(self, primary: _Primary | None, response_id: str) -> None:
        if not self.primary.done():
            self.primary.set_result((primary, response_id))


@dataclass
class _JudgeJob:
    release: Release
    variant: str
    response_id: str
    question: str
    primary: _Primary


class _WorkQueue:
    """Background work of one release (shadow requests, judge calls): ``size`` waiting at most, ``concurrency``
    running; a full queue refuses at once, so the request path never waits."""

    def __init__(self, name: str, size: int, concurrency: int, run: Callable[[Any], Awaitable[None]]) -> None:
        self.run = run
        self.queue: asyncio.Queue[Any] = asyncio.Queue(size)
        self.workers = [asyncio.create_task(self._work(), name=f"keel-{name}-{i}") for i in range(concurrency)]

    def offer(self, job: Any) -> bool:
        try:
            self.queue.put_nowait(job)
            return True
        except asyncio.QueueFull:
            return False

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                await self.run(job)
            except Exception:  # one broken job must not stop the others
                log.exception("release background job failed")
            finally:
                self.queue.task_done()

    async def aclose(self) -> None:
        for w in self.workers:
            w.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)


def variant_check(chat: ChatService) -> Callable[[VariantSpec], None]:
    """A variant may only name what this server has: a 400 naming the missing piece, at create time, instead of
    a release whose variant fails every request it gets."""

    def check(v: VariantSpec) -> None:
        where = f"variant {v.name!r}"
        if v.model and chat.router.routes.get(v.model) is None:
            known = ", ".join(sorted(chat.router.aliases)) or "none"
            raise InvalidRequest(f"{where}: model {v.model!r} is not a model alias (available: {known})",
                                 param="variants", code="unknown_model")
        if v.prompt:
            if chat.prompts is None:
                raise InvalidRequest(f"{where}: this server has no prompt registry", param="variants")
            try:
                chat.prompts.resolve(v.prompt)
            except KeelError as e:
                raise InvalidRequest(f"{where}: prompt {v.prompt!r}: {e.message}", param="variants",
                                     code="unknown_prompt") from None
        if v.policy and (chat.guards is None or not chat.guards.has_policy(v.policy)):
            have = ", ".join(sorted(chat.guards.policy.file.policies)) if chat.guards is not None else "guardrails off"
            raise InvalidRequest(f"{where}: no guardrail policy {v.policy!r} ({have})", param="variants",
                                 code="unknown_policy")
        if v.workflow:
            names = {w["name"] for w in chat.agents.workflows()} if chat.agents is not None else set()
            if v.workflow not in names:
                raise InvalidRequest(f"{where}: no agent workflow {v.workflow!r} ({', '.join(sorted(names))})",
                                     param="variants", code="unknown_workflow")
        if v.rag and (chat.grounder is None or not chat.grounder.rag.store.has_collection(v.rag)):
            raise InvalidRequest(f"{where}: no document collection {v.rag!r}; ingest documents into it first",
                                 param="variants", code="unknown_collection")

    return check


def variant_gate(chat: ChatService, *, rag: ArtifactGate | None = None, workflow: ArtifactGate | None = None,
                 policy: ArtifactGate | None = None) -> VariantGate:
    """The eval gates of every artifact the candidate names: its prompt version (by content hash, as label
    promotions use it), its document collection, agent workflow and guardrail policy (:mod:`evals.gate`), whether
    or not the baseline shares it (a new endpoint's baseline serves nobody yet, so sharing proves nothing). An
    adapter alias passed its gate when it was deployed and a base model has nothing to gate. None: nothing in the
    candidate is gated."""

    def gate(candidate: VariantSpec) -> tuple[bool, str] | None:
        verdicts: list[tuple[bool, str]] = []
        if candidate.prompt and chat.prompts is not None:
            version = chat.prompts.resolve(candidate.prompt)
            v = chat.prompts.check_gate(version.name, version.version)
            verdicts.append((v.passed, f"{version.name}@{version.version}: {v.reason}"))
        for check, name in ((rag, candidate.rag), (workflow, candidate.workflow), (policy, candidate.policy)):
            if check is not None and name:
                v = check(name)
                verdicts.append((v.passed, v.reason))
        if not verdicts:
            return None
        failed = [reason for ok, reason in verdicts if not ok]
        return not failed, "; ".join(failed or [reason for _, reason in verdicts])

    return gate
