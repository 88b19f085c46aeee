"""The budget, retry and ledger wrappers around a real ONNX Runtime suspect."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcore_auditor.adapters.base import Access, InputConvention, Oracle, OracleInfo
from deepcore_auditor.adapters.errors import InputError, OracleError, TransientOracleError
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.auditor.channel import Budgeted, Retrying
from deepcore_auditor.auditor.errors import BudgetExceeded
from deepcore_auditor.auditor.ledger import QueryLedger, Recorded, point_digest
from deepcore_auditor.fingerprints.models import build_architecture, export_onnx

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("budget") / "m.onnx"
    export_onnx(build_architecture("mlp", SHAPE, 10), path, SHAPE)
    return OnnxOracle(path, convention=InputConvention(), point_shape=SHAPE, num_classes=10)


class Flaky(Oracle):
    """Fails with a transient error on the calls listed, otherwise asks the real suspect."""

    def __init__(self, inner: Oracle, fail_on: set[int]) -> None:
        self.inner, self.fail_on, self.calls = inner, fail_on, 0

    @property
    def info(self) -> OracleInfo:
        return self.inner.info

    def _answer(self, points, access):
        self.calls += 1
        if self.calls in self.fail_on:
            raise TransientOracleError("simulated timeout")
        return self.inner.query(points, access)


def pts(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


class Counting(Oracle):
    """Counts the points the real suspect answered; fails permanently on the calls listed."""

    def __init__(self, inner: Oracle, broken_on: set[int]) -> None:
        self.inner, self.broken_on, self.calls, self.answered = inner, broken_on, 0, 0

    @property
    def info(self) -> OracleInfo:
        return self.inner.info

    def _answer(self, points, access):
        self.calls += 1
        if self.calls in self.broken_on:
            raise OracleError("simulated malformed answer")
        out = self.inner.query(points, access)
        self.answered += len(points)
        return out


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(0, 40),
    batches=st.lists(st.tuples(st.integers(1, 12), st.booleans(), st.integers(0, 5)), max_size=12),
    fails=st.sets(st.integers(1, 30), max_size=8),
    broken=st.sets(st.integers(1, 30), max_size=3),
)
def test_never_past_the_budget_and_every_answer_recorded_once(suspect, tmp_path_factory, budget, batches, fails, broken):
    """Any sequence of batches (new points, points seen before, repeat checks), transient
    failures retried and permanent ones not: the budget is never passed, and every answer the
    suspect gave is in the ledger file exactly once, as read back from disk."""
    path = tmp_path_factory.mktemp("prop") / "ledger.jsonl"
    counting = Counting(suspect, broken)
    budgeted = Budgeted(Flaky(counting, fails), budget)
    ledger = QueryLedger.open(path, {"audit": 1}, resume=False)
    oracle = Recorded(Retrying(budgeted, attempts=3, sleep=lambda s: None), ledger)
    for n, again, seed in batches:
        p = pts(n, seed=seed)
        try:
            out = oracle.query_again(p, Access.LABELS) if again else oracle.query(p, Access.LABELS)
            assert len(out) == n
        except (BudgetExceeded, TransientOracleError, OracleError):
            pass
        assert budgeted.spent <= budget
    back = QueryLedger.read(path)
    assert back.entries == ledger.entries and back.repeats == ledger.repeats
    assert len(back.records) == len(ledger.entries) + len(ledger.repeats) == counting.answered


def test_retries_are_charged_to_the_budget(suspect):
    budgeted = Budgeted(Flaky(suspect, {1}), 100)
    out = Retrying(budgeted, sleep=lambda s: None).query(pts(5), Access.LABELS)
    assert len(out) == 5 and budgeted.spent == 10


def test_budget_refuses_before_sending(suspect):
    flaky = Flaky(suspect, set())
    b = Budgeted(flaky, 4)
    with pytest.raises(BudgetExceeded):
        b.query(pts(5), Access.LABELS)
    assert flaky.calls == 0 and b.spent == 0


def test_recorded_answers_are_replayed_not_asked(suspect):
    ledger = QueryLedger({})
    b = Budgeted(suspect, 100)
    r = Recorded(b, ledger)
    first = r.query(pts(6), Access.PROBS)
    again = r.query(pts(6), Access.PROBS)
    assert np.array_equal(first, again) and b.spent == 6 and r.replayed == 6


def test_a_point_twice_in_one_batch_is_asked_and_recorded_once(suspect):
    ledger = QueryLedger({})
    b = Budgeted(suspect, 100)
    p = pts(3)
    batch = p[[0, 1, 0, 2, 1]]
    out = Recorded(b, ledger).query(batch, Access.LABELS)
    assert b.spent == 3 and len(ledger.records) == 3
    assert out[0] == out[2] and out[1] == out[4]
    assert np.array_equal(out[[0, 1, 3]], suspect.query(p, Access.LABELS))


def test_ledger_file_resume_checks_header_and_survives_a_torn_line(suspect, tmp_path):
    path = tmp_path / "l.jsonl"
    header = {"fingerprint_sha256": "f", "suspect": {"sha256": "s"}, "access": "labels"}
    ledger = QueryLedger.open(path, header, resume=False)
    p = pts(4)
    ledger.record([point_digest(x) for x in p], suspect.query(p, Access.LABELS))
    with open(path, "a") as f:
        f.write('{"digest": "abc", "ans')  # killed mid-write
    ledger.close()  # the audit that wrote it has ended
    again = QueryLedger.open(path, header, resume=True)
    assert len(again) == 4
    again.close()
    with pytest.raises(InputError, match="another suspect"):
        QueryLedger.open(path, {**header, "suspect": {"sha256": "other"}}, resume=True)
    with pytest.raises(InputError, match="already exists"):
        QueryLedger.open(path, header, resume=False)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["ledger"] == header


def test_a_ledger_written_before_charge_lines_counts_its_answers_as_charged(suspect, tmp_path):
    path = tmp_path / "old.jsonl"
    lines = [{"ledger": {"a": 1}}] + [{"digest": point_digest(p), "answer": 1, "t": 0} for p in pts(20)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ledger = QueryLedger.open(path, {"a": 1}, resume=True)
    assert ledger.spent == 20
    ledger.charge(5)
    assert ledger.spent == 25 and QueryLedger.read(path).spent == 25  # the old answers still count


def test_a_locked_ledger_refuses_a_second_audit_until_released(tmp_path):
    path = tmp_path / "l.jsonl"
    first = QueryLedger.open(path, {"a": 1}, resume=False, lock=True)
    with pytest.raises(InputError, match="in use by another audit"):
        QueryLedger.open(path, {"a": 1}, resume=True, lock=True)
    first.close()
    with QueryLedger.open(path, {"a": 1}, resume=True, lock=True) as again:
        assert again.header == {"a": 1}
