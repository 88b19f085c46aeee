"""One audit: ask a suspect the fingerprint's core points in small batches until the
sequential test decides, or the budget or the points run out."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adapters.base import Access, Oracle
from adapters.errors import BudgetExceeded, IncompatibleSuspect, InputError
from auditor.budget import Budgeted, QueryLedger, Recorded, Retrying
from auditor.stats import SequentialTest, expected_queries, log_likelihood_ratios
from fingerprints.calibration import MODES, rates
from fingerprints.format import Fingerprint

logger = logging.getLogger(__name__)

VERDICTS = ("independent", "piracy", "inconclusive")


@dataclass(frozen=True)
class AuditConfig:
    """How to audit: access mode, identification mode, budget, batch size, error rates, seed."""

    access: Access = Access.LABELS
    mode: str = "agreement"
    budget: int = 200
    batch_size: int = 10
    alpha: float = 0.01
    beta: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown identification mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.budget < self.batch_size:
            raise InputError(f"budget {self.budget} is smaller than one batch ({self.batch_size} queries)")
        if not (0 < self.alpha < 0.5):
            raise InputError(f"alpha must lie in (0, 0.5), got {self.alpha}")
        if not (0 < self.beta < 0.5):
            raise InputError(f"beta must lie in (0, 0.5), got {self.beta}")
        if self.mode == "similarity" and self.access is not Access.PROBS:
            raise InputError("the similarity mode compares output vectors: it needs --access probs")


@dataclass(frozen=True)
class Step:
    """The state of the test after one batch: the verdict against the number of queries."""

    queries: int
    agreement: float
    score: float
    llr: float
    decision: str | None


@dataclass(frozen=True)
class AuditResult:
    """Everything an audit concluded and what it cost; serializes to JSON."""

    verdict: str
    queries_used: int
    budget: int
    alpha: float
    beta: float
    mode: str
    access: str
    agreement: float
    llr: float
    thresholds: dict[str, float]
    p0: float
    p1: float
    expected_queries_if_pirated: float
    trajectory: list[Step]
    elapsed_s: float
    fingerprint_sha256: str
    suspect: dict[str, Any]
    calibration: dict[str, Any]
    replayed_from_ledger: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expected_queries_if_pirated"] = None if math.isinf(self.expected_queries_if_pirated) else round(self.expected_queries_if_pirated, 1)
        return d


def check_compatible(fp: Fingerprint, oracle: Oracle, config: AuditConfig) -> None:
    """Refuse, before the first query, a suspect that cannot answer what this audit needs."""
    config.validate()
    info = oracle.info
    if config.access not in info.access:
        raise IncompatibleSuspect(
            f"{config.mode} mode with --access {config.access.value}: this suspect only answers {'/'.join(a.value for a in info.access)}"
        )
    if info.num_classes is not None and info.num_classes != fp.num_classes:
        raise IncompatibleSuspect(f"suspect has {info.num_classes} classes, the fingerprint {fp.num_classes}")


# Identity keys that say where a suspect was reached, not what it is. A Triton server restarted
# after a crash may come back on another port (or be reached over gRPC instead of HTTP), so the
# URL is kept in the ledger for the record ("suspect_location") but left out of what --resume
# checks: the model name, its version, the server version and the digest of the model's config
# still have to match, so a ledger is never continued against another model or configuration.
LOCATION_KEYS = ("url",)


def ledger_header(fp: Fingerprint, suspect: Oracle, config: AuditConfig) -> dict[str, Any]:
    """What a ledger must match to be resumed: same fingerprint, suspect and access.

    The suspect's location (`LOCATION_KEYS`) is recorded beside, not checked.
    """
    identity = suspect.info.identity
    header: dict[str, Any] = {
        "fingerprint_sha256": fp.digest,
        "suspect": {k: v for k, v in identity.items() if k not in LOCATION_KEYS},
        "access": config.access.value,
    }
    location = {k: identity[k] for k in LOCATION_KEYS if k in identity}
    if location:
        header["suspect_location"] = location
    return header


def audit(
    fp: Fingerprint,
    suspect: Oracle,
    config: AuditConfig,
    *,
    ledger: QueryLedger | None = None,
    retries: int = 3,
    progress: Callable[[Step], None] | None = None,
) -> AuditResult:
    """Ask `suspect` the core points batch by batch until the sequential test decides.

    Queries go through Recorded(Retrying(Budgeted(suspect))): answers already in `ledger` are
    replayed without asking (resume), and the hard budget counts every attempt.
    """
    config.validate()
    ledger = ledger if ledger is not None else QueryLedger(ledger_header(fp, suspect, config))
    prior = len(ledger)
    budgeted = Budgeted(suspect, max(0, config.budget - prior))
    recorded = Recorded(Retrying(budgeted, attempts=retries), ledger)
    oracle: Oracle = recorded
    check_compatible(fp, oracle, config)
    r = rates(fp, config.mode)
    test = SequentialTest(config.alpha, config.beta)
    order = np.random.default_rng(config.seed).permutation(len(fp))
    start = time.perf_counter()
    agree: list[float] = []
    scores: list[float] = []
    llr = 0.0
    trajectory: list[Step] = []
    decision: str | None = None
    notes = list(r.summary.get("notes", []))  # type: ignore[arg-type]
    asked = 0
    while decision is None and asked < len(order):
        n = min(config.batch_size, len(order) - asked, config.budget - asked)
        if n <= 0:
            break
        idx = order[asked : asked + n]
        try:
            answer = oracle.query(fp.points[idx], config.access)
        except BudgetExceeded as e:  # retries spent what was left
            notes.append(f"stopped: {e}")
            break
        asked += n
        if config.access is Access.LABELS:
            a = (answer == fp.owner_labels[idx]).astype(np.float64)
            s = a
        else:
            a = (answer.argmax(axis=1) == fp.owner_labels[idx]).astype(np.float64)
            s = answer[np.arange(n), fp.owner_labels[idx]] if config.mode == "similarity" else a
        agree.extend(a.tolist())
        scores.extend(s.tolist())
        llr += float(log_likelihood_ratios(s, r.p0[idx], r.p1[idx]).sum())
        decision = test.decide(llr)
        step = Step(asked, round(float(np.mean(agree)), 4), round(float(np.mean(scores)), 4), round(llr, 4), decision)
        trajectory.append(step)
        if progress:
            progress(step)
    if decision is None and asked >= len(order):
        notes.append(f"the fingerprint's {len(order)} points ran out before the test decided")
    elif decision is None and asked >= config.budget:
        notes.append(f"the budget ran out after {asked} queries before the test decided")
    p0, p1 = float(r.p0.mean()), float(r.p1.mean())
    return AuditResult(
        verdict=decision or "inconclusive",
        queries_used=prior + budgeted.spent,
        budget=config.budget,
        alpha=config.alpha,
        beta=config.beta,
        mode=config.mode,
        access=config.access.value,
        agreement=trajectory[-1].agreement if trajectory else math.nan,
        llr=round(llr, 4),
        thresholds={"piracy": round(test.upper, 4), "independent": round(test.lower, 4)},
        p0=round(p0, 4),
        p1=round(p1, 4),
        expected_queries_if_pirated=expected_queries(p0, p1, config.alpha),
        trajectory=trajectory,
        elapsed_s=round(time.perf_counter() - start, 4),
        fingerprint_sha256=fp.digest,
        suspect=oracle.info.to_dict(),
        calibration=r.summary,
        replayed_from_ledger=recorded.replayed,
        notes=notes,
    )
