"""The piracy-vs-homologous benchmark: every method, every family, every query budget.

One run (`deepcore bench --data D --out DIR`):
1. builds (or reuses) the zoo of `benchmarks.zoo` for data set D;
2. builds each method's fingerprint from the owner: DeepCore (`fingerprints.build`) and the
   baselines (`fingerprints.baselines`), timing each;
3. asks every evaluated suspect and every calibration reference each fingerprint's points once,
   through the project's ONNX Runtime adapter (probabilities; label-only methods read the top-1);
4. scores each suspect at every budget (the first b points in the audit's own order) and sets
   each method's threshold on the calibration references alone, at false identification rate
   alpha: a one-sided binomial test on the references' agreement bound for label methods, the
   references' mean + z(1-alpha) standard deviations (never below their maximum) otherwise;
5. runs the real sequential audit (`auditor.audit.audit`, batch 1, no repeat check) for every
   method that asks points one by one, and compares its median queries with the arithmetic
   minimum ln(1/alpha) / KL(p_pirate || p_reference) for the measured agreement rates;
6. writes results.json, results.md and the plots (roc.png, errors.png) to DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.adapters.onnx import file_sha256
from deepcore_auditor.adapters.open import open_suspect
from deepcore_auditor.auditor.audit import AuditConfig, audit, plan_order
from deepcore_auditor.auditor.cluster import RayCluster
from deepcore_auditor.auditor.commands import zoo_on
from deepcore_auditor.benchmarks.metrics import auc, binomial_threshold, kl_bernoulli, tpr_at_fpr
from deepcore_auditor.benchmarks.zoo import Member, Zoo, ZooConfig, build_zoo
from deepcore_auditor.fingerprints.baselines import BaselineConfig, build_baseline, sac_distance
from deepcore_auditor.fingerprints.build import BuildConfig, FanOut, Given, build_fingerprint
from deepcore_auditor.fingerprints.calibration import SET_NAMES, point_sets, rate_bound, rates, resolve_test
from deepcore_auditor.fingerprints.config import KnownModelSpec, zoo_counts, zoo_of
from deepcore_auditor.fingerprints.core import CoreConfig, choose_epsilon
from deepcore_auditor.fingerprints.data import default_cache_dir, load_data
from deepcore_auditor.fingerprints.format import Fingerprint, ModelAnswers, load_fingerprint, save_fingerprint
from deepcore_auditor.fingerprints.progress import QUIET, Progress
from deepcore_auditor.fingerprints.stats import log_likelihood_ratios

logger = logging.getLogger(__name__)

BUDGETS = (10, 20, 50, 100, 200, 400)
MAX_FPR = 0.01  # the field's headline operating point: TPR at FPR <= 1%
# A method's scores: label agreement (binomial threshold), or a continuous score.
SCORES = {
    "deepcore-agreement": ("deepcore", "agreement"),
    "deepcore-similarity": ("deepcore", "similarity"),
    "deepcore-clustering": ("deepcore", "clustering"),
    "random": ("random", "agreement"),
    "ipguard": ("ipguard", "agreement"),
    "akh": ("akh", "agreement"),
    "cae": ("cae", "agreement"),
    "sac-w": ("sac-w", "correlation"),
    "sac-m": ("sac-m", "correlation"),
}
LABEL_ONLY = ("deepcore-agreement", "deepcore-clustering", "random", "ipguard", "akh", "cae")
QUICK_FAMILIES = ("fine-tune-own", "fine-tune-other", "prune", "int8", "fp16", "adv-fine-tune")
FUNCTIONAL_FAMILIES = ("distill-same", "distill-other", "extract", "adv-extract")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the data, the zoo, the fingerprints' size, the budgets, alpha."""

    data: str
    zoo: ZooConfig = field(default_factory=ZooConfig)
    budgets: tuple[int, ...] = BUDGETS
    alpha: float = 0.01
    n_points: int = 400
    candidates: int = 1200  # DeepCore's candidate points
    # DeepCore's L-inf radius; None: the product's default, chosen from the owner's robustness as
    # `deepcore fingerprint` does (fingerprints.core.choose_epsilon), and CAE gets the same radius.
    epsilon: float | None = None
    methods: tuple[str, ...] = tuple(SCORES)
    seed: int = 0
    test: str = "auto"  # the sequential audits' test (auditor.audit.AuditConfig.test); clustering runs Wald's only
    zoo_size: str = "default"  # DeepCore's (fingerprints.config.ZOO_SIZES)
    selection_references: int | None = None  # DeepCore's, per recipe (None: the zoo size's; config.zoo_with_selection)
    without: tuple[str, ...] = ()  # DeepCore zoo members left out of its build (build_fingerprint(without=...))
    sgd_epochs: int = 0  # DeepCore's SGD references' length (BuildConfig.sgd_epochs; 0: 2 x epochs + 2)

    def deepcore_zoo(self) -> tuple[KnownModelSpec, ...]:
        """The zoo DeepCore's fingerprint is built from (`without` still in it: left out by the build)."""
        return zoo_of(*zoo_counts(self.zoo_size, selection=self.selection_references))

    def validate(self) -> None:
        if not self.budgets or any(b < 1 for b in self.budgets) or list(self.budgets) != sorted(set(self.budgets)):
            raise InputError(f"budgets must be increasing positive integers, got {list(self.budgets)}")
        if max(self.budgets) > self.n_points:
            raise InputError(f"the largest budget {max(self.budgets)} exceeds the fingerprints' {self.n_points} points")
        unknown = [m for m in self.methods if m not in SCORES]
        if unknown or not self.methods:
            raise InputError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: use some of {', '.join(SCORES)}")
        try:
            zoo_counts(self.zoo_size)
        except ValueError as e:
            raise InputError(str(e)) from None
        if self.selection_references is not None and self.selection_references < 1:
            raise InputError(f"--selection-references must be 1 or more, got {self.selection_references}")
        unknown = sorted(set(self.without) - {z.name for z in self.deepcore_zoo()})
        if unknown:
            raise InputError(f"--without: {', '.join(unknown)} not in DeepCore's zoo")
        if len(set(self.without)) != len(self.without):
            raise InputError(f"--without names a model twice: {', '.join(self.without)}")
        if self.sgd_epochs < 0:
            raise InputError(f"--sgd-epochs must be 0 (2 x --epochs + 2) or more, got {self.sgd_epochs}")
        deepcore_flags = (self.zoo_size != "default" or self.selection_references is not None or self.without
                          or self.sgd_epochs)
        if deepcore_flags and not any(SCORES[m][0] == "deepcore" for m in self.methods):
            raise InputError("--zoo, --selection-references, --without and --sgd-epochs shape DeepCore's fingerprint: "
                             "ask for a deepcore method too")
        if not 0 < self.alpha < 0.5:
            raise InputError(f"alpha must lie in (0, 0.5), got {self.alpha}")
        if self.zoo.members < 1 or self.zoo.epochs < 1 or self.zoo.calibration_references < 2:
            raise InputError("the zoo needs at least 1 member a family, 1 epoch and 2 calibration references")


