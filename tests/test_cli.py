"""The `deepcore` command's contract: exit statuses, JSON output, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, audit_args, one_line_error

from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.fingerprints.config import BASE_ZOO
from deepcore_auditor.fingerprints.models import build_architecture, export_onnx


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_audit_json_and_exit_status_for_piracy(world):
    r = run(*audit_args(world, world.pirate_onnx, "--json"))
    assert r.exit_code == 1, r.output
    d = json.loads(r.stdout)
    assert d["verdict"] == "piracy"
    assert {"verdict", "queries_used", "budget", "alpha", "trajectory"} <= d.keys()
    assert d["budget"] == 60 and 0 < d["queries_used"] <= 60


def test_audit_exit_status_for_independent_is_not_piracy(world):
    r = run(*audit_args(world, world.independent_onnx, "--json"))
    assert r.exit_code in (0, 3), r.output
    assert json.loads(r.stdout)["verdict"] in ("independent", "inconclusive")


def test_audit_inconclusive_exits_3(world):
    r = run(*audit_args(world, world.independent_onnx, "--budget", "5", "--alpha", "1e-300", "--beta", "1e-300", "--json"))
    assert r.exit_code == 3, r.output
    assert json.loads(r.stdout)["verdict"] == "inconclusive"


def test_audit_writes_report_and_ledger_then_resumes(world, tmp_path):
    ledger, report = tmp_path / "l.jsonl", tmp_path / "r.json"
    args = audit_args(world, world.independent_onnx, "--budget", "10", "--alpha", "1e-300", "--beta", "1e-300", "--ledger", str(ledger), "--report", str(report), "--json")
    assert run(*args).exit_code == 3
    assert json.loads(report.read_text())["content"]["result"]["queries_used"] == 10
    one_line_error(run(*args), "already exists", "--resume")
    last = len(args) - 1 - args[::-1].index("--budget")
    args[last + 1] = "20"
    one_line_error(run(*args, "--resume"), f"--report {report} already exists", "--force")
    r = run(*args, "--resume", "--force")  # the first run's report replaced, as asked
    assert r.exit_code == 3, r.output
    d = json.loads(r.stdout)
    assert d["replayed_from_ledger"] == 10 and d["queries_used"] == 20


def test_fingerprint_command_refuses_references_that_never_learnt_the_task(world, tmp_path):
    """500 samples and one epoch leave the owner-architecture students far below the owner (0.48
    against 0.82 when measured): the build stops with one line naming one, writing nothing."""
    out = tmp_path / "fp.json"
    data = world.root / "owner-data.npz"
    r = run("fingerprint", "--owner", str(world.owner_ts), "--data", str(data), "--out", str(out), *TINY, "--points", "10",
            "--candidates", "20", "--steps", "5", "--train-samples", "500", "--epochs", "1", "--max-epochs", "1")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = r.output.strip().splitlines()[-1]  # after the build's progress lines on stderr
    assert line.startswith("deepcore: error: cannot train a trustworthy known model") and "below its floor" in line
    assert "also after retraining" in line and ("sim-" in line or "ref-" in line or "cal-" in line)
    assert not out.exists()


def test_inspect_shows_every_known_models_quality(world):
    """The world's fingerprint (built through the same service as the command) verifies, and
    inspect shows the owner's held-out accuracy, the radius chosen and every known model's
    held-out accuracy and agreement, all of them within their floors."""
    i = run("inspect", str(world.fingerprint), "--json")
    assert i.exit_code == 0, i.output
    d = json.loads(i.stdout)
    # up to --points 100: only candidates that reach the owner's confidence are kept
    assert 50 <= d["points"] <= 100 and d["point_shape"] == [1, 28, 28] and d["owner"]["sha256"]
    assert 0.7 < d["owner_accuracy"] <= 1 and 0 < d["epsilon"] <= 0.15
    assert len(d["known_models"]) == len(BASE_ZOO) == 18  # 11 that choose the points, 2 held-out pirates, 5 references (TINY)
    for line in d["known_models"]:
        acc = float(line.split("held-out accuracy ")[1].split(",")[0])
        assert acc >= 0.38, line  # the loosest floor: chance + 0.4 of the owner's skill above it
    assert isinstance(d["calibration"], dict) and not any("unchecked" in n for n in d["calibration"]["notes"])


# ---- bad input: one line, exit 2, nothing written -------------------------------------------


def test_zoo_sizes_below_the_base_zoos_are_refused_before_any_work(world, tmp_path):
    out = tmp_path / "fp.json"
    data = str(world.root / "owner-data.npz")
    for flag, value in (("--selection-references", "0"), ("--calibration-references", "3")):
        one_line_error(run("fingerprint", "--owner", str(world.owner_ts), "--data", data, "--out", str(out), flag, value),
                       flag, "already holds")
    assert not out.exists()


def test_a_negative_sgd_length_and_an_unknown_zoo_size_are_refused_before_any_work(world, tmp_path):
    out = tmp_path / "fp.json"
    data = str(world.root / "owner-data.npz")
    one_line_error(run("fingerprint", "--owner", str(world.owner_ts), "--data", data, "--out", str(out), "--sgd-epochs", "-1"),
                   "--sgd-epochs must be 0", "got -1")
    one_line_error(run("fingerprint", "--owner", str(world.owner_ts), "--data", data, "--out", str(out), "--zoo", "huge"),
                   "--zoo", "huge")
    assert not out.exists()


def test_owner_args_are_checked_before_any_work(world, tmp_path):
    out = tmp_path / "fp.json"
    data = str(world.root / "owner-data.npz")
    one_line_error(run("fingerprint", "--owner", str(world.owner_ts), "--data", data, "--out", str(out), "--owner-arg", "num_classes=10"),
                   "only used with a package.module:factory")
    one_line_error(run("fingerprint", "--owner", "deepcore_auditor.benchmarks.owners:vgg_bn", "--owner-weights", str(world.owner_ts),
                       "--data", data, "--out", str(out), "--owner-arg", "10"), "--owner-arg", "NAME=VALUE")
    assert not out.exists()


def test_missing_fingerprint(world, tmp_path):
    one_line_error(run(*["audit", "--fingerprint", str(tmp_path / "nope.json"), "--suspect", str(world.pirate_onnx)]), "fingerprint file not found")


def test_corrupt_fingerprint(world, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x00\x01garbage")
    one_line_error(run("audit", "--fingerprint", str(bad), "--suspect", str(world.pirate_onnx)), "not a fingerprint")


def test_tampered_fingerprint(world, tmp_path):
    doc = json.loads(world.fingerprint.read_text())
    doc["content"]["method"]["seed"] = 12345
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(doc))
    one_line_error(run("audit", "--fingerprint", str(bad), "--suspect", str(world.pirate_onnx)), "does not match its sha256")


def test_missing_suspect(world, tmp_path):
    one_line_error(run(*audit_args(world, tmp_path / "gone.onnx")), "not found")


def test_corrupt_suspect(world, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    one_line_error(run(*audit_args(world, bad)), "bad.onnx")


def test_suspect_whose_input_does_not_fit(world, tmp_path):
    torch.manual_seed(0)
    other = tmp_path / "cifar-shaped.onnx"
    export_onnx(build_architecture("mlp", (3, 32, 32), 10), other, (3, 32, 32))
    one_line_error(run(*audit_args(world, other)), "32")


def test_suspect_with_another_number_of_classes(world, tmp_path):
    torch.manual_seed(0)
    five = tmp_path / "five.onnx"
    export_onnx(build_architecture("mlp", (1, 28, 28), 5), five, (1, 28, 28))
    one_line_error(run(*audit_args(world, five)), "5")


def test_budget_smaller_than_one_batch(world):
    one_line_error(run(*audit_args(world, world.pirate_onnx, "--budget", "3")), "smaller than one batch")


def test_similarity_mode_needs_probs(world):
    one_line_error(run(*audit_args(world, world.pirate_onnx, "--mode", "similarity")), "--access probs")


def test_resume_without_ledger(world):
    one_line_error(run(*audit_args(world, world.pirate_onnx, "--resume")), "--ledger")


def test_bad_suspect_mean(world):
    one_line_error(run(*audit_args(world, world.pirate_onnx, "--suspect-mean", "a,b")), "--suspect-mean")


def test_unknown_data_name_writes_nothing(world, tmp_path):
    out = tmp_path / "fp.json"
    one_line_error(run("fingerprint", "--owner", str(world.owner_ts), "--data", "imagenet-21k", "--out", str(out)), "unknown data")
    assert list(tmp_path.iterdir()) == []


def test_missing_owner(tmp_path):
    one_line_error(run("fingerprint", "--owner", str(tmp_path / "o.pt"), "--data", "fashion-mnist", "--out", str(tmp_path / "f.json")), "not found")


def test_owner_that_is_not_a_model(tmp_path):
    bad = tmp_path / "o.pt"
    bad.write_bytes(b"junk")
    one_line_error(run("fingerprint", "--owner", str(bad), "--data", "fashion-mnist", "--out", str(tmp_path / "f.json")), "o.pt")
    assert not (tmp_path / "f.json").exists()


def test_owner_whose_input_does_not_fit_the_data(world, tmp_path):
    torch.manual_seed(0)
    net = torch.jit.trace(build_architecture("mlp", (3, 32, 32), 10).eval(), torch.zeros(1, 3, 32, 32))
    path = tmp_path / "cifar-owner.pt"
    torch.jit.save(net, str(path))
    r = run("fingerprint", "--owner", str(path), "--data", str(world.root / "owner-data.npz"), "--out", str(tmp_path / "f.json"))
    one_line_error(r, "owner")
    assert not (tmp_path / "f.json").exists()


def test_output_directory_missing(world, tmp_path):
    one_line_error(run("fingerprint", "--owner", str(world.owner_ts), "--data", "fashion-mnist", "--out", str(tmp_path / "no" / "f.json")), "does not exist")


def test_real_process_exit_status_and_clean_stderr(world):
    p = subprocess.run([sys.executable, "-m", "deepcore_auditor", *audit_args(world, world.owner_onnx, "--json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert json.loads(p.stdout)["verdict"] == "piracy"
    q = subprocess.run([sys.executable, "-m", "deepcore_auditor", "audit", "--fingerprint", "/nonexistent", "--suspect", "x.onnx"], capture_output=True, text=True, timeout=120)
    assert q.returncode == 2 and q.stderr.strip().count("\n") == 0 and "Traceback" not in q.stderr


def test_cross_framework_suspect_with_its_own_input_convention(world, tmp_path):
    """A converted (Keras-style) copy: NHWC input in 0..255, its own normalization inside."""
    from deepcore_auditor.fingerprints.format import load_fingerprint

    fp = load_fingerprint(world.fingerprint)
    mean, std = fp.convention.mean[0], fp.convention.std[0]
    net = build_architecture("cnn", (1, 28, 28), 10)  # the world owner's architecture, its weights
    net.load_state_dict(torch.jit.load(str(world.owner_ts)).state_dict())

    class KerasStyle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x.permute(0, 3, 1, 2) / 255.0 - mean) / std)

    path = tmp_path / "keras-copy.onnx"
    torch.onnx.export(KerasStyle().eval(), (torch.zeros(1, 28, 28, 1),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, opset_version=17, dynamo=False)
    one_line_error(run(*audit_args(world, path)), "NHWC")
    r = run(*audit_args(world, path, "--suspect-layout", "NHWC", "--suspect-scale", "255", "--suspect-mean", "0",
                        "--suspect-std", "1", "--json"))
    assert r.exit_code == 1, r.output
    assert json.loads(r.stdout)["agreement"] == 1.0


@pytest.mark.parametrize("value", ["-1", "nan", "1e9"])
def test_bad_retry_backoff(world, value):
    one_line_error(run(*audit_args(world, world.pirate_onnx, "--retry-backoff", value)), "--retry-backoff")
