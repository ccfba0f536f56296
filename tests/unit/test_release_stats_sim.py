"""Release statistics at the splits a canary really runs: a 5% and a 25% canary, peeked after every request.

tests/unit/test_release_stats.py checks the sequences on 50/50 arms looked at every 10 requests per arm. A canary
is lopsided (the default steps are 5% -> 25% -> 50%) and the controller judges it every second, so here the small
arm has 10 to a few hundred observations while the baseline has twenty times more, and every request is a look
(time-uniform sequences: more looks can only make it harder). Measured, on seeded numpy simulations run through
lifecycle.releases.stats.decide (compare()'s decision for a whole path at once; the last test checks they agree):

- the A/A false-fail rate of one metric, binary and continuous, against the level compare() states: one side of
  a two-sided (1 - alpha) sequence, alpha / 2;
- the false-pass rate (the canary is worse by exactly its margin, the hardest case, and a look says "within the
  margin"), against the same alpha / 2;
- the family-wise false-rollback rate of a default canary step (errors, guardrail_blocks and negative_feedback
  judged together, any "fail" rolls back) at the controller's per-metric level, against the spec's alpha;
- power: known regressions are caught at small canary sizes.

Before the null-variance floors in stats._null_variances (and the controller's split of alpha over a step's
metrics), the small arm's own variance let these very runs say "fail" for identical arms in 7.8% (a rate of 0.9)
and 19.4% (a right-skewed metric where higher is better) of 5% canaries, "pass" for a canary at its margin in 7.8%
(error rate 0.02 -> 0.04), 9.4% (blocks 0.05 -> 0.10) and 24% (lognormal latency) of them, and roll back 7.0% of
A/A canaries going through the steps at rates near 0.5; each of those fails below. A rate is allowed the
Monte-Carlo noise of a test whose true rate *is* the level: ``_tolerated(runs, level)`` is the 99.9% quantile of
Binomial(runs, level).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from lifecycle.releases import controller
from lifecycle.releases.spec import ReleaseSpec
from lifecycle.releases.stats import STATES, Sample, compare, decide

ALPHA = 0.05
FAIL, PASS = STATES.index("fail"), STATES.index("pass")
CHUNK = 250  # simulated canaries per numpy batch (memory: a few arrays of CHUNK x requests floats)


def _tolerated(runs: int, level: float) -> int:
    return int(binom.ppf(0.999, runs, level))


def _bernoulli(p: float):
    return lambda rng, shape: (rng.random(shape) < p).astype(float)


def _lognormal(median: float, sigma: float):
    return lambda rng, shape: rng.lognormal(math.log(median), sigma, shape)


def _beta(a: float, b: float):
    return lambda rng, shape: rng.beta(a, b, shape)


def _looks(rng: np.random.Generator, runs: int, share: np.ndarray, draw_c, draw_t, observed: float = 1.0):
    """Each arm's running n, sum and sum of squares after every request of ``runs`` simulated canaries.

    ``share[i]`` is the canary's share when request i arrives (a schedule of steps, or one split); each request is
    assigned at random (hash assignment is), and a metric is observed on a share of requests (feedback is sparse).
    Returns (n_c, s_c, q_c, n_t, s_t, q_t), each [run, request]."""
    shape = (runs, share.size)
    canary = rng.random(shape) < share
    seen = rng.random(shape) < observed
    x = np.where(canary, draw_t(rng, shape), draw_c(rng, shape))
    out = []
    for arm in (~canary & seen, canary & seen):
        out += [np.cumsum(arm, axis=1), np.cumsum(np.where(arm, x, 0.0), axis=1),
                np.cumsum(np.where(arm, x * x, 0.0), axis=1)]
    return out


def _ever(seed: int, runs: int, share: np.ndarray, metrics: list[tuple], state: int, alpha: float) -> np.ndarray:
    """Per simulated canary and metric: did any look say ``state``? ``metrics``: (draw control, draw treatment,
    kind, higher is better, margin, observed share). Returns bool [run, metric]."""
    rng = np.random.default_rng(seed)
    hits = []
    for start in range(0, runs, CHUNK):
        chunk = min(CHUNK, runs - start)
        per_metric = []
        for draw_c, draw_t, kind, higher, margin, observed in metrics:
            looks = _looks(rng, chunk, share, draw_c, draw_t, observed)
            states = decide(*looks, kind=kind, alpha=alpha, higher_is_better=higher, margin=margin,
                            min_n=controller.MIN_N)
            per_metric.append((states == state).any(axis=1))
        hits.append(np.stack(per_metric, axis=1))
    return np.concatenate(hits)


def _named(cases: list[tuple]) -> list:
    return [pytest.param(*case, id=case[0]) for case in cases]


def _split(share: float, requests: int) -> np.ndarray:
    return np.full(requests, share)


# Requests per simulated canary: about 200 canary observations at 5%, 250 at 25%.
SPLITS = [pytest.param(0.05, 4000, id="5/95"), pytest.param(0.25, 1000, id="25/75")]


# --- A/A: identical arms, one metric --------------------------------------------------------------------------

@pytest.mark.parametrize(("share", "requests"), SPLITS)
@pytest.mark.parametrize(("name", "draw", "kind", "higher", "margin", "seed"), _named([
    ("error rate 0.02", _bernoulli(0.02), "binary", False, 0.02, 41),
    ("rate 0.5", _bernoulli(0.5), "binary", False, 0.05, 42),
    ("rate 0.9, lower is better", _bernoulli(0.9), "binary", False, 0.05, 43),
    ("lognormal latency", _lognormal(800.0, 1.0), "continuous", False, 100.0, 44),
    ("right-skewed, higher is better", _lognormal(800.0, 1.0), "continuous", True, 100.0, 45),
    ("judge-like score beta(8, 2)", _beta(8, 2), "continuous", True, 0.05, 46),
]))
def test_a_a_false_fail_rate_of_a_lopsided_canary(share, requests, name, draw, kind, higher, margin, seed):
    runs = 1000
    fails = int(_ever(seed, runs, _split(share, requests), [(draw, draw, kind, higher, margin, 1.0)], FAIL,
                      ALPHA).sum())
    limit = _tolerated(runs, ALPHA / 2)
    assert fails <= limit, (f"{name} at {share:.0%}: A/A false-fail {fails}/{runs} = {fails / runs:.2%}, "
                            f"tolerated {limit} at level alpha/2 = {ALPHA / 2}")


# --- false pass: the canary is worse by exactly its margin -----------------------------------------------------

LATENCY_SHIFT = 160.0 * math.exp(0.5)  # mean of lognormal(960, 1) minus that of lognormal(800, 1): 264 ms


@pytest.mark.parametrize(("share", "requests"), [pytest.param(0.05, 8000, id="5/95"),
                                                 pytest.param(0.25, 2500, id="25/75")])
@pytest.mark.parametrize(("name", "control", "canary", "kind", "margin", "seed"), _named([
    ("errors 0.02 -> 0.04, margin 0.02", _bernoulli(0.02), _bernoulli(0.04), "binary", 0.02, 51),
    ("blocks 0.05 -> 0.10, margin 0.05", _bernoulli(0.05), _bernoulli(0.10), "binary", 0.05, 52),
    ("rate 0.5 -> 0.6, margin 0.1", _bernoulli(0.5), _bernoulli(0.6), "binary", 0.1, 53),
    ("latency lognormal 800 -> 960 ms median", _lognormal(800.0, 1.0), _lognormal(960.0, 1.0), "continuous",
     LATENCY_SHIFT, 54),
]))
def test_false_pass_rate_at_the_margin(share, requests, name, control, canary, kind, margin, seed):
    """"pass" means "at most margin worse"; a canary exactly margin worse (lower is better) must rarely get it.
    Counted at any look from min_n on, though the controller only acts on a pass once the step's window is full."""
    runs = 500
    passes = int(_ever(seed, runs, _split(share, requests), [(control, canary, kind, False, margin, 1.0)], PASS,
                       ALPHA).sum())
    limit = _tolerated(runs, ALPHA / 2)
    assert passes <= limit, (f"{name} at {share:.0%}: false pass {passes}/{runs} = {passes / runs:.2%}, "
                             f"tolerated {limit} at level alpha/2 = {ALPHA / 2}")


