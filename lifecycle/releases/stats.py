"""The statistics that decide releases (A/B tests, canaries): comparisons that stay valid however often anyone looks.

A release dashboard is refreshed every few seconds and a canary is promoted or rolled back the moment the numbers
allow it, so every result here is *anytime-valid*: the chance that any look, ever, wrongly says "fail" (or "pass",
or "mismatch") stays under ``alpha``. A classic z-test checked after every batch does not have that property; its
false-alarm rate grows with every look (tests/unit/test_release_stats.py measures both).

Everything is computed from per-variant sufficient statistics (n, sum, sum of squares; counts for the split) so
it can be evaluated from SQL aggregates at any time, with no per-request history.

References (cited once here; the functions below say which part they use):

- [WS] I. Waudby-Smith, D. Arbour, R. Sinha, E. H. Kennedy, A. Ramdas. "Time-uniform central limit theory and
  asymptotic confidence sequences". Annals of Statistics (2024), arXiv:2103.06476.
- [JKPW] R. Johari, P. Koomen, L. Pekelis, D. Walsh. "Peeking at A/B tests: why it matters, and what to do about
  it". KDD 2017. Their normal-mixture mSPRT is the same Robbins boundary as the sequence below (their mixing
  variance plays the part of rho), so "fail" here is an mSPRT rejection in the bad direction.
- [LM] M. Lindon, A. Malek. "Anytime-valid inference for multinomial count data". NeurIPS 2022, arXiv:2011.03567.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import gammaln
from scipy.stats import norm

State = Literal["insufficient", "pass", "fail", "inconclusive"]
Kind = Literal["binary", "continuous"]

# The per-arm sample size at which the confidence sequences are tightest. A sequence valid at every n must be
# wider than a fixed-n interval somewhere; the mixing scale rho ([WS]'s tuning formula) chooses where it pays least.
# 250 per arm is where release decisions are made: it is about the classic per-arm n for detecting a 10-point drop
# in an ~90% success rate (fixed_horizon_n(0.9, -0.1, 0.05, 0.9) = 266). There the width is 1.55x a single look's
# 95% interval; from 50 to 10,000 per arm it stays within 13% of what a sequence tuned for that very n would give.
TUNED_N = 250

# Dirichlet prior of the SRM test ([LM]'s conjugate mixture): concentration k * intended proportions. k = 100 puts a
# prior standard deviation of ~5 percentage points on a 50/50 split, the size of the assignment bugs that SRM checks
# catch. The test is valid for any k; a k off by 10x costs a few units of log-evidence, i.e. a few more units.
SRM_PRIOR_STRENGTH = 100.0


@dataclass(frozen=True, slots=True)
class Sample:
    """Sufficient statistics of one variant for one metric: all the tests below need, and all SQL has to sum."""

    n: int
    total: float = 0.0
    total_sq: float = 0.0

    def __post_init__(self) -> None:
        if self.n < 0 or self.total_sq < 0:
            raise ValueError(f"a sample needs n >= 0 and a sum of squares >= 0, got n={self.n}, "
                             f"total_sq={self.total_sq}")

    @classmethod
    def of(cls, values: Iterable[float]) -> Sample:
        xs = [float(v) for v in values]
        return cls(len(xs), math.fsum(xs), math.fsum(x * x for x in xs))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def var(self) -> float:
        """Unbiased sample variance; 0 below two observations, and never negative from rounding."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))


