"""Streaming output guard: show the model's text as soon as it is safe, judge it as it comes.

Each output entry of the policy runs at one of three points:

* **before release**: the cheap text checks (``keel/pii``, ``keel/secrets``, ``keel/toxicity``,
  ``keel/system_prompt_leakage``) and any ``redact`` entry check every piece of text before the client
  sees it, with the text shown before it as context (toxicity: the sentence so far; a private key's body:
  its header). A piece ends at a word the model has finished (whitespace after it), before a run of
  digit-bearing words (a phone, card or IBAN written in groups) and a placeholder being written, and, where
  names are personal data, before capitalised words that may begin a name; a name (two capitalised words,
  with initials or particles between) waits for the end of its sentence, where its owner's contact details
  would be (as the sentence windows did: a name whose e-mail comes in a later sentence is shown, the
  e-mail masked; the non-streaming check reads the whole answer and masks both). So a stream lags the
  model by about one word, and what these entries mask is never shown. A piece they refuse holds the rest
  of its sentence until the sentence is whole ("You can kill the" ... "process" passes); if the whole
  sentence fails, what was shown of it is retracted, without the words that failed. Leakage judges
  everything shown so far, so a verbatim run of the system prompt is refused at its eighth word, after
  seven were shown: a retraction.
* **after release**: the model-backed judges (topics, prompt injection, per-sentence groundedness) judge
  each sentence window once it is shown (``release: after``, the default); a failure ends that choice
  with a :class:`GuardrailRetraction` (the client withdraws what it showed and displays the refusal) and
  ``Finished(reason=content_filter)``, counted in ``keel_guardrail_stream_retractions_total``. A policy
  with a judge marked ``release: before`` streams window by window instead: nothing is shown before its
  window has passed every entry (added time to first token: one sentence + one check).
* A policy with ``streaming: windows`` holds every window until all its entries passed (the old way).
* **at the end** (JSON schema, groundedness over the share of the answer): on the whole answer; a failure
  retracts.

Measured in bench/serving.py (guarded vs unguarded through Keel, and straight to vLLM).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from app.core.types import Finished, TextDelta, Usage
from app.guardrails.metrics import GuardrailMetrics
from app.guardrails.policy import ResolvedPolicy, before_release, holds_windows, needs_whole_output
from app.guardrails.settings import StreamingSettings
from app.guardrails.types import GuardContext, GuardrailRedaction, GuardrailRetraction, ValidatorResult
from app.guardrails.validators.pii import (
    ALL_ENTITIES,
    CAPITALISED,
    NAME_CANDIDATE,
    PARTICLE,
    PARTICLES,
    PiiVault,
)

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


# a word that may be one group of a value written in groups: digits, "+1", "(555)", an IBAN's "NWBK"
_GROUP = re.compile(r"\d|^[+(]|^[A-Z0-9]{4}[.,;:]?$")
_CAPITALISED = re.compile(CAPITALISED)
_PARTICLE = re.compile(PARTICLE)
# a placeholder being written in two words ("[EMAIL 1]"): restored only once whole
_OPENING = re.compile(r"^[<\[][A-Za-z_]*$")
_CONTEXT = 400  # characters of shown text the redactors see before a piece (pii's reach is 160)


def hold_point(buf: str, *, start: int = 0, names: bool = False) -> int:
    """How much of ``buf`` the redactors can judge now, i.e. what more text cannot turn into part of a
    value they mask (``start``: what is already shown; the result is never below it). Always a word start."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", buf)]
    p, writing = len(buf), ""
    if words and words[-1][1] == len(buf):
        p = words.pop()[0]  # the model is still writing this word
        writing = buf[p:]
    # a word that starts in lower case ends a run of number groups or of capitalised words ("Paris is")
    lower = writing[:1].islower()
    while not lower and words and (_GROUP.search(buf[words[-1][0]:words[-1][1]])
                                   or _OPENING.match(buf[words[-1][0]:words[-1][1]])):
        p = words.pop()[0]
    if names:
        if not lower or any(part.startswith(writing) for part in PARTICLES):  # "Vincent v...": van Gogh?
            # the capitalised words (and particles between them) at the end may be a name's beginning
            run = len(words)
            while run and (_CAPITALISED.match(buf, words[run - 1][0])
                           or _PARTICLE.fullmatch(buf, *words[run - 1])):
                run -= 1
            while run < len(words) and not _CAPITALISED.match(buf, words[run][0]):
                run += 1  # "drove the van": a particle starts no name
            if run < len(words):
                p = words[run][0]
        m = next((m for m in NAME_CANDIDATE.finditer(buf) if m.end() > start), None)
        if m is not None and m.start() < p:
            p = next((a for a, b in reversed(words) if a <= m.start()), 0)  # the word the name begins in
    return max(p, start)


