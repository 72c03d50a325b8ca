"""A distribution-free confidence interval for a median, from order statistics (the benchmarks' ratio spreads)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """``(low, high)``: the narrowest pair of order statistics ``x_(j) <= x_(n+1-j)`` of ``values`` (n of them) that
    cover the population median with probability at least ``confidence``, for any continuous distribution of
    independent values.

    The number of values below the median is Binomial(n, 1/2), so the interval misses the median with probability
    ``2 P(Bin(n, 1/2) <= j - 1)``; ``j`` is the largest rank keeping that at most ``1 - confidence``. With too few
    values for any such pair (n < 6 at 95%) the interval is the sample's extremes, which then cover with less
    probability than asked."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("values must not be empty")
    if any(math.isnan(x) for x in ordered):
        raise ValueError("values hold a NaN: a median interval of them has no meaning")
    # j: the lower bound's 1-based rank; below: P(Bin(n, 1/2) <= j), the probability that it lies above the median
    j, below = 1, 1.0 / 2.0**n
    while j < n // 2 and 2 * (below + math.comb(n, j) / 2.0**n) <= 1 - confidence:
        below += math.comb(n, j) / 2.0**n
        j += 1
    return ordered[j - 1], ordered[n - j]
