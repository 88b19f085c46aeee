"""`deepcore challenge`: a third party audits models it knows to be independent with the
fingerprint's own test — the check against an owner whose points every model answers its way."""

from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import one_line_error

from deepcore_auditor.auditor.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_an_honest_fingerprint_passes_the_challenge(world):
    r = run("challenge", "--fingerprint", str(world.fingerprint), "--independent", str(world.independent_onnx), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["passed"] and d["accused"] == [] and d["test"] in ("betting", "sprt")  # auto, resolved for this fingerprint
    (m,) = d["models"]
    assert m["verdict"] != "piracy" and 0 <= m["agreement_all_points"] <= 1 and m["queries"] > 0
    assert (m["agreement_all_points"] > d["p0"]) == (m["suspect"] in d["above_p0"])
    assert "p0_per_set" not in d and "agreement_per_set" not in m  # one set of points: the whole fingerprint's p0


def test_a_model_the_fingerprint_accuses_fails_the_challenge(world):
    """A challenger who hands in a copy as 'independent' sees it accused: the command reports it, exit 1."""
    r = run("challenge", "--fingerprint", str(world.fingerprint), "--independent", str(world.independent_onnx),
            "--independent", str(world.pirate_onnx))
    assert r.exit_code == 1, r.output
    assert "FAILED: 1 of 2 independent models accused" in r.stdout


def test_challenge_needs_models_that_open(world, tmp_path):
    one_line_error(run("challenge", "--fingerprint", str(world.fingerprint), "--independent", str(tmp_path / "none.onnx")),
                   "none.onnx")
    r = run("challenge", "--fingerprint", str(world.fingerprint))
    assert r.exit_code == 2 and "--independent" in r.output
