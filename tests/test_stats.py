"""The verdict's arithmetic: exact bounds, Wald's thresholds, and the validity of the soft test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepcore_auditor.fingerprints.stats import (
    SequentialTest,
    binom_cdf,
    clopper_pearson_lower,
    clopper_pearson_upper,
    expected_queries,
    log_likelihood_ratios,
)


def test_clopper_pearson_matches_closed_forms():
    # k = 0: upper bound solves (1 - p)^n = 1 - confidence
    assert clopper_pearson_upper(0, 10, 0.95) == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-6)
    # k = n: lower bound solves p^n = 1 - confidence
    assert clopper_pearson_lower(10, 10, 0.95) == pytest.approx(0.05 ** (1 / 10), abs=1e-6)
    u = clopper_pearson_upper(30, 100, 0.95)
    assert binom_cdf(30, 100, u) == pytest.approx(0.05, abs=1e-6)
    assert 0.30 < u < 0.40 and clopper_pearson_lower(30, 100) < 0.30


def test_wald_thresholds_and_decisions():
    t = SequentialTest(alpha=0.01, beta=0.05)
    assert t.upper == pytest.approx(math.log(0.95 / 0.01))
    assert t.lower == pytest.approx(math.log(0.05 / 0.99))
    assert t.decide(t.upper + 1e-9) == "piracy"
    assert t.decide(t.lower - 1e-9) == "independent"
    assert t.decide(0.0) is None
    with pytest.raises(ValueError):
        SequentialTest(alpha=0.7, beta=0.01)


def test_expected_queries_matches_the_field_example():
    # field notes: p0 = 0.1, p1 = 0.5, alpha = 1e-3 needs about 14 queries on average
    assert expected_queries(0.1, 0.5, 1e-3) == pytest.approx(13.9, abs=0.5)
    assert math.isinf(expected_queries(0.5, 0.5, 0.01))


@pytest.mark.parametrize("soft", [False, True])
def test_false_identification_rate_is_bounded_by_alpha(soft):
    """Independent suspects scoring at p0 on average are flagged at most alpha of the time."""
    rng = np.random.default_rng(0)
    p0, p1, alpha = 0.4, 0.7, 0.05
    test = SequentialTest(alpha, 0.05)
    flagged = 0
    trials = 4000
    for _ in range(trials):
        s = rng.beta(2 * p0, 2 * (1 - p0), size=200) if soft else (rng.random(200) < p0).astype(float)
        llr = np.cumsum(log_likelihood_ratios(s, np.full(200, p0), np.full(200, p1)))
        hit = np.flatnonzero((llr >= test.upper) | (llr <= test.lower))
        flagged += bool(len(hit)) and llr[hit[0]] >= test.upper
    assert flagged / trials <= alpha


def test_pirates_are_caught_near_walds_average():
    rng = np.random.default_rng(1)
    p0, p1, alpha = 0.4, 0.9, 0.01
    test = SequentialTest(alpha, 0.01)
    stops = []
    for _ in range(500):
        llr = np.cumsum(log_likelihood_ratios((rng.random(400) < p1).astype(float), np.full(400, p0), np.full(400, p1)))
        stops.append(int(np.flatnonzero(llr >= test.upper)[0]) + 1)
    assert np.mean(stops) <= 2 * expected_queries(p0, p1, alpha)
