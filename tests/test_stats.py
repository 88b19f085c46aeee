"""The verdict's arithmetic: exact bounds, Wald's thresholds, and the validity of the soft test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from deepcore_auditor.fingerprints.stats import (
    BettingTest,
    Bettor,
    SequentialTest,
    binom_cdf,
    clopper_pearson_lower,
    clopper_pearson_upper,
    copy_queries,
    expected_queries,
    grouped_prediction_upper,
    log_likelihood_ratios,
    prediction_upper_per_group,
)


def test_clopper_pearson_matches_closed_forms():
    # k = 0: upper bound solves (1 - p)^n = 1 - confidence
    assert clopper_pearson_upper(0, 10, 0.95) == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-6)
    # k = n: lower bound solves p^n = 1 - confidence
    assert clopper_pearson_lower(10, 10, 0.95) == pytest.approx(0.05 ** (1 / 10), abs=1e-6)
    u = clopper_pearson_upper(30, 100, 0.95)
    assert binom_cdf(30, 100, u) == pytest.approx(0.05, abs=1e-6)
    assert 0.30 < u < 0.40 and clopper_pearson_lower(30, 100) < 0.30


def _upper_by_pmf(k: int, n: int, confidence: float) -> float:
    """The bound as first written: bisection on `binom_cdf`, every pmf term from lgamma."""
    if n <= 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def test_clopper_pearson_equals_the_first_bisection_bit_for_bit():
    # A report's plan holds p0 as computed and verify-report asks for equality with a recomputation:
    # the faster arithmetic must give the very same floats, for every count a fingerprint can have.
    cases = [(k, n, c) for n in (1, 2, 7, 30) for k in range(n + 1) for c in (0.95, 0.975)]
    cases += [(k, 200, c) for k in range(0, 201, 7) for c in (0.95, 0.975)] + [(199, 200, 0.95), (1, 1000, 0.95)]
    for k, n, c in cases:
        assert clopper_pearson_upper(k, n, c) == _upper_by_pmf(k, n, c), (k, n, c)
        assert clopper_pearson_lower(k, n, c) == 1.0 - _upper_by_pmf(n - k, n, c), (k, n, c)


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


# --- The betting test (anytime-valid, sampling without replacement) --------------------------


def _wealth_path(scores, p0: float) -> list[float]:
    b = Bettor(len(scores) * p0, len(scores))
    out = []
    for s in scores:
        b.update(s)
        out.append(math.exp(b.log_wealth))
    return out


@pytest.mark.parametrize("population", [(1, 1, 0, 0, 0, 1, 0, 0), (0.9, 0.2, 0.0, 0.4, 0.5, 0.0, 0.2, 0.0)])
def test_wealth_is_a_supermartingale_over_every_order(population):
    """Reference computation: over all 8! orders of a population whose mean is exactly p0 (0/1
    and soft scores), the mean wealth after every answer is at most 1."""
    p0 = float(np.mean(population))
    paths = np.array([_wealth_path(order, p0) for order in itertools.permutations(population)])
    assert paths.mean(axis=0).max() <= 1 + 1e-9
    assert paths.max() > 1.5  # the bettor does stake: some orders win


def test_betting_false_identification_rate_holds_without_replacement():
    """A suspect whose 200 answers have mean exactly p0 (the worst case H0 allows), asked in
    random orders: `piracy` at most alpha of the time, looking after every answer."""
    rng = np.random.default_rng(0)
    p0, alpha, n = 0.4, 0.05, 200
    population = np.zeros(n)
    population[: int(p0 * n)] = 1
    flagged = 0
    for _ in range(2000):
        t = BettingTest.start(alpha, 0.05, np.full(n, p0), np.full(n, 0.9))
        flagged += any(t.update(s) == "piracy" or t.piracy.log_wealth >= t.upper for s in rng.permutation(population))
    assert flagged / 2000 <= alpha


def test_pirate_above_p1_is_rarely_cleared():
    rng = np.random.default_rng(2)
    n, beta = 200, 0.05
    population = np.zeros(n)
    population[: int(0.8 * n)] = 1
    cleared = 0
    for _ in range(2000):
        t = BettingTest.start(0.01, beta, np.full(n, 0.3), np.full(n, 0.8))
        cleared += any(t.update(s) == "independent" for s in rng.permutation(population))
    assert cleared / 2000 <= beta


@pytest.mark.parametrize("p0", [0.4, 0.6, 0.8, 0.9])
def test_an_exact_copy_needs_about_the_ideal_number_of_answers(p0):
    n, alpha = 400, 0.01
    t = BettingTest.start(alpha, 0.01, np.full(n, p0), np.full(n, min(0.98, p0 + 0.1)))
    first = t.piracy.best_case_needs(t.upper, n)
    assert t.useful_batch(50) <= first
    asked = 0
    while t.decision() is None:
        t.update(1.0)
        asked += 1
    assert asked <= 1.3 * copy_queries(p0, alpha) and asked == first  # foreseen exactly: no batch overshoots it


def test_a_pirate_between_p0_and_p1_is_called_a_pirate_not_independent():
    """Wald's test drifts to the nearer hypothesis; the betting test gains evidence from any mean above p0."""
    rng = np.random.default_rng(3)
    n, p0, p1, q = 400, 0.3, 0.4, 0.45  # p1 = p0 + MIN_GAP (calibration); the pirates' floor: 1.0
    population = np.zeros(n)
    population[: int(q * n)] = 1
    verdicts = []
    for _ in range(300):
        t = BettingTest.start(0.01, 0.01, np.full(n, p0), np.full(n, p1))
        verdicts.append(next((v for v in (t.update(s) for s in rng.permutation(population)) if v), None))
    assert verdicts.count("independent") <= 3 and verdicts.count("piracy") >= 270
    wald = SequentialTest(0.01, 0.01)
    walds = []
    for _ in range(300):  # Wald's rates of old: p1 halfway between p0 and the pirates' floor
        llr = np.cumsum(log_likelihood_ratios(rng.permutation(population), np.full(n, p0), np.full(n, 0.65)))
        walds.append(wald.decide(float(llr[np.flatnonzero((llr >= wald.upper) | (llr <= wald.lower))[0]])))
    assert walds.count("independent") > 200  # the drift the betting test removes


