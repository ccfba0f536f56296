"""Truncated answers are flagged by a metric of their own (issue 22: RAG answers cut off mid-sentence)."""

from __future__ import annotations

from evals.metrics import Sample, registry
from evals.suite import Case


def test_an_answer_cut_off_at_max_tokens_fails_not_truncated() -> None:
    metric = registry["not_truncated"]
    case = Case(id="c1", input="Tell me about lighthouses.")
    cut = metric.fn(Sample(case=case, output="Lighthouses guide ships and", finish_reason="length",
                           completion_tokens=48), {})
    assert cut.value == 0.0 and "finish_reason: length" in cut.reason and "48 tokens" in cut.reason
    assert metric.fn(Sample(case=case, output="Lighthouses guide ships.", finish_reason="stop"), {}).value == 1.0
    assert metric.threshold == 1.0 and metric.higher_is_better
