"""The statistics of a verdict: confidence and prediction bounds for calibration, and the two
sequential tests an audit can run — testing by betting and Wald's SPRT (older reports name it
and still replay under it); `calibration.resolve_test` says which one an audit runs.

Every identification mode reduces a suspect's answer at fingerprint point i to a score
s_i in [0, 1] (1 = behaves like the owner) and gives per-point rates p0_i (what an independent
model scores at most) and p1_i (what a pirate scores at least). The test sums

    llr_i = s_i * ln(p1_i / p0_i) + (1 - s_i) * ln((1 - p1_i) / (1 - p0_i))

and says `piracy` once the sum reaches ln((1 - beta) / alpha), `independent` once it falls to
ln(beta / (1 - alpha)). For any score in [0, 1] whose mean is at most p0_i, exp(llr_i) has
expectation at most 1 (convexity), so the running likelihood ratio is a supermartingale and
Ville's inequality bounds the false identification rate by alpha at every look: stopping early
costs nothing, and the bound holds for soft scores (probabilities) as well as 0/1 agreement.

That is the SPRT (`SequentialTest`). Its weakness is that it decides between two simple
hypotheses: a pirate scoring between p0 and p1 drifts to whichever is nearer, and every agreeing
answer earns ln(p1/p0) although it is worth up to ln(1/p0). Its supermartingale argument also
assumes each answer's conditional mean stays at most p0, which asking a finite set of points
without replacement does not give once early answers were low.

`BettingTest` answers both. The fingerprint's N points are asked in a uniformly random order (the
audit's seeded permutation), so a suspect's score s_t is a draw without replacement from its N
fixed per-point scores c_1..c_N (their expectations, for a randomized suspect), and

    E[s_t | s_1..s_{t-1}] = (sum_i c_i - S_{t-1}) / (N - t + 1),     S_{t-1} = s_1 + ... + s_{t-1}.

Under H0 "the suspect's mean score over the fingerprint is at most p0" this is at most
m_t = (N p0 - S_{t-1}) / (N - t + 1) (clipped to [0, 1]). A bettor stakes a predictable fraction
lambda_t in [0, 1/m_t] of its wealth on s_t exceeding m_t: K_t = prod (1 + lambda_t (s_t - m_t)).
Each factor is non-negative and has conditional mean at most 1 under H0, so K is a non-negative
supermartingale and, by Ville's inequality, P(K ever reaches 1/alpha) <= alpha: `piracy` when it
does, at any look (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
betting", JRSS-B 2024, section on sampling without replacement). The stake is the plug-in Kelly
bet for a 0/1 score, (mu_hat - m_t) / (m_t (1 - m_t)), from a smoothed running mean, capped at
MAX_BET of the all-in stake 1/m_t: an exact copy then needs about ln(1/alpha)/ln(1/p0) answers,
and a pirate anywhere above p0 gains evidence at a rate near KL(its mean || p0) instead of
drifting away. `independent` has its own guarantee: a second bettor, on the scores 1 - s_t,
against H1 "the mean score is at least p1" (p1 = p0 + 0.05, `calibration.CLEARING_GAP`), and
`independent` when its wealth reaches 1/beta: a suspect scoring at least p1 is cleared with
probability at most beta. The stakes depend only on earlier answers, so the verdict replays exactly from a ledger.
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
    """Exact one-sided upper confidence bound on a binomial rate after k successes in n.

    Found by bisection on `binom_cdf`, and bit for bit what that gives: a report's plan holds
    p0 and p1 as computed, and `verify-report` recomputes them from the fingerprint and asks for
    equality, so this arithmetic may be made faster but never different (a closed form such as
    the beta quantile differs in the last bits). The faster form: log C(n, i) is summed once
    per bound, not once per bisection step, in the same order of operations as
    `_log_binom_pmf` (tests/test_stats.py checks the two agree exactly)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    log_choose = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]

    def cdf(p: float) -> float:
        if not 0 < p < 1:
            return binom_cdf(k, n, p)
        lp, lq = math.log(p), math.log1p(-p)
        return min(1.0, sum(math.exp(c + i * lp + (n - i) * lq) for i, c in enumerate(log_choose)))

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) > 1 - confidence:
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


