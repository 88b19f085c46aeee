"""p0 and p1 read off a fingerprint's known models: the betting test's prediction bound, and the
builder's refusal of a fingerprint no verdict could use."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.fingerprints.build import check_separable
from deepcore_auditor.fingerprints.calibration import (
    CLEARING_GAP,
    LEGACY_PREDICTION_LEVEL,
    MIN_PREDICTION_DOF,
    PREDICTION_LEVEL,
    rates,
    reference_groups,
    resolve_test,
    why_not_betting,
)
from deepcore_auditor.fingerprints.config import zoo_with_references, zoo_with_selection
from deepcore_auditor.fingerprints.format import Fingerprint, ModelAnswers, load_fingerprint
from deepcore_auditor.fingerprints.stats import Bettor, t_quantile


def _agreeing(fp: Fingerprint, m: ModelAnswers, share: float, seed: int) -> ModelAnswers:
    """`m` answering the owner's label on `share` of the points (others: another class)."""
    rng = np.random.default_rng(seed)
    labels = fp.owner_labels.copy()
    flip = rng.permutation(len(labels))[: int(round((1 - share) * len(labels)))]
    labels[flip] = (labels[flip] + 1) % fp.num_classes
    return dataclasses.replace(m, labels=labels)


def _with_references(fp: Fingerprint, count: int, shares: dict[str, float]) -> Fingerprint:
    """`fp` as if built with `count` calibration references, each agreeing as `shares` says by kind."""
    zoo = zoo_with_references(count)
    template = next(m for m in fp.known_models if m.kind == "independent" and m.role == "calibration")
    known = [m for m in fp.known_models if not (m.kind == "independent" and m.role == "calibration")]
    for i, spec in enumerate(z for z in zoo if z.kind == "independent" and z.role == "calibration"):
        share = shares[f"{spec.arch}/{spec.recipe}"] + 0.02 * (i % 3 - 1)  # seed-to-seed spread
        known.append(_agreeing(fp, dataclasses.replace(template, name=spec.name, family=spec.family), share, i))
    method = {**fp.method, "params": {**fp.method["params"], "zoo": [dataclasses.asdict(z) for z in zoo]}}
    return dataclasses.replace(fp, known_models=tuple(known), method=method)


SHARES = {"owner/adam": 0.5, "owner/sgd": 0.2, "lenet/adam": 0.1, "mlp/adam": 0.1, "cnn-wide/adam": 0.15}


def test_replicate_references_raise_p0_to_a_prediction_bound(world):
    fp = load_fingerprint(world.fingerprint)
    five = rates(_with_references(fp, 5, SHARES), "agreement", "betting").summary
    assert five["prediction_dof"] in (None, 0) and any("degrees of freedom" in n for n in five["notes"])
    ten = _with_references(fp, 10, SHARES)
    groups = reference_groups(ten, [m for m in ten.known_models if m.kind == "independent" and m.role == "calibration"], False)
    assert sorted(len(g) for g in groups) == [1, 1, 2, 3, 3]  # same-arch Adam x3 and SGD x3, lenet x2, mlp, cnn-wide
    bet, wald = rates(ten, "agreement", "betting").summary, rates(ten, "agreement", "sprt").summary
    assert bet["prediction_dof"] == 5 >= MIN_PREDICTION_DOF
    assert bet["p0"] == max(wald["p0"], bet["prediction_bound"]) and bet["prediction_bound"] > 0.52  # above the Adam kind
    assert bet["p1"] == pytest.approx(min(bet["p0"] + CLEARING_GAP, (1 + bet["p0"]) / 2), abs=1e-4)
    # Read at PREDICTION_LEVEL (0.001); plans written before read it at 0.01: a lower bound, the same kinds.
    legacy = rates(ten, "agreement", "betting", level=LEGACY_PREDICTION_LEVEL).summary
    assert bet["prediction_level"] == PREDICTION_LEVEL == 0.001 and legacy["prediction_level"] == 0.01
    assert wald["p0"] < legacy["prediction_bound"] < bet["prediction_bound"] and legacy["prediction_dof"] == 5
    with pytest.raises(InputError, match="unknown prediction level"):
        rates(ten, "agreement", "betting", level=0.05)


def test_a_supplied_reference_is_a_kind_of_its_own(world):
    fp = _with_references(load_fingerprint(world.fingerprint), 10, SHARES)
    cal = [m for m in fp.known_models if m.kind == "independent" and m.role == "calibration"]
    own = dataclasses.replace(cal[0], name="my-resnet")
    assert len(reference_groups(fp, cal + [own], False)) == len(reference_groups(fp, cal, False)) + 1


