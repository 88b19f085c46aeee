"""The audit end to end on real small models through real ONNX Runtime sessions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deepcore_auditor.adapters.base import Access, LabelsOnly
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.auditor.audit import AuditConfig, audit
from deepcore_auditor.auditor.ledger import QueryLedger
from deepcore_auditor.fingerprints.calibration import rates
from deepcore_auditor.fingerprints.format import load_fingerprint
from deepcore_auditor.fingerprints.stats import Bettor, copy_queries


def _open(world, path):
    fp = load_fingerprint(world.fingerprint)
    return fp, OnnxOracle(path, convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes)


def test_fingerprint_points_are_core_points_of_the_owner(world):
    fp, owner = _open(world, world.owner_onnx)
    probs = owner.query(fp.points, Access.PROBS)
    assert (probs.argmax(1) == fp.owner_labels).all()
    assert probs.max(1).min() >= fp.method["params"]["core"]["min_confidence"] - 1e-4
    assert fp.points.min() >= 0 and fp.points.max() <= 1


def test_selection_references_were_kept_apart_from_calibration(world):
    fp = load_fingerprint(world.fingerprint)
    roles = {(m.kind, m.role) for m in fp.known_models}
    assert {("independent", "selection"), ("independent", "calibration"), ("piracy", "calibration")} <= roles
    summary = rates(fp, "agreement").summary
    assert all(name.startswith("cal-") for name in summary["independent_models"])


MODES_TESTS = [("agreement", Access.LABELS, "betting"), ("similarity", Access.PROBS, "betting"),
               ("agreement", Access.LABELS, "sprt"), ("clustering", Access.LABELS, "sprt")]


@pytest.mark.parametrize("mode,access,test", MODES_TESTS)
def test_copies_of_the_owner_are_flagged(world, mode, access, test):
    for path in (world.owner_onnx, world.pirate_onnx):
        fp, suspect = _open(world, path)
        res = audit(fp, suspect, AuditConfig(access=access, mode=mode, budget=60, batch_size=5, test=test))
        assert res.verdict == "piracy", (path.name, mode, res.to_dict())
        assert res.trajectory[-1].llr >= res.thresholds["piracy"]
        if mode == "agreement" and res.agreement == 1.0 and test == "sprt":
            # a copy that always agrees stops at the test's own arithmetic minimum
            minimum = math.ceil(res.thresholds["piracy"] / math.log(res.p1 / res.p0))
            assert res.queries_used == 5 * math.ceil(minimum / 5)
        if mode == "agreement" and res.agreement == 1.0 and test == "betting":
            # ... which for the betting test is foreseen: no batch asks past it, and it is near ln(1/alpha)/ln(1/p0)
            need = Bettor(len(fp) * res.p0, len(fp)).best_case_needs(res.thresholds["piracy"], len(fp))
            assert res.queries_used == need <= 1.3 * copy_queries(res.p0, res.alpha)


def test_clustering_mode_runs_under_walds_test_only(world):
    fp, suspect = _open(world, world.pirate_onnx)
    for test in ("betting", "auto"):  # the default refuses it too: it bounds no unseen model
        with pytest.raises(InputError, match="clustering"):
            audit(fp, suspect, AuditConfig(mode="clustering", budget=60, test=test))
    assert audit(fp, suspect, AuditConfig(mode="clustering", budget=60, test="sprt")).verdict == "piracy"


@pytest.mark.parametrize("mode,access,test", MODES_TESTS)
def test_independent_model_is_never_accused(world, mode, access, test):
    fp, suspect = _open(world, world.independent_onnx)
    res = audit(fp, suspect, AuditConfig(access=access, mode=mode, budget=60, batch_size=5, test=test))
    assert res.verdict != "piracy", res.to_dict()
    assert res.queries_used <= 60


def test_trajectory_reports_the_verdict_against_queries(world):
    fp, suspect = _open(world, world.pirate_onnx)
    res = audit(fp, suspect, AuditConfig(budget=60, batch_size=5, test="sprt"))
    qs = [s.queries for s in res.trajectory]
    assert qs == list(range(5, 5 * len(qs) + 1, 5))
    betting = audit(fp, suspect, AuditConfig(budget=60, batch_size=5, test="betting"))  # batches of at most 5, none past the verdict
    steps = np.diff([0] + [s.queries for s in betting.trajectory])
    assert steps.max() <= 5 and betting.verdict == "piracy" and betting.trajectory[-1].llr_independent is not None
    assert res.trajectory[-1].decision == res.verdict
    assert all(s.decision is None for s in res.trajectory[:-1])
    d = res.to_dict()
    assert {"verdict", "queries_used", "budget", "alpha", "trajectory", "fingerprint_sha256", "suspect"} <= d.keys()
    assert d["suspect"]["identity"]["sha256"]


def test_budget_is_a_hard_limit_and_ends_inconclusive(world):
    fp, suspect = _open(world, world.independent_onnx)
    # alpha tiny and beta tiny: the test cannot decide within 10 queries.
    res = audit(fp, suspect, AuditConfig(budget=10, batch_size=5, alpha=1e-300, beta=1e-300))
    assert res.verdict == "inconclusive"
    assert res.queries_used == 10
    assert any("budget" in n for n in res.notes)


def test_similarity_mode_refuses_a_labels_only_oracle_before_any_query(world):
    fp, suspect = _open(world, world.pirate_onnx)
    labels_only = LabelsOnly(suspect)
    with pytest.raises(InputError, match="needs --access probs"):
        audit(fp, labels_only, AuditConfig(access=Access.LABELS, mode="similarity"))
    ledger = QueryLedger({})
    with pytest.raises(IncompatibleSuspect, match="only answers labels"):
        audit(fp, labels_only, AuditConfig(access=Access.PROBS, mode="similarity"), ledger=ledger)
    assert len(ledger) == 0


def test_seed_changes_the_order_not_the_outcome_for_a_copy(world):
    fp, _ = _open(world, world.owner_onnx)
    firsts = set()
    for seed in range(3):
        _, suspect = _open(world, world.owner_onnx)
        res = audit(fp, suspect, AuditConfig(budget=60, batch_size=5, seed=seed))
        assert res.verdict == "piracy"
        firsts.add(res.queries_used)
    assert firsts  # deterministic per seed; below, the same seed gives the same trajectory
    _, s1 = _open(world, world.independent_onnx)
    _, s2 = _open(world, world.independent_onnx)
    a = audit(fp, s1, AuditConfig(budget=60, batch_size=5, seed=7))
    b = audit(fp, s2, AuditConfig(budget=60, batch_size=5, seed=7))
    assert [x.llr for x in a.trajectory] == [x.llr for x in b.trajectory]


def test_resume_from_ledger_asks_nothing_twice(world, tmp_path):
    fp, suspect = _open(world, world.independent_onnx)
    cfg = AuditConfig(budget=20, batch_size=5, alpha=1e-300, beta=1e-300)
    from deepcore_auditor.auditor.audit import ledger_header

    path = tmp_path / "ledger.jsonl"
    first = audit(fp, suspect, cfg, ledger=QueryLedger.open(path, ledger_header(fp, suspect, cfg), resume=False))
    assert first.queries_used == 20
    cfg2 = AuditConfig(budget=40, batch_size=5, alpha=1e-300, beta=1e-300)
    ledger = QueryLedger.open(path, ledger_header(fp, suspect, cfg2), resume=True)
    assert len(ledger) == 20
    second = audit(fp, suspect, cfg2, ledger=ledger)
    assert second.replayed_from_ledger == 20
    assert second.queries_used == 40
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    digests = [r["digest"] for r in records if "digest" in r]
    assert len(digests) == len(set(digests)) == 40
    assert sum(r.get("charge", 0) for r in records) == 40


def test_known_model_answers_match_the_stored_calibration(world):
    fp = load_fingerprint(world.fingerprint)
    r = rates(fp, "agreement")
    for m in fp.known_models:
        if m.role == "calibration" and m.kind == "independent":
            assert r.summary["independent_models"][m.name] == pytest.approx(float(np.mean(m.labels == fp.owner_labels)), abs=1e-4)
    assert 0 < r.p0.max() < r.p1.min() < 1


def test_a_betting_audit_begun_at_the_legacy_prediction_level_is_refused_on_resume(world, tmp_path):
    """A ledger whose plan was made before the level moved (no `prediction_level` named, read at
    0.01) is not resumed under today's plan: `--resume` refuses it in one line naming the
    difference, and nothing is asked or appended. Wald's ledgers, whose plans name no level, still
    resume."""
    from deepcore_auditor.auditor.audit import Plan, ledger_header
    from deepcore_auditor.fingerprints.calibration import LEGACY_PREDICTION_LEVEL

    fp, suspect = _open(world, world.independent_onnx)
    cfg = AuditConfig(budget=10, batch_size=5, test="betting")
    then = Plan.make(fp, cfg, prediction_level=LEGACY_PREDICTION_LEVEL)
    header = ledger_header(fp, suspect, cfg, then)
    del header["plan"]["prediction_level"]  # as a ledger of then was written
    path = tmp_path / "old.jsonl"
    QueryLedger.open(path, header, resume=False).close()
    before = path.read_bytes()
    with pytest.raises(InputError, match="cannot resume: .* another plan .*prediction_level"):
        QueryLedger.open(path, ledger_header(fp, suspect, cfg), resume=True)
    assert path.read_bytes() == before
    wald = AuditConfig(budget=10, batch_size=5, test="sprt")
    QueryLedger.open(tmp_path / "wald.jsonl", ledger_header(fp, suspect, wald), resume=False).close()
    again = QueryLedger.open(tmp_path / "wald.jsonl", ledger_header(fp, suspect, wald), resume=True)
    assert len(again) == 0
    again.close()

def test_failed_attempts_of_an_interrupted_audit_count_against_the_budget_on_resume(world, tmp_path):
    """Failed attempts are charged on disk before they are sent, so a resumed audit knows what
    earlier runs spent and the budget holds across runs (it once counted only answers)."""
    from deepcore_auditor.adapters.errors import TransientOracleError
    from deepcore_auditor.auditor.audit import ledger_header
    from tests.test_channel import Flaky

    fp, suspect = _open(world, world.independent_onnx)
    cfg = AuditConfig(budget=30, batch_size=5, alpha=1e-300, beta=1e-300, repeat_checks=0)
    path = tmp_path / "ledger.jsonl"
    flaky = Flaky(suspect, {3, 4})  # the third batch fails on both of its attempts
    with pytest.raises(TransientOracleError):
        audit(fp, flaky, cfg, ledger=QueryLedger.open(path, ledger_header(fp, suspect, cfg), resume=False), retries=2)
    ledger = QueryLedger.open(path, ledger_header(fp, suspect, cfg), resume=True)
    assert (len(ledger), ledger.spent) == (10, 20)
    again = Flaky(suspect, set())
    res = audit(fp, again, cfg, ledger=ledger)
    assert res.queries_used == 30 == 20 + again.calls * 5  # 10 more points, not 20
    assert res.answered == 20 and res.verdict == "inconclusive"


def test_the_betting_plan_records_its_clearing_gap_and_older_plans_verify_under_theirs(world):
    """The betting test's p1 sits CLEARING_GAP above p0 and the plan says so; a plan from a
    ledger written before names no gap and reads back the legacy 0.1, which is what its rates were
    computed with: recomputed from the fingerprint under its own gap, it is the plan that was
    written (`verify-report --fingerprint`). A gap out of (0, 0.5] is refused."""
    import dataclasses

    from deepcore_auditor.auditor.audit import Plan
    from deepcore_auditor.fingerprints.calibration import CLEARING_GAP, LEGACY_CLEARING_GAP, LEGACY_PREDICTION_LEVEL

    fp = load_fingerprint(world.fingerprint)
    config = AuditConfig(test="betting")
    plan = Plan.make(fp, config)
    p0, p1 = np.asarray(plan.p0), np.asarray(plan.p1)
    assert plan.clearing_gap == CLEARING_GAP == 0.05
    assert np.allclose(p1, np.minimum(p0 + CLEARING_GAP, (1 + p0) / 2))
    then = Plan.make(fp, config, LEGACY_CLEARING_GAP, LEGACY_PREDICTION_LEVEL)  # a plan of then: neither field named
    back = Plan.from_dict({k: v for k, v in then.to_dict().items() if k not in ("clearing_gap", "prediction_level")})
    assert back.clearing_gap == LEGACY_CLEARING_GAP and back == then != plan
    assert Plan.make(fp, config, back.clearing_gap, back.prediction_level) == back
    assert np.allclose(np.asarray(back.p1), np.minimum(p0 + 0.1, (1 + p0) / 2))
    assert Plan.make(fp, AuditConfig(test="sprt")).clearing_gap == LEGACY_CLEARING_GAP  # Wald's p1 is its own
    for bad in (0.0, -0.1, 0.2, 0.7, math.nan):  # only the gaps the tool has used: a report cannot choose its own p1
        with pytest.raises(ValueError, match="unknown clearing gap"):
            Plan.from_dict({**plan.to_dict(), "clearing_gap": bad})
    wald = Plan.make(fp, AuditConfig(test="sprt"))
    assert "clearing_gap" not in wald.to_dict() and Plan.from_dict(wald.to_dict()) == wald  # its ledgers as written before
    assert "unknown clearing gap" in (dataclasses.replace(wald, clearing_gap=CLEARING_GAP).problem() or "")


def test_the_betting_plan_records_its_prediction_level_and_older_plans_verify_under_theirs(world):
    """The betting plan names the level its p0's prediction bound was read at
    (calibration.PREDICTION_LEVEL); a plan written before names none and reads back the legacy
    0.01, under which it recomputes from the fingerprint as written. Wald's plans name none; any
    other level is refused (a report cannot choose its own p0)."""
    import dataclasses

    from test_calibration import SHARES, _with_references

    from deepcore_auditor.auditor.audit import Plan
    from deepcore_auditor.fingerprints.calibration import LEGACY_PREDICTION_LEVEL, PREDICTION_LEVEL, rates

    # Ten references give the prediction bound 5 degrees of freedom: the level moves p0 (the
    # suite's world alone has too few references for any bound, and both levels would agree).
    fp = _with_references(load_fingerprint(world.fingerprint), 10, SHARES)
    config = AuditConfig(test="betting")
    plan = Plan.make(fp, config)
    assert plan.prediction_level == PREDICTION_LEVEL == 0.001 and plan.to_dict()["prediction_level"] == PREDICTION_LEVEL
    assert np.allclose(plan.p0, rates(fp, "agreement", "betting").p0[list(plan.indices)])
    old = {k: v for k, v in Plan.make(fp, config, prediction_level=LEGACY_PREDICTION_LEVEL).to_dict().items()
           if k != "prediction_level"}
    back = Plan.from_dict(old)
    assert back.prediction_level == LEGACY_PREDICTION_LEVEL and back != plan
    assert all(a < b for a, b in zip(back.p0, plan.p0, strict=True))  # the older, lower bound
    assert Plan.make(fp, config, back.clearing_gap, back.prediction_level) == back
    assert np.allclose(back.p0, rates(fp, "agreement", "betting", level=LEGACY_PREDICTION_LEVEL).p0[list(back.indices)])
    for bad in (0.05, 0.0, -0.01, math.nan):
        with pytest.raises(ValueError, match="unknown prediction level"):
            Plan.from_dict({**plan.to_dict(), "prediction_level": bad})
    with pytest.raises(ValueError, match="no version of this tool wrote that pair"):
        Plan.from_dict({**plan.to_dict(), "clearing_gap": 0.1})
    wald = Plan.make(fp, AuditConfig(test="sprt"))
    assert wald.prediction_level == LEGACY_PREDICTION_LEVEL and "prediction_level" not in wald.to_dict()
    assert "unknown prediction level" in (dataclasses.replace(wald, prediction_level=PREDICTION_LEVEL).problem() or "")


def test_a_betting_report_from_before_the_clearing_gap_verifies_against_its_fingerprint(world, tmp_path, monkeypatch):
    """A betting-test report written before plans named their gap (p1 at p0 + 0.1, no
    `clearing_gap` in its plan) passes `verify-report --fingerprint`: the plan is recomputed from
    the fingerprint under the gap it read back. The same report claiming another gap fails."""
    from click.testing import CliRunner
    from conftest import audit_args

    from deepcore_auditor.auditor.audit import Plan
    from deepcore_auditor.auditor.cli import cli
    from deepcore_auditor.auditor.errors import ReportError
    from deepcore_auditor.auditor.report import verify_report
    from deepcore_auditor.fingerprints.calibration import LEGACY_CLEARING_GAP, LEGACY_PREDICTION_LEVEL
    from deepcore_auditor.fingerprints.format import canonical_digest

    path = tmp_path / "old.report.json"
    monkeypatch.setattr(Plan.make.__func__, "__defaults__", (LEGACY_CLEARING_GAP, LEGACY_PREDICTION_LEVEL))  # as the tool did then
    r = CliRunner().invoke(cli, audit_args(world, world.pirate_onnx, "--test", "betting", "--report", str(path)))
    monkeypatch.undo()
    assert r.exit_code == 1, r.output  # piracy
    doc = json.loads(path.read_text())
    plan = doc["content"]["ledger"]["header"]["plan"]
    assert plan.pop("clearing_gap") == LEGACY_CLEARING_GAP  # what a plan of then holds: no gap named, no level
    assert plan.pop("prediction_level") == LEGACY_PREDICTION_LEVEL
    doc["content_sha256"] = canonical_digest(doc["content"])
    path.write_text(json.dumps(doc))
    v = verify_report(path, fingerprint_path=world.fingerprint)
    assert v.verdict == "piracy" and any("recomputed from the fingerprint" in c for c in v.checks)
    plan["clearing_gap"] = 0.3
    doc["content_sha256"] = canonical_digest(doc["content"])
    path.write_text(json.dumps(doc))
    with pytest.raises(ReportError, match="unknown clearing gap"):
        verify_report(path, fingerprint_path=world.fingerprint)
    plan["clearing_gap"], plan["prediction_level"] = 0.05, 0.05
    doc["content_sha256"] = canonical_digest(doc["content"])
    path.write_text(json.dumps(doc))
    with pytest.raises(ReportError, match="unknown prediction level"):
        verify_report(path, fingerprint_path=world.fingerprint)