# --- family-wise: a default canary step judges three metrics, and any "fail" rolls back --------------------------

def _default_spec() -> ReleaseSpec:
    return ReleaseSpec.model_validate({"name": "support", "strategy": "canary",
                                       "variants": [{"name": "stable", "model": "m"},
                                                    {"name": "canary", "model": "m2"}]})


def _default_metrics(rates: dict[str, float]) -> list[tuple]:
    """The default spec's metrics with the controller's kinds and directions; feedback rates 20% of answers."""
    out = []
    for m in _default_spec().metrics:
        kind, higher = controller.METRICS[m.name]
        observed = 0.2 if m.name == "negative_feedback" else 1.0
        out.append((_bernoulli(rates[m.name]), _bernoulli(rates[m.name]), kind, higher, m.margin, observed))
    return out


SCHEDULE = np.concatenate([_split(0.05, 2000), _split(0.25, 1000), _split(0.5, 1000)])  # 100 + 250 + 500 canary


@pytest.mark.parametrize(("share", "seed"), [pytest.param(0.05, 61, id="5/95"), pytest.param(0.25, 62, id="25/75"),
                                             pytest.param(None, 63, id="steps 5-25-50")])
@pytest.mark.parametrize(("rates", "runs"), [
    pytest.param({"errors": 0.02, "guardrail_blocks": 0.05, "negative_feedback": 0.2}, 800, id="typical"),
    # Rates near 0.5 are the sequences' hardest case: more runs, so the tolerance is close to alpha.
    pytest.param({"errors": 0.2, "guardrail_blocks": 0.4, "negative_feedback": 0.5}, 2000, id="rates near 0.5"),
])
def test_family_wise_false_rollback_of_a_default_step(share, seed, rates, runs):
    spec = _default_spec()
    assert [m.name for m in spec.metrics] == ["errors", "guardrail_blocks", "negative_feedback"]
    alpha = controller.metric_alpha(spec)
    assert alpha == pytest.approx(2 * spec.alpha / 3)  # Bonferroni over the three one-sided "fail" tests
    shares = SCHEDULE if share is None else _split(share, 4000 if share == 0.05 else 1500)
    fails = _ever(seed, runs, shares, _default_metrics(rates), FAIL, alpha)
    rollbacks = int(fails.any(axis=1).sum())
    limit = _tolerated(runs, spec.alpha)
    per_metric = ", ".join(f"{m.name} {n / runs:.2%}" for m, n in zip(spec.metrics, fails.sum(axis=0), strict=True))
    assert rollbacks <= limit, (f"A/A false rollback {rollbacks}/{runs} = {rollbacks / runs:.2%} ({per_metric}), "
                                f"tolerated {limit} at alpha {spec.alpha}")


