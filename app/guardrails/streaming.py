"""Streaming output guard: validate the model's stream in sentence windows before releasing it.

Text is released only after its window passed the output validators (so no unvalidated text reaches the
client); redacted windows are released redacted, preceded by a :class:`GuardrailRedaction` event; a window
that fails a ``block`` validator ends that choice with a :class:`GuardrailRetraction` (the client withdraws
what it showed and displays the refusal) and ``Finished(reason=content_filter)``. Whole-output validators
(JSON schema) run when the stream ends.

Added time to first token = the time to receive the first window (one sentence, or at most
``first_window_max_chars``) + one window validation. Measured in bench/guardrails.py.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from app.core.types import Finished, TextDelta, Usage
from app.guardrails.metrics import GuardrailMetrics
from app.guardrails.settings import StreamingSettings
from app.guardrails.types import GuardContext, GuardrailRedaction, GuardrailRetraction, ValidatorResult
from app.guardrails.validators.pii import PiiVault

if TYPE_CHECKING:
    from app.guardrails.policy import ResolvedPolicy

_BOUNDARY = re.compile(r"[.!?][\"')\]*_]*\s+|\n+")


def take_window(buf: str, *, min_chars: int, max_chars: int, final: bool = False) -> int:
    """Length of the next window at the head of ``buf`` (0 = wait for more text)."""
    if not buf:
        return 0
    for m in _BOUNDARY.finditer(buf):
        if m.end() >= min_chars:
            return m.end()
    if final:
        return len(buf)
    if len(buf) >= max_chars:
        cut = buf.rfind(" ", 0, max_chars)
        return cut + 1 if cut > 0 else max_chars
    return 0


@dataclass
class _Choice:
    buf: str = ""
    released_model_text: str = ""    # validated model text (before placeholder restoration)
    released_chars: int = 0          # chars the client has seen
    windows: int = 0
    retracted: bool = False
    finished: bool = False
    results: list[ValidatorResult] = field(default_factory=list)


class WindowEngine(Protocol):
    """What a stream's guard uses of the engine that made it (``GuardrailEngine``): checking a window,
    restoring placeholders, refusal texts, and recording the outcome."""

    metrics: GuardrailMetrics

    async def check_window(self, policy: ResolvedPolicy, context: GuardContext, text: str, *, vault: PiiVault,
                           released: str = "", window: int | None = None, whole: bool = False
                           ) -> tuple[str, list[ValidatorResult]]: ...

    def restore_placeholders(self, policy: ResolvedPolicy, text: str, vault: PiiVault, user: str | None) -> str: ...

    def refusal_for(self, policy_name: str, validator: str, stage: str = "output") -> str: ...

    def _observe(self, stage: str, policy: str, results: list[ValidatorResult], latency_ms: float,
                 outcome: str) -> None: ...

    def record(self, request_id: str, stage: str, policy: str, results: list[ValidatorResult]) -> None: ...


class OutputGuard:
    def __init__(self, engine: WindowEngine, policy: ResolvedPolicy, context: GuardContext, vault: PiiVault,
                 settings: StreamingSettings, *, enabled: bool = True) -> None:
        self.engine = engine
        self.policy = policy
        self.context = context
        self.vault = vault
        self.settings = settings
        self.enabled = enabled and bool(policy.output)
        self._choices: dict[int, _Choice] = {}
        self._first_in: float | None = None
        self.added_ttft_s: float | None = None

    @property
    def retracted(self) -> bool:
        return any(c.retracted for c in self._choices.values())

    @property
    def released_chars(self) -> int:
        """Characters the client has been shown so far, over every choice."""
        return sum(c.released_chars for c in self._choices.values())

    @property
    def results(self) -> list[ValidatorResult]:
        return [r for c in self._choices.values() for r in c.results]

    def _choice(self, index: int) -> _Choice:
        return self._choices.setdefault(index, _Choice())

    async def feed(self, delta: TextDelta) -> list[Any]:
        """Add model text; returns what may be sent now (TextDelta / GuardrailEvent / Finished)."""
        if self._first_in is None:
            self._first_in = time.perf_counter()
        if not self.enabled:
            self._mark_first_out()
            return [delta]
        c = self._choice(delta.index)
        if c.retracted or c.finished:
            return []
        c.buf += delta.text
        return await self._drain(delta.index, final=False)

    async def finish(self, index: int = 0) -> list[Any]:
        """The model finished choice ``index``: validate the rest and the whole-output validators."""
        if not self.enabled:
            return []
        c = self._choice(index)
        if c.retracted or c.finished:
            return []
        out = await self._drain(index, final=True)
        if c.retracted:
            return out
        whole_text = c.released_model_text
        _, results = await self.engine.check_window(self.policy, self.context, whole_text, vault=self.vault,
                                                    window=c.windows, whole=True)
        self._account(c, results)
        failing = next((r for r in results if r.action in ("block", "reask")), None)
        if failing:  # reask cannot happen mid-stream: treated as a retraction
            out += self._retract(index, c, failing)
        c.finished = True
        self._finalize(c)
        return out

    async def _drain(self, index: int, *, final: bool) -> list[Any]:
        c = self._choice(index)
        out: list[Any] = []
        s = self.settings
        while c.buf and not c.retracted:
            limit = s.first_window_max_chars if c.windows == 0 else s.max_window_chars
            n = take_window(c.buf, min_chars=s.min_window_chars, max_chars=limit, final=final)
            if n == 0:
                break
            window, c.buf = c.buf[:n], c.buf[n:]
            out += await self._check(index, c, window)
        return out

    async def _check(self, index: int, c: _Choice, window: str) -> list[Any]:
        safe, results = await self.engine.check_window(
            self.policy, self.context, window, vault=self.vault, released=c.released_model_text, window=c.windows)
        self._account(c, results)
        wnum = c.windows
        c.windows += 1
        blocking = next((r for r in results if r.action == "block"), None)
        if blocking:
            return self._retract(index, c, blocking)
        out: list[Any] = []
        for r in results:
            if r.action == "redact":
                out.append(GuardrailRedaction.of(r, wnum, index))
        c.released_model_text += safe
        text = self.engine.restore_placeholders(self.policy, safe, self.vault, self.context.user)
        if text:
            c.released_chars += len(text)
            self._mark_first_out()
            out.append(TextDelta(text, index))
        return out

    def _retract(self, index: int, c: _Choice, result: ValidatorResult) -> list[Any]:
        c.retracted = True
        c.buf = ""
        message = self.engine.refusal_for(self.policy.name, result.validator)
        self._mark_first_out()
        self._finalize(c)
        return [GuardrailRetraction(result.validator, max(c.windows - 1, 0), result.reason, message,
                                    c.released_chars, index),
                Finished(self.settings.retraction_finish_reason, index)]  # type: ignore[arg-type]

    def _account(self, c: _Choice, results: list[ValidatorResult]) -> None:
        c.results.extend(results)
        self.engine._observe("output", self.policy.name, results, -1, "")
        self.engine.record(self.context.request_id, "output", self.policy.name, results)

    def _finalize(self, c: _Choice) -> None:
        outcome = ("retracted" if c.retracted else
                   "redacted" if any(r.action == "redact" for r in c.results) else "pass")
        self.engine.metrics.decisions.labels("output", self.policy.name, outcome).inc()

    def _mark_first_out(self) -> None:
        if self.added_ttft_s is None and self._first_in is not None:
            self.added_ttft_s = time.perf_counter() - self._first_in
            self.engine.metrics.stream_added_ttft.observe(self.added_ttft_s)

    async def wrap(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Guard a ChatService/LLM event stream: TextDelta is validated, Finished flushes the choice,
        everything else (Started, Usage) passes through. After a retraction of every open choice the
        upstream stream is closed (generation stops); its Usage is then not reported."""
        try:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    for out in await self.feed(ev):
                        yield out
                elif isinstance(ev, Finished):
                    c = self._choice(ev.index)
                    if c.retracted:
                        continue
                    for out in await self.finish(ev.index):
                        yield out
                    if not c.retracted:
                        yield ev
                elif isinstance(ev, Usage):
                    yield ev
                else:
                    yield ev
                if self._choices and all(ch.retracted for ch in self._choices.values()):
                    break
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
