"""Per-point rates for the sequential test, read off the known models stored in a fingerprint.

p0 is what an independent model scores at most; it comes from *calibration* references, never
from those used to choose the points (selection makes them refuse, so they would understate
p0). It is an upper confidence bound, not a point estimate: the largest of each reference's
exact (or Hoeffding) upper bound and the references' mean plus two between-model standard
deviations, so an unseen independent model that agrees more than the calibration ones is still
covered.
p1 is what a pirate scores at least: a lower bound from the held-out piracy simulations.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.fingerprints.format import Fingerprint, ModelAnswers
from deepcore_auditor.fingerprints.quality import quality_problem
from deepcore_auditor.fingerprints.stats import (
    TESTS,
    Bettor,
    clopper_pearson_lower,
    clopper_pearson_upper,
    grouped_prediction_upper,
    hoeffding_lower,
    hoeffding_upper,
)

logger = logging.getLogger(__name__)

MODES = ("agreement", "similarity", "clustering")
CONFIDENCE = 0.95
MIN_GAP = 0.1  # p1 is held at least this far above p0, so the test has power
# The betting test's p1: its `independent` verdict clears a suspect scoring at least p1 with
# probability at most beta, and says nothing of a pirate between p0 and p1 — one there is cleared
# as readily as an independent model. At 0.1 above p0 the Fashion-MNIST benchmark (2026-12-07,
# fresh machine, p0 0.659) cleared an adversarially fine-tuned copy at 0.718 and an adversarial
# extraction at 0.565 / 0.730 on the two sets; at 0.05 both were caught (54 of 55 pirates instead
# of 52) and the 18 homologous suspects were still all cleared, after a median of 28 queries
# instead of 24 (at 0.02: 31.5, the same pirates caught). On the CIFAR-10 benchmark (p0 0.639) it
# bought nothing and cost more: 50 of 55 caught either way, the same four cleared (each below p0
# on the core points; on the error points the pruned copy below p0, the three students 0.014-0.029
# above it, inside even the narrower band), the homologous suspects cleared
# after a median of 68 queries instead of 48 (at most 158). Kept for the guarantee: `independent`
# now says a pirate agreeing at least p0 + 0.05 would be cleared at most at beta. Plans written
# before it name none: their p1 sat LEGACY_CLEARING_GAP above p0, and they verify under it.
CLEARING_GAP = 0.05
LEGACY_CLEARING_GAP = 0.1
# How often the prediction bound's model lets an unseen independent model of a reference kind lie
# above p0. The model (normal on the arcsine scale, one spread pooled over every kind) is what the
# references can support, and it understates: on the null benchmarks of 2026-12-07 the owner's
# architecture trained with other seeds spread 1.8-2.4x (Fashion-MNIST, 100 models) and 2.8x
# (CIFAR-10, 20 models) as widely as the references' pooled spread, and its own kind's bound at
# level 0.01 was exceeded by 2-3 in 100 and 3 in 20. At 0.01, p0 depended on luck in the draw of
# references: on the same points, 19 references instead of 13 lowered the Fashion-MNIST error
# points' p0 from 0.729 to 0.685 and the test then accused 2 of the 300 independent models. At
# 0.001 (Student's t at 8 degrees of freedom 4.50 instead of 2.90: the margin a 1% bound needs
# if the true spread is about 1.6x the estimate), with the fingerprints rebuilt, none of the 350
# null models lay above p0 and none was accused, with 10, 13 or 19 references on either data set;
# the price is queries (the Fashion-MNIST benchmark's weight copies after 15 instead of 11, its
# miss rate at 100 queries 0.31 instead of 0.09). A plan records the level its p0 was read at;
# plans written before name none and were read at LEGACY_PREDICTION_LEVEL.
PREDICTION_LEVEL = 0.001
LEGACY_PREDICTION_LEVEL = 0.01
PREDICTION_LEVELS = (PREDICTION_LEVEL, LEGACY_PREDICTION_LEVEL)
P1_DEFAULT = 0.9  # when no held-out piracy simulation is stored
P1_MAX = 0.98  # a pirate is never assumed more faithful than this: one disagreement is not proof
SMOOTHING = 4.0  # clustering: pseudo-models pulling each point's rate towards the pooled bound


@dataclass(frozen=True)
class Rates:
    """Per-point p0 and p1 for one identification mode, with how they were obtained."""

    mode: str
    p0: np.ndarray
    p1: np.ndarray
    summary: dict[str, object]


def owner_accuracy(fp: Fingerprint) -> float | None:
    """The owner's held-out accuracy as the builder measured it, when the fingerprint says."""
    for key in ("owner_holdout_accuracy", "owner_test_accuracy"):
        value = fp.extra.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def check_known_models(fp: Fingerprint) -> list[str]:
    """Refuse a fingerprint whose known models are implausible (a reference that never learnt the
    task makes p0 look small: the false accusations this check exists for). Returns notes on what
    could not be checked."""
    acc = owner_accuracy(fp)
    unmeasured = [m.name for m in fp.known_models if m.quality is None]
    for m in fp.known_models:
        if m.quality is None:
            continue
        problem = quality_problem(m.name, m.family, str(m.quality["arch"]), float(m.quality["accuracy"]), acc, fp.num_classes)
        if problem:
            raise InputError(f"the fingerprint's known model {problem}: its rates cannot be trusted; rebuild the fingerprint")
    if unmeasured:
        return [f"{len(unmeasured)} known models carry no held-out accuracy (made before it was measured): "
                "their plausibility is unchecked"]
    if acc is None:
        return ["the owner's accuracy is not recorded: the known models' plausibility is unchecked"]
    return []