@dataclass
class MethodData:
    """A fingerprint in the audit's order and every model's answers to it."""

    name: str
    fp: Fingerprint
    order: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # model -> [n] top-1 in plan order
    probs: dict[str, np.ndarray] = field(default_factory=dict)  # model -> [n, K]
    build_s: float = 0.0

    @property
    def owner_labels(self) -> np.ndarray:
        return self.fp.owner_labels[self.order]

    @cached_property
    def sets(self) -> np.ndarray | None:
        """Per position, its point's set (calibration.point_sets), or None for one set."""
        sets = point_sets(self.fp)[self.order]
        return sets if sets.max() > 0 else None

    @cached_property
    def set_p0(self) -> np.ndarray:
        """Per position, the p0 the audit's test holds its point's set to (agreement mode)."""
        return rates(self.fp, "agreement", "betting").p0[self.order]


def _set_z(md: MethodData, agree: np.ndarray) -> float:
    """A fingerprint with several sets of points, scored as its audit judges it: the largest
    over the sets answered of the agreement's z score against that set's own p0 (the audit
    accuses when either set's test does)."""
    assert md.sets is not None
    sets, p0 = md.sets[: len(agree)], md.set_p0[: len(agree)]
    z = []
    for k in np.unique(sets):
        mine = sets == k
        p = float(np.clip(p0[mine].mean(), 1e-3, 1 - 1e-3))
        z.append((float(agree[mine].mean()) - p) * math.sqrt(mine.sum() / (p * (1 - p))))
    return max(z)