def _context(shown: str) -> str:
    """What the redactors see of the text shown so far: its last ``_CONTEXT`` characters, or from the
    header of a private key block still open (its body is a key only with it), up to 16k characters."""
    begin = shown.rfind("-----BEGIN ", max(0, len(shown) - 16_000))
    if begin >= 0 and "-----END " not in shown[begin:]:
        return shown[min(begin, max(0, len(shown) - _CONTEXT)):]
    return shown[-_CONTEXT:]


@dataclass
class _Choice:
    buf: str = ""                    # model text of the open window (shown or not)
    shown: int = 0                   # how much of buf the client has seen (progressive release)
    before_window: int = 0           # len(released_model_text) when the open window began
    context: str = ""                # model text shown before the open window (the redactors' context)
    released_model_text: str = ""    # validated model text (before placeholder restoration)
    released_chars: int = 0          # chars the client has seen
    windows: int = 0
    retracted: bool = False
    finished: bool = False
    results: list[ValidatorResult] = field(default_factory=list)
    pending: list[ValidatorResult] = field(default_factory=list)  # the open window's piece-by-piece checks
    holding: bool = False            # a check refused part of the open window: nothing more until it is whole


class WindowEngine(Protocol):
    """What a stream's guard uses of the engine that made it (``GuardrailEngine``): checking a window,
    restoring placeholders, refusal texts, and recording the outcome."""

    metrics: GuardrailMetrics

    async def check_window(self, policy: ResolvedPolicy, context: GuardContext, text: str, *, vault: PiiVault,
                           released: str = "", window: int | None = None, whole: bool = False,
                           part: Literal["all", "before", "after"] = "all", prefix: str = "",
                           sentence: str = "") -> tuple[str, list[ValidatorResult]]: ...

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
        streamed = [spec for spec in policy.output if not needs_whole_output(spec)]
        # window by window when the policy asks for it or a judge must pass before its text is shown
        self.progressive = policy.streaming == "progressive" and not any(holds_windows(s) for s in streamed)
        self._pieces = any(before_release(spec) for spec in streamed)
        self._judges = any(not before_release(spec) for spec in streamed)
        self._names = any(spec.validator == "keel/pii" and spec.params.get("persons", "all") != "none"
                          and "PERSON" in spec.params.get("entities", ALL_ENTITIES) for spec in streamed)
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
            if not self.progressive:
                if n == 0:
                    break
                window, c.buf = c.buf[:n], c.buf[n:]
                out += await self._check(index, c, window)
                continue
            if n == 0:
                if not c.holding:  # a check failed on the unfinished sentence: it waits for the whole one
                    p = hold_point(c.buf, start=c.shown, names=self._names) if self._pieces else len(c.buf)
                    if p > c.shown:
                        out += await self._release(index, c, p)
                break
            # a window is complete: show the rest of it, except what may still grow into a value (a number in
            # groups, a word cut by the length limit: it opens the next window), then judge it whole. At the
            # end nothing grows any more (and the length limit does not cut: take_window)
            if self._pieces and not final:
                n = min(n, hold_point(c.buf[:n], start=c.shown))
                if n == 0:
                    break
            out += await self._release(index, c, n, closing=True)
            if c.retracted:
                break
            out += await self._judge(index, c)
            c.context = _context(c.context + c.buf[:n])
            c.buf = c.buf[n:]
            c.shown, c.before_window, c.holding = 0, len(c.released_model_text), False
            c.windows += 1
        return out

    async def _release(self, index: int, c: _Choice, upto: int, *, closing: bool = False) -> list[Any]:
        """Show ``c.buf[c.shown:upto]`` once the entries that run before release have passed it. A check that
        refuses a piece of an unfinished sentence holds the sentence (it may read differently whole: "You can
        kill the" ... "process"); ``closing``: the sentence is whole, a refusal retracts."""
        piece = c.buf[c.shown:upto]
        out: list[Any] = []
        safe = piece
        if self._pieces and piece:
            safe, results = await self.engine.check_window(
                self.policy, self.context, piece, vault=self.vault, released=c.released_model_text,
                window=c.windows, part="before", prefix=_context(c.context + c.buf[:c.shown]),
                sentence=c.released_model_text[c.before_window:])
            blocking = next((r for r in results if r.action == "block"), None)
            # a name that began in text already shown cannot be masked any more: withdraw the answer
            blocking = blocking or next((r for r in results if "PERSON" in r.details.get("began_in_prefix", ())),
                                        None)
            if blocking and not closing:
                c.holding = True
                return []
            c.pending.extend(results)
            if blocking:
                self._account(c, _per_entry(c.pending))
                c.pending = []
                return self._retract(index, c, blocking)
            out += [GuardrailRedaction.of(r, c.windows, index) for r in results if r.action == "redact"]
        c.shown = upto
        return out + self._show(index, c, safe)

    def _show(self, index: int, c: _Choice, safe: str) -> list[Any]:
        """Release checked model text: the user's own masked values come back in it."""
        c.released_model_text += safe
        text = self.engine.restore_placeholders(self.policy, safe, self.vault, self.context.user)
        if not text:
            return []
        c.released_chars += len(text)
        self._mark_first_out()
        return [TextDelta(text, index)]

    async def _judge(self, index: int, c: _Choice) -> list[Any]:
        """The judges over the window just shown (the pieces' checks are accounted once per window)."""
        results = _per_entry(c.pending)
        c.pending = []
        if self._judges:
            shown = c.released_model_text[c.before_window:]
            _, judged = await self.engine.check_window(
                self.policy, self.context, shown, vault=self.vault, released=c.released_model_text[:c.before_window],
                window=c.windows, part="after")
            results += judged
        self._account(c, results)
        blocking = next((r for r in results if r.action == "block"), None)
        return self._retract(index, c, blocking) if blocking else []

    async def _check(self, index: int, c: _Choice, window: str) -> list[Any]:
        safe, results = await self.engine.check_window(
            self.policy, self.context, window, vault=self.vault, released=c.released_model_text, window=c.windows)
        self._account(c, results)
        wnum = c.windows
        c.windows += 1
        blocking = next((r for r in results if r.action == "block"), None)
        if blocking:
            return self._retract(index, c, blocking)
        redactions: list[Any] = [GuardrailRedaction.of(r, wnum, index) for r in results if r.action == "redact"]
        return redactions + self._show(index, c, safe)

    def _retract(self, index: int, c: _Choice, result: ValidatorResult) -> list[Any]:
        c.retracted = True
        c.buf = ""
        if c.released_chars:  # the user saw text that is now withdrawn: the cost of showing it early
            self.engine.metrics.stream_retractions.labels(self.policy.name, result.validator).inc()
        message = self.engine.refusal_for(self.policy.name, result.validator)
        self._mark_first_out()
        self._finalize(c)
        return [GuardrailRetraction(result.validator, result.window if result.window is not None else c.windows,
                                    result.reason, message,
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
            for c in self._choices.values():  # a stream cut short: what was checked is still accounted
                if c.pending:
                    self._account(c, _per_entry(c.pending))
                    c.pending = []
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def _per_entry(results: list[ValidatorResult]) -> list[ValidatorResult]:
    """A window's piece-by-piece results as one per policy entry (the audit trail and the metrics count
    windows, not words): its failures merged (worst score, every kind counted), else one pass; the pieces'
    time summed."""
    out: list[ValidatorResult] = []
    for label in dict.fromkeys(r.validator for r in results):
        mine = [r for r in results if r.validator == label]
        failed = [r for r in mine if r.verdict != "pass"] or mine
        worst = max(failed, key=lambda r: r.score)
        counts: dict[str, int] = {}
        for r in failed:
            for kind, n in (r.details.get("counts") or {}).items():
                counts[kind] = counts.get(kind, 0) + n
        kinds = sorted({k for r in failed for k in r.details.get("kinds", ())} | set(counts))
        details = {**worst.details, **({"counts": counts} if counts else {}), **({"kinds": kinds} if kinds else {})}
        out.append(replace(worst, latency_ms=sum(r.latency_ms for r in mine), details=details))
    return out