def _groups(fp: Fingerprint) -> tuple[list[ModelAnswers], list[ModelAnswers], list[str]]:
    notes: list[str] = check_known_models(fp)
    indep = [m for m in fp.known_models if m.kind == "independent" and m.role == "calibration"]
    if not indep:
        indep = [m for m in fp.known_models if m.kind == "independent"]
        if indep:
            notes.append("no held-out calibration references: p0 from selection references (optimistic)")
    if not indep:
        raise InputError("the fingerprint carries no reference models: p0 cannot be calibrated")
    pir = [m for m in fp.known_models if m.kind == "piracy" and m.role == "calibration"]
    if not pir:
        notes.append(f"no held-out piracy simulations: p1 set to {P1_DEFAULT}")
    return indep, pir, notes


def _scores(fp: Fingerprint, m: ModelAnswers, soft: bool) -> np.ndarray:
    return m.owner_prob if soft else (m.labels == fp.owner_labels).astype(np.float64)


def rate_bound(values: list[np.ndarray], soft: bool, upper: bool) -> float:
    """A bound on the group's rate for models not in the group: the widest of each model's
    own confidence bound and mean +/- 2 between-model standard deviations (the spread left
    once each model's sampling noise over the n points is taken out)."""
    n = len(values[0])
    means = np.array([v.mean() for v in values])
    if soft:
        each = [hoeffding_upper(m, n, CONFIDENCE) if upper else hoeffding_lower(m, n, CONFIDENCE) for m in means]
    else:
        k = [int(round(v.sum())) for v in values]
        each = [clopper_pearson_upper(x, n, CONFIDENCE) if upper else clopper_pearson_lower(x, n, CONFIDENCE) for x in k]
    spread = 0.0
    if len(means) > 1:
        noise = float(np.mean([v.var() for v in values])) / n
        spread = 2 * float(np.sqrt(max(0.0, means.var(ddof=1) - noise)))
    if upper:
        return float(min(1.0, max(max(each), means.mean() + spread)))
    return float(max(0.0, min(min(each), means.mean() - spread)))


# The kinds of points a fingerprint holds, by set number (`point_sets`): core points, grown far
# past the owner's boundary, and the owner's own mistakes on natural held-out data
# (fingerprints.build: error points), which follow its core points in the file.
SET_NAMES = ("core", "errors")


