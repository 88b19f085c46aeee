"""The exit-status contract and the outputs' safety, through the real `deepcore` process.

- No failure path ends with a verdict's status (0, 1, 3): a closed stdout, an unwritable stderr,
  usage errors and bad values all exit 2 with (at most) one line.
- No command replaces one of its inputs or keys, whatever the path's spelling, nor an existing
  file unless `--force`.
- One validation for the plan an audit makes and the one a verifier reads back; resume keyed
  on the suspect's content; fingerprints' points checked on load; the flags named as typed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import audit_args
from conftest import process_error_line as error_line
from conftest import run_deepcore as deepcore

from deepcore_auditor.fingerprints.format import canonical_digest, decode_array, encode_array


def closed_stdout(*args: object) -> int:
    """Run `deepcore` with stdout and stderr on one pipe whose reader is already gone (as
    `... 2>&1 | head -0` would leave it); its exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "deepcore_auditor", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    proc.stdout.close()
    return proc.wait(timeout=300)


# ----------------------------------------------------------------------------- exit status

def test_an_unwritable_stderr_does_not_change_a_verdict(world: Any) -> None:
    """Progress lines to /dev/full are lost; the independent verdict is still printed and 0."""
    with open("/dev/full", "w") as full:
        r = deepcore(*audit_args(world, world.independent_onnx, "--no-report"), stderr=full)
    assert r.returncode == 0 and r.stdout.startswith("verdict: independent"), (r.returncode, r.stdout)


@pytest.mark.parametrize("suspect", ["independent_onnx", "pirate_onnx"])
def test_a_verdict_that_cannot_be_printed_exits_2_never_a_verdicts_status(world: Any, suspect: str) -> None:
    assert closed_stdout(*audit_args(world, getattr(world, suspect), "--no-report")) == 2
    assert closed_stdout(*audit_args(world, getattr(world, suspect), "--no-report", "--json")) == 2


