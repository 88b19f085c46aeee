"""Error points: the owner's mistakes on held-out data as a second set of points, with a test of
its own at half of alpha (calibration.point_sets, audit._PerSet), built by the fingerprint
command (build._with_error_points) and replayed by verify-report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY

from deepcore_auditor.auditor.audit import AuditConfig, Plan, run_test, thresholds
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.fingerprints.calibration import point_sets, rates, subset
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint, save_fingerprint
from deepcore_auditor.fingerprints.stats import SequentialTest

ERRORS = 80


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def two_sets(world: Any) -> Fingerprint:
    """The world's fingerprint followed by its own last ERRORS points moved by 1/255 (a file never
    lists a point twice), named error points: two sets, each with the known models' answers on
    the points they come from, and each large enough for an exact copy to be identified by its
    own test (which points they are does not matter to the tests)."""
    fp = load_fingerprint(world.fingerprint)
    tail = np.arange(len(fp) - ERRORS, len(fp))

    def twice(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, a[tail]])

    points = np.concatenate([fp.points, np.clip(fp.points[tail] + np.float32(1 / 255), 0, 1)])
    known = tuple(dataclasses.replace(m, labels=twice(m.labels), owner_prob=twice(m.owner_prob)) for m in fp.known_models)
    return dataclasses.replace(fp, points=points, owner_labels=twice(fp.owner_labels), owner_probs=twice(fp.owner_probs),
                               known_models=known, extra={**fp.extra, "error_points": ERRORS})


def test_each_set_gets_the_rates_of_its_own_points(two_sets: Fingerprint) -> None:
    sets = point_sets(two_sets)
    assert sets.sum() == ERRORS and (sets[-ERRORS:] == 1).all()
    for test in ("sprt", "betting"):
        r = rates(two_sets, "agreement", test)
        for k in (0, 1):
            own = rates(subset(two_sets, np.flatnonzero(sets == k)), "agreement", test)
            assert np.allclose(r.p0[sets == k], own.p0) and np.allclose(r.p1[sets == k], own.p1)
        assert r.summary["p0"] == rates(subset(two_sets, np.flatnonzero(sets == 0)), "agreement", test).summary["p0"]
        assert "independent_models" in r.summary["error_points"]
    assert not (point_sets(dataclasses.replace(two_sets, extra={})) > 0).any()


def test_a_fingerprint_naming_more_error_points_than_it_has_is_refused(two_sets: Fingerprint) -> None:
    from deepcore_auditor.adapters.errors import InputError

    for bad in (500, len(two_sets), -1, "40", 2.5, True, [40]):
        with pytest.raises(InputError, match="error points among its"):
            point_sets(dataclasses.replace(two_sets, extra={"error_points": bad}))


def test_the_plan_records_each_positions_set_and_reads_back(two_sets: Fingerprint) -> None:
    plan = Plan.make(two_sets, AuditConfig(test="sprt"))
    assert np.array_equal(plan.set_of(), point_sets(two_sets)[np.asarray(plan.indices)])
    assert Plan.from_dict(plan.to_dict()) == plan and plan.set_alpha() == pytest.approx(0.005)
    old = {k: v for k, v in plan.to_dict().items() if k != "sets"}  # a ledger from before error points
    assert Plan.from_dict(old).sets == () and Plan.from_dict(old).set_alpha() == 0.01
    with pytest.raises(ValueError, match="point sets"):
        Plan.from_dict({**plan.to_dict(), "sets": [2] * len(plan)})
    with pytest.raises(ValueError, match="point sets"):
        Plan.from_dict({**plan.to_dict(), "sets": [0]})
    # each set's test accuses at alpha/2: a union bound over the two
    assert thresholds(plan)["piracy"] == round(SequentialTest(0.005, 0.01).upper, 4)
    betting = Plan.make(two_sets, AuditConfig(test="betting"))
    assert thresholds(betting)["piracy"] == round(math.log(2 / 0.01), 4)


def _suspect(plan: Plan, copies: set[int]) -> Any:
    """Answers the owner's label on the points of the sets in `copies`, another label elsewhere."""
    labels, sets = np.asarray(plan.owner_labels), plan.set_of()
    return lambda pos: np.where(np.isin(sets[pos], list(copies)), labels[pos], (labels[pos] + 1) % 10)


