"""The eval harness's metrics on live traffic: a score for an answer a user just got, off the request path.

A release may judge a sampled share of its answers with the same metric functions its offline suites use, so
"the canary's answers are less relevant" is measured in production with the definition CI gates on. Only
metrics that need nothing but the question, the answer and (for grounded answers) the passages can run here;
those that compare with a reference answer belong in a suite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from evals.cases import Case
from evals.metrics import MetricEnv, Sample, compute, registry
from evals.runner import judge_api_key, judge_backend, judge_endpoint
from evals.settings import EvalConfig

#: Metrics that judge an answer on its own (no reference, no expected sources).
ONLINE = frozenset({"answer_relevancy", "faithfulness", "no_toxicity", "no_pii_leak", "no_system_prompt_leak",
                    "not_truncated", "distinct_ngrams", "on_topic"})


def check_online(metric: str) -> None:
    """ValueError naming what to use instead, for a metric that cannot score live answers."""
    if metric not in registry:
        raise ValueError(f"unknown metric {metric!r}; online metrics: {', '.join(sorted(ONLINE))}")
    if metric not in ONLINE:
        raise ValueError(f"metric {metric!r} needs a reference answer or expected sources, which live traffic "
                         f"does not have; online metrics: {', '.join(sorted(ONLINE))}")


class OnlineJudge:
    """``await judge.score(metric, question, answer)``: the metric's value (0..1 for these), or None when the
    judge could not score it (its errors are counted by the judge client's metrics, never raised to users)."""

    def __init__(self, env: MetricEnv) -> None:
        self.env = env

    @classmethod
    def from_config(cls, config: EvalConfig, *, embedder: Any = None, metrics: Any = None) -> OnlineJudge:
        cfg = config.evals
        base_url, model = judge_endpoint(config)
        return cls(MetricEnv(embedder=embedder, embedding_model=cfg.embedding_model, judge_base_url=base_url,
                             judge_model=model, judge_api_key=judge_api_key(config, base_url),
                             judge_temperature=cfg.judge_temperature, judge_max_tokens=cfg.judge_max_tokens,
                             judge_frequency_penalty=cfg.judge_frequency_penalty,
                             judge_timeout_s=cfg.judge_timeout_s, judge_retries=cfg.judge_retries,
                             judge_backend=judge_backend(config), metrics=metrics))

    def check(self, metric: str) -> None:
        check_online(metric)
        if registry[metric].judged and not self.env.has_judge:
            raise ValueError(f"metric {metric!r} is LLM-judged and this server has no judge: set evals.judge_model "
                             "(and evals.judge_base_url for a remote one)")

    async def score(self, metric: str, question: str, answer: str, *, contexts: Sequence[str] = (),
                    params: dict[str, Any] | None = None, finish_reason: str | None = None,
                    system_prompt: str | None = None) -> float | None:
        check_online(metric)
        sample = Sample(Case(id="online", input=question), answer, contexts=list(contexts),
                        finish_reason=finish_reason, system_prompt=system_prompt, env=self.env)
        result = await compute(registry[metric], sample, dict(params or {}))
        return None if math.isnan(result.value) else float(result.value)
