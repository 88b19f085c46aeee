"""The audit report: one self-contained, digest-protected (optionally signed) JSON document.

    {"format": "deepcore-audit-report", "version": 1, "content_sha256": ..., "content": {...}, ["signature"]}

`content` holds the tool's version, start and finish times (UTC), the fingerprint's digest (with
its signature and commitment, if any), the suspect's identity (ONNX sha256, or Triton server,
model, version and config digest), the test and its parameters, the result, and the whole query
ledger: its header (with the plan: every point's digest, the owner's label and the rates, in the
order asked) and every answered query with its time. `verify_report` replays the sequential test
on the ledger's answers with the same code the audit ran (`auditor.audit.run_test`) and refuses
the report unless the verdict, the points used, the statistic and every digest agree.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor import tool_version
from deepcore_auditor.adapters.base import Access
from deepcore_auditor.auditor.audit import (
    LOCATION_KEYS,
    AuditConfig,
    AuditResult,
    Plan,
    judge_repeats,
    repeat_positions,
    run_test,
    thresholds,
)
from deepcore_auditor.auditor.errors import ReportError
from deepcore_auditor.auditor.ledger import QueryLedger
from deepcore_auditor.fingerprints.format import Document, load_fingerprint, read_document, write_document
from deepcore_auditor.fingerprints.signing import Key

logger = logging.getLogger(__name__)

REPORT_FORMAT = "deepcore-audit-report"
PLAN_KEYS = ("mode", "access", "alpha", "beta", "batch_size", "seed", "repeat_checks")
REPORT_VERSION = 1
TEST_NAMES = {"sprt": "Wald sequential probability ratio test",
              "betting": "anytime-valid test by betting, sampling without replacement"}


def build_report(
    result: AuditResult,
    ledger: QueryLedger,
    *,
    started_utc: str,
    finished_utc: str,
    retries: int,
    fingerprint_signature: dict[str, Any] | None,
    signature_verified: bool,
    commitment: Document | None = None,
) -> dict[str, Any]:
    """The report's content for a finished audit and its ledger."""
    file_sha = hashlib.sha256(ledger.path.read_bytes()).hexdigest() if ledger.path is not None else None
    plan = ledger.header.get("plan", {})
    return {
        "tool": tool_version(),
        "started_utc": started_utc,
        "finished_utc": finished_utc,
        "fingerprint": {
            "sha256": result.fingerprint_sha256,
            "signature": None if fingerprint_signature is None else {k: fingerprint_signature.get(k) for k in ("scheme", "key_id")},
            "signature_verified": signature_verified,
            "commitment": None if commitment is None else {"sha256": commitment.digest, "content": commitment.content},
        },
        "suspect": result.suspect,
        "test": {
            "name": TEST_NAMES[plan.get("test", "sprt")],
            "budget": result.budget,
            "retries": retries,
            "thresholds": result.thresholds,
            **{k: plan.get(k) for k in PLAN_KEYS},
            "test": plan.get("test", "sprt"),
        },
        "result": result.to_dict(),
        "ledger": {
            "file": None if ledger.path is None else str(ledger.path),
            "file_sha256": file_sha,
            "header": ledger.header,
            "records": ledger.records,
        },
    }


def write_report(content: dict[str, Any], path: Path, key: Key | None = None) -> str:
    """Write the report atomically, signed with `key` if given; returns its content digest."""
    return write_document(path, REPORT_FORMAT, REPORT_VERSION, content, key, "report")


@dataclass
class Verification:
    """What `verify_report` checked and found; every check in `checks` passed."""

    report: str
    verdict: str
    answered: int
    queries_used: int
    signature: str
    checks: list[str] = field(default_factory=list)
    caveat: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"report": self.report, "verdict": self.verdict, "answered": self.answered,
                "queries_used": self.queries_used, "signature": self.signature, "checks": self.checks,
                "caveat": self.caveat}


