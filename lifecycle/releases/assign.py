"""Which variant answers a unit (an API key, a user, a thread, a request): deterministic and sticky.

The hash and bucket ranges are GrowthBook's (FNV-1a, version 2 hashing, ``getBucketRanges``), so a unit lands
where GrowthBook's SDKs in any language would put it: every process, after every restart, without a lookup.
Variants are laid out in spec order with the candidate's range at the top, so when a canary grows from 5% to
25% every unit already on the canary stays there (its hash does not move, its range only widens downwards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from growthbook.core import chooseVariation, gbhash, getBucketRanges


def bucket(seed: str, unit: str) -> float:
    """The unit's fixed position in [0, 1) for this release (``seed``): 10,000 buckets."""
    return float(gbhash(seed, unit, 2))


def ranges(order: Sequence[str], weights: Mapping[str, float]) -> list[tuple[float, float]]:
    shares = [max(0.0, float(weights.get(v, 0.0))) / 100 for v in order]
    total = sum(shares)
    if total <= 0:
        raise ValueError("no variant has traffic")
    return getBucketRanges(len(order), 1.0, [s / total for s in shares])


def choose(seed: str, unit: str, order: Sequence[str], weights: Mapping[str, float]) -> str:
    """The variant for ``unit`` under ``weights`` (percent per variant, in ``order``)."""
    return pick(seed, unit, order, ranges(order, weights), weights)


def pick(seed: str, unit: str, order: Sequence[str], bucket_ranges: Sequence[tuple[float, float]],
         weights: Mapping[str, float]) -> str:
    """:func:`choose` with the ranges computed once (they change only when the weights do)."""
    index = chooseVariation(bucket(seed, unit), list(bucket_ranges))
    # A bucket exactly at a float boundary can fall outside every range: it belongs to the last variant.
    return order[index] if index >= 0 else next(v for v in reversed(order) if weights.get(v, 0) > 0)


def layout(variants: Sequence[str], baseline: str, candidate: str) -> list[str]:
    """Spec order, with the candidate last: its range is the top of [0, 1) and only grows downwards."""
    return [v for v in variants if v != candidate] + [candidate] if candidate != baseline else list(variants)