@pytest.mark.parametrize("test", ["sprt", "betting"])
@pytest.mark.parametrize("copies,verdict", [({1}, "piracy"), ({0}, "piracy"), (set(), "independent"), ({0, 1}, "piracy")])
def test_either_set_accuses_and_only_both_clear(two_sets: Fingerprint, test: str, copies: set[int], verdict: str) -> None:
    """A student that copies only the owner's mistakes is accused by their test, a copy of the
    core points by theirs; `independent` needs both tests to clear the suspect."""
    plan = Plan.make(two_sets, AuditConfig(test=test, budget=len(two_sets), batch_size=5))
    out = run_test(plan, _suspect(plan, copies), len(two_sets))
    assert out.decision == verdict, (out.decision, out.asked, out.per_set)
    last = out.trajectory[-1]
    limits = thresholds(plan)
    if verdict == "piracy":
        assert last.llr >= limits["piracy"]
    elif test == "sprt":
        assert last.llr <= limits["independent"]
    else:  # the betting test plots minus its evidence against piracy: every set's crossed ln(1/beta)
        assert last.llr_independent is not None and -last.llr_independent <= limits["independent"]
    if copies == {1}:  # the answers on the core points were asked and count in the agreement, not as evidence
        assert out.per_set["core"][0] == 0 and out.per_set["errors"][0] == 1


@pytest.mark.parametrize("test", ["sprt", "betting"])
def test_adaptive_allocation_asks_the_set_a_suspect_copies(two_sets: Fingerprint, test: str) -> None:
    """A plan over two sets shares its queries adaptively: a suspect that copies one set only is
    asked that set's points, in the set's own plan order, and accused with fewer queries than the
    plan's fixed order (which asked the other set's points for nothing); every position once."""
    config = AuditConfig(test=test, budget=len(two_sets), batch_size=5)
    plan = Plan.make(two_sets, config)
    assert plan.allocation == "adaptive"
    fixed = dataclasses.replace(plan, allocation="fixed")
    sets = plan.set_of()
    for copies in ({0}, {1}):
        out, before = run_test(plan, _suspect(plan, copies), len(plan)), run_test(fixed, _suspect(fixed, copies), len(plan))
        assert out.decision == before.decision == "piracy"
        assert out.asked < before.asked and before.positions == list(range(before.asked))
        assert len(set(out.positions)) == len(out.positions) == out.asked
        (copied,) = copies
        other = [p for p in out.positions if sets[p] != copied]
        assert len(other) <= 5, (copies, len(other))  # at most the first batch, before any evidence
        for k in (0, 1):  # each set's points in the plan's order: a prefix of the set's positions
            mine = [p for p in out.positions if sets[p] == k]
            assert mine == np.flatnonzero(sets == k)[: len(mine)].tolist()


def test_adaptive_allocation_keeps_each_sets_level(two_sets: Fingerprint) -> None:
    """The allocation looks at the answers, yet each set's test keeps its level: suspects whose
    answers agree on each set exactly as often as its p0 allows (the null's boundary, each set's
    points a fixed population asked in a seeded random order) are accused at most at alpha, well
    within the binomial spread, over 300 audits."""
    rng = np.random.default_rng(7)
    accused = 0
    for seed in range(300):
        plan = Plan.make(two_sets, AuditConfig(test="betting", budget=len(two_sets), batch_size=1, seed=seed, alpha=0.05))
        sets, p0 = plan.set_of(), np.asarray(plan.p0)
        agree = np.zeros(len(plan), dtype=bool)
        for k in (0, 1):  # the suspect: floor(p0 n_k) points of each set answered like the owner
            mine = np.flatnonzero(sets == k)
            agree[rng.choice(mine, size=int(p0[mine[0]] * len(mine)), replace=False)] = True
        labels = np.asarray(plan.owner_labels)
        out = run_test(plan, lambda pos, a=agree, y=labels: np.where(a[pos], y[pos], (y[pos] + 1) % 10), len(plan))
        accused += out.decision == "piracy"
    assert accused <= 25, accused  # alpha 0.05: 15 expected at most; P(Binomial(300, 0.05) > 25) < 0.01


