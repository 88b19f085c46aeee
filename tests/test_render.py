"""`deepcore report`: an audit report rendered for people, opened in a real headless browser.

Chromium comes from Debian (`.ci/run` installs it and sets DEEPCORE_REQUIRE_CHROMIUM, so CI
fails rather than skips without it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import process_error_line, run_deepcore

from deepcore_auditor.adapters.images import to_uint8_grid
from deepcore_auditor.auditor.render import evidence_svg
from deepcore_auditor.fingerprints.format import load_fingerprint, save_fingerprint


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("DEEPCORE_REQUIRE_CHROMIUM"):
        raise AssertionError("DEEPCORE_REQUIRE_CHROMIUM is set but no chromium is installed")
    pytest.skip("no chromium to open the page in (apt-get install chromium)")


def browser(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reports(world: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reports of real audits: a pirate, and an independent model under a name with markup in it."""
    root = tmp_path_factory.mktemp("reports")
    odd = root / "in<b>dep&endent.onnx"
    shutil.copy(world.independent_onnx, odd)
    out = {}
    for name, suspect, code in (("pirate", world.pirate_onnx, 1), ("independent", odd, 0)):
        r = run_deepcore("audit", "--fingerprint", world.fingerprint, "--suspect", suspect, "--budget", "100",
                         "--batch-size", "5", "--report", root / f"{name}.json")
        assert r.returncode == code, r.stderr
        out[name] = root / f"{name}.json"
    return out


def test_the_html_page_opens_in_a_browser_and_shows_the_verdict_and_the_plot(world: Any, reports: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    page = tmp_path / "pirate.html"
    r = run_deepcore("report", reports["pirate"], "--out", page, "--fingerprint", world.fingerprint)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    dom = browser("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    text = dom.stdout
    assert '<h1 id="verdict">Verdict: piracy</h1>' in text and "PIRATED copy" in text and "alpha = 0.01" in text
    assert "<svg" in text and "<polyline" in text and "piracy threshold" in text and "p0 0." in text
    assert "passes every check" in text and "plan (points, owner labels, rates) recomputed from the fingerprint" in text
    assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:|//)", page.read_text())  # nothing fetched
    shot = tmp_path / "pirate.png"
    taken = browser("--window-size=900,1300", f"--screenshot={shot}", page.as_uri())
    assert taken.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000


def test_values_from_the_report_are_escaped(reports: dict[str, Path]) -> None:
    r = run_deepcore("report", reports["independent"])
    assert r.returncode == 0, r.stderr
    assert "in&lt;b&gt;dep&amp;endent.onnx" in r.stdout and "in<b>dep" not in r.stdout
    assert "Verdict: independent" in r.stdout and "INDEPENDENT" in r.stdout
    md = run_deepcore("report", reports["independent"], "--format", "md")
    assert md.returncode == 0 and md.stdout.startswith("# Verdict: independent")
    assert "in&lt;b&gt;dep&amp;endent.onnx" in md.stdout and "data:image/svg+xml;base64," in md.stdout
    assert "| queries | agreement | statistic | decision |" in md.stdout


def test_a_report_that_fails_a_check_is_rendered_with_the_failure_and_exit_2(reports: dict[str, Path], world: Any,
                                                                            tmp_path: Path) -> None:
    """Given a fingerprint other than the audited one, verification fails: the page says so at the
    top, and the command exits 2 naming the check."""
    fp = load_fingerprint(world.fingerprint)
    other = tmp_path / "other-fp.json"
    save_fingerprint(dataclasses.replace(fp, points=to_uint8_grid(fp.points)), other)
    r = run_deepcore("report", reports["pirate"], "--out", tmp_path / "p.html", "--fingerprint", other)
    process_error_line(r, "does not verify", "is the audited one")
    assert "does NOT verify" in (tmp_path / "p.html").read_text()


def test_bad_input_is_one_line(reports: dict[str, Path], world: Any, tmp_path: Path) -> None:
    process_error_line(run_deepcore("report", world.fingerprint), "audit report")  # a fingerprint, not a report
    process_error_line(run_deepcore("report", reports["pirate"], "--fingerprint", reports["independent"]), "fingerprint")
    process_error_line(run_deepcore("report", tmp_path / "missing.json"), "not found")
    out = tmp_path / "page.html"
    out.write_text("keep me")
    process_error_line(run_deepcore("report", reports["pirate"], "--out", out), "already exists", "--force")
    assert out.read_text() == "keep me"
    process_error_line(run_deepcore("report", reports["pirate"], "--out", reports["pirate"], "--force"), "--out")
    assert run_deepcore("report", reports["pirate"], "--format", "pdf").returncode == 2


def test_the_plot_stays_inside_its_panels() -> None:
    """Every drawn point of both curves and the band lies inside its panel, even for a statistic
    that ran far past a threshold."""
    trajectory = [{"queries": q, "agreement": round(a, 4), "llr": -9.0 * q / 20}
                  for q, a in ((5, 0.8), (10, 0.7), (15, 14 / 15), (20, 0.75))]
    svg = evidence_svg(trajectory, {"piracy": 4.6, "independent": -4.6}, 0.88, 0.98, "agreement", "labels", 100)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    rects = [tuple(float(v) for v in m) for m in re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)]
    shapes = re.findall(r'<(polyline|polygon)[^>]* points="([^"]+)"', svg)
    assert len(rects) == 2 and [k for k, _ in shapes] == ["polyline", "polygon", "polyline"]
    for i, (_, pts) in enumerate(shapes):
        x0, y0, w, h = rects[0 if i == 0 else 1]
        for pair in pts.split():
            px, py = (float(v) for v in pair.split(","))
            assert x0 - 1e-6 <= px <= x0 + w + 1e-6 and y0 - 1e-6 <= py <= y0 + h + 1e-6, (i, pair)


def test_the_band_is_exact_binomial_for_label_agreement() -> None:
    """Agreements are stored to 4 decimals; the band must still be the Clopper-Pearson one
    (14 of 15 is 0.9333: k = 13.9995), not the wider Hoeffding band."""
    from deepcore_auditor.auditor.render import _band
    from deepcore_auditor.fingerprints.stats import clopper_pearson_lower

    lo, _ = _band(round(14 / 15, 4), 15, "agreement", "labels")
    assert lo == pytest.approx(clopper_pearson_lower(14, 15, 0.975))