MAX_BET = 0.9  # of the all-in stake: one disagreement costs a copy's bettor ln(1/(1 - MAX_BET))
# One pseudo-answer of 1 smooths the stakes' running mean: the first stake is the largest allowed,
# so an exact copy loses nothing to a warm-up. Chosen by simulating copies and pirates at 0.85-1.0
# against p0 0.2-0.8 (median answers within 1.2x of the ideal ln(1/alpha)/KL); a disagreeing answer
# early costs the pirate's bettor up to ln(1/(1 - MAX_BET)), which it wins back in a few answers.
PRIOR_WEIGHT = 1.0
TESTS = ("betting", "sprt")
# `independent` rests on at least this many answers, however early its bettor wins: a suspect
# that disagrees on its first two points is unlike a pirate scoring above p1 at level beta, but a
# verdict a court reads should rest on more, and the repeat check (against suspects that randomize
# their answers) needs that many answers to ask again.
MIN_ANSWERS_INDEPENDENT = 10


@dataclass
class Bettor:
    """Wealth against H0 "the mean of N scores in [0, 1] is at most null_total / N", the scores
    drawn without replacement in a uniformly random order (see the module docstring).

    `null_total` is the sum of the per-point null rates (N p0 for a uniform p0). The stake on the
    next score is a function of the scores seen so far only (predictable)."""

    null_total: float
    population: int
    prior_mean: float = 1.0
    seen: int = 0
    total: float = 0.0
    log_wealth: float = 0.0

    def null_mean(self) -> float:
        """A bound on the conditional mean of the next score under H0, in [_EPS, 1]. Raising the
        bound to _EPS keeps the stake finite and the factor's mean at most 1: where H0 allows
        a conditional mean of 0 at most, every remaining score is 0."""
        left = self.population - self.seen
        if left <= 0:
            return 1.0
        return min(1.0, max(_EPS, (self.null_total - self.total) / left))

    def stake(self) -> float:
        m = self.null_mean()
        if m >= 1.0:
            return 0.0  # H0 allows every remaining score to be 1: nothing can refute it
        mu = (PRIOR_WEIGHT * self.prior_mean + self.total) / (PRIOR_WEIGHT + self.seen)
        kelly = (mu - m) / (m * (1 - m))
        return min(max(kelly, 0.0), MAX_BET / m)

    def update(self, score: float) -> None:
        x = min(max(float(score), 0.0), 1.0)
        m, lam = self.null_mean(), self.stake()
        self.log_wealth += math.log1p(lam * (x - m))
        self.seen += 1
        self.total += x

    def copy(self) -> Bettor:
        return Bettor(self.null_total, self.population, self.prior_mean, self.seen, self.total, self.log_wealth)

    def best_case_needs(self, threshold: float, limit: int) -> int:
        """How many more scores of 1, at the least, before the wealth could reach
        exp(threshold); `limit` + 1 when even `limit` of them would not."""
        trial = self.copy()
        for k in range(1, limit + 1):
            trial.update(1.0)
            if trial.log_wealth >= threshold:
                return k
        return limit + 1


@dataclass
class BettingTest:
    """Two bettors over the suspect's scores: one against independence (mean at most p0, level
    alpha), one against piracy (mean at least p1, level beta, on 1 - score). Both are
    anytime-valid, so the test may be looked at after every answer and stopped at any time."""

    alpha: float
    beta: float
    piracy: Bettor
    independence: Bettor

    @classmethod
    def start(cls, alpha: float, beta: float, p0: np.ndarray, p1: np.ndarray) -> BettingTest:
        if not (0 < alpha < 0.5 and 0 < beta < 0.5):
            raise ValueError(f"alpha and beta must lie in (0, 0.5), got {alpha}, {beta}")
        n = len(p0)
        p0_total, p1_total = float(np.sum(p0)), float(np.sum(p1))
        piracy = Bettor(p0_total, n)
        independence = Bettor(n - p1_total, n)  # bets on 1 - score: H1 says its mean is at most 1 - p1
        return cls(alpha, beta, piracy, independence)

    @property
    def upper(self) -> float:
        return math.log(1 / self.alpha)

    @property
    def lower(self) -> float:
        return math.log(1 / self.beta)

    def update(self, score: float) -> str | None:
        self.piracy.update(score)
        self.independence.update(1.0 - min(max(float(score), 0.0), 1.0))
        return self.decision()

    def decision(self) -> str | None:
        if self.piracy.log_wealth >= self.upper:
            return "piracy"
        if self.independence.log_wealth >= self.lower and self.independence.seen >= MIN_ANSWERS_INDEPENDENT:
            return "independent"
        return None

    def useful_batch(self, limit: int) -> int:
        """The fewest answers after which the test could decide (if they all went one way), at
        most `limit`: asking more in one batch could only spend queries past a verdict."""
        clearing = max(self.independence.best_case_needs(self.lower, limit), MIN_ANSWERS_INDEPENDENT - self.independence.seen)
        return max(1, min(self.piracy.best_case_needs(self.upper, limit), clearing, limit))


