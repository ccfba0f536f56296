"""What peeking-safe release decisions cost in traffic: requests per arm until a regression is called.

    .venv/bin/python bench/release_stats.py [--runs 200] [--aa-runs 400] [--p0 0.9] [--drop 0.1] [--peek 10]

Simulates canaries whose success rate drops from ``--p0`` by ``--drop`` (default 0.9 -> 0.8) and looks at them
the way a dashboard does, after every ``--peek`` requests per arm, with lifecycle.releases.stats.compare at
alpha 0.05. Reports the median and 90th percentile per-arm n at which it first says "fail", the share of runs it
has caught by the fixed-horizon n, and, for the yardstick, the per-arm n of the classic two-proportion z-test
looked at once (fixed_horizon_n, 80% and 90% power), which is only valid if nobody looks before that n. Also the
A/A false-fail rate (no drop, peeked up to ``--aa-max-n`` per arm) of the sequential test and of the naive
z-test peeked the same way. Seeded, so a rerun gives the same numbers; no timings. Prints a table and writes
bench/results/release_stats.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lifecycle.releases.stats import Sample, compare, fixed_horizon_n  # noqa: E402


def first_fail(rng: np.random.Generator, p_control: float, p_treatment: float, max_n: int, peek: int,
               alpha: float) -> int | None:
    """Per-arm n at the first look where compare() says "fail" in one simulated experiment; None if never by
    ``max_n``."""
    x = rng.random((2, max_n)) < np.array([[p_control], [p_treatment]])
    sums = np.cumsum(x, axis=1)
    for n in range(peek, max_n + 1, peek):
        control, treatment = Sample(n, float(sums[0, n - 1]), float(sums[0, n - 1])), Sample(
            n, float(sums[1, n - 1]), float(sums[1, n - 1]))
        if compare(control, treatment, kind="binary", alpha=alpha, higher_is_better=True, margin=0.0).state == "fail":
            return n
    return None


def naive_ever_fails(rng: np.random.Generator, p: float, max_n: int, peek: int, alpha: float) -> bool:
    """The classic z-test (unpooled standard error), looked at after every batch: did any look say "worse"?"""
    x = rng.random((2, max_n)) < p
    n = np.arange(peek, max_n + 1, peek)
    s = np.cumsum(x, axis=1)[:, n - 1]
    rates = s / n
    se = np.sqrt((rates[0] * (1 - rates[0]) + rates[1] * (1 - rates[1])) / n)
    z = np.divide(rates[1] - rates[0], se, out=np.zeros_like(se), where=se > 0)
    return bool((z < -statistics.NormalDist().inv_cdf(1 - alpha / 2)).any())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="simulated canaries with the drop")
    ap.add_argument("--aa-runs", type=int, default=400, help="simulated A/A experiments")
    ap.add_argument("--p0", type=float, default=0.9, help="control success rate")
    ap.add_argument("--drop", type=float, default=0.1, help="how much lower the treatment's success rate is")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--peek", type=int, default=10, help="requests per arm between two looks")
    ap.add_argument("--max-n", type=int, default=3000, help="per-arm n at which a run with the drop gives up")
    ap.add_argument("--aa-max-n", type=int, default=1000, help="per-arm n at which an A/A run ends")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    firsts = [first_fail(rng, args.p0, args.p0 - args.drop, args.max_n, args.peek, args.alpha)
              for _ in range(args.runs)]
    caught = sorted(n for n in firsts if n is not None)
    missed = args.runs - len(caught)
    # Runs never caught count as beyond max_n: the quantiles are exact as long as they fall within the caught ones.
    ordered = caught + [args.max_n + 1] * missed
    fixed80 = fixed_horizon_n(args.p0, -args.drop, args.alpha, 0.8)
    fixed90 = fixed_horizon_n(args.p0, -args.drop, args.alpha, 0.9)
    aa_fails = sum(first_fail(rng, args.p0, args.p0, args.aa_max_n, args.peek, args.alpha) is not None
                   for _ in range(args.aa_runs))
    naive = sum(naive_ever_fails(rng, args.p0, args.aa_max_n, args.peek, args.alpha) for _ in range(args.aa_runs))

    results = {
        "sequential_fail_n_p50": int(np.quantile(ordered, 0.5, method="inverted_cdf")),
        "sequential_fail_n_p90": int(np.quantile(ordered, 0.9, method="inverted_cdf")),
        "sequential_caught_by_fixed80_n": round(sum(n <= fixed80 for n in caught) / args.runs, 3),
        "sequential_caught_by_fixed90_n": round(sum(n <= fixed90 for n in caught) / args.runs, 3),
        "sequential_caught_by_max_n": round(len(caught) / args.runs, 3),
        "fixed_horizon_n_power80": fixed80,
        "fixed_horizon_n_power90": fixed90,
        "aa_false_fail_rate_sequential": round(aa_fails / args.aa_runs, 4),
        "aa_false_fail_rate_naive_peeked": round(naive / args.aa_runs, 4),
    }
    labels = {
        "sequential_fail_n_p50": 'sequential: median n per arm to "fail"',
        "sequential_fail_n_p90": 'sequential: p90 n per arm to "fail"',
        "sequential_caught_by_fixed80_n": f"sequential: share caught by n={fixed80}",
        "sequential_caught_by_fixed90_n": f"sequential: share caught by n={fixed90}",
        "sequential_caught_by_max_n": f"sequential: share caught by n={args.max_n}",
        "fixed_horizon_n_power80": "fixed horizon: n per arm, 80% power",
        "fixed_horizon_n_power90": "fixed horizon: n per arm, 90% power",
        "aa_false_fail_rate_sequential": f"A/A false-fail rate, sequential ({args.aa_runs} runs)",
        "aa_false_fail_rate_naive_peeked": "A/A false-fail rate, naive z peeked",
    }
    print(f"success rate {args.p0} -> {args.p0 - args.drop:.3g}, alpha {args.alpha}, a look every {args.peek} "
          f"requests per arm, {args.runs} runs")
    for key, value in results.items():
        print(f"{labels[key]:46}{value:>10}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "release_stats.json"
    path.write_text(json.dumps({"config": vars(args), "machine": platform.platform(), "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