def test_a_plan_from_before_adaptive_allocation_replays_in_plan_order(two_sets: Fingerprint) -> None:
    """A ledger written before the allocation existed names none: its plan reads back "fixed"
    and asks in plan order, as the audit that wrote it did; a plan naming another is refused."""
    plan = Plan.make(two_sets, AuditConfig(test="betting"))
    old = {k: v for k, v in plan.to_dict().items() if k != "allocation"}
    assert Plan.from_dict(old).allocation == "fixed" and Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="unknown allocation"):
        Plan.from_dict({**plan.to_dict(), "allocation": "greedy"})
    one_set = Plan.make(dataclasses.replace(two_sets, extra={}), AuditConfig(test="betting"))
    assert one_set.allocation == "fixed"


def test_a_two_set_fingerprint_through_the_cli_verifies(world: Any, two_sets: Fingerprint, tmp_path: Path) -> None:
    """The audit command on a fingerprint with error points: each set's agreement in a note,
    inspect names the error points, and verify-report replays the two tests from the ledger."""
    path = tmp_path / "two-sets.json"
    save_fingerprint(two_sets, path)
    i = run("inspect", str(path), "--json")
    assert i.exit_code == 0, i.output
    assert json.loads(i.stdout)["error_points"] == ERRORS and "on the error points" in json.loads(i.stdout)["known_models"][0]
    verdicts = {}
    for name, suspect in (("pirate", world.pirate_onnx), ("independent", world.independent_onnx)):
        report, ledger = tmp_path / f"{name}.report.json", tmp_path / f"{name}.ledger.jsonl"
        a = run("audit", "--fingerprint", str(path), "--suspect", str(suspect), "--json", "--report", str(report), "--ledger", str(ledger))
        d = json.loads(a.stdout)
        verdicts[name] = d["verdict"]
        assert any(n.startswith("agreement per set of points (each its own test at alpha/2)") for n in d["notes"]), d["notes"]
        v = run("verify-report", str(report), "--ledger", str(ledger), "--fingerprint", str(path))
        assert v.exit_code == 0, v.output
        assert json.loads(report.read_text())["content"]["ledger"]["header"]["plan"]["sets"]  # the plan names each position's set
    assert verdicts["pirate"] == "piracy" and verdicts["independent"] != "piracy"


@pytest.mark.slow
def test_a_build_keeps_no_error_points_that_its_students_do_not_share(world: Any, tmp_path: Path) -> None:
    """The world's owner rebuilt with 40 error points (its known models come from this session's
    cache): on this small world the held-out students do not agree with the owner's mistakes
    clearly above the references' bound, so the build says so and keeps the core points alone."""
    out = tmp_path / "fp.json"
    conv = json.loads(world.fingerprint.read_text())["content"]["convention"]
    r = run("fingerprint", "--owner", str(world.owner_ts), "--data", str(world.root / "owner-data.npz"), "--out", str(out),
            *TINY, "--error-points", "40", "--mean", ",".join(map(str, conv["mean"])), "--std", ",".join(map(str, conv["std"])))
    assert r.exit_code == 0, r.output
    assert "40 error points offered" in r.output and "no error points: the held-out simulated students agree" in r.output
    fp = load_fingerprint(out)
    dropped = fp.extra["error_points_dropped"]
    assert "error_points" not in fp.extra and dropped["offered"] == 40
    assert sum(dropped["held_out_students"]) / len(dropped["held_out_students"]) < dropped["p0"] + 0.1
    assert not point_sets(fp).any() and "error points" not in r.output.strip().splitlines()[-1]