def test_metric_alpha_splits_only_beyond_two_metrics():
    assert controller.metric_alpha(_default_spec()) == pytest.approx(0.05 * 2 / 3)
    two = ReleaseSpec.model_validate({"name": "s", "strategy": "canary", "variants": [
        {"name": "stable", "model": "m"}, {"name": "canary", "model": "m2"}], "alpha": 0.1,
        "metrics": [{"name": "errors", "margin": 0.02}, {"name": "latency_ms", "margin": 50}]})
    assert controller.metric_alpha(two) == 0.1
    one = two.model_copy(update={"metrics": two.metrics[:1]})
    assert controller.metric_alpha(one) == 0.1


# --- power at lopsided splits -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "share", "requests", "control", "canary", "kind", "higher", "margin", "want",
                          "seed"), _named([
    ("errors 0.02 -> 0.10 in a 5% canary (~300 canary requests)", 0.05, 6000, _bernoulli(0.02), _bernoulli(0.10),
     "binary", False, 0.02, 0.9, 71),
    ("success 0.9 -> 0.8 in a 25% canary (~300)", 0.25, 1200, _bernoulli(0.9), _bernoulli(0.8), "binary", True,
     0.02, 0.8, 72),
    ("latency median 800 -> 1600 ms in a 5% canary (~100)", 0.05, 2000, _lognormal(800.0, 1.0),
     _lognormal(1600.0, 1.0), "continuous", False, 100.0, 0.9, 73),
]))
def test_a_known_regression_is_caught_in_a_lopsided_canary(name, share, requests, control, canary, kind, higher,
                                                            margin, want, seed):
    """At the level a default step (three metrics) gives each metric."""
    runs = 500
    alpha = controller.metric_alpha(_default_spec())
    caught = int(_ever(seed, runs, _split(share, requests), [(control, canary, kind, higher, margin, 1.0)], FAIL,
                       alpha).sum())
    assert caught >= want * runs, f"{name}: caught {caught}/{runs} = {caught / runs:.1%}, want >= {want:.0%}"


def test_a_clean_canary_passes_a_wide_margin_about_when_an_exact_test_would():
    """The other side of the floors: no more data than needed. 0 errors in n canary requests and none in the
    baseline's 120 - n, margin 0.3: the exact time-uniform test (a uniform-prior beta-binomial mixture against a
    30% error rate, at alpha / 2) rules the margin out from n = 19; the null's variance alone (the score test)
    would need 26, the canary's own (smoothed) variance said so at 10."""
    first = next(n for n in range(10, 60) if decide(120 - n, 0, 0, n, 0, 0, kind="binary", higher_is_better=False,
                                                    margin=0.3) == PASS)
    assert 15 <= first <= 20, first


# --- decide() is compare() ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "draw", "margin"), [("binary", _bernoulli(0.3), 0.05),
                                                      ("continuous", _lognormal(800.0, 1.0), 100.0)])
@pytest.mark.parametrize("higher", [True, False])
def test_decide_says_what_compare_says(kind, draw, margin, higher):
    rng = np.random.default_rng(81)
    looks = _looks(rng, 10, _split(0.1, 600), draw, _bernoulli(0.4) if kind == "binary" else _lognormal(900.0, 1.0))
    states = decide(*looks, kind=kind, higher_is_better=higher, margin=margin)
    seen = set()
    for run in range(10):
        for i in range(0, 600, 5):
            n_c, s_c, q_c, n_t, s_t, q_t = (a[run, i] for a in looks)
            c = compare(Sample(int(n_c), float(s_c), float(q_c)), Sample(int(n_t), float(s_t), float(q_t)), kind=kind,
                        higher_is_better=higher, margin=margin)
            assert STATES[states[run, i]] == c.state, (run, i, c.reason)
            seen.add(c.state)
    assert {"insufficient", "inconclusive"} <= seen