def test_verify_report_and_inspect_exit_2_when_their_answer_cannot_be_written(world: Any, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    r = deepcore(*audit_args(world, world.pirate_onnx, "--report", report, "--json"))
    assert r.returncode == 1, r.stderr
    assert deepcore("verify-report", report).returncode == 0
    assert closed_stdout("verify-report", report) == 2
    assert closed_stdout("inspect", world.fingerprint) == 2


@pytest.mark.parametrize("args, words", [
    (["audit", "--budgett", "3"], ["No such option", "--budgett", "deepcore audit --help"]),
    (["audit", "--fingerprint", "x", "--suspect", "y", "--seed", "-1"], ["'--seed'", "-1"]),
    (["fingerprint", "--owner", "a", "--data", "b", "--out", "c", "--seed", "-2"], ["'--seed'"]),
    (["fingerprint", "--owner", "a", "--data", "b", "--out", "c", "--reference-weight", "heavy"], ["'--reference-weight'", "auto"]),
    (["audit"], ["Missing option", "--fingerprint"]),
    (["no-such-command"], ["No such command", "no-such-command"]),
])
def test_usage_errors_are_one_line_and_exit_2(args: list[str], words: list[str]) -> None:
    error_line(deepcore(*args), *words)


# ----------------------------------------------------------------------------- outputs

@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    assert deepcore("keygen", "--private", priv, "--public", pub).returncode == 0
    return {"private": priv, "public": pub}


def test_a_report_never_replaces_the_suspect_or_a_key_and_an_existing_file_only_with_force(world: Any, tmp_path: Path,
                                                                                           keys: dict[str, Path]) -> None:
    suspect = tmp_path / "suspect.onnx"
    shutil.copy(world.independent_onnx, suspect)
    model = suspect.read_bytes()
    error_line(deepcore(*audit_args(world, suspect, "--report", suspect)), "--suspect input", "would be destroyed")
    spelled = tmp_path / "sub" / ".." / "suspect.onnx"
    (tmp_path / "sub").mkdir()
    error_line(deepcore(*audit_args(world, suspect, "--report", spelled)), "--suspect input")
    linked = tmp_path / "hard-link.onnx"
    os.link(suspect, linked)
    error_line(deepcore(*audit_args(world, suspect, "--report", linked)), "--suspect input")  # same inode
    assert suspect.read_bytes() == model
    private = keys["private"].read_bytes()
    error_line(deepcore(*audit_args(world, suspect, "--report", keys["private"], "--key", keys["private"])), "--key input")
    error_line(deepcore(*audit_args(world, suspect, "--report", keys["public"])), "already exists", "--force")
    assert keys["private"].read_bytes() == private
    other = tmp_path / "old-report.json"
    other.write_text("{}")
    assert deepcore(*audit_args(world, suspect, "--report", other, "--force")).returncode == 0
    assert json.loads(other.read_text())["format"] == "deepcore-audit-report"


def test_sign_and_commit_never_destroy_their_inputs(world: Any, tmp_path: Path, keys: dict[str, Path]) -> None:
    fp = tmp_path / "fp.json"
    shutil.copy(world.fingerprint, fp)
    private, original = keys["private"].read_bytes(), fp.read_bytes()
    error_line(deepcore("sign", fp, "--key", keys["private"], "--out", keys["private"]), "--key input", "would be destroyed")
    assert keys["private"].read_bytes() == private and fp.read_bytes() == original
    error_line(deepcore("commit", fp, "--out", fp), "fingerprint input")
    error_line(deepcore("commit", fp, "--out", tmp_path / "." / "fp.json"), "fingerprint input")
    assert fp.read_bytes() == original
    taken = tmp_path / "taken.json"
    taken.write_text("not mine")
    error_line(deepcore("commit", fp, "--out", taken), "already exists", "--force")
    error_line(deepcore("sign", fp, "--key", keys["private"], "--out", taken), "already exists")
    assert taken.read_text() == "not mine"
    assert deepcore("commit", fp, "--out", taken, "--force").returncode == 0
    # --out naming the fingerprint itself, however spelled, is signing in place, as without --out
    (tmp_path / "sub").mkdir()
    r = deepcore("sign", fp, "--key", keys["private"], "--out", tmp_path / "sub" / ".." / "fp.json")
    assert r.returncode == 0, r.stderr
    assert json.loads(fp.read_text())["signature"]["scheme"] == "ed25519"


def test_fingerprint_refuses_an_out_that_is_an_input_or_exists_before_any_work(world: Any, tmp_path: Path) -> None:
    data = world.root / "owner-data.npz"
    copy = tmp_path / "data.npz"
    shutil.copy(data, copy)
    before = copy.read_bytes()
    error_line(deepcore("fingerprint", "--owner", world.owner_ts, "--data", copy, "--out", copy), "--data input")
    existing = tmp_path / "fp.json"
    existing.write_text("keep me")
    error_line(deepcore("fingerprint", "--owner", world.owner_ts, "--data", copy, "--out", existing), "already exists", "--force")
    assert copy.read_bytes() == before and existing.read_text() == "keep me"


# ----------------------------------------------------------------------------- validation, resume, loading

def test_repeat_checks_beyond_the_fingerprint_are_refused_before_any_query(world: Any) -> None:
    n = json.loads(deepcore("inspect", world.fingerprint, "--json").stdout)["points"]
    error_line(deepcore(*audit_args(world, world.independent_onnx, "--no-report", "--repeat-checks", n + 1)),
               f"repeat checks must lie between 0 and the fingerprint's {n} points")
    r = deepcore(*audit_args(world, world.independent_onnx, "--no-report", "--json", "--repeat-checks", n))
    assert r.returncode in (0, 3), r.stderr  # at the limit: a report the verifier accepts (tested with ledgers elsewhere)


def test_resume_follows_the_suspects_content_not_its_path(world: Any, tmp_path: Path) -> None:
    """Begun on `a/x.onnx` given relative to the working directory, resumed on the same bytes
    moved to another directory and given by absolute path; another model's bytes are refused."""
    (tmp_path / "a").mkdir()
    shutil.copy(world.independent_onnx, tmp_path / "a" / "x.onnx")
    ledger = tmp_path / "l.jsonl"
    args = audit_args(world, "a/x.onnx", "--budget", "10", "--alpha", "1e-300", "--beta", "1e-300", "--ledger", ledger,
                      "--no-report", "--json")
    first = deepcore(*args, cwd=tmp_path)
    assert first.returncode == 3, first.stderr
    moved = tmp_path / "b" / "y.onnx"
    moved.parent.mkdir()
    (tmp_path / "a" / "x.onnx").rename(moved)
    args[args.index("--suspect") + 1] = str(moved)
    args[len(args) - 1 - args[::-1].index("--budget") + 1] = "20"
    r = deepcore(*args, "--resume")
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout)["replayed_from_ledger"] == 10
    args[args.index("--suspect") + 1] = str(world.pirate_onnx)
    error_line(deepcore(*args, "--resume"), "written for another suspect", "sha256")
    header = json.loads(ledger.read_text().splitlines()[0])["ledger"]
    assert header["suspect_location"]["path"] == "a/x.onnx" and "path" not in header["suspect"]