def test_grouped_prediction_bound_matches_a_hand_computation():
    groups = [[0.5, 0.6, 0.4], [0.1, 0.2]]
    z = [np.arcsin(np.sqrt(np.array(g))) for g in groups]
    s = math.sqrt(sum(((v - v.mean()) ** 2).sum() for v in z) / 3)
    top = max(v.mean() + 4.540703 * s * math.sqrt(1 + 1 / len(v)) for v in z)  # t_3(0.99)
    bound, dof = grouped_prediction_upper(groups, 0.01)
    assert dof == 3 and bound == pytest.approx(math.sin(top) ** 2, abs=1e-5)
    assert grouped_prediction_upper([[0.5], [0.1]], 0.01) is None  # no replicate: no spread to estimate
    each, dof = prediction_upper_per_group(groups + [[]], 0.01)  # each group's own bound; the empty one dropped
    assert dof == 3 and len(each) == 2 and max(each) == pytest.approx(math.sin(top) ** 2, abs=1e-5)
    assert each[1] == pytest.approx(math.sin(z[1].mean() + 4.540703 * s * math.sqrt(1.5)) ** 2, abs=1e-5)
    assert prediction_upper_per_group([[0.5, 0.5], [0.9]], 0.01) == ([0.5, 0.9], 1)  # never below a member


def test_grouped_prediction_bound_covers_new_models_at_its_level():
    """Simulated zoos: kinds of models with their own mean agreement, seed-to-seed spread shared; a
    new model of the most agreeing kind exceeds the bound at most `level` of the time."""
    rng = np.random.default_rng(5)
    means, sd, level, misses, trials = (0.9, 0.5, 0.3), 0.08, 0.05, 0, 3000
    for _ in range(trials):
        groups = [list(np.sin(np.clip(rng.normal(m, sd, size=3), 0, math.pi / 2)) ** 2) for m in means]
        bound, _ = grouped_prediction_upper(groups, level)
        misses += np.sin(np.clip(rng.normal(means[0], sd), 0, math.pi / 2)) ** 2 > bound
    assert misses / trials <= level + 0.01