def point_sets(fp: Fingerprint) -> np.ndarray:
    """Per point, the number of its set in SET_NAMES: the last `extra["error_points"]` points are
    the owner's mistakes, the others core points (all of them in a fingerprint without any)."""
    sets = np.zeros(len(fp), dtype=np.int64)
    k = fp.extra.get("error_points", 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(fp):
        raise InputError(f"the fingerprint names {k} error points among its {len(fp)} points")
    if k:
        sets[len(fp) - k:] = 1
    return sets


def subset(fp: Fingerprint, index: np.ndarray) -> Fingerprint:
    """The fingerprint restricted to the points at `index`, every known model's answers with them,
    as one set of points of its own (no error points named)."""
    extra = {k: v for k, v in fp.extra.items() if k != "error_points"}
    known = tuple(dataclasses.replace(m, labels=m.labels[index], owner_prob=m.owner_prob[index]) for m in fp.known_models)
    return dataclasses.replace(fp, points=fp.points[index], owner_labels=fp.owner_labels[index],
                               owner_probs=fp.owner_probs[index], known_models=known, extra=extra, signature=None)


def set_means(fp: Fingerprint, values: np.ndarray) -> dict[str, float]:
    """The mean of a per-point array (an agreement, a rate) over each set of points, by name
    (SET_NAMES), to four places; {} for a fingerprint of one set, whose mean is the whole one."""
    sets = point_sets(fp)
    if sets.max() == 0:
        return {}
    return {name: round(float(np.mean(values[sets == k])), 4) for k, name in enumerate(SET_NAMES)}


def set_view(fp: Fingerprint, k: int) -> Fingerprint:
    """`subset` to the points of set `k`, made once per fingerprint object (`Fingerprint.derived`),
    so that its own memo — the rates, the costly part — serves every audit that asks again."""
    key = ("set", k)
    view = fp.derived.get(key)
    if view is None:
        view = fp.derived[key] = subset(fp, np.flatnonzero(point_sets(fp) == k))
    return view


def rates(fp: Fingerprint, mode: str, test: str = "sprt", gap: float = CLEARING_GAP, level: float | None = None) -> Rates:
    """The test's per-point p0/p1 for `mode` (agreement, similarity, clustering) under `test`
    ("betting" or "sprt"; the rates a report's plan holds are recomputed under the test it names),
    the betting test's p1 `gap` above p0 (`CLEARING_GAP`) and its p0's prediction bound read at
    `level` (None: `PREDICTION_LEVEL`); a plan recomputes under its own gap and level.

    Each set of points (`point_sets`) gets its own rates, from the known models' answers on that
    set alone: an independent model that agrees little with the owner's core points may agree
    more with its mistakes, and the reverse (the audit runs one test per set). The summary is the
    core points' one, with the error points' own under "error_points".

    Computed once per fingerprint object (`Fingerprint.derived`): the exact binomial bounds are
    most of an audit's fixed cost. Each call gets its own summary; p0 and p1 are read-only."""
    level = PREDICTION_LEVEL if level is None else level
    if level not in PREDICTION_LEVELS:
        raise InputError(f"unknown prediction level {level}: {' or '.join(map(str, PREDICTION_LEVELS))}")
    betting = test == "betting"
    key = ("rates", mode, test, gap if betting else None, level if betting else None)  # Wald's reads neither
    kept = fp.derived.get(key)
    if kept is None:
        sets = point_sets(fp)
        if sets.max() == 0:
            kept = _rates(fp, mode, test, gap, level)
        else:
            parts = [rates(set_view(fp, k), mode, test, gap, level) for k in range(len(SET_NAMES))]
            p0, p1 = np.empty(len(fp)), np.empty(len(fp))
            for k, r in enumerate(parts):
                p0[sets == k], p1[sets == k] = r.p0, r.p1
            kept = Rates(mode, p0, p1, {**parts[0].summary, "error_points": parts[1].summary})
        kept.p0.setflags(write=False)
        kept.p1.setflags(write=False)
        fp.derived[key] = kept
    return dataclasses.replace(kept, summary=copy.deepcopy(kept.summary))


def _rates(fp: Fingerprint, mode: str, test: str, gap: float = CLEARING_GAP, level: float = PREDICTION_LEVEL) -> Rates:
    if mode not in MODES:
        raise InputError(f"unknown identification mode {mode!r}: use one of {', '.join(MODES)}")
    if test not in TESTS:
        raise InputError(f"unknown sequential test {test!r}: use one of {', '.join(TESTS)}")
    if mode == "clustering" and test == "betting":
        raise InputError("the clustering mode's per-point rates, read off a few references, bound no unseen model's "
                         "answers, so the betting test does not take them: use the agreement mode (or --test sprt to "
                         "repeat an audit made with Wald's test)")
    indep, pir, notes = _groups(fp)
    soft = mode == "similarity"
    n = len(fp)
    p0 = rate_bound([_scores(fp, m, soft) for m in indep], soft, upper=True)
    pirates = rate_bound([_scores(fp, m, soft) for m in pir], soft, upper=False) if pir else P1_DEFAULT
    if test == "betting":
        return _betting_rates(fp, mode, n, p0, pirates, indep, pir, notes, soft, gap, level)
    # Wald's test decides for whichever hypothesis is nearer the truth: a pirate scoring
    # between p0 and p1 would drift to 'independent'. So p1 sits halfway between p0 and the
    # held-out pirates' lower bound, never closer than MIN_GAP to p0.
    p1 = max(p0 + MIN_GAP, (p0 + pirates) / 2)
    if p1 > P1_MAX:
        # p0 is never lowered (that would void the false-identification bound); p1 shrinks instead.
        p1 = max(P1_MAX, (p0 + 1) / 2)
        if p0 > P1_MAX - MIN_GAP:
            notes.append(f"independent models agree up to {p0:.2f}: only near-copies of the owner can be told apart")
    if pirates < p0 + MIN_GAP:
        notes.append(f"held-out pirates score down to {pirates:.2f}, not clearly above p0 {p0:.2f}: "
                     f"pirates that agree less than {p1:.2f} may be called independent")
    p0_i, p1_i = np.full(n, p0), np.full(n, p1)
    if mode == "clustering":
        k0 = np.sum([_scores(fp, m, False) for m in indep], axis=0)
        p0_i = np.maximum((k0 + SMOOTHING * p0) / (len(indep) + SMOOTHING), 0.02)
        if pir:
            k1 = np.sum([_scores(fp, m, False) for m in pir], axis=0)
            p1_i = (k1 + SMOOTHING * p1) / (len(pir) + SMOOTHING)
        p1_i = np.minimum(np.maximum(p1_i, p0_i + 0.05), 0.999)
    summary = {
        "p0": round(p0, 4),
        "p1": round(p1, 4),
        "independent_models": {m.name: round(float(_scores(fp, m, soft).mean()), 4) for m in indep},
        "piracy_models": {m.name: round(float(_scores(fp, m, soft).mean()), 4) for m in pir},
        "confidence": CONFIDENCE,
        "notes": notes,
    }
    return Rates(mode, p0_i, p1_i, summary)


MIN_PREDICTION_DOF = 4  # replicate references needed before the seed-to-seed spread is estimated at all


TEST_CHOICES = ("auto", *TESTS)


def resolve_test(fp: Fingerprint, mode: str, test: str, alpha: float = 0.01, budget: int = 200) -> str:
    """The sequential test an audit runs: `test` itself, or for "auto" (the default) the betting
    test when the fingerprint's references give p0 as a prediction bound for unseen models under
    which an exact copy is identifiable within `budget` at `alpha` (`why_not_betting`), and
    Wald's otherwise. The betting test asks without replacement and gains evidence from any mean
    above p0, so it accuses every independent model that p0 fails to bound — on the CIFAR-10
    regression world (5 references, p0 0.767, same-architecture competitors at 0.80-0.84) it
    accused 12 of 40 audits where Wald's test, whose drift to the nearer hypothesis tolerates a
    mean a little above p0, accused 3. A p0 that does not bound is no ground for the sharper test."""
    if test not in TEST_CHOICES:
        raise InputError(f"unknown sequential test {test!r}: use one of {', '.join(TEST_CHOICES)}")
    if mode == "clustering" and test != "sprt":
        raise InputError("the clustering mode's per-point rates, read off a few references, bound no unseen model "
                         "(Fashion-MNIST benchmark, 2026-12-06: 6 of 18 independent suspects accused): use the agreement "
                         "mode; --test sprt repeats an audit made with it")
    if test != "auto":
        return test
    return "sprt" if why_not_betting(fp, mode, alpha, budget) else "betting"


def why_not_betting(fp: Fingerprint, mode: str, alpha: float, budget: int) -> str | None:
    """Why `auto` runs Wald's test on this fingerprint (a note for the audit), or None when it runs
    the betting test: p0 must be a prediction bound (enough replicate references), and under
    that bound an exact copy must still be identifiable within the audit's budget — where the
    references vary so much from seed to seed that even an answer of 1 to every query would not
    reach 1/alpha before the budget runs out, the betting test could only ever say
    `inconclusive` to a pirate."""
    dof = prediction_dof(fp, mode)
    if dof < MIN_PREDICTION_DOF:
        return (f"sequential test: Wald's — the betting test needs a p0 that bounds unseen independent models, which "
                f"this fingerprint's references do not give ({dof} degrees of freedom; rebuild with "
                "--calibration-references 10 or more)")
    n = len(fp)
    limit = min(budget, n)
    sets = point_sets(fp)
    if sets.max() > 0:  # the core points' own test, at its share of alpha; the adaptive allocation
        # (`audit._PerSet`) asks a copy of the core points nothing else, so it may have every query
        fp = set_view(fp, 0)
        n = len(fp)
        alpha, limit = alpha / len(SET_NAMES), min(limit, n)
    p0 = float(np.mean(rates(fp, mode, "betting").p0))
    if Bettor(n * p0, n).best_case_needs(math.log(1 / alpha), limit) > limit:
        return (f"sequential test: Wald's — the references vary so much that their prediction bound puts p0 at "
                f"{p0:.3f}, where not even an exact copy could be identified within {limit} queries at alpha {alpha:g}; "
                "Wald's test assumes independent models agree at most its own p0 (the references' bound): rebuild with "
                "more points or more references, or raise the budget, for the betting test's bound")
    return None


def prediction_dof(fp: Fingerprint, mode: str) -> int:
    """The degrees of freedom p0's prediction bound would have (`stats.grouped_prediction_upper`:
    replicate references beyond one per kind), counted without computing any bound: the choice
    of test is made before every audit, and the bounds are what an audit's fixed cost is made of."""
    indep, _, _ = _groups(fp)
    return sum(len(g) - 1 for g in reference_groups(fp, indep, mode == "similarity"))


def reference_groups(fp: Fingerprint, models: list[ModelAnswers], soft: bool) -> list[list[float]]:
    """The calibration references' mean scores, grouped by how they were trained
    (`reference_kinds`)."""
    return list(reference_kinds(fp, models, soft).values())


def reference_kinds(fp: Fingerprint, models: list[ModelAnswers], soft: bool) -> dict[tuple[str, str], list[float]]:
    """The references' mean scores by how they were trained — (architecture, recipe), as the
    fingerprint's recorded zoo says ("owner": the owner's architecture); a model the zoo does not
    name (a reference the owner supplied) is a kind of its own, ("own", its name)."""
    zoo = {z.get("name"): (z.get("arch"), z.get("recipe", "adam")) for z in fp.method.get("params", {}).get("zoo", [])
           if isinstance(z, dict)}
    kinds: dict[tuple[str, str], list[float]] = {}
    for m in models:
        kinds.setdefault(zoo.get(m.name, ("own", m.name)), []).append(float(_scores(fp, m, soft).mean()))
    return kinds


def _betting_rates(fp: Fingerprint, mode: str, n: int, p0: float, pirates: float, indep: list[ModelAnswers],
                   pir: list[ModelAnswers], notes: list[str], soft: bool, gap: float = CLEARING_GAP,
                   level: float = PREDICTION_LEVEL) -> Rates:
    """Rates for the betting test. p0 is H0's bound on an independent suspect's mean score: the
    references' own bound (as Wald's), raised to a prediction bound for one more model trained
    like one of them (`stats.grouped_prediction_upper`, at `level`) once the zoo holds
    enough replicate references to measure the seed-to-seed spread. The betting test asks points
    without replacement, so a suspect whose mean over all the points exceeds p0 is accused once
    enough of them are asked: p0 must bound independent models, not describe them.

    p1, the bound the `independent` verdict tests against (H1: the mean score is at least p1),
    sits `gap` (CLEARING_GAP) above p0 — not halfway to the pirates as Wald's does — so that a
    suspect scoring anywhere above p0 + gap is cleared with probability at most beta, and a pirate
    between p0 and the held-out pirates' floor gains evidence for piracy instead of being cleared."""
    groups = reference_groups(fp, indep, soft)
    predicted = grouped_prediction_upper(groups, level)
    if predicted is not None and predicted[1] >= MIN_PREDICTION_DOF:
        p0 = max(p0, predicted[0])
    else:
        notes.append(f"{len(indep)} calibration references in {len(groups)} kinds leave "
                     f"{0 if predicted is None else predicted[1]} degrees of freedom for the seed-to-seed spread "
                     f"(at least {MIN_PREDICTION_DOF} needed): p0 is the references' own bound, with no allowance for "
                     "an unseen model's variation; build with --calibration-references 10 or more")
    p1 = min(p0 + gap, (1 + p0) / 2)
    if pirates < p1:
        notes.append(f"held-out pirates score down to {pirates:.2f}, not clearly above p0 {p0:.2f}: "
                     "pirates that agree that little may end inconclusive")
    if p0 > P1_MAX - MIN_GAP:
        notes.append(f"independent models agree up to {p0:.2f}: only near-copies of the owner can be told apart")
    values = [float(_scores(fp, m, soft).mean()) for m in indep]
    summary = {
        "p0": round(p0, 4),
        "p1": round(p1, 4),
        "prediction_bound": None if predicted is None else round(predicted[0], 4),
        "prediction_dof": None if predicted is None else predicted[1],
        "prediction_level": level,
        "pirates_floor": round(pirates, 4),
        "test": "betting",
        "independent_models": {m.name: round(v, 4) for m, v in zip(indep, values, strict=True)},
        "piracy_models": {m.name: round(float(_scores(fp, m, soft).mean()), 4) for m in pir},
        "confidence": CONFIDENCE,
        "notes": notes,
    }
    return Rates(mode, np.full(n, p0), np.full(n, p1), summary)