def test_a_torn_ledger_tail_adds_no_line_to_an_error(world: Any, tmp_path: Path) -> None:
    ledger = tmp_path / "l.jsonl"
    args = audit_args(world, world.pirate_onnx, "--ledger", ledger, "--no-report", "--json")
    assert deepcore(*args).returncode == 1
    with open(ledger, "a") as f:
        f.write('{"digest": "ab')  # a write cut by a kill
    args[args.index("--budget") + 1] = "5"
    error_line(deepcore(*args, "--resume"), "already charged")


def _rehashed(src: Path, dst: Path, change: Any) -> Path:
    doc = json.loads(src.read_text())
    points = decode_array(doc["content"]["points"], "points").copy()
    change(points)
    doc["content"]["points"] = encode_array(points)
    doc["content_sha256"] = canonical_digest(doc["content"])
    doc.pop("signature", None)
    dst.write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.25, float("inf")])
def test_a_fingerprint_with_points_outside_the_unit_range_is_refused_on_load(world: Any, tmp_path: Path, value: float) -> None:
    def poke(p: np.ndarray) -> None:
        p.flat[7] = value

    bad = _rehashed(world.fingerprint, tmp_path / "bad.json", poke)
    error_line(deepcore("inspect", bad), "points must be finite and lie in [0, 1]")
    args = audit_args(world, world.pirate_onnx, "--no-report")
    args[args.index("--fingerprint") + 1] = str(bad)
    error_line(deepcore(*args), "points must be finite")  # refused on load, never blamed on the suspect


def test_an_oversized_fingerprint_is_refused_before_it_is_read(tmp_path: Path) -> None:
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(600 * 2**20)  # sparse: 600 MiB that take no disk
    error_line(deepcore("inspect", huge), "600 MiB", "more than the 512 MiB")


def test_triton_options_are_named_as_typed(world: Any) -> None:
    error_line(deepcore(*audit_args(world, world.pirate_onnx, "--no-report", "--connect-timeout", "5")),
               "--connect-timeout apply to Triton and v2 server suspects only")
    line = error_line(deepcore(*audit_args(world, "triton+ftp://127.0.0.1:1/m", "--no-report", "--connect-timeout", "5")),
                      "unsupported server URL scheme")
    assert "connect_timeout_s" not in line
    error_line(deepcore(*audit_args(world, "triton+http://127.0.0.1:1/m", "--no-report", "--connect-timeout", "-1")),
               "--connect-timeout")


def test_onnx_execution_providers_are_chosen_and_recorded(world: Any) -> None:
    """--ort-providers runs an ONNX suspect on exactly the providers named, records the ones it
    used, and refuses a provider this ONNX Runtime lacks, or a suspect that is not ONNX."""
    r = deepcore(*audit_args(world, world.pirate_onnx, "--no-report", "--json", "--ort-providers", "cpu"))
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["suspect"]["details"]["providers"] == ["CPUExecutionProvider"]
    error_line(deepcore(*audit_args(world, world.pirate_onnx, "--no-report", "--ort-providers", "coreml,cpu")),
               "offers no CoreMLExecutionProvider", "available: ")  # Apple's, never in a Linux build
    error_line(deepcore(*audit_args(world, world.pirate_onnx, "--no-report", "--ort-providers", "cpu", "--device", "cpu")),
               "give one")
    error_line(deepcore(*audit_args(world, "v2+http://127.0.0.1:1/m.onnx", "--no-report", "--ort-providers", "cpu")),
               ".onnx suspects only")
    error_line(deepcore(*audit_args(world, world.pirate_onnx, "--no-report", "--ort-providers", "cpu,cpu")), "named twice")
    error_line(deepcore(*audit_args(world, world.owner_ts, "--no-report", "--ort-providers", "cpu")), ".onnx suspects only")
    error_line(deepcore(*audit_args(world, "v2+http://127.0.0.1:1/m", "--no-report", "--ort-providers", "cpu")), ".onnx suspects only")