def test_builder_refuses_a_fingerprint_no_verdict_could_use(world):
    fp = load_fingerprint(world.fingerprint)
    said: list[str] = []
    check_separable(fp, said.append)  # the suite's own fingerprint is usable
    assert any("an exact copy is identified after" in s for s in said)
    painted = dataclasses.replace(fp, known_models=tuple(
        _agreeing(fp, m, 0.99, i) if m.kind == "independent" and m.role == "calibration" else m
        for i, m in enumerate(fp.known_models)))
    with pytest.raises(InputError, match=r"even an exact copy would need more than \d+ points"):
        check_separable(painted, said.append)
    check_separable(painted, said.append, refuse=False)
    assert said[-1].startswith("warning: even an exact copy")


def test_auto_runs_the_betting_test_only_on_a_p0_that_bounds(world):
    fp = load_fingerprint(world.fingerprint)
    five, ten = _with_references(fp, 5, SHARES), _with_references(fp, 10, SHARES)
    assert resolve_test(five, "agreement", "auto") == "sprt"  # no replicate references: Wald's, as before
    assert resolve_test(ten, "agreement", "auto") == "betting"
    assert resolve_test(ten, "clustering", "sprt") == "sprt"
    with pytest.raises(InputError, match="clustering"):
        resolve_test(ten, "clustering", "auto")
    assert resolve_test(five, "agreement", "betting") == "betting"  # asked for by name: run as asked
    with pytest.raises(InputError, match="unknown sequential test"):
        resolve_test(fp, "agreement", "bayes")
    assert "degrees of freedom" in why_not_betting(five, "agreement", 0.01, 200) and why_not_betting(ten, "agreement", 0.01, 200) is None


def test_auto_runs_walds_test_where_the_bound_leaves_no_copy_identifiable(world):
    # References of one kind that vary wildly from seed to seed (as the suite's 100-point world's
    # Adam references do at ten: 0.49-0.79) put the prediction bound so high that an exact copy
    # could not reach 1/alpha within the budget: the betting test could only say inconclusive.
    fp = load_fingerprint(world.fingerprint)
    wide = _with_references(fp, 10, {**SHARES, "owner/adam": 0.7})
    spread = dataclasses.replace(wide, known_models=tuple(
        _agreeing(wide, m, [0.52, 0.95, 0.7][i % 3], i) if m.name.endswith("adam") and "same-arch" in m.name else m
        for i, m in enumerate(wide.known_models)))
    bound = float(rates(spread, "agreement", "betting").summary["p0"])
    needs = Bettor(len(fp) * bound, len(fp)).best_case_needs(math.log(100), len(fp))
    assert bound > 0.95 and 60 < needs <= len(fp)
    assert resolve_test(spread, "agreement", "auto", 0.01, 60) == "sprt"
    note = why_not_betting(spread, "agreement", 0.01, 60)
    assert note and "not even an exact copy" in note and f"{bound:.3f}" in note and "within 60 queries" in note
    assert resolve_test(spread, "agreement", "auto", 0.01, needs) == "betting"  # a budget that lets a copy through


def test_auto_gives_the_core_points_test_every_query_of_the_budget(world):
    """With error points, `auto` asks whether an exact copy of the core points could be identified
    within the budget by their own test (at alpha/2). The adaptive allocation asks such a copy
    nothing else, so the whole budget counts — not the core points' share of it, as it once did,
    which sent budgets a copy fits in to Wald's test. Checked against a real run of that copy."""
    from deepcore_auditor.auditor.audit import AuditConfig, Plan, run_test

    ten = _with_references(load_fingerprint(world.fingerprint), 10, SHARES)
    tail = np.arange(len(ten) - 40, len(ten))

    def twice(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, a[tail]])

    two = dataclasses.replace(
        ten, points=np.concatenate([ten.points, np.clip(ten.points[tail] + np.float32(1 / 255), 0, 1)]),
        owner_labels=twice(ten.owner_labels), owner_probs=twice(ten.owner_probs),
        known_models=tuple(dataclasses.replace(m, labels=twice(m.labels), owner_prob=twice(m.owner_prob)) for m in ten.known_models),
        extra={**ten.extra, "error_points": 40})
    n = len(ten)
    p0 = float(np.mean(rates(ten, "agreement", "betting").p0))
    needs = Bettor(n * p0, n).best_case_needs(math.log(2 / 0.01), n)
    assert needs < n and needs * len(two) // n > needs  # the share rule would have asked for more
    assert resolve_test(two, "agreement", "auto", 0.01, needs) == "betting"
    assert resolve_test(two, "agreement", "auto", 0.01, needs - 1) == "sprt"
    plan = Plan.make(two, AuditConfig(test="auto", budget=needs, batch_size=1))
    assert plan.test == "betting"
    labels = np.asarray(plan.owner_labels)
    out = run_test(plan, lambda pos: np.where(plan.set_of()[pos] == 0, labels[pos], (labels[pos] + 1) % 10), needs)
    assert out.decision == "piracy" and out.asked == needs