def _agreement_per_set(md: MethodData, models: list[str]) -> dict[str, Any]:
    """Each model's agreement with the owner on every point of each set (not a budget's prefix),
    beside the p0 the audit holds each set to: which set catches which family (a weight copy keeps
    the owner's core decisions and unlearns its mistakes, a student the reverse) and how far each
    p0 sits above the independent models it bounds."""
    assert md.sets is not None
    sets = {SET_NAMES[k]: md.sets == k for k in np.unique(md.sets).tolist()}
    return {"p0": {name: round(float(md.set_p0[mine].mean()), 4) for name, mine in sets.items()},
            "models": {m: {name: round(float((md.labels[m][mine] == md.owner_labels[mine]).mean()), 4)
                           for name, mine in sets.items()} for m in models}}


def _fingerprints(zoo: Zoo, config: BenchConfig, say: Callable[[str], None],
                  bars: Progress = QUIET, fan_out: FanOut | None = None,
                  created: str | None = None) -> dict[str, tuple[Fingerprint, float]]:
    """Each method's fingerprint, built once and cached beside the zoo under a digest of exactly
    what it was built from (so changing one method's parameters rebuilds that method only)."""
    wanted = sorted({SCORES[m][0] for m in config.methods}, key=lambda m: (m != "deepcore", m))  # DeepCore's radius first
    x, y = zoo.halves["A"]
    core = CoreConfig(n_candidates=config.candidates, n_points=config.n_points, epsilon=config.epsilon, seed=config.seed)
    build = BuildConfig(core=core, zoo=config.deepcore_zoo(), train_samples=len(x),
                        epochs=config.zoo.epochs, sgd_epochs=config.sgd_epochs, seed=config.seed)
    out: dict[str, tuple[Fingerprint, float]] = {}
    owner_id = {"path": str(zoo.paths["owner"]), "sha256": file_sha256(zoo.paths["owner"])}
    for method in wanted:
        # CAE grows as many candidates in the same L-inf radius as DeepCore: only the objective
        # differs. The other baselines have no radius (their cache tags keep the fixed default).
        radius = config.epsilon if config.epsilon is not None else BaselineConfig.cae_epsilon
        if method == "cae" and config.epsilon is None:
            radius = (_radii(out)["deepcore"] if "deepcore" in out else
                      choose_epsilon(zoo.owner, x, y, core.min_confidence, seed=config.seed).epsilon)
        bc = BaselineConfig(n_points=config.n_points, seed=config.seed, cae_candidates=config.candidates, cae_epsilon=radius)
        params = build.to_dict() if method == "deepcore" else bc.to_dict()
        if method == "deepcore" and config.without:  # (only then: the tags of whole-zoo builds stay as they were)
            params["without"] = sorted(config.without)
        tag = hashlib.sha256(json.dumps({"method": method, **params}, sort_keys=True).encode()).hexdigest()[:12]
        path, time_path = zoo.root / f"fp-{method}-{tag}.json", zoo.root / f"fp-{method}-{tag}.build_s"
        if path.is_file() and time_path.is_file():
            out[method] = (load_fingerprint(path), float(time_path.read_text()))
            continue
        say(f"building the {method} fingerprint")
        t0 = time.perf_counter()
        if method == "deepcore":
            fp = build_fingerprint(zoo.owner, x, y, zoo.data.train.classes, owner_id, build,
                                   holdout=(zoo.data.test.points(), zoo.data.test.y), progress=lambda m: logger.info(m),
                                   require_separable=False, bars=bars, fan_out=fan_out, created=created,
                                   cache_dir=zoo.root, without=config.without)
        else:
            sur = [zoo.torch_models[m.name] for m in zoo.role("cae-surrogate")] if method == "cae" else []
            ref = [zoo.torch_models[m.name] for m in zoo.role("cae-reference")] if method == "cae" else []
            fp = build_baseline(method, zoo.owner, zoo.data.test.points(), zoo.data.test.y, zoo.data.train.classes, owner_id, bc,
                                surrogates=sur, references=ref)
        build_s = round(time.perf_counter() - t0, 1)
        save_fingerprint(fp, path)
        time_path.write_text(str(build_s))
        out[method] = (fp, build_s)
    return out


def _radii(fps: dict[str, tuple[Fingerprint, float]]) -> dict[str, float]:
    """The L-inf radius each point-growing method among `fps` used, as its fingerprint records it
    (resolved: --epsilon, or the owner's robustness)."""
    out = {}
    if "deepcore" in fps:
        out["deepcore"] = float(fps["deepcore"][0].method["params"]["core"]["epsilon"])
    if "cae" in fps:
        out["cae"] = float(fps["cae"][0].method["params"]["cae_epsilon"])
    return out


