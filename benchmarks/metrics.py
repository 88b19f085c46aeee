"""Score statistics of the benchmark: AUC, the ROC curve, the true-positive rate at a bounded
false-positive rate, the binomial threshold at a false identification rate, and the Bernoulli KL
divergence (the expected queries of a sequential test)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from deepcore_auditor.fingerprints.stats import binom_cdf


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not pos or not neg:
        return math.nan
    p, n = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def roc_curve(pos: Sequence[float], neg: Sequence[float]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) over every threshold."""
    ts = sorted(set(pos) | set(neg), reverse=True)
    fpr, tpr = [0.0], [0.0]
    for t in ts:
        fpr.append(float(np.mean(np.asarray(neg) >= t)))
        tpr.append(float(np.mean(np.asarray(pos) >= t)))
    return fpr, tpr


def tpr_at_fpr(pos: Sequence[float], neg: Sequence[float], max_fpr: float) -> tuple[float, float]:
    """(true-positive rate, false-positive rate) of the threshold that flags the most positives
    while flagging at most `max_fpr` of the negatives, a score flagged when strictly above it.

    With N negatives the rates attainable are multiples of 1/N: below 1/N (N < 100 for 1%) the
    only admissible threshold flags no negative at all, i.e. it sits on the highest negative
    score, and a positive counts only when it scores above every negative. The field's headline
    figure (TPR at FPR <= 1%) read on a zoo of a few dozen homologous models is therefore that
    strict one."""
    if not pos or not neg:
        return math.nan, math.nan
    n = np.sort(np.asarray(neg, float))[::-1]
    allowed = int(math.floor(max_fpr * len(n) + 1e-9))  # negatives that may be flagged
    t = n[allowed] if allowed < len(n) else -math.inf
    return float(np.mean(np.asarray(pos, float) > t)), float(np.mean(n > t))


def binomial_threshold(p0: float, n: int, alpha: float) -> float:
    """The smallest agreement k/n with P(Binomial(n, p0) >= k) <= alpha (above 1 if none)."""
    for k in range(n + 1):
        if 1.0 - (binom_cdf(k - 1, n, p0) if k > 0 else 0.0) <= alpha:
            return k / n
    return (n + 1) / n


def kl_bernoulli(p: float, q: float) -> float:
    p, q = min(max(p, 1e-9), 1 - 1e-9), min(max(q, 1e-9), 1 - 1e-9)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