@dataclass(frozen=True, slots=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Comparison:
    state: State
    diff: float | None  # treatment mean - control mean
    diff_ci: Interval | None  # always-valid (1 - alpha) confidence sequence for the difference
    control_ci: Interval | None  # always-valid (1 - alpha) confidence sequence of each mean
    treatment_ci: Interval | None
    reason: str


@dataclass(frozen=True, slots=True)
class SrmResult:
    p_value: float
    mismatch: bool
    reason: str


def boundary(t: float | np.ndarray, alpha: float, tuned_t: float = TUNED_N) -> float | np.ndarray:
    """Half-width of the [WS] asymptotic confidence sequence for a mean of unit-variance data after ``t`` draws.

    The [WS] asymptotic confidence sequence is
        mean_t ± sigma_t * sqrt( 2(t rho^2 + 1) / (t^2 rho^2) * log(sqrt(t rho^2 + 1) / alpha) ),
    Robbins' two-sided normal mixture boundary, which [WS] show holds time-uniformly for any
    distribution with a finite variance once sigma is estimated (asymptotically, like the CLT does for one look).
    rho = sqrt((-2 log alpha + log(-2 log alpha + 1)) / tuned_t) minimises the width at t = tuned_t ([WS]).
    This returns the factor that multiplies sigma_t; ``t`` may be a numpy array (a whole path of looks).
    """
    a = -2.0 * math.log(alpha)
    rho2 = (a + math.log(a + 1.0)) / tuned_t
    return np.sqrt(2.0 * (t * rho2 + 1.0) / (t * t * rho2) * (0.5 * np.log(t * rho2 + 1.0) - math.log(alpha)))


def _variance(sample: Sample, kind: Kind) -> float:
    """The variance that scales a sequence. For a 0/1 metric it is p(1-p) at the Laplace-smoothed rate (x+1)/(n+2):
    at 0 of 20 errors the plain estimate is 0, the sequence collapses to a point and one request decides."""
    return float(_arm_variances(sample.n, sample.total, sample.total_sq, kind))


#: The states decide() returns, by their code (its array holds indices into this).
STATES: tuple[State, ...] = ("insufficient", "inconclusive", "pass", "fail")


def _arm_variances(n, total, total_sq, kind: Kind):
    """_variance for arrays of looks (Sample.var for a continuous metric)."""
    if kind == "binary":
        p = (total + 1.0) / (n + 2.0)
        return p * (1.0 - p)
    return np.where(n >= 2, np.maximum(0.0, (total_sq - total * total / np.maximum(n, 1)) / np.maximum(n - 1, 1)), 0.0)


def _null_variances(n_c, s_c, v_c, n_t, s_t, v_t, kind: Kind, shift: float):
    """Each arm's variance for the test of the null "the treatment's mean is the control's plus ``shift``", which
    one end of the sequence makes (shift 0 for "fail", the margin on the bad side for "pass").

    A small arm's own estimate is the weak point of a lopsided split. 9 successes in a 10-request canary give
    p(1-p) = 0.14 where the truth may be 0.25; 50 error-free requests give 1/52 where a rate 2 points worse than the
    baseline's 2% has 0.038; ten lognormal latencies that missed the tail have a fraction of its variance. Each such
    underestimate narrows the sequence exactly when the small arm looks extreme, and peeking finds them: simulated
    5% canaries said "fail" for identical arms in up to 19% of runs and "pass" for a canary at its margin in up to
    24% (tests/unit/test_release_stats_sim.py). So the big arm's estimate speaks for both, through the null:

    - rates: each arm's rate halfway between its own (Laplace-smoothed) rate and the null's, the restricted
      estimate (the rates with p_t = p_c + shift that reproduce the arms' pooled, smoothed count; for shift 0 the
      pooled rate). The variance at the null alone is the score test's, conservative where the data lie far from
      the null: it wants 26 error-free canary requests to rule out a 30% error rate where an exact time-uniform
      test wants 19. At the midpoint it is close to the likelihood-ratio test's, which is accurate in the tails:
      2 n KL(p_hat, p0) = (p_hat - p0)^2 / (pbar (1 - pbar) / n) for a pbar between the two (0 against 0.3:
      pbar (1 - pbar) = 0.126 exactly, 0.1275 at the midpoint).
    - continuous metrics: the pooled within-arm variance (the null fixes the means, not the spread; with equal
      spreads this is the classic pooled t-test's), in which the big arm's well-estimated variance dominates.

    The sequence's end uses the larger of the difference's variance from the arms' own estimates and from these,
    so it only ever widens."""
    if kind == "binary":
        own_c, own_t = (s_c + 1.0) / (n_c + 2.0), (s_t + 1.0) / (n_t + 2.0)
        null_c = np.clip(((s_c + 1.0) + (s_t + 1.0) - (n_t + 2.0) * shift) / (n_c + n_t + 4.0), 0.0, 1.0)
        null_t = np.clip(null_c + shift, 0.0, 1.0)
        p_c, p_t = (own_c + null_c) / 2.0, (own_t + null_t) / 2.0
        return p_c * (1.0 - p_c), p_t * (1.0 - p_t)
    pooled = ((n_c - 1) * v_c + (n_t - 1) * v_t) / np.maximum(n_c + n_t - 2, 1)
    return pooled, pooled


def _bounds(n_c, s_c, q_c, n_t, s_t, q_t, *, kind: Kind, alpha: float, higher_is_better: bool, margin: float):
    """diff, low and high of the difference's sequence for (arrays of) looks; see compare(). Assumes n >= 1."""
    v_c, v_t = _arm_variances(n_c, s_c, q_c, kind), _arm_variances(n_t, s_t, q_t, kind)
    bad = margin if not higher_is_better else -margin
    f_c, f_t = _null_variances(n_c, s_c, v_c, n_t, s_t, v_t, kind, 0.0)
    p_c, p_t = _null_variances(n_c, s_c, v_c, n_t, s_t, v_t, kind, bad)
    t = n_c + n_t
    scale = np.sqrt(t) * boundary(t, alpha, 2 * TUNED_N)
    own = v_c / n_c + v_t / n_t
    half_fail = np.sqrt(np.maximum(own, f_c / n_c + f_t / n_t)) * scale
    half_pass = np.sqrt(np.maximum(own, p_c / n_c + p_t / n_t)) * scale
    diff = s_t / n_t - s_c / n_c
    if higher_is_better:  # "worse" is the high end below 0, "within" the low end above -margin
        low, high = diff - half_pass, diff + half_fail
    else:
        low, high = diff - half_fail, diff + half_pass
    if kind == "binary":
        low, high = np.maximum(low, -1.0), np.minimum(high, 1.0)
    return diff, low, high


def decide(n_c, total_c, total_sq_c, n_t, total_t, total_sq_t, *, kind: Kind, alpha: float = 0.05,
           higher_is_better: bool, margin: float, min_n: int = 10) -> np.ndarray:
    """compare()'s state for many looks at once (numpy arrays of each arm's n, sum and sum of squares, broadcast
    together): codes into STATES. The simulations that check the error rates use it (one call per simulated path
    instead of one compare() per look); compare() computes its interval with the same code."""
    n_c, n_t = np.asarray(n_c, dtype=float), np.asarray(n_t, dtype=float)
    need = max(min_n, 2 if kind == "continuous" else 1)
    enough = (n_c >= need) & (n_t >= need)
    one_c, one_t = np.maximum(n_c, 1.0), np.maximum(n_t, 1.0)
    _, low, high = _bounds(one_c, np.asarray(total_c, dtype=float), np.asarray(total_sq_c, dtype=float), one_t,
                           np.asarray(total_t, dtype=float), np.asarray(total_sq_t, dtype=float), kind=kind,
                           alpha=alpha, higher_is_better=higher_is_better, margin=margin)
    worse, within = (high < 0, low > -margin) if higher_is_better else (low > 0, high < margin)
    return np.where(~enough, 0, np.where(worse, 3, np.where(within, 2, 1)))


def compare(control: Sample, treatment: Sample, *, kind: Kind, alpha: float = 0.05, higher_is_better: bool,
            margin: float, min_n: int = 10, metric: str = "") -> Comparison:
    """Is the treatment worse than the control, or at most ``margin`` worse? Valid at every look.

    The difference of means gets the [WS] sequence of a randomised two-arm experiment (their average treatment
    effect, estimated by AIPW): with t = n_c + n_t units, each unit's inverse-propensity pseudo-outcome has mean
    mu_t - mu_c, and with the arms' own means as the outcome model (AIPW) its variance is the Neyman one,
    sigma^2 = var_t / pi + var_c / (1 - pi) with pi = n_t / t. So the half-width is sigma * boundary(t) =
    sqrt(var_t / n_t + var_c / n_c) * sqrt(t) * boundary(t): the usual standard error of the difference times a
    factor that grows like sqrt(log t) where a single look would use 1.96 (t counts both arms, so the sequence is
    tuned at 2 * TUNED_N). Plugging in the final means rather than [WS]'s predictable running ones changes
    nothing asymptotically and lets the sequence be computed from the aggregates alone.
    Because the weights pi come from the counts, unequal splits (a 5% canary) need no special case in the
    formula; they do in the variances: a 10-request canary's own variance is too noisy to trust, so each end of the
    sequence also weighs the null it tests (_null_variances): the end that says "fail" tied arms, the end that says
    "pass" a treatment exactly ``margin`` worse.

    The sequence is two-sided at ``alpha``; "fail" and "pass" each use one side of it, so each is wrong with
    probability at most about alpha / 2 over the whole experiment, however often it is looked at.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if margin < 0:
        raise ValueError(f"margin is how much worse the treatment may be, >= 0; got {margin}")
    if kind not in ("binary", "continuous"):
        raise ValueError(f"kind must be 'binary' or 'continuous', got {kind!r}")
    name = metric or "metric"
    need = max(min_n, 2 if kind == "continuous" else 1)
    if control.n < need or treatment.n < need:
        return Comparison("insufficient", None, None, None, None,
                          f"{name}: {treatment.n} treatment and {control.n} control observations, "
                          f"at least {need} per arm needed")
    if kind == "binary":
        for s in (control, treatment):
            if not (0 <= s.total <= s.n and math.isclose(s.total, s.total_sq, rel_tol=1e-9, abs_tol=1e-9)):
                raise ValueError(f"a binary sample must hold 0/1 values, got n={s.n}, total={s.total}, "
                                 f"total_sq={s.total_sq}")
    var_c, var_t = _variance(control, kind), _variance(treatment, kind)
    lo_hi = (0.0, 1.0) if kind == "binary" else (-math.inf, math.inf)
    control_ci = _clip(control.mean, var_c ** 0.5 * float(boundary(control.n, alpha)), lo_hi)
    treatment_ci = _clip(treatment.mean, var_t ** 0.5 * float(boundary(treatment.n, alpha)), lo_hi)

    _, low, high = _bounds(control.n, control.total, control.total_sq, treatment.n, treatment.total,
                           treatment.total_sq, kind=kind, alpha=alpha, higher_is_better=higher_is_better, margin=margin)
    diff = treatment.mean - control.mean
    diff_ci = Interval(float(low), float(high))

    if higher_is_better:
        worse, within = diff_ci.high < 0, diff_ci.low > -margin
    else:
        worse, within = diff_ci.low > 0, diff_ci.high < margin
    state: State = "fail" if worse else "pass" if within else "inconclusive"
    direction = "worse" if (diff < 0) == higher_is_better and diff != 0 else "better" if diff else "equal"
    verdict = {"fail": "significantly worse",
               "pass": f"at most {_num(margin)} worse",
               "inconclusive": f"not yet shown worse or within the {_num(margin)} margin"}[state]
    amount = f" by {_num(abs(diff))}" if diff else ""
    reason = (f"{name} {_num(treatment.mean)} vs {_num(control.mean)}: {direction}{amount} "
              f"({_num(100 * (1 - alpha))}% CS {_num(diff_ci.low)}..{_num(diff_ci.high)}), {verdict}")
    return Comparison(state, diff, diff_ci, control_ci, treatment_ci, reason)


def srm(counts: Sequence[int], weights: Sequence[float], *, alpha: float = 0.001) -> SrmResult:
    """Sample ratio mismatch: do the arms' unit counts fit the intended split? Valid at every look ([LM]).

    Under the intended proportions theta0, each unit's arm is a Multinomial(1, theta0) draw; the alternative mixes
    theta over a Dirichlet(k * theta0) prior. The ratio of the two marginal likelihoods is a martingale under
    theta0, so by Ville's inequality it exceeds 1/alpha with probability at most alpha ever, and it depends on the
    counts only ([LM]):  log BF = lgamma(K) - lgamma(K + N) + sum_i [lgamma(a_i + x_i) - lgamma(a_i)
    - x_i log theta0_i],  a = k * theta0, K = k, N = sum x. The p-value is min(1, 1/BF). (Keeping the running
    minimum over looks would be tighter still, but needs history; this one is valid on its own at every look.)
    The default alpha 0.001 is the SRM threshold GrowthBook and Optimizely use: a mismatch invalidates the
    experiment, so a false alarm is costly and a real mismatch is rarely subtle.
    """
    if len(counts) != len(weights):
        raise ValueError(f"srm needs one weight per count: got {len(counts)} counts and {len(weights)} weights")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if any(c < 0 for c in counts) or any(w < 0 for w in weights):
        raise ValueError(f"counts and weights must be >= 0, got counts={list(counts)}, weights={list(weights)}")
    total_w = math.fsum(weights)
    if total_w <= 0:
        raise ValueError("srm needs at least one arm with a positive weight")
    shares = ", ".join(f"{c} ({_num(100 * w / total_w)}%)" for c, w in zip(counts, weights, strict=True))
    stray = [i for i, (c, w) in enumerate(zip(counts, weights, strict=True)) if w == 0 and c > 0]
    if stray:
        return SrmResult(0.0, True, f"arm {stray[0]} has weight 0 but received {counts[stray[0]]} units "
                                    f"(counts vs intended: {shares})")
    arms = [(c, w / total_w) for c, w in zip(counts, weights, strict=True) if w > 0]
    n = sum(c for c, _ in arms)
    k = SRM_PRIOR_STRENGTH
    log_bf = gammaln(k) - gammaln(k + n)
    for c, theta in arms:
        log_bf += gammaln(k * theta + c) - gammaln(k * theta) - c * math.log(theta)
    p = min(1.0, math.exp(-log_bf)) if log_bf > -700 else 1.0
    mismatch = p < alpha
    verdict = "sample ratio mismatch" if mismatch else "consistent with the intended split"
    return SrmResult(p, mismatch, f"counts vs intended: {shares}: {verdict} (anytime p={p:.3g}, alpha={alpha:g})")


def fixed_horizon_n(p0: float, delta: float, alpha: float, power: float) -> int:
    """Per-arm n of the classic two-sided two-proportion z-test (pooled variance under H0), looked at once.

    n = (z_{1-alpha/2} sqrt(2 pbar (1 - pbar)) + z_power sqrt(p0 (1 - p0) + p1 (1 - p1)))^2 / delta^2 with
    p1 = p0 + delta: the yardstick the sequential test's sample sizes are compared with (bench/release_stats.py).
    """
    p1 = p0 + delta
    if not (0 < p0 < 1 and 0 < p1 < 1 and delta != 0):
        raise ValueError(f"need 0 < p0 < 1, 0 < p0 + delta < 1 and delta != 0; got p0={p0}, delta={delta}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha}, power={power}")
    pbar = (p0 + p1) / 2
    z = norm.ppf(1 - alpha / 2) * math.sqrt(2 * pbar * (1 - pbar)) + norm.ppf(power) * math.sqrt(
        p0 * (1 - p0) + p1 * (1 - p1))
    return math.ceil(z * z / (delta * delta))


def _clip(center: float, half: float, bounds: tuple[float, float]) -> Interval:
    return Interval(max(bounds[0], center - half), min(bounds[1], center + half))


def _num(x: float) -> str:
    """Three significant figures without exponents: 0.0234, 0.31, 1234 (latencies read badly as 1.23e+03)."""
    text = f"{x:.3g}"
    return f"{x:.0f}" if "e+" in text else text
