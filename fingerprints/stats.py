"""The statistics of a verdict: confidence bounds for calibration and Wald's sequential test.

Every identification mode reduces a suspect's answer at fingerprint point i to a score
s_i in [0, 1] (1 = behaves like the owner) and gives per-point rates p0_i (what an independent
model scores at most) and p1_i (what a pirate scores at least). The test sums

    llr_i = s_i * ln(p1_i / p0_i) + (1 - s_i) * ln((1 - p1_i) / (1 - p0_i))

and says `piracy` once the sum reaches ln((1 - beta) / alpha), `independent` once it falls to
ln(beta / (1 - alpha)). For any score in [0, 1] whose mean is at most p0_i, exp(llr_i) has
expectation at most 1 (convexity), so the running likelihood ratio is a supermartingale and
Ville's inequality bounds the false identification rate by alpha at every look: stopping early
costs nothing, and the bound holds for soft scores (probabilities) as well as 0/1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_EPS = 1e-6


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1:
        return 0.0 if k == n else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.exp(_log_binom_pmf(i, n, p)) for i in range(k + 1)))


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound on a binomial rate after k successes in n."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def clopper_pearson_lower(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided lower confidence bound on a binomial rate after k successes in n."""
    return 1.0 - clopper_pearson_upper(n - k, n, confidence)


def hoeffding_upper(mean: float, n: int, confidence: float = 0.95) -> float:
    """Upper confidence bound on the mean of n i.i.d. values in [0, 1]."""
    return min(1.0, mean + math.sqrt(math.log(1 / (1 - confidence)) / (2 * max(n, 1))))


def hoeffding_lower(mean: float, n: int, confidence: float = 0.95) -> float:
    return max(0.0, mean - math.sqrt(math.log(1 / (1 - confidence)) / (2 * max(n, 1))))


def log_likelihood_ratios(scores: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Per-point llr of 'pirate' over 'independent' for scores in [0, 1] (see module docstring)."""
    p0 = np.clip(p0, _EPS, 1 - _EPS)
    p1 = np.clip(p1, _EPS, 1 - _EPS)
    s = np.clip(scores, 0.0, 1.0)
    return s * np.log(p1 / p0) + (1 - s) * np.log((1 - p1) / (1 - p0))


@dataclass(frozen=True)
class SequentialTest:
    """Wald's SPRT thresholds for a false identification rate alpha and a miss rate beta."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if not (0 < self.alpha < 0.5 and 0 < self.beta < 0.5):
            raise ValueError(f"alpha and beta must lie in (0, 0.5), got {self.alpha}, {self.beta}")

    @property
    def upper(self) -> float:
        return math.log((1 - self.beta) / self.alpha)

    @property
    def lower(self) -> float:
        return math.log(self.beta / (1 - self.alpha))

    def decide(self, llr_sum: float) -> str | None:
        if llr_sum >= self.upper:
            return "piracy"
        if llr_sum <= self.lower:
            return "independent"
        return None


def expected_queries(p0: float, p1: float, alpha: float) -> float:
    """Wald's approximation of the mean queries to flag a pirate: ln(1/alpha) / KL(p1 || p0)."""
    p0, p1 = min(max(p0, _EPS), 1 - _EPS), min(max(p1, _EPS), 1 - _EPS)
    kl = p1 * math.log(p1 / p0) + (1 - p1) * math.log((1 - p1) / (1 - p0))
    return math.inf if kl <= 0 else math.log(1 / alpha) / kl
