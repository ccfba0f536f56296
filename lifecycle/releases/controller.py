"""What a release should do next, decided from its numbers: small pure functions, testable without a server.

A canary works like an Argo Rollouts analysis run, judged by statistics that are safe to peek at: every metric
of the canary is compared with the baseline's (:func:`lifecycle.releases.stats.compare`, an always-valid
confidence sequence): any metric significantly *worse* rolls back at once, whatever the step; once the step
has run its window (``min_requests`` canary requests and ``min_duration_s``), it advances when every required
metric is shown to be at most its margin worse, holds while that is not yet clear, and rolls back when it is
still unclear after ``max_duration_s`` (an undecided canary is not a passing one). Each metric is judged at
:func:`metric_alpha`, so that however many metrics a step judges, ``spec.alpha`` bounds its false rollbacks (a
metric wrongly shown worse) and its false advances (tests/unit/test_release_stats_sim.py measures both by
simulation); a good canary still undecided at ``max_duration_s`` is rolled back all the same, which no alpha
bounds: give a step enough traffic within its time. An A/B test is stopped by
a sample-ratio mismatch (assignment is broken, so no comparison can be trusted); its winner is a person's call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lifecycle.releases.spec import MetricName, ReleaseSpec
from lifecycle.releases.stats import Comparison, Sample, SrmResult, compare, srm
from lifecycle.releases.store import Release, VariantTotals

Action = Literal["advance", "promote", "rollback", "hold", "stop"]

# name -> (kind, higher is better)
METRICS: dict[MetricName, tuple[Literal["binary", "continuous"], bool]] = {
    "errors": ("binary", False),
    "guardrail_blocks": ("binary", False),
    "guardrail_redactions": ("binary", False),
    "negative_feedback": ("binary", False),
    "latency_ms": ("continuous", False),
    "ttft_ms": ("continuous", False),
    "judge_score": ("continuous", True),
}
#: How a canary with manual promotion says its analysis passed (the release's note starts with it).
READY = "ready to promote: "
MIN_N = 10  # per arm, before a comparison says anything
BOUNDED = frozenset({"judge_score"})  # continuous metrics in [0, 1]


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str


def metric_alpha(spec: ReleaseSpec) -> float:
    """The level of each metric's two-sided sequence, so that ``spec.alpha`` bounds a step's decisions.

    "fail" and "pass" each use one side of a metric's sequence (error at most half its level), and a step rolls
    back when *any* metric fails: with k metrics, a false rollback is the union of k one-sided errors. Bonferroni:
    at a per-metric level of min(alpha, 2 alpha / k), the k fail sides together stay within alpha (one or two
    metrics keep the full alpha: k * alpha / 2 <= alpha already), and so does a false advance, which needs a metric
    that is truly worse than its margin to pass. Three metrics (the default) get 0.0333 each at alpha 0.05.
    """
    return min(spec.alpha, 2.0 * spec.alpha / max(1, len(spec.metrics)))


def comparisons(spec: ReleaseSpec, totals: dict[str, VariantTotals], control: str,
                treatment: str) -> dict[str, Comparison]:
    """Each metric of ``treatment`` against ``control`` (every metric the spec names), at metric_alpha(spec)."""
    out: dict[str, Comparison] = {}
    alpha = metric_alpha(spec)
    for m in spec.metrics:
        kind, higher = METRICS[m.name]
        out[m.name] = compare(_sample(totals, control, m.name), _sample(totals, treatment, m.name), kind=kind,
                              alpha=alpha, higher_is_better=higher, margin=m.margin, min_n=MIN_N,
                              metric=m.name)
    return out


def _sample(totals: dict[str, VariantTotals], variant: str, metric: str) -> Sample:
    t = totals.get(variant)
    if t is None:
        return Sample(0, 0.0, 0.0)
    m = t.metrics[metric]
    if metric in BOUNDED and m.n:
        # Scores in [0, 1] that all agree (every answer judged 1.0) have no variance, and a confidence sequence
        # of width 0 would let the first few answers decide: one pseudo-observation at each end (as the
        # binary metrics' Laplace smoothing does) keeps it honest.
        return Sample(m.n + 2, m.total + 1.0, m.total_sq + 1.0)
    return Sample(m.n, m.total, m.total_sq)


def judge_canary(release: Release, totals: dict[str, VariantTotals], now: float) -> Verdict:
    spec = release.spec
    cand = spec.candidate
    compared = comparisons(spec, totals, spec.baseline, cand)
    failed = [c for name, c in compared.items() if c.state == "fail"]
    if failed:
        return Verdict("rollback", "; ".join(c.reason for c in failed))
    if release.status != "running":
        return Verdict("hold", f"{release.status}: traffic stays at this step until resumed")
    window = spec.canary
    steps = window.steps
    seen = totals[cand].since_step if cand in totals else 0
    elapsed = now - release.step_started_at
    share = steps[release.step]
    if seen < window.min_requests or elapsed < window.min_duration_s:
        return Verdict("hold", f"step {release.step + 1}/{len(steps)} at {share:g}%: collecting data "
                               f"({seen}/{window.min_requests} canary requests, {elapsed:.0f}/"
                               f"{window.min_duration_s:g} s)")
    required = [m for m in spec.metrics if m.required]
    pending = [compared[m.name] for m in required if compared[m.name].state != "pass"]
    if not pending:
        passed = ", ".join(f"{m.name} within {m.margin:g}" for m in required) or "no metric failed"
        nxt = release.step + 1
        if nxt >= len(steps) - 1:
            if window.promotion == "manual":
                return Verdict("hold", f"{READY}step {release.step + 1}/{len(steps)} at {share:g}% passed ({passed}); "
                                       "a person promotes to 100%")
            return Verdict("promote", f"step {release.step + 1}/{len(steps)} at {share:g}% passed ({passed}); "
                                      "promoted to 100%")
        return Verdict("advance", f"step {release.step + 1}/{len(steps)} at {share:g}% passed ({passed}); "
                                  f"advancing to {steps[nxt]:g}%")
    unclear = "; ".join(f"{c.reason}" for c in pending)
    if elapsed >= window.max_duration_s:
        return Verdict("rollback", f"still inconclusive after {elapsed:.0f} s at {share:g}% "
                                   f"(max_duration_s {window.max_duration_s:g}): {unclear}")
    return Verdict("hold", f"step {release.step + 1}/{len(steps)} at {share:g}%: inconclusive so far: {unclear}")


def is_ready(release: Release) -> bool:
    """A manual-promotion canary whose analysis passed, holding for a person."""
    return release.status == "running" and (release.note or "").startswith(READY)


def judge_ab(release: Release, totals: dict[str, VariantTotals]) -> Verdict:
    """A/B: stop on a sample-ratio mismatch; otherwise it runs until a person decides."""
    check = sample_ratio(release, totals)
    if check is not None and check.mismatch:
        return Verdict("stop", f"sample ratio mismatch: {check.reason}; assignment is broken, so no comparison "
                               "can be trusted: all traffic back on the baseline")
    return Verdict("hold", "running; promote a variant when its numbers convince you")


def sample_ratio(release: Release, totals: dict[str, VariantTotals]) -> SrmResult | None:
    """Units per variant against the weights (None before any traffic, or for a one-variant split)."""
    order = [v.name for v in release.spec.variants]
    weights = [release.weights.get(v, 0.0) for v in order]
    if sum(1 for w in weights if w > 0) < 2:
        return None
    counts = [totals[v].units if v in totals else 0 for v in order]
    if sum(counts) == 0:
        return None
    return srm(counts, weights, alpha=release.spec.srm_alpha)


def weights_at(spec: ReleaseSpec, step: int) -> dict[str, float]:
    share = spec.canary.steps[step]
    return {spec.baseline: 100 - share, spec.candidate: share}