def _ask_all(zoo: Zoo, fps: dict[str, tuple[Fingerprint, float]], config: BenchConfig,
             say: Callable[[str], None]) -> tuple[dict[str, MethodData], float, int]:
    """Every evaluated suspect and calibration reference answers every fingerprint, once."""
    data: dict[str, MethodData] = {}
    for method, (fp, build_s) in fps.items():
        data[method] = MethodData(method, fp, plan_order(len(fp), config.seed), build_s=build_s)
    models = zoo.role("evaluate") + zoo.role("calibrate")
    say(f"asking {len(models)} models the points of {len(data)} fingerprints")
    t0, asked = time.perf_counter(), 0
    for m in models:
        for md in data.values():
            with open_suspect(str(zoo.paths[m.name]), convention=md.fp.convention, point_shape=md.fp.point_shape,
                              num_classes=md.fp.num_classes) as oracle:
                probs = oracle.query(md.fp.points[md.order], Access.PROBS)
            asked += len(md.order)
            md.probs[m.name] = probs.astype(np.float64)
            md.labels[m.name] = probs.argmax(1)
    return data, time.perf_counter() - t0, asked


def _attach_references(md: MethodData, refs: list[Member]) -> None:
    """Baselines carry no references of their own: the calibration references' answers become
    their known models, so the audit's rates (p0) come from the same models as the threshold."""
    inverse = np.argsort(md.order)
    known = []
    for m in refs:
        labels, probs = md.labels[m.name][inverse], md.probs[m.name][inverse]
        owner_prob = probs[np.arange(len(labels)), md.fp.owner_labels]
        known.append(ModelAnswers(m.name, "independent", "calibration", "calibration", labels.astype(np.int64), owner_prob))
    md.fp = dataclasses.replace(md.fp, known_models=tuple(known))


def _score(name: str, md: MethodData, model: str, b: int, clustering: tuple[np.ndarray, np.ndarray] | None) -> float:
    kind = SCORES[name][1]
    agree = (md.labels[model][:b] == md.owner_labels[:b]).astype(np.float64)
    if kind == "agreement":
        return float(agree.mean()) if md.sets is None else _set_z(md, agree)
    if kind == "similarity":
        return float(md.probs[model][np.arange(b), md.owner_labels[:b]].mean())
    if kind == "clustering":
        assert clustering is not None
        return float(log_likelihood_ratios(agree, clustering[0][:b], clustering[1][:b]).sum())
    owner = md.fp.owner_probs[md.order][:b].astype(np.float64)
    return -sac_distance(owner, md.probs[model][:b])


def _threshold(name: str, md: MethodData, refs: list[str], b: int, ref_scores: list[float], alpha: float) -> float:
    if SCORES[name][1] == "agreement" and md.sets is not None:
        # each set's z score against its own p0 (a bound), at alpha over the number of sets, as the audit's tests
        return NormalDist().inv_cdf(1 - alpha / len(np.unique(md.sets)))
    if SCORES[name][1] == "agreement" and md.sets is None:
        values = [(md.labels[r] == md.owner_labels).astype(np.float64) for r in refs]
        return binomial_threshold(rate_bound(values, soft=False, upper=True), b, alpha)
    s = np.asarray(ref_scores)
    return float(max(s.max() + 1e-9, s.mean() + NormalDist().inv_cdf(1 - alpha) * s.std(ddof=1)))