def test_the_bench_reports_each_models_agreement_per_set(two_sets: Fingerprint) -> None:
    """`deepcore bench` records each model's agreement on every point of each set beside the set's
    p0 (the audit's own), and results.md tabulates it per family: a copy of the owner's mistakes
    alone reads 0 on the core points and 1 on the error points."""
    from deepcore_auditor.benchmarks.piracy import MethodData, _agreement_per_set, plan_order
    from deepcore_auditor.benchmarks.report import _per_set

    md = MethodData("deepcore", two_sets, plan_order(len(two_sets), 0))
    sets = point_sets(two_sets)[md.order]
    md.labels["copy"] = md.owner_labels.copy()
    md.labels["student"] = np.where(sets == 1, md.owner_labels, (md.owner_labels + 1) % 10)
    r = _agreement_per_set(md, ["copy", "student"])
    assert r["models"] == {"copy": {"core": 1.0, "errors": 1.0}, "student": {"core": 0.0, "errors": 1.0}}
    betting = rates(two_sets, "agreement", "betting").p0
    assert r["p0"] == {name: round(float(betting[point_sets(two_sets) == k].mean()), 4) for k, name in enumerate(("core", "errors"))}
    lines = _per_set("deepcore-agreement", r, {"student": {"family": "extract", "kind": "piracy", "role": "evaluate"}})
    assert "| extract (piracy) | 1 | 0.000 (0.000–0.000) | 1.000 (1.000–1.000) |" in lines
    assert f"p0 the audit holds each set to: core {r['p0']['core']}, errors {r['p0']['errors']}." in lines


def test_the_challenge_holds_each_set_to_its_own_p0(world: Any, two_sets: Fingerprint, tmp_path: Path) -> None:
    """`deepcore challenge` on a fingerprint with error points: each model's agreement on each set,
    measured by asking it every point, beside that set's own p0 (the premise of that set's test);
    a model counts as above p0 when any set's agreement exceeds that set's — not only when its
    agreement over every point exceeds their mean."""
    from deepcore_auditor.adapters.base import Access
    from deepcore_auditor.adapters.onnx import OnnxOracle

    path = tmp_path / "two-sets.json"
    save_fingerprint(two_sets, path)
    models = [str(world.independent_onnx), str(world.pirate_onnx)]
    r = run("challenge", "--fingerprint", str(path), *[a for m in models for a in ("--independent", m)], "--json")
    assert r.exit_code == 1, r.output  # the copy handed in as independent is accused
    d = json.loads(r.stdout)
    sets = point_sets(two_sets)
    p0 = rates(two_sets, "agreement", d["test"]).p0
    assert d["p0_per_set"] == {name: round(float(p0[sets == k].mean()), 4) for k, name in enumerate(("core", "errors"))}
    for row in d["models"]:
        oracle = OnnxOracle(row["suspect"], convention=two_sets.convention, point_shape=two_sets.point_shape,
                            num_classes=two_sets.num_classes)
        agree = oracle.query(two_sets.points, Access.LABELS) == two_sets.owner_labels
        assert row["agreement_per_set"] == {"core": round(float(agree[sets == 0].mean()), 4),
                                            "errors": round(float(agree[sets == 1].mean()), 4)}
    assert d["above_p0"] == [m["suspect"] for m in d["models"]
                             if any(m["agreement_per_set"][k] > p for k, p in d["p0_per_set"].items())]
    assert str(world.pirate_onnx) in d["above_p0"] and d["accused"] == [str(world.pirate_onnx)]
    text = run("challenge", "--fingerprint", str(path), "--independent", str(world.independent_onnx))
    assert "agree above p0 on a set of points (core " in text.stdout and "errors " in text.stdout, text.output
