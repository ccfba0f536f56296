"""The guardrails-ai face of Keel's checks: ``@register_validator(name="keel/...")`` classes.

Each validator takes its static configuration (thresholds, entity lists) as constructor arguments, its
loaded resources (embedding index, NER model, classifier) as attributes, and its per-request context from
the Guard call's ``metadata``:

* ``vault`` (PiiVault) for ``keel/pii`` placeholders, ``system_prompt`` for leakage, ``passages`` for
  groundedness, ``schema`` for JSON, ``secret_values`` for configured secrets;
* ``_keel_sink`` (a list): the validator appends a :class:`SinkEntry` there (its label, full
  :class:`CheckResult`, own latency, the value it saw, or the error it raised), so the engine gets scores
  and findings per validator without reading the Guard's shared history (not safe under concurrency).

A failed check returns ``FailResult(fix_value=<redacted text>)`` when it can repair, so ``on_fail=fix``
yields the redacted text as the Guard's validated output; several fixers in one Guard form a chain, each
seeing the previous one's output. Results carry the call's metadata forward, because guardrails-ai hands
a validator's result metadata to the next validator of the same Guard. A check that raises is recorded in
the sink and passes inside the Guard: the engine applies ``guardrails.on_error`` to it, and the other
validators of the Guard still run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from guardrails.classes.validation.validation_result import ErrorSpan, FailResult, PassResult, ValidationResult
from guardrails.validator_base import Validator, register_validator

from app.guardrails.validators.base import CheckResult
from app.guardrails.validators.groundedness import check_groundedness
from app.guardrails.validators.harmful import (
    CATEGORIES,
    HarmfulClassifier,
    HarmScorer,
    check_harmful,
    embed_chunks,
)
from app.guardrails.validators.injection import AttackIndex, detect_injection
from app.guardrails.validators.injection_model import InjectionClassifier
from app.guardrails.validators.json_schema import check_json_schema
from app.guardrails.validators.leakage import check_secrets, check_system_prompt_leakage
from app.guardrails.validators.pii import ALL_ENTITIES, NameDetector, check_pii
from app.guardrails.validators.topics import TopicIndex, check_topics
from app.guardrails.validators.toxicity import ProfanityClassifier, check_toxicity

log = logging.getLogger("keel.guardrails")


@dataclass(frozen=True, slots=True)
class SinkEntry:
    label: str
    result: CheckResult | None  # None when the check raised
    latency_ms: float
    value: str                  # what this validator saw (in a chain: the previous fixer's output)
    error: str = ""


def _to_result(res: CheckResult, value: str, metadata: dict[str, Any]) -> ValidationResult:
    meta = {**metadata, "score": res.score}
    if res.passed:
        return PassResult(metadata=meta)
    spans = [ErrorSpan(start=f.start, end=f.end, reason=f.kind) for f in res.findings if 0 <= f.start < f.end]
    # a failing check without a repair keeps the value: on_fail=fix must never hand None to the next fixer
    kwargs: dict[str, Any] = {"error_message": res.reason or "validation failed", "metadata": meta,
                              "fix_value": res.fixed if res.fixed is not None else value}
    if spans:
        kwargs["error_spans"] = spans
    return FailResult(**kwargs)


class _KeelValidator(Validator):
    """Shared plumbing: subclasses implement ``check(value, metadata) -> CheckResult``.

    ``keel_label`` names the policy entry in sink entries (the engine sets it; defaults to the registered name).
    """

    keel_label: str = ""
    # True for checks that spend their time in an embedding forward pass (native code, GIL released): the
    # engine runs them together in one Guard, beside the Guard of the pure-Python checks (engine docstring).
    model_backed: bool = False

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def _validate(self, value: Any, metadata: dict[str, Any]) -> ValidationResult:
        if self.keel_label in metadata.get("_keel_skip", ()):
            # not this entry's text (a fused Guard runs e.g. toxicity on the last user turn only)
            return PassResult(metadata=dict(metadata))
        text = str(value)
        sink = metadata.get("_keel_sink")
        t0 = time.perf_counter()
        try:
            res = self.check(text, metadata)
        except Exception as e:  # a validator bug must not take the request, or the rest of its Guard, down
            log.exception("guardrail validator %s failed", self.keel_label or self.rail_alias)
            if sink is None:
                raise
            sink.append(SinkEntry(self.keel_label or self.rail_alias, None, (time.perf_counter() - t0) * 1000,
                                  text, f"{type(e).__name__}: {e}"))
            return PassResult(metadata=dict(metadata))
        if sink is not None:
            sink.append(SinkEntry(self.keel_label or self.rail_alias, res, (time.perf_counter() - t0) * 1000, text))
        return _to_result(res, text, metadata)


@register_validator(name="keel/prompt_injection", data_type="string")
class PromptInjection(_KeelValidator):
    model_backed = True

    def __init__(self, threshold: float = 0.5, sim_floor: float = 0.55, sim_ceiling: float = 0.75,
                 index: AttackIndex | None = None, classifier: InjectionClassifier | None = None,
                 clf_floor: float = 0.3, clf_ceiling: float = 0.9, on_fail: Any = None, **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, threshold=threshold, sim_floor=sim_floor, sim_ceiling=sim_ceiling,
                         clf_floor=clf_floor, clf_ceiling=clf_ceiling, **kwargs)
        self.threshold, self.sim_floor, self.sim_ceiling, self.index = threshold, sim_floor, sim_ceiling, index
        self.classifier, self.clf_floor, self.clf_ceiling = classifier, clf_floor, clf_ceiling

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        return detect_injection(value, self.index, threshold=self.threshold, sim_floor=self.sim_floor,
                                sim_ceiling=self.sim_ceiling, classifier=self.classifier if self.index else None,
                                clf_floor=self.clf_floor, clf_ceiling=self.clf_ceiling)


@register_validator(name="keel/harmful_request", data_type="string")
class HarmfulRequest(_KeelValidator):
    """Requests for help doing serious harm (app/guardrails/validators/harmful.py); ``categories`` /
    ``exclude`` pick the categories this entry refuses, so one category can have its own refusal."""

    model_backed = True

    def __init__(self, classifier: HarmfulClassifier | None = None, embedder: Any = None, threshold: float = 0.5,
                 categories: list[str] | None = None, exclude: list[str] | None = None, on_fail: Any = None,
                 encoder: HarmScorer | None = None, **kwargs: Any) -> None:
        unknown = (set(categories or ()) | set(exclude or ())) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"keel/harmful_request: unknown categories {sorted(unknown)}; known: {list(CATEGORIES)}")
        super().__init__(on_fail=on_fail, threshold=threshold, categories=categories, exclude=exclude, **kwargs)
        self.classifier, self.embedder, self.threshold, self.encoder = classifier, embedder, threshold, encoder
        self.categories = tuple(categories) if categories is not None else None
        self.exclude = tuple(exclude or ())

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        if self.classifier is None or self.embedder is None:
            raise RuntimeError("keel/harmful_request has no classifier (the engine loads it at warm-up)")
        return check_harmful(value, self.classifier, lambda t: embed_chunks(self.embedder, t),
                             threshold=self.threshold, categories=self.categories, exclude=self.exclude,
                             encoder=self.encoder)


@register_validator(name="keel/pii", data_type="string")
class Pii(_KeelValidator):
    def __init__(self, entities: list[str] | None = None, names: NameDetector | None = None, persons: str = "all",
                 on_fail: Any = None, **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, entities=list(entities or ALL_ENTITIES), persons=persons, **kwargs)
        self.entities, self.names, self.persons = tuple(entities or ALL_ENTITIES), names, persons

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        return check_pii(value, entities=self.entities, names=self.names, vault=metadata.get("vault"),
                         known=metadata.get("known") or (), persons=self.persons,  # type: ignore[arg-type]
                         prefix=metadata.get("prefix", ""))


@register_validator(name="keel/toxicity", data_type="string")
class Toxicity(_KeelValidator):
    def __init__(self, threshold: float = 0.85, classifier: ProfanityClassifier | None = None, on_fail: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, threshold=threshold, **kwargs)
        self.threshold, self.classifier = threshold, classifier

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        # a stream's piece is judged with the sentence it continues ("sentence"; see streaming.py)
        sentence = metadata.get("sentence", "")
        res = check_toxicity(sentence + value, threshold=self.threshold, classifier=self.classifier)
        if sentence and res.fixed is not None:  # masking keeps lengths: the piece's own part
            res = replace(res, fixed=res.fixed[len(sentence):])
        return res


@register_validator(name="keel/topic", data_type="string")
class TopicGuard(_KeelValidator):
    model_backed = True

    def __init__(self, index: TopicIndex, deny_threshold: float = 0.5, allow_threshold: float = 0.3,
                 on_fail: Any = None, **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, deny_threshold=deny_threshold, allow_threshold=allow_threshold, **kwargs)
        self.index, self.deny_threshold, self.allow_threshold = index, deny_threshold, allow_threshold

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        return check_topics(value, self.index, deny_threshold=self.deny_threshold, allow_threshold=self.allow_threshold)


@register_validator(name="keel/groundedness", data_type="string")
class Groundedness(_KeelValidator):
    model_backed = True

    def __init__(self, embedder: Any, threshold: float = 0.55, max_unsupported_ratio: float = 0.0,
                 lexical_threshold: float = 0.75, on_fail: Any = None, **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, threshold=threshold, max_unsupported_ratio=max_unsupported_ratio,
                         lexical_threshold=lexical_threshold, **kwargs)
        self.embedder, self.threshold, self.max_unsupported_ratio = embedder, threshold, max_unsupported_ratio
        self.lexical_threshold = lexical_threshold

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        passages = metadata.get("passages")
        if passages is None:  # no retrieval in this request: nothing to ground against
            return CheckResult(True, details={"skipped": "no passages"})
        return check_groundedness(value, passages, self.embedder, threshold=self.threshold,
                                  max_unsupported_ratio=self.max_unsupported_ratio,
                                  lexical_threshold=self.lexical_threshold, question=metadata.get("question"))


@register_validator(name="keel/json_schema", data_type="string")
class JsonSchema(_KeelValidator):
    def __init__(self, schema: dict[str, Any] | None = None, on_fail: Any = None, **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, **kwargs)
        self.schema = schema

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        schema = metadata.get("schema", self.schema)
        if schema is None and not metadata.get("expect_json"):
            return CheckResult(True, details={"skipped": "no schema"})
        return check_json_schema(value, schema)


@register_validator(name="keel/system_prompt_leakage", data_type="string")
class SystemPromptLeakage(_KeelValidator):
    def __init__(self, n: int = 5, threshold: float = 0.25, min_shared: int = 3, run: int = 8, on_fail: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, n=n, threshold=threshold, min_shared=min_shared, run=run, **kwargs)
        self.n, self.threshold, self.min_shared, self.run = n, threshold, min_shared, run

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        return check_system_prompt_leakage(metadata.get("leak_context", "") + value, metadata.get("system_prompt"),
                                           n=self.n, threshold=self.threshold, min_shared=self.min_shared,
                                           run=self.run, allowed=metadata.get("passages") or ())


@register_validator(name="keel/secrets", data_type="string")
class Secrets(_KeelValidator):
    def __init__(self, on_fail: Any = None, **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, **kwargs)

    def check(self, value: str, metadata: dict[str, Any]) -> CheckResult:
        return check_secrets(value, metadata.get("secret_values", ()), prefix=metadata.get("prefix", ""))


VALIDATOR_CLASSES: dict[str, type[_KeelValidator]] = {
    "keel/prompt_injection": PromptInjection,
    "keel/harmful_request": HarmfulRequest,
    "keel/pii": Pii,
    "keel/toxicity": Toxicity,
    "keel/topic": TopicGuard,
    "keel/groundedness": Groundedness,
    "keel/json_schema": JsonSchema,
    "keel/system_prompt_leakage": SystemPromptLeakage,
    "keel/secrets": Secrets,
}
