"""Release statistics: peeking after every batch must not raise the false-alarm rate, and real regressions must
still be caught at sample sizes close to a classic fixed-horizon test's.

The simulations use fixed seeds, so every rate below is one deterministic number; the assertions allow the
binomial noise of a rate measured on a few hundred runs: ``_tolerated(runs, alpha)`` is the 99.9% quantile of
Binomial(runs, alpha), the most false alarms a test whose true rate *is* alpha would show with 99.9% probability
(with 400 runs at alpha 0.05: 35 of 400 = 8.75%). The measured rates are far below it (about 1%, see the
messages), because "fail" uses one side of a two-sided sequence. These arms are 50/50; the lopsided splits a canary
runs (5% and 25%), false passes, and the family-wise rate of a step's metrics are in test_release_stats_sim.py.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy.stats import binom

from lifecycle.releases.stats import Comparison, Interval, Sample, compare, fixed_horizon_n, srm

RUNS = 400  # simulated experiments per A/A scenario
STEP = 10  # observations per arm between two looks
HORIZON = 1000  # observations per arm at the last look


def _tolerated(runs: int, alpha: float) -> int:
    return int(binom.ppf(0.999, runs, alpha))


def _paths(rng: np.random.Generator, runs: int, n: int, draw) -> tuple[np.ndarray, np.ndarray]:
    """Running sums and sums of squares of ``runs`` two-arm experiments: [run, arm (0 control, 1 treatment), n]."""
    x = draw(rng, (runs, 2, n))
    return np.cumsum(x, axis=2), np.cumsum(x * x, axis=2)


def _bernoulli(p_control: float, p_treatment: float | None = None):
    p = np.array([p_control, p_control if p_treatment is None else p_treatment])[None, :, None]
    return lambda rng, shape: (rng.random(shape) < p).astype(float)


def _lognormal_latency(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.lognormal(math.log(800.0), 1.0, shape)  # ms: median 0.8 s, a long right tail (p99 ~8 s)


def _at(sums: np.ndarray, squares: np.ndarray, run: int, arm: int, n: int) -> Sample:
    return Sample(n, float(sums[run, arm, n - 1]), float(squares[run, arm, n - 1]))


def _first(sums, squares, run: int, state: str, horizon: int, **kw) -> int | None:
    """The per-arm n of the first look at which compare() says ``state``, peeking every STEP; None if never."""
    for n in range(STEP, horizon + 1, STEP):
        if compare(_at(sums, squares, run, 0, n), _at(sums, squares, run, 1, n), **kw).state == state:
            return n
    return None


def _naive_ever_fails(sums: np.ndarray, squares: np.ndarray, higher_is_better: bool, alpha: float) -> np.ndarray:
    """The classic two-sample z-test (unpooled, Welch standard error), looked at the same way: per run, whether
    any look had the treatment significantly worse at two-sided alpha."""
    n = np.arange(STEP, HORIZON + 1, STEP)
    s, q = sums[:, :, n - 1], squares[:, :, n - 1]
    var = np.maximum(0.0, (q - s * s / n) / (n - 1))
    diff = (s[:, 1] - s[:, 0]) / n
    se = np.sqrt((var[:, 0] + var[:, 1]) / n)
    z = np.divide(diff, se, out=np.zeros_like(diff), where=se > 0)
    crit = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    return ((z < -crit) if higher_is_better else (z > crit)).any(axis=1)


# --- A/A: no difference, peeked at 100 times -------------------------------------------------------------------

@pytest.mark.parametrize(("name", "draw", "kind", "higher_is_better", "seed"), [
    ("success rate p=0.1", _bernoulli(0.1), "binary", True, 11),
    ("error rate p=0.5", _bernoulli(0.5), "binary", False, 12),
    ("lognormal latency", _lognormal_latency, "continuous", False, 13),
])
def test_a_a_peeking_every_batch_keeps_false_fails_under_alpha(name, draw, kind, higher_is_better, seed):
    alpha = 0.05
    sums, squares = _paths(np.random.default_rng(seed), RUNS, HORIZON, draw)
    fails = sum(_first(sums, squares, r, "fail", HORIZON, kind=kind, alpha=alpha, higher_is_better=higher_is_better,
                       margin=0.02) is not None for r in range(RUNS))
    naive = int(_naive_ever_fails(sums, squares, higher_is_better, alpha).sum())
    limit = _tolerated(RUNS, alpha)
    report = (f"{name}: sequential false-fail {fails}/{RUNS} = {fails / RUNS:.2%}, naive peeked z-test "
              f"{naive}/{RUNS} = {naive / RUNS:.2%}, tolerated {limit}/{RUNS} = {limit / RUNS:.2%} at alpha {alpha}")
    assert fails <= limit, report
    # The naive test, peeked the same way, is wrong far more often than alpha: beyond the tolerance, not by noise.
    assert naive > limit, report


# --- power --------------------------------------------------------------------------------------------------------

def test_a_ten_point_drop_in_success_rate_fails_within_600_per_arm():
    """0.9 -> 0.8: a classic test needs 266 per arm for 90% power looked at once (fixed_horizon_n); the sequence,
    looked at every 10, says "fail" by 600 per arm in >= 90% of runs (measured ~97%, median ~210)."""
    runs = 200
    sums, squares = _paths(np.random.default_rng(21), runs, 600, _bernoulli(0.9, 0.8))
    firsts = [_first(sums, squares, r, "fail", 600, kind="binary", higher_is_better=True, margin=0.02)
              for r in range(runs)]
    caught = [n for n in firsts if n is not None]
    assert len(caught) >= 0.9 * runs, f"caught {len(caught)}/{runs}, median n {statistics.median(caught)}"


def test_a_thirty_point_drop_fails_within_100_per_arm():
    runs = 200
    sums, squares = _paths(np.random.default_rng(22), runs, 100, _bernoulli(0.9, 0.6))
    caught = sum(_first(sums, squares, r, "fail", 100, kind="binary", higher_is_better=True, margin=0.02) is not None
                 for r in range(runs))
    assert caught >= 0.9 * runs, f"caught {caught}/{runs}"


def test_identical_arms_eventually_pass_a_five_point_margin():
    runs, horizon = 100, 3000
    sums, squares = _paths(np.random.default_rng(23), runs, horizon, _bernoulli(0.9))
    final = [compare(_at(sums, squares, r, 0, horizon), _at(sums, squares, r, 1, horizon), kind="binary",
                     higher_is_better=True, margin=0.05).state for r in range(runs)]
    assert final.count("pass") >= 0.95 * runs, final


# --- compare(): edges and semantics ----------------------------------------------------------------------------

def test_sample_of_mean_and_var():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    s = Sample.of(values)
    assert (s.n, s.total, s.total_sq) == (5, 20.0, 130.0)
    assert s.mean == pytest.approx(statistics.fmean(values))
    assert s.var == pytest.approx(statistics.variance(values))
    assert Sample.of([]).mean == 0.0 and Sample.of([]).var == 0.0
    assert Sample.of([7.0]).var == 0.0
    assert Sample.of([0.1] * 1000).var >= 0.0  # rounding never makes it negative
    with pytest.raises(ValueError):
        Sample(-1)


def test_below_min_n_is_insufficient():
    c = compare(Sample(9, 9, 9), Sample(500, 0, 0), kind="binary", higher_is_better=True, margin=0.01)
    assert c == Comparison("insufficient", None, None, None, None, c.reason)
    assert "9" in c.reason and "10" in c.reason
    assert compare(Sample(20, 18, 18), Sample(20, 18, 18), kind="binary", higher_is_better=True, margin=0.01,
                   min_n=21).state == "insufficient"


def test_no_errors_in_either_arm_never_fails_and_keeps_a_width():
    for n in (10, 11, 50, 1000, 100_000):
        c = compare(Sample(n), Sample(n), kind="binary", higher_is_better=False, margin=0.01, metric="error rate")
        assert c.state != "fail"
        assert c.diff == 0.0
        assert c.diff_ci.low < 0 < c.diff_ci.high  # smoothed variance: never a point
        assert c.control_ci.low == 0.0 and c.control_ci.high > 0.0
    assert compare(Sample(100_000), Sample(100_000), kind="binary", higher_is_better=False, margin=0.01).state == "pass"


def test_all_errors_against_none_fails_quickly():
    first = next(n for n in range(10, 21) if compare(Sample(n), Sample(n, n, n), kind="binary",
                                                     higher_is_better=False, margin=0.01).state == "fail")
    assert first <= 20
    c = compare(Sample(first), Sample(first, first, first), kind="binary", higher_is_better=False, margin=0.01,
                metric="canary error rate")
    assert c.diff == 1.0 and c.diff_ci.low > 0 and c.diff_ci.high <= 1.0
    assert c.reason.startswith("canary error rate 1 vs 0: worse by 1 (95% CS ")


def test_fail_is_checked_before_pass():
    """Significantly worse by less than the margin: both conditions hold, and the regression wins."""
    c = compare(Sample(1_000_000, 900_000, 900_000), Sample(1_000_000, 890_000, 890_000), kind="binary",
                higher_is_better=True, margin=0.05)
    assert -0.05 < c.diff_ci.low <= c.diff_ci.high < 0
    assert c.state == "fail"


def test_direction_and_margin_for_lower_is_better():
    control = Sample.of([100.0, 110.0, 90.0, 105.0, 95.0] * 40)
    better = Sample.of([50.0, 55.0, 45.0, 52.0, 48.0] * 40)
    c = compare(control, better, kind="continuous", higher_is_better=False, margin=5.0, metric="latency ms")
    assert c.state == "pass" and c.diff == pytest.approx(-50.0)
    assert c.reason.startswith("latency ms 50 vs 100: better by 50")
    worse = compare(better, control, kind="continuous", higher_is_better=False, margin=5.0)
    assert worse.state == "fail" and worse.diff_ci.low > 0
    assert isinstance(c.treatment_ci, Interval) and c.treatment_ci.low < 50 < c.treatment_ci.high


def test_wider_than_one_look_but_narrowing():
    """The price of peeking: at n = 250 per arm the sequence is ~1.55x the 95% fixed-n interval, and it shrinks."""
    widths = []
    for n in (100, 250, 1000, 10_000):
        c = compare(Sample(n, 0.9 * n, 0.9 * n), Sample(n, 0.9 * n, 0.9 * n), kind="binary",
                    higher_is_better=True, margin=0.0)
        fixed = 1.96 * math.sqrt(2 * 0.9 * 0.1 / n)
        widths.append(c.diff_ci.high - c.diff_ci.low)
        assert 1.3 * 2 * fixed < widths[-1] < 2.2 * 2 * fixed
    assert widths == sorted(widths, reverse=True)


@pytest.mark.parametrize("kw", [{"alpha": 0.0}, {"alpha": 1.0}, {"margin": -0.1}, {"kind": "ordinal"}])
def test_bad_arguments_raise(kw):
    args = {"kind": "binary", "higher_is_better": True, "margin": 0.01, **kw}
    with pytest.raises(ValueError):
        compare(Sample(20, 10, 10), Sample(20, 10, 10), **args)


def test_binary_samples_must_be_zero_one():
    with pytest.raises(ValueError, match="0/1"):
        compare(Sample.of([0.5] * 20), Sample(20, 10, 10), kind="binary", higher_is_better=True, margin=0.01)


# --- fixed-horizon yardstick ---------------------------------------------------------------------------------------

def test_fixed_horizon_n_matches_the_textbook_formula():
    assert fixed_horizon_n(0.9, -0.1, 0.05, 0.8) == 199  # = 0.1 -> 0.2 by symmetry; the classic table value
    assert fixed_horizon_n(0.1, 0.1, 0.05, 0.8) == 199
    assert fixed_horizon_n(0.9, -0.1, 0.05, 0.9) == 266
    assert fixed_horizon_n(0.5, 0.05, 0.05, 0.8) > 1500  # small effects are expensive
    with pytest.raises(ValueError):
        fixed_horizon_n(0.9, 0.2, 0.05, 0.8)


# --- SRM -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("weights", "seed"), [((1.0, 1.0), 31), ((0.9, 0.1), 32), ((0.5, 0.25, 0.25), 33)])
def test_srm_a_correct_split_is_not_flagged_however_often_it_is_checked(weights, seed):
    alpha, runs, units, step = 0.01, 300, 5000, 100
    rng = np.random.default_rng(seed)
    p = np.array(weights) / sum(weights)
    arms = rng.choice(len(p), size=(runs, units), p=p)
    counts = np.stack([np.cumsum(arms == i, axis=1) for i in range(len(p))], axis=2)  # [run, unit, arm]
    flagged = sum(any(srm(counts[r, m - 1].tolist(), weights, alpha=alpha).mismatch
                      for m in range(step, units + 1, step)) for r in range(runs))
    assert flagged <= _tolerated(runs, alpha), f"flagged {flagged}/{runs} correct splits at alpha {alpha}"


def test_srm_flags_60_40_on_a_50_50_split_within_a_few_thousand_units():
    rng = np.random.default_rng(34)
    for _ in range(50):
        first = np.cumsum(rng.random(3000) < 0.6)
        assert any(srm([int(first[m - 1]), m - int(first[m - 1])], [0.5, 0.5]).mismatch
                   for m in range(100, 3001, 100))
    result = srm([1200, 800], [50, 50])
    assert result.mismatch and result.p_value < 0.001
    assert "1200 (50%), 800 (50%)" in result.reason and "mismatch" in result.reason


def test_srm_zero_weight_arms():
    assert srm([500, 510, 0], [1, 1, 0]).p_value == srm([500, 510], [1, 1]).p_value
    stray = srm([500, 510, 1], [1, 1, 0])
    assert stray.mismatch and stray.p_value == 0.0 and "weight 0" in stray.reason
    assert srm([0, 0], [1, 1]).p_value == 1.0  # nothing assigned yet: no evidence either way


def test_srm_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="one weight per count: got 3 counts and 2 weights"):
        srm([1, 2, 3], [1, 1])
    with pytest.raises(ValueError, match="positive weight"):
        srm([0, 0], [0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        srm([-1, 2], [1, 1])