def verify_report(
    path: Path,
    key: Key | None = None,
    ledger_path: Path | None = None,
    fingerprint_path: Path | None = None,
) -> Verification:
    """Recompute a report's verdict from its ledger and check every digest; ReportError if not.

    With `key`, the report must carry that key's valid signature. With `ledger_path`, the ledger
    file must be the one the report names (its sha256) and hold exactly the header and records
    the report embeds. With `fingerprint_path`,
    the fingerprint must be the audited one, and the plan (point digests, owner labels, rates)
    is recomputed from it.
    """
    doc = read_document(path, REPORT_FORMAT, REPORT_VERSION, ReportError, "audit report", key, "report")
    where = str(path)
    c = doc.content
    try:
        led, res, test = c["ledger"], c["result"], c["test"]
        ledger = QueryLedger.from_lines(led["header"], led["records"])
        plan = Plan.from_dict(ledger.header["plan"])
        fp_sha = c["fingerprint"]["sha256"]
        budget = int(test["budget"])
        reported = (str(res["verdict"]), int(res["answered"]), float(res["llr"]), int(res["queries_used"]))
        trajectory = list(res["trajectory"])
        identity = dict(res["suspect"]["identity"])
        commitment = c["fingerprint"]["commitment"]
        committed = None if commitment is None else str(commitment["content"]["fingerprint_sha256"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise ReportError(f"{where}: malformed report content ({type(e).__name__}: {e})") from None
    v = Verification(where, reported[0], reported[1], reported[3], _describe_signature(doc.signature, key))
    v.checks.append("report content matches its sha256 digest")
    if key is not None:
        v.checks.append(f"report signature verified ({key.scheme}, key {key.key_id})")

    def require(ok: bool, what: str, detail: str = "") -> None:
        if not ok:
            raise ReportError(f"{where}: {what}{': ' + detail if detail else ''}")
        v.checks.append(what)

    require(ledger.header.get("fingerprint_sha256") == fp_sha == res.get("fingerprint_sha256"), "ledger, report and result name the same fingerprint")
    def what(d: Any) -> Any:  # a suspect's identity less where it was reached (ledgers written before 2026-12-02 kept the path in it)
        return {k: val for k, val in d.items() if k not in LOCATION_KEYS} if isinstance(d, dict) else d

    require(what(ledger.header.get("suspect")) == what(identity), "ledger and result name the same suspect")
    require(len(set(plan.digests)) == len(plan), "plan lists each point once")
    if committed is not None:
        require(committed == fp_sha, "fingerprint matches the owner's commitment")

    require(reported[3] <= budget, "queries charged within the budget", f"{reported[3]} > {budget}")
    require(reported[3] == ledger.spent and ledger.spent >= len(ledger.entries) + len(ledger.repeats),
            "queries charged in the ledger equal the reported ones and cover every answer", f"ledger {ledger.spent}, reported {reported[3]}")

    # Replay the test on the recorded answers, with the code the audit ran.
    access = Access(plan.access)
    dtype = np.int64 if access is Access.LABELS else np.float64

    def answers_for(pos: np.ndarray) -> np.ndarray | None:
        digests = [plan.digests[i] for i in pos]
        if not all(d in ledger.entries for d in digests):
            return None
        return np.asarray([ledger.entries[d] for d in digests], dtype=dtype)

    try:
        out = run_test(plan, answers_for, budget)
    except (ValueError, IndexError, TypeError, OverflowError) as e:  # answers of the wrong shape for the access
        raise ReportError(f"{where}: the ledger's answers cannot be scored ({type(e).__name__}: {e})") from None
    verdict = out.decision or "inconclusive"
    repeat = {"asked": 0, "differing": 0}
    if out.decision == "independent" and plan.repeat_checks > 0:
        verdict, repeat = judge_repeats(plan, np.asarray(out.positions), ledger.entries, ledger.repeats)
    recomputed = [s.to_dict() for s in out.trajectory]
    require(verdict == reported[0], "recomputed verdict equals the reported one", f"recomputed {verdict}, reported {reported[0]}")
    require(out.asked == reported[1], "recomputed points used equal the reported ones", f"recomputed {out.asked}, reported {reported[1]}")
    require(round(out.llr, 4) == reported[2] and recomputed == trajectory, "recomputed statistic and trajectory equal the reported ones")
    stated = {
        "test parameters": ([test.get(k) for k in PLAN_KEYS] + [test.get("test", "sprt")], [getattr(plan, k) for k in PLAN_KEYS] + [plan.test]),
        "result parameters": ([res.get(k) for k in ("alpha", "beta", "mode", "access", "budget")], [plan.alpha, plan.beta, plan.mode, plan.access, budget]),
        "thresholds": ([res.get("thresholds"), test.get("thresholds")], [thresholds(plan)] * 2),
        "agreement": (res.get("agreement"), out.trajectory[-1].agreement if out.trajectory else None),
        "repeat check": (res.get("repeat_check") or {"asked": 0, "differing": 0}, repeat),
    }
    for what, (said, recomputed_value) in stated.items():
        require(said == recomputed_value, f"stated {what} equal the plan and the replay", f"stated {said}, recomputed {recomputed_value}")
    means = list(plan.stated_rates())  # older audits summed in another order: a tolerance
    said_means = [res.get("p0"), res.get("p1")]
    require(all(isinstance(x, (int, float)) and abs(x - m) <= 1e-4 for x, m in zip(said_means, means, strict=False)),
            "stated mean rates equal the plan's", f"stated {said_means}, recomputed {[round(m, 4) for m in means]}")
    used = {plan.digests[i] for i in out.positions}
    require(set(ledger.entries) <= used, "ledger holds no answer the test did not use",
            f"{len(set(ledger.entries) - used)} answers beyond the {out.asked} the test used")
    if ledger.repeats:
        expected = {plan.digests[i] for i in repeat_positions(plan, np.asarray(out.positions))}
        require(out.decision == "independent" and set(ledger.repeats) <= expected, "repeat checks are the planned ones")
        v.checks.append(f"repeat check recomputed: {repeat['differing']} of {repeat['asked']} repeated answers differ")

    if ledger_path is not None:
        try:
            data = Path(ledger_path).read_bytes()
        except OSError as e:
            raise ReportError(f"cannot read ledger {ledger_path}: {e.strerror or e}") from None
        require(hashlib.sha256(data).hexdigest() == led.get("file_sha256"), f"ledger file {ledger_path} is the one the report names (sha256)")
        on_disk = QueryLedger.read(Path(ledger_path), quiet=True)
        require(on_disk.header == ledger.header and on_disk.records == ledger.records,
                f"ledger file {ledger_path} holds exactly the header and records the report embeds")
    if fingerprint_path is None and key is None:
        v.caveat = ("the plan's points, labels and rates were taken from the report itself: give --fingerprint "
                    "(or the key of a signed report) to check them against the owner's fingerprint")
    if fingerprint_path is not None:
        fp = load_fingerprint(fingerprint_path)
        require(fp.digest == fp_sha, f"fingerprint {fingerprint_path} is the audited one (sha256)")
        config = AuditConfig(access=access, mode=plan.mode, budget=max(budget, plan.batch_size), batch_size=plan.batch_size,
                             alpha=plan.alpha, beta=plan.beta, seed=plan.seed, repeat_checks=plan.repeat_checks,
                             test=plan.test)
        require(Plan.make(fp, config, plan.clearing_gap, plan.prediction_level) == plan, "plan (points, owner labels, rates) recomputed from the fingerprint")
    return v


def _describe_signature(block: dict[str, Any] | None, key: Key | None) -> str:
    if block is None:
        return "unsigned"
    what = f"{block.get('scheme')} key {block.get('key_id')}"
    return f"signed, verified ({what})" if key is not None else f"signed ({what}), not verified: no key given"