def copy_queries(p0: float, alpha: float) -> float:
    """The answers an exact copy needs under an ideal bet: ln(1/alpha) / ln(1/p0)."""
    return math.inf if p0 >= 1 else (0.0 if p0 <= 0 else math.log(1 / alpha) / math.log(1 / p0))


def t_quantile(q: float, dof: int) -> float:
    """Student's t quantile (scipy's)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(q, dof))


def grouped_prediction_upper(groups: list[list[float]], level: float) -> tuple[float, int] | None:
    """A one-sided (1 - level) prediction bound for one new model of any of the `groups` (models
    trained alike: same architecture and recipe, other seeds and data subsets), and its degrees of
    freedom; None when no group holds two models.

    Each group's agreements are taken on the arcsine-square-root scale, where a proportion's
    sampling variance hardly depends on its level, and modelled as normal around the group's own
    mean with one spread shared by all groups (the pooled within-group standard deviation, K - G
    degrees of freedom). The bound is the largest over groups of mean_g + t_{K-G}(1 - level) * s *
    sqrt(1 + 1/K_g), mapped back; a new model of a kind no group represents is not covered."""
    each = prediction_upper_per_group(groups, level)
    if each is None:
        return None
    bounds, dof = each
    return max(bounds), dof


def prediction_upper_per_group(groups: list[list[float]], level: float) -> tuple[list[float], int] | None:
    """`grouped_prediction_upper` for one new model of each group in turn (empty groups dropped):
    each group's bound, never below its own largest member, and the degrees of freedom; None
    when no group holds two models."""
    groups = [g for g in groups if g]
    s, dof = pooled_arcsine_spread(groups)
    if dof < 1:
        return None
    t = t_quantile(1 - level, dof)
    tops = [float(_arcsine(g).mean()) + t * s * math.sqrt(1 + 1 / len(g)) for g in groups]
    return [max(math.sin(min(top, math.pi / 2)) ** 2, max(g)) for top, g in zip(tops, groups, strict=True)], dof


def _arcsine(values: list[float]) -> np.ndarray:
    return np.arcsin(np.sqrt(np.clip(np.asarray(values, dtype=np.float64), 0, 1)))


def pooled_arcsine_spread(groups: list[list[float]]) -> tuple[float, int]:
    """The pooled within-group standard deviation of the groups' proportions on the
    arcsine-square-root scale, and its degrees of freedom (values beyond one per group); (0.0, 0)
    without a replicate. The spread `prediction_upper_per_group` assumes every group shares."""
    z = [_arcsine(g) for g in groups if g]
    dof = sum(len(v) - 1 for v in z)
    if dof < 1:
        return 0.0, 0
    return math.sqrt(sum(float(((v - v.mean()) ** 2).sum()) for v in z) / dof), dof


def expected_queries(p0: float, p1: float, alpha: float) -> float:
    """Wald's approximation of the mean queries to flag a pirate: ln(1/alpha) / KL(p1 || p0)."""
    p0, p1 = min(max(p0, _EPS), 1 - _EPS), min(max(p1, _EPS), 1 - _EPS)
    kl = p1 * math.log(p1 / p0) + (1 - p1) * math.log((1 - p1) / (1 - p0))
    return math.inf if kl <= 0 else math.log(1 / alpha) / kl
