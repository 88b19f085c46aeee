"""Reports written before the betting test (Wald's SPRT, no test named in their plan) still verify
and replay under the test they ran: two made on 2026-12-06 by the tool at commit d9df7d3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepcore_auditor.auditor.audit import Plan
from deepcore_auditor.auditor.errors import ReportError
from deepcore_auditor.auditor.report import verify_report
from deepcore_auditor.fingerprints.format import canonical_digest

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name,verdict", [("sprt-report-pirate.json", "piracy"), ("sprt-report-independent.json", "independent")])
def test_reports_of_walds_test_still_verify(name: str, verdict: str) -> None:
    path = DATA / name
    content = json.loads(path.read_text())["content"]
    assert "test" not in content["ledger"]["header"]["plan"]  # written before plans named their test
    assert Plan.from_dict(content["ledger"]["header"]["plan"]).test == "sprt"
    v = verify_report(path)
    assert v.verdict == verdict and any("recomputed" in c for c in v.checks)


def test_an_old_report_altered_to_claim_the_betting_test_fails(tmp_path: Path) -> None:
    doc = json.loads((DATA / "sprt-report-pirate.json").read_text())
    doc["content"]["test"]["test"] = "betting"
    doc["content_sha256"] = canonical_digest(doc["content"])  # a consistent forgery: only the replay can tell
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(ReportError, match="test parameters"):
        verify_report(tmp_path / "r.json")
