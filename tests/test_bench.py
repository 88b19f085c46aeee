"""The piracy benchmark (`deepcore bench`): a scaled-down run end to end, its statistics, and its
refusals. The full benchmark is not part of the suite; its committed results are under
benchmarks/results/."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import one_line_error

from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.benchmarks.metrics import auc, binomial_threshold, kl_bernoulli, roc_curve, tpr_at_fpr
from deepcore_auditor.benchmarks.piracy import SCORES
from deepcore_auditor.fingerprints.stats import binom_cdf

# One suspect a family, a small owner (about 0.77 test accuracy), 20-point fingerprints.
SMOKE = ["--members", "1", "--epochs", "2", "--train-samples", "3000", "--points", "20", "--candidates", "1000",
         "--budgets", "10,20", "--seed", "3"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    result = CliRunner().invoke(cli, ["bench", "--data", "fashion-mnist", "--out", str(out), "--cache-dir", str(root / "cache"), *SMOKE])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text()), result.output


@pytest.mark.slow
def test_smoke_writes_every_output(smoke: tuple[Path, dict, str]) -> None:
    out, r, output = smoke
    for name in ("roc.png", "errors.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "## The bar" in md and "test accuracy" in md and "## TPR at FPR <= 1%" in md
    assert set(r["methods"]) == set(SCORES)
    for name, e in r["methods"].items():
        assert list(e["budgets"]) == ["10", "20"], name
        for b in e["budgets"].values():
            assert 0 <= b["auc"] <= 1 and 0 <= b["fir"] <= 1 and 0 <= b["mir"] <= 1
        assert ("sequential" in e) == (e["score"] != "correlation")
    assert set(r["bar"]) == {"deepcore-agreement", "deepcore-clustering"}
    assert all(len(bar) == 10 and all(isinstance(b["met"], bool) for b in bar) for bar in r["bar"].values())
    assert 0 < r["owner"]["test_accuracy"] <= 1
    assert r["environment"]["torch"] and r["run_s"] > 0 and r["config"]["seed"] == 3
    assert "results in" in output
    # No --epsilon: DeepCore's radius is the product's, chosen from the owner's robustness (not a
    # fixed 0.15), and CAE grows its points in the same radius.
    assert r["config"]["epsilon"] is None
    (zoo,) = (out.parent / "cache" / "bench").iterdir()
    (dc,) = [json.loads(f.read_text())["content"]["method"] for f in zoo.glob("fp-deepcore-*.json")]
    (cae,) = [json.loads(f.read_text())["content"]["method"] for f in zoo.glob("fp-cae-*.json")]
    assert 0 < dc["params"]["core"]["epsilon"] == cae["params"]["cae_epsilon"] <= 0.15
    assert r["radius"] == {"deepcore": dc["params"]["core"]["epsilon"], "cae": cae["params"]["cae_epsilon"]}
    assert f"deepcore's L-inf radius {r['radius']['deepcore'] * 255:.1f}/255" in (out / "results.md").read_text()


@pytest.mark.slow
def test_smoke_tells_weight_copies_from_another_task(smoke: tuple[Path, dict, str]) -> None:
    """Even a tiny owner's weight copies agree with it on its core points far more than a model
    of another task; no homologous suspect is accused, and no quantized copy cleared."""
    _, r, _ = smoke
    dc = r["methods"]["deepcore-agreement"]
    scores = dc["budgets"]["20"]["scores"]
    copies = [scores[k] for k in scores if k.startswith(("fine-tune-own", "int8", "fp16"))]
    assert len(copies) == 3 and min(copies) > scores["other-task-0"] + 0.3, scores
    verdicts = dc["sequential"]["verdicts"]
    assert all(v["verdict"] != "piracy" for k, v in verdicts.items() if r["zoo"][k]["kind"] == "homologous"), verdicts
    assert all(v["verdict"] != "independent" for k, v in verdicts.items() if k.startswith(("int8", "fp16"))), verdicts
    assert all(v["queries"] <= 20 for v in verdicts.values())
    assert dc["budgets"]["20"]["tpr_at_fpr_1pct"] > 0 and dc["budgets"]["20"]["fpr_at_that_threshold"] == 0
    assert any(b["criterion"].startswith("DeepCore TPR at FPR <= 1%") for b in r["bar"]["deepcore-agreement"])
    # thresholds come from the calibration references, never from evaluated suspects
    assert len(dc["budgets"]["20"]["reference_scores"]) == 6
    assert set(dc["budgets"]["20"]["reference_scores"]).isdisjoint(scores)


def test_auc_and_roc() -> None:
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5], [0.5]) == 0.5
    assert math.isnan(auc([], [0.1]))
    fpr, tpr = roc_curve([0.9, 0.4], [0.5, 0.1])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert all(a <= b for a, b in zip(fpr, fpr[1:], strict=False)) and all(a <= b for a, b in zip(tpr, tpr[1:], strict=False))


def test_tpr_at_fpr() -> None:
    # Under 100 negatives, FPR <= 1% admits no false positive: only positives above every negative count.
    assert tpr_at_fpr([0.9, 0.7, 0.5], [0.1, 0.6, 0.2], 0.01) == (2 / 3, 0.0)
    assert tpr_at_fpr([0.6], [0.6], 0.01) == (0.0, 0.0)  # a tie with a negative is not above it
    # With 200 negatives two may be flagged: the threshold is the third highest.
    neg = [0.0] * 197 + [0.8, 0.9, 0.95]
    assert tpr_at_fpr([0.85, 0.92, 0.5], neg, 0.01) == (2 / 3, 0.01)
    assert tpr_at_fpr([0.99], neg, 0.0) == (1.0, 0.0)
    assert all(math.isnan(v) for v in tpr_at_fpr([], [0.1], 0.01))


@pytest.mark.parametrize("p0,n", [(0.3, 10), (0.5, 50), (0.1, 400), (0.8, 20)])
def test_binomial_threshold_holds_alpha(p0: float, n: int) -> None:
    t = binomial_threshold(p0, n, 0.01)
    k = round(t * n)
    assert 1 - binom_cdf(k - 1, n, p0) <= 0.01  # flagging at >= k keeps FIR within alpha
    if k > 0:
        assert 1 - binom_cdf(k - 2, n, p0) > 0.01  # and k is the smallest such count


def test_threshold_unreachable_and_kl() -> None:
    assert binomial_threshold(0.99, 10, 0.01) > 1  # no agreement count is rare enough: never flag
    assert kl_bernoulli(0.5, 0.5) == 0
    assert kl_bernoulli(0.9, 0.3) > kl_bernoulli(0.6, 0.3) > 0
    assert np.isclose(math.log(1000) / kl_bernoulli(0.5, 0.1), 13.5, atol=0.1)  # field.md: "about 14 queries"


@pytest.mark.parametrize("args,words", [
    (["--budgets", "10,x"], ["--budgets", "integers"]),
    (["--budgets", "50,10"], ["budgets", "increasing"]),
    (["--budgets", "10,500"], ["500", "points"]),
    (["--methods", "deepcore-agreement,nope"], ["nope", "method"]),
    (["--members", "0"], ["member"]),
    (["--alpha", "0.7"], ["alpha"]),
    (["--selection-references", "0"], ["--selection-references", "1 or more"]),
    (["--without", "sim-prune,no-such-model"], ["--without", "no-such-model", "not in DeepCore's zoo"]),
    (["--zoo", "tiny"], ["--zoo", "tiny"]),
    (["--without", "sim-prune,sim-prune"], ["--without", "twice"]),
    (["--sgd-epochs", "-1"], ["--sgd-epochs", "got -1"]),
    (["--methods", "akh", "--zoo", "small"], ["DeepCore's fingerprint", "deepcore method"]),
])
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], words: list[str]) -> None:
    result = CliRunner().invoke(cli, ["bench", "--data", "fashion-mnist", "--out", str(tmp_path / "r"), *args])
    one_line_error(result, *words)
    assert not (tmp_path / "r").exists()


def test_missing_data_and_output_directory(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "--data", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "r")])
    one_line_error(result, "nope.tar.gz")
    result = CliRunner().invoke(cli, ["bench", "--data", "fashion-mnist", "--out", str(tmp_path / "no" / "r")])
    one_line_error(result, "does not exist")
    assert not (tmp_path / "r").exists() and not (tmp_path / "no").exists()


def test_core_speed_script_times_both_loops_on_the_same_work(tmp_path: Path) -> None:
    """benchmarks/core_speed.py (its figures are in the README): both loops run and the ratio is theirs."""
    from deepcore_auditor.benchmarks.core_speed import main

    out = tmp_path / "speed.json"
    assert main(["--students", "2", "--references", "1", "--candidates", "8", "--steps", "2", "--repeats", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["candidates"] == 8 and r["steps"] == 2 and r["models"] == {"owner": "cnn", "students": 2, "references": 1}
    assert len(r["seconds"]["optimize_points"]) == len(r["seconds"]["bare_loop"]) == len(r["seconds"]["bare_loop_channels_last"]) == 1
    floor = min(r["median_s"]["bare_loop"], r["median_s"]["bare_loop_channels_last"])
    assert r["ratio"] == pytest.approx(r["median_s"]["optimize_points"] / floor, rel=0.01, abs=0.002)


def test_train_speed_script_times_both_layouts_and_train(tmp_path: Path) -> None:
    """benchmarks/train_speed.py (its figures are in the README): every architecture, both shapes."""
    from deepcore_auditor.benchmarks import train_speed

    out = tmp_path / "train.json"
    assert train_speed.main(["--steps", "0", "--out", str(out)]) == 2
    assert not out.exists()
    assert train_speed.main(["--steps", "1", "--repeats", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {(row["data"], row["arch"]) for row in r["rows"]} == {(d, a) for d in train_speed.SHAPES for a in train_speed.ARCHITECTURES}
    assert all(min(row["ms_per_step"].values()) > 0 for row in r["rows"])


def test_adversarial_extraction_asks_across_the_students_boundary(fmnist) -> None:
    """The benchmark's adversarial label extraction (fingerprints.recipes.adversarial_extract): its
    later queries lie within epsilon of the attacker's own images and cross the student's boundary
    on most of them, and the student it returns learnt the owner's task from the owner's labels."""
    import torch

    from deepcore_auditor.adapters.base import InputConvention
    from deepcore_auditor.fingerprints import recipes
    from deepcore_auditor.fingerprints.data import channel_stats
    from deepcore_auditor.fingerprints.models import Normalized, TrainConfig, build_architecture, predict, train

    x, y = fmnist.train.points(slice(0, 3000)), fmnist.train.y[:3000]
    test_x = fmnist.test.points(slice(0, 1000))
    mean, std = channel_stats(fmnist.train)

    def fresh(arch: str, seed: int) -> Normalized:
        torch.manual_seed(seed)
        return Normalized(build_architecture(arch, fmnist.train.shape, 10), InputConvention(mean=mean, std=std))

    owner = train(fresh("cnn", 1), x[:1500], y[:1500], TrainConfig(epochs=1, seed=1))
    student = train(fresh("mlp", 2), x[1500:2000], predict(owner, x[1500:2000]).argmax(1), TrainConfig(epochs=1, seed=2))
    pool = x[2000:2500]
    moved = recipes._pushed_across(student, pool, 0.1, seed=5)
    assert np.abs(moved - pool).max() <= 0.1 + 1e-6 and moved.min() >= 0 and moved.max() <= 1
    flipped = np.mean(predict(student, moved).argmax(1) != predict(student, pool).argmax(1))
    assert flipped > 0.3, flipped
    stolen = recipes.adversarial_extract(owner, x[1500:3000], fresh("mlp", 3), 0.1, TrainConfig(epochs=1, seed=3))
    agree = np.mean(predict(stolen, test_x).argmax(1) == predict(owner, test_x).argmax(1))
    assert agree > 0.6, agree


def test_zoo_ablation_refuses_unknown_variants_and_a_missing_directory(tmp_path: Path, capsys) -> None:
    """benchmarks/zoo_ablation.py (its figures are in the README): bad input is one line and exit 2,
    before any work; every variant leaves out members of DeepCore's zoo only."""
    from deepcore_auditor.benchmarks.piracy import BenchConfig
    from deepcore_auditor.benchmarks.zoo_ablation import VARIANTS, main

    assert main(["--out", str(tmp_path / "a"), "--variants", "whole-zoo,nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: unknown variant(s) nope: use some of " + ", ".join(VARIANTS)]
    assert main(["--out", str(tmp_path / "no" / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "no").exists()
    for size, without in VARIANTS.values():
        BenchConfig(data="fashion-mnist", zoo_size=size, without=without).validate()


def test_qurd_check_names_what_it_cannot_import_in_one_line(tmp_path: Path, capsys) -> None:
    """benchmarks/qurd_check.py runs the authors' code from a checkout the user gives: without one
    (or without its dependencies) it says which, in one line, exit 2, and writes nothing."""
    from deepcore_auditor.benchmarks.qurd_check import main

    out = tmp_path / "out"
    assert main(["--reference-src", str(tmp_path / "no-checkout"), "--zoo", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qurd_check: ") and "no-checkout" in err[0]
    assert not out.exists()
    from deepcore_auditor.benchmarks.qurd_check import ReferenceMissing, open_zoo

    with pytest.raises(ReferenceMissing, match="is not a benchmark zoo built by `deepcore bench`"):
        open_zoo(tmp_path)  # no meta.json
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ReferenceMissing, match="holds no fp-akh-"):
        open_zoo(tmp_path)


def test_the_null_benchmark_refuses_an_unknown_zoo_size_before_any_work(tmp_path: Path) -> None:
    """benchmarks/null.py --zoo: the sizes `deepcore fingerprint --zoo` takes; another is one line,
    before the data is loaded or anything trained."""
    from deepcore_auditor.benchmarks.null import NullConfig, run

    with pytest.raises(InputError, match="--zoo must be one of small, default, large, got 'tiny'"):
        run(str(tmp_path / "no-data.npz"), tmp_path / "out", NullConfig(), zoo_size="tiny")
    with pytest.raises(InputError, match="--references-curve .* not with --zoo small"):
        run(str(tmp_path / "no-data.npz"), tmp_path / "out", NullConfig(), curve=(5, 10), zoo_size="small")
    with pytest.raises(InputError, match="--epochs must be 1 or more, got 0"):
        run(str(tmp_path / "no-data.npz"), tmp_path / "out", NullConfig(epochs=0))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_miss_rate_within_a_budget_is_what_an_audit_with_that_budget_says(smoke: tuple[Path, dict, str]) -> None:
    """The sequential audits run once, at the largest budget; the miss rate within a smaller budget
    b is read off them (not called `piracy` by the b-th query). Checked against real audits run
    with budget b itself on every pirate: each says `piracy` exactly when the long audit had by
    then, so the figure is the audit's own at that budget."""
    from deepcore_auditor.adapters.base import Access
    from deepcore_auditor.adapters.open import open_suspect
    from deepcore_auditor.auditor.audit import AuditConfig, audit
    from deepcore_auditor.fingerprints.format import load_fingerprint

    out, r, _ = smoke
    seq = r["methods"]["deepcore-agreement"]["sequential"]
    assert set(seq["missed_within"]) <= {"10", "20"} and seq["missed_within"]
    (zoo,) = (out.parent / "cache" / "bench").iterdir()
    (fp_path,) = zoo.glob("fp-deepcore-*.json")
    fp = load_fingerprint(fp_path)
    pirates = [k for k in seq["verdicts"] if r["zoo"][k]["kind"] == "piracy"]
    for b in seq["missed_within"]:
        config = AuditConfig(access=Access.LABELS, budget=int(b), batch_size=1, alpha=0.01, beta=0.01, seed=3, repeat_checks=0)
        missed = []
        for name in pirates:
            with open_suspect(str(zoo / f"{name}.onnx"), convention=fp.convention, point_shape=fp.point_shape,
                              num_classes=fp.num_classes) as oracle:
                verdict = audit(fp, oracle, config).verdict
            v = seq["verdicts"][name]
            assert (verdict == "piracy") == (v["verdict"] == "piracy" and v["queries"] <= int(b)), (name, b, verdict, v)
            missed.append(verdict != "piracy")
        assert seq["missed_within"][b] == round(float(np.mean(missed)), 4)
