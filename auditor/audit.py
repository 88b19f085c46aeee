"""One audit: ask a suspect the fingerprint's core points in small batches until the
sequential test decides, or the budget or the points run out."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np

from deepcore_auditor import tool_version
from deepcore_auditor.adapters.base import Access, Oracle
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError
from deepcore_auditor.auditor.channel import QueryChannel
from deepcore_auditor.auditor.errors import BudgetExceeded
from deepcore_auditor.auditor.ledger import QueryLedger, point_digest
from deepcore_auditor.fingerprints.calibration import (
    CLEARING_GAP,
    LEGACY_CLEARING_GAP,
    LEGACY_PREDICTION_LEVEL,
    MODES,
    PREDICTION_LEVEL,
    PREDICTION_LEVELS,
    SET_NAMES,
    TEST_CHOICES,
    point_sets,
    rates,
    resolve_test,
    why_not_betting,
)
from deepcore_auditor.fingerprints.format import Fingerprint
from deepcore_auditor.fingerprints.stats import TESTS, BettingTest, SequentialTest, expected_queries, log_likelihood_ratios

logger = logging.getLogger(__name__)

VERDICTS = ("independent", "piracy", "inconclusive")
ALLOCATIONS = ("fixed", "adaptive")  # how a plan shares its queries between sets of points (Plan.allocation)


@dataclass(frozen=True)
class AuditConfig:
    """How to audit: access mode, identification mode, budget, batch size, error rates, seed,
    and how many points to ask again before concluding `independent` (0: no repeat check).
    `test` is the sequential test: "betting" (anytime-valid), "sprt" (Wald's, which reports made
    before the betting test name and replay under) or "auto" (the default: betting when the
    fingerprint's p0 is a prediction bound, `calibration.resolve_test`); a plan names the one run."""

    access: Access = Access.LABELS
    mode: str = "agreement"
    test: str = "auto"
    budget: int = 200
    batch_size: int = 10
    alpha: float = 0.01
    beta: float = 0.01
    seed: int = 0
    repeat_checks: int = 10

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown identification mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.test not in TEST_CHOICES:
            raise InputError(f"unknown sequential test {self.test!r}: use one of {', '.join(TEST_CHOICES)}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.budget < self.batch_size:
            raise InputError(f"budget {self.budget} is smaller than one batch ({self.batch_size} queries)")
        if not (0 < self.alpha < 0.5):
            raise InputError(f"alpha must lie in (0, 0.5), got {self.alpha}")
        if not (0 < self.beta < 0.5):
            raise InputError(f"beta must lie in (0, 0.5), got {self.beta}")
        if self.seed < 0:
            raise InputError(f"--seed must be 0 or more, got {self.seed}")
        if self.repeat_checks < 0:
            raise InputError(f"repeat checks must be 0 or more, got {self.repeat_checks}")
        if self.mode == "similarity" and self.access is not Access.PROBS:
            raise InputError("the similarity mode compares output vectors: it needs --access probs")


# Two probability answers to the same point are "the same" within this (GPU kernels may differ
# in the last bits; a randomized defence differs by far more). Labels must be equal.
REPEAT_TOLERANCE = 1e-4


def plan_order(n: int, seed: int) -> np.ndarray:
    """The order in which an audit with `seed` asks a fingerprint's `n` points."""
    return np.random.default_rng(seed).permutation(n)


@dataclass(frozen=True)
class Plan:
    """Everything needed to recompute an audit's verdict from its answers alone: the test, the
    order in which points are asked, and per point its digest, the owner's label and the rates.

    It is written in the ledger's header, so a ledger (with the budget) is enough to replay the
    audit (`verify-report`), and a resumed audit must follow the same plan.
    """

    mode: str
    access: str
    alpha: float
    beta: float
    batch_size: int
    seed: int
    repeat_checks: int
    indices: tuple[int, ...]
    digests: tuple[str, ...]
    owner_labels: tuple[int, ...]
    p0: tuple[float, ...]
    p1: tuple[float, ...]
    test: str = "sprt"  # a ledger written before the betting test names none: it ran Wald's
    # Per position, the set of its point (calibration.SET_NAMES: 0 core, 1 the owner's mistakes);
    # empty (a ledger written before error points, or a fingerprint without them): all core points.
    sets: tuple[int, ...] = ()
    # How the queries are shared between the sets (ALLOCATIONS): "fixed", in plan order whatever
    # the answers (what a ledger written before "adaptive" did, and names nothing), or "adaptive",
    # each batch to the set nearest to accusing (`_PerSet.next_positions`).
    allocation: str = "fixed"
    # How far above p0 the betting test's p1 sits (calibration.CLEARING_GAP): what its rates were
    # computed with, so that a verifier recomputes them alike. A ledger written before it names
    # none: its p1 sat LEGACY_CLEARING_GAP above p0. Wald's plans keep the legacy value (unused).
    clearing_gap: float = LEGACY_CLEARING_GAP
    # The level the betting test's p0 was read at (calibration.PREDICTION_LEVEL), for the same
    # reason. A ledger written before it names none: its p0 was read at LEGACY_PREDICTION_LEVEL.
    # Wald's plans keep the legacy value (their p0 reads no level).
    prediction_level: float = LEGACY_PREDICTION_LEVEL

    @classmethod
    def make(cls, fp: Fingerprint, config: AuditConfig, clearing_gap: float = CLEARING_GAP,
             prediction_level: float = PREDICTION_LEVEL) -> Plan:
        """The plan for `config`, under the test it resolves to (`calibration.resolve_test`); the
        rates are the fingerprint's own, computed once per fingerprint object, the betting test's
        p1 `clearing_gap` above p0 and its p0 read at `prediction_level` (a verifier passes the
        plan's own, and the test the plan names: "auto" itself resolves at today's level)."""
        config.validate()
        test = resolve_test(fp, config.mode, config.test, config.alpha, config.budget)
        betting = test == "betting"
        gap = clearing_gap if betting else LEGACY_CLEARING_GAP
        level = prediction_level if betting else LEGACY_PREDICTION_LEVEL
        r = rates(fp, config.mode, test, gap, level)
        sets = point_sets(fp)
        order = plan_order(len(fp), config.seed)
        plan = cls(
            test=test,
            mode=config.mode, access=config.access.value, alpha=config.alpha, beta=config.beta,
            batch_size=config.batch_size, seed=config.seed, repeat_checks=config.repeat_checks,
            indices=tuple(int(i) for i in order),
            digests=tuple(point_digest(fp.points[i]) for i in order),
            owner_labels=tuple(int(fp.owner_labels[i]) for i in order),
            p0=tuple(float(r.p0[i]) for i in order),
            p1=tuple(float(r.p1[i]) for i in order),
            sets=tuple(int(k) for k in sets[order]) if sets.max() > 0 else (),
            allocation="adaptive" if sets.max() > 0 else "fixed",
            clearing_gap=gap,
            prediction_level=level,
        )
        problem = plan.problem()
        if problem:  # the very check a verifier applies to the plan read back from the ledger
            raise InputError(f"cannot audit with these settings: {problem}")
        return plan

    def problem(self) -> str | None:
        """What makes this plan invalid, or None: one check for the plan an audit makes and the
        plan `from_dict` reads back, so an audit can never write a report its verifier rejects."""
        n = len(self.digests)
        if n == 0 or any(len(x) != n for x in (self.indices, self.owner_labels, self.p0, self.p1)):
            return "plan arrays differ in length"
        if self.test not in TESTS:
            return f"unknown sequential test {self.test!r}"
        if self.mode not in MODES or self.batch_size < 1 or not (0 < self.alpha < 0.5 and 0 < self.beta < 0.5):
            return "unknown mode or out-of-range batch size, alpha or beta"
        if self.seed < 0:
            return f"the seed must be 0 or more, got {self.seed}"
        if not 0 <= self.repeat_checks <= n:
            return f"repeat checks must lie between 0 and the fingerprint's {n} points, got {self.repeat_checks}"
        if self.sets and (len(self.sets) != n or any(k not in range(len(SET_NAMES)) for k in self.sets)):
            return f"point sets must be one of 0..{len(SET_NAMES) - 1} per point"
        if self.allocation not in ALLOCATIONS:
            return f"unknown allocation {self.allocation!r}: one of {', '.join(ALLOCATIONS)}"
        # Only the gaps this tool has used: a report stating another would have its p1 recomputed
        # from the fingerprint under a gap of its own choosing, and the check would prove nothing.
        if self.clearing_gap not in (CLEARING_GAP, LEGACY_CLEARING_GAP) or (
                self.test != "betting" and self.clearing_gap != LEGACY_CLEARING_GAP):
            return (f"unknown clearing gap {self.clearing_gap} for the {self.test} test: "
                    f"{CLEARING_GAP} or {LEGACY_CLEARING_GAP} (before it was recorded) for the betting test, none for Wald's")
        if self.prediction_level not in PREDICTION_LEVELS or (
                self.test != "betting" and self.prediction_level != LEGACY_PREDICTION_LEVEL):
            return (f"unknown prediction level {self.prediction_level} for the {self.test} test: {PREDICTION_LEVEL} or "
                    f"{LEGACY_PREDICTION_LEVEL} (before it was recorded) for the betting test, none for Wald's")
        if self.clearing_gap == LEGACY_CLEARING_GAP and self.prediction_level != LEGACY_PREDICTION_LEVEL:
            return (f"prediction level {self.prediction_level} with the clearing gap {LEGACY_CLEARING_GAP}: no version "
                    f"of this tool wrote that pair (the gap moved to {CLEARING_GAP} before the level moved)")
        if any(not 0 <= v < 2**31 for v in self.owner_labels):
            return "owner label out of range"
        if any(not (math.isfinite(v) and 0 <= v <= 1) for v in self.p0 + self.p1):
            return "rates outside [0, 1]"
        return None

    def to_dict(self) -> dict[str, Any]:
        # Field by field, not `asdict` (which deep-copies each of the thousand numbers: a third
        # of an audit's own cost); every field is a scalar or a tuple of scalars.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.test != "betting":  # Wald's rates read no gap or level: its plans stay as they were written (and resume)
            del d["clearing_gap"], d["prediction_level"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """A plan read back from a ledger header; anything malformed raises ValueError."""
        try:
            plan = cls(
                mode=str(d["mode"]), access=Access(d["access"]).value, alpha=float(d["alpha"]), beta=float(d["beta"]),
                batch_size=int(d["batch_size"]), seed=int(d["seed"]), repeat_checks=int(d["repeat_checks"]),
                indices=tuple(int(v) for v in d["indices"]), digests=tuple(str(v) for v in d["digests"]),
                owner_labels=tuple(int(v) for v in d["owner_labels"]),
                p0=tuple(float(v) for v in d["p0"]), p1=tuple(float(v) for v in d["p1"]),
                test=str(d.get("test", "sprt")),
                sets=tuple(int(v) for v in d.get("sets", ())),
                allocation=str(d.get("allocation", "fixed")),
                clearing_gap=float(d.get("clearing_gap", LEGACY_CLEARING_GAP)),
                prediction_level=float(d.get("prediction_level", LEGACY_PREDICTION_LEVEL)),
            )
        except (KeyError, TypeError, OverflowError) as e:
            raise ValueError(f"malformed plan ({type(e).__name__}: {e})") from e
        problem = plan.problem()
        if problem:
            raise ValueError(f"malformed plan: {problem}")
        return plan

    def __len__(self) -> int:
        return len(self.digests)

    def set_of(self) -> np.ndarray:
        """Per position, its point's set (all 0 without error points)."""
        return np.asarray(self.sets, dtype=np.int64) if self.sets else np.zeros(len(self), dtype=np.int64)

    def stated_rates(self) -> tuple[float, float]:
        """p0 and p1 as the result states them, one figure each: their means over the core points
        (error points have their own, in the calibration summary). The audit and the report's
        verifier both read them here."""
        core = self.set_of() == 0
        return float(np.mean(np.asarray(self.p0)[core])), float(np.mean(np.asarray(self.p1)[core]))

    def set_alpha(self) -> float:
        """Each set's test accuses at alpha / the number of sets (a union bound: an independent
        model is accused with probability at most alpha whichever set's test would do it)."""
        return self.alpha / len(np.unique(self.set_of()))


def score_answers(answers: np.ndarray, owner_labels: np.ndarray, access: Access, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per point: agreement with the owner's label (0/1), and the score the test uses."""
    if access is Access.LABELS:
        a = (answers == owner_labels).astype(np.float64)
        return a, a
    a = (answers.argmax(axis=1) == owner_labels).astype(np.float64)
    s = answers[np.arange(len(answers)), owner_labels] if mode == "similarity" else a
    return a, np.asarray(s, dtype=np.float64)


def same_answer(first: Any, again: Any) -> bool:
    """Whether a repeated query got the answer it got the first time."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(again, dtype=np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= REPEAT_TOLERANCE))


def repeat_positions(plan: Plan, asked: np.ndarray) -> np.ndarray:
    """Which of the positions `asked` (in the order the test asked them) a repeat check asks
    again (seeded, sorted). A plan asked in its own order asks a prefix, and gets the positions
    it always got."""
    asked = np.asarray(asked, dtype=np.int64)
    k = min(plan.repeat_checks, len(asked))
    return np.sort(asked[np.random.default_rng([plan.seed, 1]).choice(len(asked), size=k, replace=False)])


@dataclass
class Outcome:
    """Where the sequential test stopped."""

    decision: str | None = None
    asked: int = 0
    llr: float = 0.0
    trajectory: list[Step] = field(default_factory=list)
    stop_note: str | None = None
    per_set: dict[str, tuple[float, int]] = field(default_factory=dict)  # set name -> (agreement, answers)
    positions: list[int] = field(default_factory=list)  # the plan positions asked, in the order asked
    exhausted: bool = False  # no point was left that the test could still use


class _Wald:
    """Wald's SPRT over one set's per-point rates (indexed by plan position), batch by batch."""

    def __init__(self, alpha: float, beta: float, p0: np.ndarray, p1: np.ndarray) -> None:
        self.test = SequentialTest(alpha, beta)
        self.p0, self.p1 = p0, p1
        self.llr = 0.0

    def batch(self, limit: int) -> int:
        return limit

    def add(self, pos: np.ndarray, s: np.ndarray) -> str | None:
        self.llr += float(log_likelihood_ratios(s, self.p0[pos], self.p1[pos]).sum())
        return self.test.decide(self.llr)

    def evidence(self) -> tuple[float, float | None]:
        return self.llr, None


class _Betting:
    """The two bettors of `stats.BettingTest` over one set's points, looked at after every
    answer; a batch is never larger than the answers after which the test could decide
    (`useful_batch`)."""

    def __init__(self, alpha: float, beta: float, p0: np.ndarray, p1: np.ndarray, members: np.ndarray) -> None:
        self.test = BettingTest.start(alpha, beta, p0[members], p1[members])

    def batch(self, limit: int) -> int:
        return self.test.useful_batch(limit)

    def add(self, pos: np.ndarray, s: np.ndarray) -> str | None:
        decision = None
        for score in s:  # anytime-valid: a threshold crossed at any answer of the batch decides
            decision = decision or self.test.update(float(score))
        return decision

    def evidence(self) -> tuple[float, float | None]:
        return self.test.piracy.log_wealth, self.test.independence.log_wealth


class _PerSet:
    """One test per set of points (`Plan.sets`), each at `Plan.set_alpha`: `piracy` as soon as
    any set's test says so; `independent` once every set's test has said so (a pirate is cleared
    only if the test of the set it copies clears it: at most beta). One set: the plan's test
    alone, as before sets existed.

    Which positions are asked next (`next_positions`) is the plan's allocation. "fixed": the
    plan's order, whatever the answers; a set whose test said `independent` is not scored further
    and its points still asked are spent without evidence. "adaptive": each batch goes to one
    undecided set — the one whose evidence for piracy is largest, ties to the set least asked for
    its size, then to the lower set — and takes that set's next points in plan order. A weight
    copy, which keeps the owner's core decisions but not its mistakes, is then asked core points;
    a student, the reverse; a set cleared is asked no more.

    Why each set's test stays valid (its level alpha/sets, its anytime guarantee): the set's
    points are still asked in the plan's random order, which the answers never change, and the
    choice of *when* to ask the set's next point depends on answers already given only — the next
    point of a set is, given everything seen, a uniform draw from its points not yet asked, which
    is all its bettor assumes. The allocation is a function of the answers alone, so the report's
    verifier, running this code on the ledger's answers, asks the same positions in the same order."""

    def __init__(self, plan: Plan) -> None:
        self.sets = plan.set_of()
        self.adaptive = plan.allocation == "adaptive"
        p0, p1 = np.asarray(plan.p0), np.asarray(plan.p1)
        alpha = plan.set_alpha()
        self.tests: dict[int, _Wald | _Betting] = {}
        self.members: dict[int, np.ndarray] = {}
        for k in np.unique(self.sets).tolist():
            self.members[k] = np.flatnonzero(self.sets == k)
            self.tests[k] = (_Betting(alpha, plan.beta, p0, p1, self.members[k]) if plan.test == "betting"
                             else _Wald(alpha, plan.beta, p0, p1))
        self.decided: dict[int, str] = {}
        self.asked = 0
        self.taken = dict.fromkeys(self.tests, 0)  # per set, how many of its positions were asked

    def next_positions(self, batch_size: int, room: int) -> np.ndarray:
        """The plan positions to ask next, at most `room` of them; none when no point is left
        that the test could use."""
        if not self.adaptive:
            n = min(min(t.batch(batch_size) for k, t in self.tests.items() if k not in self.decided),
                    len(self.sets) - self.asked, room)
            return np.arange(self.asked, self.asked + max(0, n))
        open_sets = [k for k in self.tests if k not in self.decided and self.taken[k] < len(self.members[k])]
        if not open_sets:
            return np.zeros(0, dtype=np.int64)
        k = max(open_sets, key=lambda j: (self.tests[j].evidence()[0], -self.taken[j] / len(self.members[j]), -j))
        n = min(self.tests[k].batch(batch_size), len(self.members[k]) - self.taken[k], room)
        return self.members[k][self.taken[k]: self.taken[k] + max(0, n)]

    def add(self, pos: np.ndarray, s: np.ndarray) -> str | None:
        self.asked += len(pos)
        for k, test in self.tests.items():
            mine = self.sets[pos] == k
            self.taken[k] += int(mine.sum())
            if k in self.decided or not mine.any():
                continue
            d = test.add(pos[mine], s[mine])
            if d == "piracy":
                return d
            if d is not None:
                self.decided[k] = d
        return "independent" if len(self.decided) == len(self.tests) else None

    def evidence(self) -> tuple[float, float | None]:
        """The evidence for piracy of the set nearest to accusing, and against piracy of the one
        farthest from clearing: each crosses its threshold (`thresholds`) exactly when the
        combined test decides."""
        ev = [t.evidence() for t in self.tests.values()]
        against = [e[1] for e in ev if e[1] is not None]
        return max(e[0] for e in ev), (min(against) if against else None)


def thresholds(plan: Plan) -> dict[str, float]:
    """The test's thresholds as a report states them: on Wald's log-likelihood ratio, or for the
    betting test on the log wealth against independence (piracy, ln(1/alpha)) and minus the log
    wealth against piracy (independent, ln(beta)), so both plot on one axis; alpha is each set's
    share (`Plan.set_alpha`)."""
    alpha = plan.set_alpha()
    if plan.test == "betting":
        return {"piracy": round(math.log(1 / alpha), 4), "independent": round(math.log(plan.beta), 4)}
    test = SequentialTest(alpha, plan.beta)
    return {"piracy": round(test.upper, 4), "independent": round(test.lower, 4)}


def run_test(
    plan: Plan,
    answers_for: Callable[[np.ndarray], np.ndarray | None],
    budget: int,
    progress: Callable[[Step], None] | None = None,
) -> Outcome:
    """The plan's sequential test: ask batch after batch (`answers_for(positions)`, None = no more
    answers) until it decides, or the budget or the points run out. The audit and the report
    verifier both run this, so a report is checked by the very code that made it."""
    access = Access(plan.access)
    test = _PerSet(plan)
    labels = np.asarray(plan.owner_labels)
    sets = plan.set_of()
    out = Outcome()
    agree: list[float] = []
    scores: list[float] = []
    while out.decision is None and out.asked < budget:
        pos = test.next_positions(plan.batch_size, budget - out.asked)
        if len(pos) == 0:
            out.exhausted = True
            break
        try:
            answers = answers_for(pos)
        except BudgetExceeded as e:  # retries spent what was left
            out.stop_note = f"stopped: {e}"
            break
        if answers is None:
            break
        out.asked += len(pos)
        out.positions.extend(pos.tolist())
        a, s = score_answers(answers, labels[pos], access, plan.mode)
        agree.extend(a.tolist())
        scores.extend(s.tolist())
        out.decision = test.add(pos, s)
        out.llr, against_piracy = test.evidence()
        step = Step(out.asked, round(float(np.mean(agree)), 4), round(float(np.mean(scores)), 4), round(out.llr, 4), out.decision,
                    None if against_piracy is None else round(against_piracy, 4))
        out.trajectory.append(step)
        if progress:
            progress(step)
    if plan.sets and agree:
        asked = sets[out.positions]
        out.per_set = {SET_NAMES[k]: (round(float(np.mean(np.asarray(agree)[asked == k])), 4) if (asked == k).any() else math.nan,
                                      int((asked == k).sum()))
                       for k in np.unique(sets).tolist()}
    return out


@dataclass(frozen=True)
class Step:
    """The state of the test after one batch: the verdict against the number of queries.

    `llr` is the evidence for piracy: Wald's log-likelihood ratio, or the betting test's log
    wealth against independence; `llr_independent` (betting test only) the log wealth against
    piracy."""

    queries: int
    agreement: float
    score: float
    llr: float
    decision: str | None
    llr_independent: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.llr_independent is None:  # Wald's steps keep the shape reports have always had
            del d["llr_independent"]
        return d


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
    answered: int = 0  # points the test used (queries_used also counts retries and repeat checks)
    repeat_check: dict[str, int] = field(default_factory=dict)  # {"asked": k, "differing": d}
    report: str | None = None  # where the audit's report was written (set by the service)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trajectory"] = [s.to_dict() for s in self.trajectory]
        d["expected_queries_if_pirated"] = None if math.isinf(self.expected_queries_if_pirated) else round(self.expected_queries_if_pirated, 1)
        d["agreement"] = None if math.isnan(self.agreement) else self.agreement  # no batch asked: JSON has no NaN
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
# A local model file is what its content digest (sha256) says, wherever it lies: its path is a
# location too, so the same file given by another spelling, or moved, resumes.
LOCATION_KEYS = ("url", "path")


def ledger_header(fp: Fingerprint, suspect: Oracle, config: AuditConfig, plan: Plan | None = None) -> dict[str, Any]:
    """What a ledger must match to be resumed: same fingerprint, suspect, access and plan.

    The suspect's location (`LOCATION_KEYS`), the tool's version and the time are recorded
    beside, not checked.
    """
    identity = suspect.info.identity
    header: dict[str, Any] = {
        "fingerprint_sha256": fp.digest,
        "suspect": {k: v for k, v in identity.items() if k not in LOCATION_KEYS},
        "access": config.access.value,
        "plan": (plan or Plan.make(fp, config)).to_dict(),
        "tool": tool_version(),
        "created_utc": utc_now(),
    }
    location = {k: identity[k] for k in LOCATION_KEYS if k in identity}
    if location:
        header["suspect_location"] = location
    return header


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def audit(
    fp: Fingerprint,
    suspect: Oracle,
    config: AuditConfig,
    *,
    ledger: QueryLedger | None = None,
    retries: int = 3,
    retry_backoff_s: float = 0.5,
    progress: Callable[[Step], None] | None = None,
) -> AuditResult:
    """Ask `suspect` the core points batch by batch until the sequential test decides.

    Queries go through one `QueryChannel` (Recorded(Retrying(Budgeted(WithClassCount(suspect))))): answers already in
    `ledger` are replayed without asking (resume), and the hard budget counts every attempt. Before an
    `independent` verdict, `config.repeat_checks` points are asked again: a suspect that answers
    the same point differently (a randomized defence) gets `inconclusive` instead.
    """
    plan = Plan.make(fp, config)  # validates the config and resolves the test
    r = rates(fp, config.mode, plan.test, plan.clearing_gap, plan.prediction_level)
    ledger = ledger if ledger is not None else QueryLedger(ledger_header(fp, suspect, config, plan))
    prior = ledger.spent  # queries charged in earlier runs of this audit, failed attempts included
    channel = QueryChannel(suspect, fp.num_classes, ledger, max(0, config.budget - prior), retries=retries,
                           retry_backoff_s=retry_backoff_s)
    check_compatible(fp, channel.oracle, config)
    start = time.perf_counter()
    notes = list(r.summary.get("notes", []))  # type: ignore[arg-type]
    if config.test == "auto" and plan.test == "sprt" and config.mode != "clustering":
        notes.append(why_not_betting(fp, config.mode, config.alpha, config.budget) or "sequential test: Wald's")
    indices = np.asarray(plan.indices)

    def ask(pos: np.ndarray) -> np.ndarray:
        return channel.ask(fp.points[indices[pos]], config.access)

    out = run_test(plan, ask, config.budget, progress)
    if out.stop_note:
        notes.append(out.stop_note)
    if out.per_set:
        notes.append("agreement per set of points (each its own test at alpha/{}): ".format(len(out.per_set)) + ", ".join(
            f"{name} {a:.3f} over {k}" if k else f"{name} none asked" for name, (a, k) in out.per_set.items()))
    decision = out.decision
    if decision is None and out.exhausted:
        notes.append(f"the fingerprint's points ran out after {out.asked} of its {len(plan)} before the test decided")
    elif decision is None and out.asked >= config.budget:
        notes.append(f"the budget ran out after {out.asked} queries before the test decided")
    repeat: dict[str, int] = {}
    if decision == "independent" and plan.repeat_checks > 0:
        decision, repeat = _repeat_check(fp, plan, channel, np.asarray(out.positions), notes)
    if channel.retried:  # after the repeat check, whose failed attempts are charged too
        notes.append(f"{channel.retried} failed attempts were retried; each was charged to the budget")
    p0, p1 = plan.stated_rates()
    return AuditResult(
        verdict=decision or "inconclusive",
        queries_used=prior + channel.spent,
        budget=config.budget,
        alpha=config.alpha,
        beta=config.beta,
        mode=config.mode,
        access=config.access.value,
        agreement=out.trajectory[-1].agreement if out.trajectory else math.nan,
        llr=round(out.llr, 4),
        thresholds=thresholds(plan),
        p0=round(p0, 4),
        p1=round(p1, 4),
        expected_queries_if_pirated=expected_queries(p0, p1, config.alpha),
        trajectory=out.trajectory,
        elapsed_s=round(time.perf_counter() - start, 4),
        fingerprint_sha256=fp.digest,
        suspect=channel.info.to_dict(),
        calibration=r.summary,
        replayed_from_ledger=channel.replayed,
        notes=notes,
        answered=out.asked,
        repeat_check=repeat,
    )


def judge_repeats(plan: Plan, asked: np.ndarray, entries: dict[str, Any], repeats: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """The verdict after an `independent` decision, given the repeat answers on record: it stands
    only if every planned repeat was asked and none changed. The audit and the report verifier
    both judge with this."""
    planned = [plan.digests[i] for i in repeat_positions(plan, asked)]
    asked_again = [d for d in planned if d in repeats]
    differing = sum(not same_answer(entries[d], repeats[d]) for d in asked_again)
    ok = differing == 0 and len(asked_again) == len(planned)
    return ("independent" if ok else "inconclusive"), {"asked": len(asked_again), "differing": differing}


def _repeat_check(
    fp: Fingerprint, plan: Plan, channel: QueryChannel, asked: np.ndarray, notes: list[str]
) -> tuple[str, dict[str, int]]:
    """Ask some answered points again before saying `independent`. A suspect that randomizes its
    answers can push its agreement down to look independent: a changed answer, or a check the
    budget left no room for, makes the verdict `inconclusive`."""
    pos = repeat_positions(plan, asked)
    ledger = channel.ledger
    todo = [i for i in pos if plan.digests[i] not in ledger.repeats]
    if len(todo) > channel.remaining:
        notes.append(
            f"the budget left no room to ask {len(pos)} points again (repeat check): an independent verdict needs it; "
            "raise --budget, or pass --repeat-checks 0 to skip the check"
        )
    else:
        try:
            channel.ask_again(fp.points[np.asarray(plan.indices)[pos]], Access(plan.access))
        except BudgetExceeded as e:
            notes.append(f"repeat check not made ({e}): an independent verdict needs it")
    verdict, summary = judge_repeats(plan, asked, ledger.entries, ledger.repeats)
    if summary["differing"]:
        notes.append(
            f"the suspect answered {summary['differing']} of {summary['asked']} repeated queries differently: it randomizes "
            "its answers (a defence against auditing, or a nondeterministic model), so its low agreement does not show independence"
        )
    return verdict, summary