def test_zoo_sizes_name_the_two_reference_counts_and_explicit_counts_win() -> None:
    """`--zoo small|default|large`: the same simulated pirates, more or fewer references; small
    keeps enough calibration references for the betting test's prediction bound (at least
    MIN_PREDICTION_DOF replicates beyond one per kind); a count given beside it wins; an unknown
    size is refused in one line."""
    from deepcore_auditor.auditor.commands import build_config
    from deepcore_auditor.fingerprints.config import DEFAULT_ZOO, ZOO_SIZES, zoo_of

    assert build_config().zoo == DEFAULT_ZOO == build_config(zoo_size="default").zoo
    small, large = build_config(zoo_size="small").zoo, build_config(zoo_size="large").zoo
    assert small == zoo_of(*ZOO_SIZES["small"]) and large == zoo_of(*ZOO_SIZES["large"])
    assert len(small) < len(DEFAULT_ZOO) < len(large)
    pirates = [z for z in DEFAULT_ZOO if z.kind == "piracy"]
    assert [z for z in small if z.kind == "piracy"] == pirates == [z for z in large if z.kind == "piracy"]
    assert small == DEFAULT_ZOO[: len(small)]  # every model of the small zoo keeps its seed and cached copy
    for zoo in (small, DEFAULT_ZOO, large):
        kinds: dict[tuple[str, str], int] = {}
        for z in zoo:
            if z.kind == "independent" and z.role == "calibration":
                kinds[(z.arch, z.recipe)] = kinds.get((z.arch, z.recipe), 0) + 1
        assert sum(n - 1 for n in kinds.values()) >= MIN_PREDICTION_DOF
    assert build_config(zoo_size="small", selection_references=3).zoo == zoo_of(ZOO_SIZES["small"][0], 3)
    with pytest.raises(InputError, match="--zoo must be one of small, default, large, got 'tiny'"):
        build_config(zoo_size="tiny")


def test_more_selection_references_come_after_every_model_the_zoo_holds() -> None:
    """`--selection-references N`: N references of the owner's architecture per recipe in the
    selection, the new ones after every model of the zoo (whose seeds, by position, and cached
    copies stay as they were); fewer than the zoo holds is refused."""
    from deepcore_auditor.fingerprints.config import DEFAULT_ZOO, SELECTION_AFTER, zoo_of

    ten = zoo_with_references(SELECTION_AFTER)
    assert zoo_with_selection(1, ten) == ten
    three = zoo_with_selection(3, ten)
    assert three == zoo_of(SELECTION_AFTER, 3) == DEFAULT_ZOO[: len(three)]  # the default: three of each
    assert three[: len(ten)] == ten and len(three) == len(ten) + 4
    added = three[len(ten):]
    assert all(z.kind == "independent" and z.role == "selection" and z.arch == "owner" for z in added)
    assert sorted(z.recipe for z in added) == ["adam", "adam", "sgd", "sgd"] and len({z.name for z in three}) == len(three)
    assert zoo_with_selection(3, three) == three
    with pytest.raises(ValueError, match="already holds 1 selection references"):
        zoo_with_selection(0, ten)


def test_more_calibration_references_keep_the_selection_models_and_so_the_points() -> None:
    """Past SELECTION_AFTER, further calibration references come after the selection references:
    every selection model keeps its place (its seed), so a build with more references grows the
    same points and only p0 moves; the extras continue the reference order, no name twice."""
    from deepcore_auditor.fingerprints.config import DEFAULT_CALIBRATION_REFERENCES, DEFAULT_ZOO, SELECTION_AFTER, zoo_of

    base = zoo_of(SELECTION_AFTER, 3)
    assert DEFAULT_CALIBRATION_REFERENCES > SELECTION_AFTER and DEFAULT_ZOO[: len(base)] == base
    for k in (SELECTION_AFTER + 1, DEFAULT_CALIBRATION_REFERENCES, 20):
        more = zoo_of(k, 3)
        assert more[: len(base)] == base and len({z.name for z in more}) == len(more)
        added = more[len(base):]
        assert len(added) == k - SELECTION_AFTER and all(z.kind == "independent" and z.role == "calibration" for z in added)
    assert [z.name for z in DEFAULT_ZOO[len(base):]] == ["cal-extra-6-mlp-adam", "cal-extra-7-mlp-adam", "cal-extra-8-lenet-adam"]
    assert zoo_with_references(12, zoo_with_references(11)) == zoo_with_references(12)  # an extended zoo continues the order

