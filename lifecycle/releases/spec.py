"""What a release is, as data: an endpoint clients call by name, its variants and how traffic moves between them.

A release spec is versioned data like a prompt or an eval suite: YAML on disk (``keel release create -f``) or JSON
over the API, validated here, hashed, and stored with every decision made about it. Wire and domain are one
model on purpose: the spec *is* the document users write.
"""

from __future__ import annotations

import hashlib
import json
import re
from itertools import pairwise
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Strategy = Literal["ab", "canary", "shadow", "bluegreen"]
Unit = Literal["key", "user", "thread", "request"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must be 1-63 lower-case letters, digits, '.', '_' or '-'")
    return value


class VariantSpec(BaseModel):
    """Everything that decides an answer, bundled: which model, which prompt, which documents, which guards."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The variant's name in this release (e.g. stable, canary, blue, green).")
    model: str | None = Field(default=None, description="Model alias (a base model or a deployed adapter); "
                              "default: the server's default model.")
    prompt: str | None = Field(default=None, description="Prompt template rendered in front of the messages: "
                               "name@version, name@label or name (its latest version).")
    rag: str | None = Field(default=None, description="Answer grounded in this document collection.")
    policy: str | None = Field(default=None, description="Guardrail policy to apply instead of the bound one.")
    workflow: str | None = Field(default=None, description="Agent workflow that answers instead of a model.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "variant name")

    @model_validator(mode="after")
    def _one_answerer(self) -> VariantSpec:
        if self.workflow and (self.rag or self.prompt):
            raise ValueError(f"variant {self.name!r}: an agent workflow renders its own prompts and retrieves "
                             "itself; drop 'prompt' and 'rag' or 'workflow'")
        if self.rag and self.prompt:
            raise ValueError(f"variant {self.name!r}: a grounded answer uses the RAG prompt; drop 'prompt' or 'rag'")
        return self


class CanarySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[float] = Field(default=[5, 25, 50, 100], description="Canary traffic share per step, in percent; "
                               "the last step must be 100 (promotion).")
    min_requests: int = Field(default=50, ge=1, description="Canary requests a step needs before it is judged.")
    min_duration_s: float = Field(default=60, ge=0, description="Time a step runs at least before it is judged.")
    max_duration_s: float = Field(default=1800, gt=0, description="A step still inconclusive after this long "
                                  "rolls back (an undecided canary is not a passing one).")
    promotion: Literal["auto", "manual"] = Field(
        default="auto", description="auto: the last step that passes promotes to 100%. manual: it holds there, "
        "ready, until a person (or a pipeline's approval) promotes; a metric that turns worse still rolls back.")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if not v or v[-1] != 100:
            raise ValueError("canary steps must end at 100 (the step that promotes)")
        if any(not 0 < s <= 100 for s in v) or any(b <= a for a, b in pairwise(v)):
            raise ValueError(f"canary steps must increase strictly within (0, 100]; got {v}")
        return v

    @model_validator(mode="after")
    def _window(self) -> CanarySpec:
        if self.max_duration_s < self.min_duration_s:
            raise ValueError("canary.max_duration_s must be at least canary.min_duration_s")
        return self


class ShadowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample: float = Field(default=1.0, gt=0, le=1, description="Share of requests also sent to the shadow.")
    concurrency: int = Field(default=2, ge=1, le=64, description="Shadow requests running at once.")
    queue: int = Field(default=64, ge=1, le=10_000, description="Shadow requests waiting; beyond it they are "
                       "dropped (counted), never making the primary wait.")
    timeout_s: float = Field(default=120, gt=0, description="A shadow answer that takes longer is recorded as "
                             "timed out.")


class JudgeSpec(BaseModel):
    """An online judge: the eval harness's metric scores a sampled share of every variant's answers, off the
    request path (``judge_score`` among the metrics makes it part of the canary's analysis)."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="An eval metric that needs no reference, e.g. answer_relevancy (LLM-judged), "
                        "faithfulness (grounded answers), no_toxicity, no_pii_leak.")
    sample: float = Field(default=0.1, gt=0, le=1, description="Share of answers judged.")
    params: dict[str, Any] = Field(default_factory=dict, description="The metric's parameters.")
    concurrency: int = Field(default=1, ge=1, le=16, description="Judge calls running at once.")
    queue: int = Field(default=64, ge=1, le=10_000, description="Answers waiting to be judged; beyond it they "
                       "are skipped (counted), never making a request wait.")


MetricName = Literal["errors", "guardrail_blocks", "guardrail_redactions", "negative_feedback", "latency_ms",
                     "ttft_ms", "judge_score"]


class MetricSpec(BaseModel):
    """One signal a canary is judged on: it fails when significantly worse than the baseline, passes when it is
    shown to be at most ``margin`` worse (absolute: a rate for rates, milliseconds for latencies)."""

    model_config = ConfigDict(extra="forbid")

    name: MetricName
    margin: float = Field(ge=0)
    required: bool = Field(default=True, description="A step passes only once this metric has enough data; an "
                           "optional metric (sparse feedback) only ever fails a step.")


def default_metrics() -> list[MetricSpec]:
    return [MetricSpec(name="errors", margin=0.02), MetricSpec(name="guardrail_blocks", margin=0.05),
            MetricSpec(name="negative_feedback", margin=0.1, required=False)]


class ReleaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The endpoint: clients send it as `model`.")
    strategy: Strategy
    variants: list[VariantSpec] = Field(min_length=2)
    baseline: str | None = Field(default=None, description="The variant serving today (stable, blue); default: "
                                 "the first. A canary, shadow or green is the other one.")
    unit: Unit = Field(default="key", description="What assignment sticks to: the API key, the request's `user` "
                       "field, its X-Keel-Thread header, or each request on its own.")
    weights: dict[str, float] | None = Field(default=None, description="A/B: percent of traffic per variant, "
                                             "adding up to 100; default: equal.")
    canary: CanarySpec = Field(default_factory=CanarySpec)
    shadow: ShadowSpec = Field(default_factory=ShadowSpec)
    metrics: list[MetricSpec] = Field(default_factory=default_metrics)
    judge: JudgeSpec | None = Field(default=None, description="Score a share of the answers with an eval metric.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Error rate of every decision, valid at any peek.")
    srm_alpha: float = Field(default=0.001, gt=0, lt=0.5, description="Sample-ratio-mismatch test level (A/B).")
    probes: list[str] = Field(default_factory=lambda: ["Hello! Reply with one short sentence."],
                              description="Blue/green: questions the green bundle must answer before the switch.")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "release name")

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique; got {names}")
        if self.baseline is None:
            self.baseline = names[0]
        elif self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a variant ({', '.join(names)})")
        if self.strategy != "ab" and len(names) != 2:
            raise ValueError(f"a {self.strategy} release has exactly two variants (the baseline and the new one)")
        if self.weights is not None:
            if self.strategy != "ab":
                raise ValueError("weights are for A/B releases; a canary follows canary.steps")
            if set(self.weights) != set(names):
                raise ValueError(f"weights must name every variant exactly ({', '.join(names)}); got "
                                 f"{', '.join(self.weights) or 'none'}")
            if any(w < 0 for w in self.weights.values()) or abs(sum(self.weights.values()) - 100) > 1e-6:
                raise ValueError(f"weights must be non-negative percentages adding up to 100; they add up to "
                                 f"{sum(self.weights.values()):g}")
        if len({m.name for m in self.metrics}) != len(self.metrics):
            raise ValueError("each metric may be listed once")
        if any(m.name == "judge_score" for m in self.metrics) and self.judge is None:
            raise ValueError("metric judge_score needs a judge: add judge: {metric: ..., sample: ...}")
        if self.strategy == "bluegreen" and not self.probes:
            raise ValueError("a blue/green release needs at least one probe question for the readiness check")
        return self

    @property
    def candidate(self) -> str:
        """The variant being released (canary, shadow, green); for A/B the first non-baseline one."""
        return next(v.name for v in self.variants if v.name != self.baseline)

    @property
    def candidate_spec(self) -> VariantSpec:
        return self.variant(self.candidate)

    def variant(self, name: str) -> VariantSpec:
        return next(v for v in self.variants if v.name == name)

    def initial_weights(self) -> dict[str, float]:
        """Traffic when the release starts: A/B as asked (equal by default), a canary at its first step, a shadow
        and a blue/green release all on the baseline."""
        if self.strategy == "ab":
            return dict(self.weights) if self.weights else {v.name: 100 / len(self.variants) for v in self.variants}
        if self.strategy == "canary":
            return {self.baseline: 100 - self.canary.steps[0], self.candidate: self.canary.steps[0]}
        return {self.baseline: 100.0, self.candidate: 0.0}

    def content_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