def _sequential(zoo: Zoo, md: MethodData, name: str, members: list[Member], config: BenchConfig) -> dict[str, dict[str, Any]]:
    mode = SCORES[name][1]
    ac = AuditConfig(access=Access.PROBS if mode == "similarity" else Access.LABELS, mode=mode, budget=max(config.budgets),
                     test="sprt" if mode == "clustering" else config.test, batch_size=1, alpha=config.alpha, beta=0.01, seed=config.seed, repeat_checks=0)
    out = {}
    for m in members:
        with open_suspect(str(zoo.paths[m.name]), convention=md.fp.convention, point_shape=md.fp.point_shape,
                          num_classes=md.fp.num_classes) as oracle:
            r = audit(md.fp, oracle, ac)
        out[m.name] = {"verdict": r.verdict, "queries": r.queries_used, "elapsed_s": r.elapsed_s, "p0": r.p0, "p1": r.p1,
                       "test": resolve_test(md.fp, mode, ac.test, ac.alpha, ac.budget)}
    return out


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def evaluate(zoo: Zoo, data: dict[str, MethodData], config: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """Scores, thresholds, AUC / FIR / MIR per family and budget, and the sequential audits."""
    evaluated, refs = zoo.role("evaluate"), [m.name for m in zoo.role("calibrate")]
    families = {m.family: m.kind for m in evaluated}
    pirates = [m for m in evaluated if m.kind == "piracy"]
    homologous = [m for m in evaluated if m.kind == "homologous"]
    results: dict[str, Any] = {}
    audit_time, audit_queries = 0.0, 0
    for name in config.methods:
        md = data[SCORES[name][0]]
        clustering = None
        if SCORES[name][1] == "clustering":
            r = rates(md.fp, "clustering")
            clustering = (r.p0[md.order], r.p1[md.order])
        per_budget: dict[str, Any] = {}
        for b in config.budgets:
            scores = {m.name: _score(name, md, m.name, b, clustering) for m in evaluated}
            ref_scores = [_score(name, md, r, b, clustering) for r in refs]
            t = _threshold(name, md, refs, b, ref_scores, config.alpha)
            flagged = {k: v >= t for k, v in scores.items()}
            neg = [scores[m.name] for m in homologous]
            fam: dict[str, Any] = {}
            for f, kind in families.items():
                ms = [m.name for m in evaluated if m.family == f]
                row: dict[str, Any] = {"flagged": int(sum(flagged[x] for x in ms)), "members": len(ms)}
                if kind == "piracy":
                    row["mir"] = round(1 - row["flagged"] / len(ms), 4)
                    row["auc"] = round(auc([scores[x] for x in ms], neg), 4)
                else:
                    row["fir"] = round(row["flagged"] / len(ms), 4)
                fam[f] = row
            tpr, fpr = tpr_at_fpr([scores[m.name] for m in pirates], neg, MAX_FPR)
            per_budget[str(b)] = {
                "threshold": round(t, 6),
                "auc": round(auc([scores[m.name] for m in pirates], neg), 4),
                # Read on the evaluated homologous models themselves (an oracle threshold, as the
                # field reports it), unlike FIR/MIR, whose threshold comes from the references only.
                "tpr_at_fpr_1pct": round(tpr, 4),
                "fpr_at_that_threshold": round(fpr, 4),
                "fir": round(float(np.mean([flagged[m.name] for m in homologous])), 4),
                "mir": round(float(np.mean([not flagged[m.name] for m in pirates])), 4),
                "families": fam,
                "scores": {k: round(v, 5) for k, v in scores.items()},
                "reference_scores": {r: round(s, 5) for r, s in zip(refs, ref_scores, strict=False)},
            }
        entry: dict[str, Any] = {"fingerprint": SCORES[name][0], "score": SCORES[name][1], "label_only": name in LABEL_ONLY,
                                 "budgets": per_budget, "build_s": md.build_s, "points": len(md.order)}
        if SCORES[name][1] == "agreement" and md.sets is not None:
            entry["agreement_per_set"] = _agreement_per_set(md, [m.name for m in evaluated] + refs)
        if SCORES[name][1] != "correlation":
            say(f"sequential audits with {name}")
            t0 = time.perf_counter()
            seq = _sequential(zoo, md, name, evaluated, config)
            audit_time += time.perf_counter() - t0
            audit_queries += sum(v["queries"] for v in seq.values())
            # `auto` reads the budget (below what an exact copy needs it runs Wald's): the audit run
            # at the largest budget stands for those budgets only at which the same test would run
            mode, test = SCORES[name][1], next(iter(seq.values()))["test"]
            alike = [b for b in config.budgets
                     if resolve_test(md.fp, mode, "sprt" if mode == "clustering" else config.test, config.alpha, b) == test]
            entry["sequential"] = _summarize_sequential(seq, evaluated, md, refs, config.alpha, alike, mode)
        results[name] = entry
    return {"methods": results, "audit_queries": audit_queries, "audit_s": round(audit_time, 2)}


def _missed_within(seq: dict[str, dict[str, Any]], members: list[Member], budgets: Sequence[int]) -> dict[str, float]:
    """Per budget b, the share of `members` the sequential audit had not called `piracy` within b
    queries. The audits ran at the largest budget, one point per query: the test is anytime-valid
    and its allocation never looks at the budget, so an audit run with budget b (where it runs the
    same test: `budgets` are those) asks the same points in the same order and says `piracy`
    exactly when this one did by its b-th query: the audit's own miss rate at that budget. The
    fixed-budget MIR scores the first b points of the plan's order instead, which is what every
    method and baseline can be given."""
    return {str(b): round(float(np.mean([not (seq[m.name]["verdict"] == "piracy" and seq[m.name]["queries"] <= b)
                                         for m in members])), 4) for b in budgets}


def _per_set_rates(md: MethodData, models: list[str], p0: np.ndarray) -> list[tuple[float, float]]:
    """Per set of points: the models' mean agreement on it and the mean of `p0` (per position,
    the audit's) over it."""
    sets = md.sets if md.sets is not None else np.zeros(len(md.order), dtype=np.int64)
    return [(float(np.mean([(md.labels[m][sets == k] == md.owner_labels[sets == k]).mean() for m in models])),
             float(p0[sets == k].mean())) for k in np.unique(sets).tolist()]


def _summarize_sequential(seq: dict[str, dict[str, Any]], evaluated: list[Member], md: MethodData, refs: list[str],
                          alpha: float, budgets: Sequence[int] = BUDGETS, mode: str = "agreement") -> dict[str, Any]:
    agree = {k: float((v == md.owner_labels).mean()) for k, v in md.labels.items()}
    first = next(iter(seq.values()))
    p0 = rates(md.fp, mode, first["test"]).p0[md.order]  # per position, what the audits' test held each point to
    p_ref = float(np.mean([agree[r] for r in refs]))
    fams: dict[str, Any] = {}
    for f in dict.fromkeys(m.family for m in evaluated):
        ms = [m for m in evaluated if m.family == f]
        verdicts = [seq[m.name]["verdict"] for m in ms]
        queries = [seq[m.name]["queries"] for m in ms]
        row: dict[str, Any] = {v: verdicts.count(v) for v in ("piracy", "independent", "inconclusive")}
        row["median_queries"] = _median(queries)
        if ms[0].kind == "piracy":
            row["missed_within"] = _missed_within(seq, ms, budgets)
            q = float(np.mean([agree[m.name] for m in ms]))
            kl = kl_bernoulli(q, p_ref) if q > p_ref else 0.0
            row["measured_agreement"] = round(q, 4)
            row["minimum_queries"] = round(math.log(1 / alpha) / kl, 1) if kl > 0 else None
            caught = [seq[m.name]["queries"] for m in ms if seq[m.name]["verdict"] == "piracy"]
            row["median_queries_caught"] = _median(caught)
            if row["minimum_queries"] and caught:
                row["ratio_to_minimum"] = round(float(np.median(caught)) / row["minimum_queries"], 2)
            # The test's own minimum against its null: ln(1/alpha)/KL(q || p0), and for a copy that
            # always agrees ln(1/alpha)/ln(1/p0). With two sets of points, each set has its own p0
            # and the family its own agreement on it: the minimum is read on the set that gives the
            # most evidence an answer (a copy's core points, a student's error points) — the
            # agreement over both sets against the core points' p0 would mix two nulls.
            kl0 = max(kl_bernoulli(qk, pk) if qk > pk else 0.0 for qk, pk in _per_set_rates(md, [m.name for m in ms], p0))
            row["minimum_queries_p0"] = round(math.log(1 / alpha) / kl0, 1) if kl0 > 0 else None
            if row["minimum_queries_p0"] and caught:
                row["ratio_to_p0_minimum"] = round(float(np.median(caught)) / row["minimum_queries_p0"], 2)
        fams[f] = row
    pirates = [m for m in evaluated if m.kind == "piracy"]
    return {"reference_agreement": round(p_ref, 4), "p0": first["p0"], "p1": first["p1"], "test": first.get("test"),
            "missed_within": _missed_within(seq, pirates, budgets), "families": fams,
            "verdicts": {m.name: {"family": m.family, "verdict": seq[m.name]["verdict"], "queries": seq[m.name]["queries"]}
                         for m in evaluated}}


BAR_METHODS = ("deepcore-agreement", "deepcore-clustering")
COPY_FAMILIES = ("fine-tune-own", "fine-tune-other", "prune", "int8", "fp16", "transfer")  # DeepCore's label-only modes


def _baselines_above(methods: dict[str, Any], dc: dict[str, Any], budgets: Sequence[int], key: str) -> list[str]:
    """Every baseline whose figure `key` beats DeepCore's at a budget of 20 or more, as "name@b: theirs > ours"."""
    out = []
    for b in (b for b in budgets if b >= 20):
        mine = dc["budgets"][str(b)][key]
        out += [f"{name}@{b}: {e['budgets'][str(b)][key]} > {mine}" for name, e in methods.items()
                if not name.startswith("deepcore") and e["budgets"][str(b)][key] > mine]
    return out


def check_bar(results: dict[str, Any], budgets: Sequence[int], method: str, alpha: float = 0.01) -> list[dict[str, Any]]:
    """The issue's bar, criterion by criterion, for one label-only DeepCore mode."""
    methods = results["methods"]
    dc = methods.get(method)
    out: list[dict[str, Any]] = []
    if dc is None:
        return out
    worst_fir = max(v["fir"] for v in dc["budgets"].values())
    seq_fp = sum(r["piracy"] for f, r in dc["sequential"]["families"].items() if "mir" not in dc["budgets"][str(budgets[0])]["families"][f])
    out.append({"criterion": "FIR 0 at alpha 0.01 (every budget, and no homologous suspect audited as piracy)",
                "met": worst_fir == 0 and seq_fp == 0, "measured": f"worst FIR {worst_fir}; sequential false accusations {seq_fp}"})
    b50 = str(max([b for b in budgets if b <= 50], default=budgets[0]))
    fams = dc["budgets"][b50]["families"]
    seqf = dc["sequential"]["families"]
    quick = [f for f in QUICK_FAMILIES if f in fams]
    bad = [f for f in quick if fams[f]["mir"] > 0 or seqf[f]["piracy"] < fams[f]["members"]
           or max(v["queries"] for v in dc["sequential"]["verdicts"].values() if v["family"] == f) > 50]
    out.append({"criterion": "fine-tuned, pruned, quantized and adversarially fine-tuned copies caught within 50 queries",
                "met": not bad, "measured": ", ".join(f"{f}: MIR@{b50} {fams[f]['mir']}, sequential {seqf[f]['piracy']}/{fams[f]['members']} "
                                                     f"median {seqf[f]['median_queries']}" for f in quick)})
    b200 = str(max([b for b in budgets if b <= 200], default=budgets[0]))
    fams = dc["budgets"][b200]["families"]
    func = [f for f in FUNCTIONAL_FAMILIES if f in fams]
    out.append({"criterion": "distillation and extraction caught (MIR <= 10%) within 200 queries",
                "met": all(fams[f]["mir"] <= 0.1 for f in func),
                "measured": ", ".join(f"{f}: MIR@{b200} {fams[f]['mir']}" for f in func)})
    losses = _baselines_above(methods, dc, budgets, "auc")
    out.append({"criterion": "DeepCore AUC at or above every baseline at every budget from 20",
                "met": not losses, "measured": "; ".join(losses) or "no baseline above"})
    below = _baselines_above(methods, dc, budgets, "tpr_at_fpr_1pct")
    out.append({"criterion": "DeepCore TPR at FPR <= 1% at or above every baseline's at every budget from 20",
                "met": not below, "measured": "; ".join(below) or "no baseline above: DeepCore " + ", ".join(
                    f"{dc['budgets'][str(b)]['tpr_at_fpr_1pct']}@{b}" for b in budgets if b >= 20)})
    ratios = {f: r.get("ratio_to_minimum") for f, r in seqf.items() if r.get("ratio_to_minimum") is not None}
    out.append({"criterion": "median queries within 2x of ln(1/alpha)/KL for the measured agreement rates",
                "met": bool(ratios) and all(v <= 2 for v in ratios.values()),
                "measured": ", ".join(f"{f} {v}x" for f, v in ratios.items())})
    ratios0 = {f: r.get("ratio_to_p0_minimum") for f, r in seqf.items() if r.get("ratio_to_p0_minimum") is not None}
    p0 = float(dc["sequential"]["p0"])
    copy_min = math.log(1 / alpha) / math.log(1 / p0) if 0 < p0 < 1 else math.inf
    copies = {f: seqf[f]["median_queries_caught"] for f in COPY_FAMILIES if f in seqf and seqf[f].get("median_queries_caught")}
    out.append({"criterion": "weight copies: median queries to piracy at most 1.3x ln(1/alpha)/ln(1/p0)",
                "met": bool(copies) and all(v <= 1.3 * copy_min for v in copies.values()),
                "measured": f"ln(1/alpha)/ln(1/p0) = {copy_min:.1f} (p0 {p0}); " + ", ".join(f"{f} {v}" for f, v in copies.items())})
    out.append({"criterion": "every family: median queries at most 1.5x ln(1/alpha)/KL(agreement || p0) on its best set of points",
                "met": bool(ratios0) and all(v <= 1.5 for v in ratios0.values()),
                "measured": ", ".join(f"{f} {v}x" for f, v in ratios0.items())})
    for families, b, what in ((COPY_FAMILIES, 20, "weight copies"), (None, 100, "every piracy family")):
        missed = {f: r["missed_within"].get(str(b)) for f, r in seqf.items() if "missed_within" in r and (families is None or f in families)}
        out.append({"criterion": f"{what}: missed by the sequential audit (as it runs) within {b} queries at most 5%",
                    "met": bool(missed) and all(v is not None and v <= 0.05 for v in missed.values()),
                    "measured": ", ".join(f"{f} {'-' if v is None else v}" for f, v in missed.items())})
    return out


def environment() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {"machine": platform.machine(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads()}


def run_bench(config: BenchConfig, out: Path, *, cache_dir: Path | None = None,
              progress: Callable[[str], None] | None = None, bars: Progress = QUIET, ray: str | None = None,
              created: str | None = None) -> dict[str, Any]:
    """Run the whole benchmark and write results.json, results.md and the plots into `out`;
    `progress` gets its phase lines, `bars` bars for the zoo and the DeepCore build. With `ray`
    (auto or a cluster's HOST:PORT), the zoo's members and DeepCore's known models train as
    tasks on that Ray cluster (auditor.cluster), with the results of the local run; `created`
    is the time DeepCore's fingerprint records (SOURCE_DATE_EPOCH, by the CLI), for runs whose
    files are to be compared."""
    config.validate()
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"cannot write results to {out}: directory {out.parent} does not exist")
    say = progress or logger.info
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(RayCluster(ray)) if ray else None
        data = load_data(config.data, cache_dir=cache_dir)
        members = cluster.training() if cluster is not None else None
        zoo = build_zoo(data, Path(cache_dir or default_cache_dir()) / "bench", config.zoo, say, bars, fan_out=members)
        known = zoo_on(cluster, Given(zoo.owner), BuildConfig.device) if cluster is not None else None
        fps = _fingerprints(zoo, config, say, bars, known, created)
    return _finish(config, out, data, zoo, fps, say, t0, cluster.name if cluster is not None else "local")


def _finish(config: BenchConfig, out: Path, data: Any, zoo: Zoo, fps: dict[str, tuple[Fingerprint, float]],
            say: Callable[[str], None], t0: float, runner: str) -> dict[str, Any]:
    small = [m for m, (fp, _) in fps.items() if len(fp) < max(config.budgets)]
    if small:
        raise InputError(f"fingerprint(s) {', '.join(small)} have fewer points than the largest budget {max(config.budgets)}")
    answers, ask_s, asked = _ask_all(zoo, fps, config, say)
    for md in answers.values():
        if md.name != "deepcore":
            _attach_references(md, zoo.role("calibrate"))
    results = evaluate(zoo, answers, config, say)
    results["bar"] = {m: check_bar(results, config.budgets, m, config.alpha) for m in BAR_METHODS if m in config.methods}
    results.update({
        "data": {"spec": config.data, **data.source, "train": len(data.train), "test": len(data.test)},
        "config": {**asdict(config), "zoo": asdict(config.zoo)},
        "owner": zoo.meta["owner"],
        "radius": _radii(fps),
        "zoo": {m.name: {**zoo.meta["members"][m.name], "seed": m.seed} for m in zoo.role("evaluate") + zoo.role("calibrate")},
        "zoo_build_s": zoo.meta.get("build_s"),
        "runner": runner,  # where the zoo trained: local, or a Ray cluster's tasks
        "answer_queries_per_s": round(asked / ask_s, 1) if ask_s else None,
        "audit_queries_per_s": round(results["audit_queries"] / results["audit_s"], 1) if results["audit_s"] else None,
        "environment": environment(),
        "run_s": round(time.perf_counter() - t0, 1),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    out.mkdir(exist_ok=True)
    from deepcore_auditor.benchmarks.report import write_outputs

    write_outputs(results, out)
    say(f"results written to {out}")
    return results