def test_the_null_benchmark_holds_each_kinds_bound_against_models_of_that_kind(world):
    """benchmarks/null.py's kind coverage: per kind of calibration reference, the bound one new model
    of it gets (the largest of them is p0's prediction bound), beside the null's models of that kind
    trained on the owner's data — other data, other tasks and the SGD kind (the null trains by Adam)
    counted nowhere."""
    from deepcore_auditor.benchmarks.null import kind_coverage

    fp = _with_references(load_fingerprint(world.fingerprint), 13, SHARES)
    rows = {f"seed-{i}": {"family": "same-arch-seed", "arch": "cnn", "data": "A", "agreement_all_points": a}
            for i, a in enumerate((0.4, 0.5, 0.99))}
    rows["lenet-b"] = {"family": "other-arch", "arch": "lenet", "data": "B", "agreement_all_points": 0.99}
    rows["task"] = {"family": "other-task", "arch": "lenet", "data": "A", "agreement_all_points": 0.99}
    cov = {(c["arch"], c["recipe"]): c for c in kind_coverage(fp, rows, "cnn")}
    assert set(cov) == {("cnn", "adam"), ("cnn", "sgd"), ("lenet", "adam"), ("mlp", "adam"), ("cnn-wide", "adam")}
    assert [len(cov[k]["references"]) for k in sorted(cov)] == [3, 3, 1, 3, 3]  # cnn adam/sgd, cnn-wide, lenet, mlp
    owner = cov[("cnn", "adam")]
    assert owner["models"] == 3 and owner["above_bound"] == 1 and owner["max"] == 0.99 and 0.5 < owner["bound"] < 0.99
    assert cov[("cnn", "sgd")]["models"] == 0 and cov[("lenet", "adam")]["models"] == 0
    # The spread the bound assumes (pooled over kinds, arcsine scale) reproduces it; the models' own
    # spread is theirs, on the same scale, and none for a kind with fewer than three models.
    refs = np.arcsin(np.sqrt(owner["references"]))
    top = refs.mean() + t_quantile(1 - PREDICTION_LEVEL, 8) * owner["references_spread"] * math.sqrt(1 + 1 / 3)
    assert owner["bound"] == pytest.approx(np.sin(top) ** 2, abs=2e-3)
    assert owner["models_spread"] == pytest.approx(np.arcsin(np.sqrt([0.4, 0.5, 0.99])).std(ddof=1), abs=1e-4)
    assert cov[("cnn", "sgd")]["models_spread"] is None
    summary = rates(fp, "agreement", "betting").summary
    assert max(c["bound"] for c in cov.values()) == pytest.approx(summary["prediction_bound"], abs=1e-4)
    assert summary["prediction_dof"] == 8 and {c["set"] for c in cov.values()} == {"core"}

    # Two sets of points (the last 20 the owner's mistakes): each set's kinds and bounds, read
    # against each model's agreement on that set; a model is above p0 if it is on either set.
    from deepcore_auditor.benchmarks.null import _above_p0, _set_p0

    two = dataclasses.replace(fp, extra={**fp.extra, "error_points": 20})
    for row, errors in zip(rows.values(), (0.1, 0.2, 0.3, 0.99, 0.99), strict=True):
        row["agreement_per_set"] = {"core": row["agreement_all_points"], "errors": errors}
    per_set = kind_coverage(two, rows, "cnn")
    assert [c["set"] for c in per_set] == ["core"] * 5 + ["errors"] * 5
    owner_errors = next(c for c in per_set if c["set"] == "errors" and (c["arch"], c["recipe"]) == ("cnn", "adam"))
    assert owner_errors["models"] == 3 and owner_errors["max"] == 0.3
    assert max(c["bound"] for c in per_set if c["set"] == "errors") == pytest.approx(
        rates(two, "agreement", "betting").summary["error_points"]["prediction_bound"], abs=1e-4)
    low = {"agreement_all_points": 0.0, "agreement_per_set": {"core": 0.0, "errors": 0.0}}
    p0 = _set_p0(two, "betting")
    assert set(p0) == {"core", "errors"}
    assert not _above_p0(low, p0) and _above_p0({**low, "agreement_per_set": {"core": 0.0, "errors": 1.0}}, p0)
