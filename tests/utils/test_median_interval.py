"""mit.utils.median_interval: the order-statistic confidence interval of a median the benchmarks report."""

from __future__ import annotations

import math
import random

import pytest

from mit.utils.median_interval import median_interval


@pytest.mark.parametrize(
    "n, ranks",
    [(1, (1, 1)), (5, (1, 5)), (6, (1, 6)), (10, (2, 9)), (25, (8, 18)), (100, (40, 61)), (300, (133, 168))],
)
def test_ranks_match_the_published_tables(n, ranks):
    """1-based ranks of the 95% interval (Conover, Practical Nonparametric Statistics, table A3; below 6 values no
    pair of ranks reaches 95%: the extremes)."""
    values = [float(i + 1) for i in range(n)]
    random.Random(n).shuffle(values)  # the order given does not matter
    assert median_interval(values) == tuple(float(r) for r in ranks)


def test_coverage_of_a_skewed_distribution_is_at_least_the_confidence():
    """Simulated coverage of the exponential distribution's median (ln 2) by intervals of 25 values: at least 95%
    (exactly 95.7% for ranks 8 and 18), while the next narrower pair of ranks (9 and 17) covers only ~89%."""
    rng = random.Random(0)
    trials, hits, narrower = 4000, 0, 0
    for _ in range(trials):
        values = [rng.expovariate(1.0) for _ in range(25)]
        low, high = median_interval(values)
        hits += low <= math.log(2) <= high
        ordered = sorted(values)
        narrower += ordered[8] <= math.log(2) <= ordered[16]
    assert hits / trials >= 0.945
    assert narrower / trials < 0.92


def test_wider_for_higher_confidence_and_ties_kept():
    values = [1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    low95, high95 = median_interval(values)
    low99, high99 = median_interval(values, confidence=0.99)
    assert low99 <= low95 <= high95 <= high99 and (low99, high99) != (low95, high95)
    assert median_interval([2.0] * 9) == (2.0, 2.0)


@pytest.mark.parametrize(
    "values, confidence, message",
    [
        ([], 0.95, "must not be empty"),
        ([1.0, math.nan], 0.95, "NaN"),
        ([1.0], 1.0, "confidence"),
        ([1.0], 0, "confidence"),
    ],
)
def test_bad_input_is_a_value_error(values, confidence, message):
    with pytest.raises(ValueError, match=message):
        median_interval(values, confidence)
