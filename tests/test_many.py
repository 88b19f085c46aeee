"""`deepcore audit-many` on the small world's real ONNX suspects: the same verdicts as single
audits, errors that stop nobody, a summary, resume, and one-line errors for bad manifests.
(The run over a real Triton server, with a kill and a resume, is in test_triton_audit.py.)"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import audit_args, one_line_error, run_deepcore

from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.auditor.many import endpoint_of, read_manifest

COMPARED = ("verdict", "queries_used", "trajectory", "agreement", "llr", "p0", "p1", "fingerprint_sha256")


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def single(world: Any, suspect: object, *extra: str) -> dict[str, Any]:
    r = run(*audit_args(world, suspect, *extra, "--json", "--no-report"))
    assert r.exit_code in (0, 1, 3), r.output
    return json.loads(r.stdout)


def pair(world: Any, pid: str, suspect: object, **options: Any) -> dict[str, Any]:
    return {"id": pid, "fingerprint": str(world.fingerprint), "suspect": str(suspect), "budget": 60, "batch-size": 5, **options}


@pytest.fixture(scope="module")
def scanned(world: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """One audit-many run: three suspects by two point orders, label-only and with probabilities,
    beside a missing file and a closed port."""
    root = tmp_path_factory.mktemp("many")
    rows = [pair(world, f"{n}-{s}", getattr(world, f"{n}_onnx"), seed=s) for n in ("pirate", "independent", "distilled")
            for s in (0, 1)]
    rows += [pair(world, "pirate-probs", world.pirate_onnx, access="probs"),
             pair(world, "missing", world.root / "no-such-model.onnx"),
             {**pair(world, "no-fingerprint", world.pirate_onnx), "fingerprint": str(world.root / "no-such-fp.json")},
             {"fingerprint": str(world.fingerprint), "suspect": "triton+http://127.0.0.1:9/m", "connect_timeout": 1}]
    manifest = write_jsonl(root / "manifest.jsonl", rows)
    out = root / "out"
    r = run_deepcore("audit-many", manifest, "--out", out, "--jobs", "3", "--json")
    return manifest, out, r


def test_every_pair_gets_the_verdict_its_single_audit_gets(world: Any, scanned: tuple[Path, Path, Any]) -> None:
    manifest, out, r = scanned
    assert r.returncode == 2, r.stderr  # three pairs errored
    summary = json.loads(r.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    by_id = {p["id"]: p for p in summary["pairs"]}
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    closed = next(pid for pid in by_id if pid.startswith("m-"))  # the closed port's line gives no id: one is made
    assert list(by_id) == [row.get("id", closed) for row in rows]
    for name in ("pirate", "independent", "distilled"):
        for seed in (0, 1):
            got = by_id[f"{name}-{seed}"]
            expected = single(world, getattr(world, f"{name}_onnx"), "--seed", str(seed))
            assert (got["status"], got["queries"]) == (expected["verdict"], expected["queries_used"]), name
            report = json.loads((out / f"{name}-{seed}" / "report.json").read_text())["content"]
            for key in COMPARED:
                assert report["result"][key] == expected[key], (name, key)
            v = run("verify-report", out / f"{name}-{seed}" / "report.json", "--ledger", out / f"{name}-{seed}" / "ledger.jsonl",
                    "--fingerprint", world.fingerprint)
            assert v.exit_code == 0, v.output
    assert by_id["pirate-0"]["status"] == "piracy" and by_id["independent-0"]["status"] == "independent"
    probs = single(world, world.pirate_onnx, "--access", "probs")
    assert (by_id["pirate-probs"]["status"], by_id["pirate-probs"]["queries"]) == (probs["verdict"], probs["queries_used"])
    counts = summary["counts"]
    assert counts["error"] == 3 and sum(counts.values()) == len(by_id)
    assert "no-such-fp.json" in by_id["no-fingerprint"]["error"]  # one bad fingerprint file: its pair, not the scan
    assert "no-such-model.onnx" in by_id["missing"]["error"] and "\n" not in by_id["missing"]["error"]
    assert "unreachable" in by_id[closed]["error"]
    table = (out / "summary.md").read_text().splitlines()
    assert len(table) == 2 + len(by_id) and all(f"| {pid} |" in "\n".join(table) for pid in by_id)


def test_a_second_run_resumes_nothing_asked_twice(world: Any, scanned: tuple[Path, Path, Any], tmp_path: Path) -> None:
    manifest, out, _ = scanned
    # A pair cut short: its report gone, its ledger kept (as a kill between the two would leave it).
    (out / "pirate-1" / "report.json").unlink()
    before = (out / "pirate-1" / "ledger.jsonl").read_text().splitlines()
    r = run_deepcore("audit-many", manifest, "--out", out, "--json")
    assert r.returncode == 2, r.stderr
    by_id = {p["id"]: p for p in json.loads(r.stdout)["pairs"]}
    assert by_id["pirate-1"]["resumed"] == "continued" and by_id["pirate-1"]["status"] == "piracy"
    after = (out / "pirate-1" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(x).get("digest") for x in after[1:]] == [json.loads(x).get("digest") for x in before[1:]]
    assert all(by_id[f"{n}-{s}"]["resumed"] == "done" for n in ("independent", "distilled") for s in (0, 1))
    assert by_id["missing"]["status"] == "error"  # tried again, still missing


def test_a_tampered_report_is_an_error_not_a_verdict(world: Any, tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [pair(world, "indep", world.independent_onnx)])
    assert run_deepcore("audit-many", manifest, "--out", tmp_path / "out").returncode == 0
    report = tmp_path / "out" / "indep" / "report.json"
    doc = json.loads(report.read_text())
    doc["content"]["result"]["verdict"] = "piracy"
    report.write_text(json.dumps(doc))
    r = run_deepcore("audit-many", manifest, "--out", tmp_path / "out", "--json")
    assert r.returncode == 2
    (only,) = json.loads(r.stdout)["pairs"]
    assert only["status"] == "error" and "report" in only["error"]


def test_a_csv_manifest_with_relative_paths(world: Any, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "p.onnx").write_bytes(world.pirate_onnx.read_bytes())
    (tmp_path / "fp.json").write_bytes(world.fingerprint.read_bytes())
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,fingerprint,suspect,budget,batch-size,seed,suspect-mean\n"
                        "p,fp.json,models/p.onnx,60,5,0,\n")
    r = run_deepcore("audit-many", manifest, "--out", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    (only,) = json.loads(r.stdout)["pairs"]
    assert only["status"] == single(world, world.pirate_onnx)["verdict"] == "piracy"


@pytest.mark.parametrize("content, words", [
    ('{"fingerprint": "f", "suspect": "s", "budgett": 3}\n', ["line 1", "unknown key 'budgett'"]),
    ('{"fingerprint": "f"}\n', ["line 1", "no suspect"]),
    ('\n{"fingerprint": "f", "suspect": "s"\n', ["line 2", "not a JSON object"]),
    ('[1, 2]\n', ["line 1", "not a JSON object"]),
    ('{"fingerprint": "f", "suspect": "s", "id": "a"}\n{"fingerprint": "f", "suspect": "t", "id": "a"}\n', ["line 2", "'a' is given twice"]),
    ('{"fingerprint": "f", "suspect": "s", "id": "../up"}\n', ["line 1", "id '../up'"]),
    ('{"fingerprint": "f", "suspect": "s", "budget": "many"}\n', ["line 1", "budget must be a number"]),
    ('{"fingerprint": "f", "suspect": "s", "access": "weights"}\n', ["line 1", "access must be one of"]),
    ('{"fingerprint": "f", "suspect": "s", "ssl": "perhaps"}\n', ["line 1", "ssl must be true or false"]),
    ('{"fingerprint": "f", "suspect": "s"}\n{"fingerprint": "f", "suspect": "t", "alpha": 0.7}\n', ["line 2", "alpha must lie in"]),
    ('# nothing\n', ["lists no pair"]),
])
def test_a_bad_manifest_is_one_line_before_any_audit(tmp_path: Path, content: str, words: list[str]) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    one_line_error(run("audit-many", manifest, "--out", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


def test_bad_csv_files_and_flags_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("fingerprint,suspect\nf,s,extra\n")
    one_line_error(run("audit-many", bad, "--out", tmp_path / "o"), "line 2", "more cells")
    one_line_error(run("audit-many", tmp_path / "absent.jsonl", "--out", tmp_path / "o"), "cannot read manifest")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    one_line_error(run("audit-many", tmp_path / "bin.jsonl", "--out", tmp_path / "o"), "not UTF-8")
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"fingerprint": "f", "suspect": "s"}\n')
    one_line_error(run("audit-many", ok, "--out", tmp_path / "o", "--jobs", "0"), "--jobs")


def test_endpoints_and_defaults_read_from_a_manifest(tmp_path: Path) -> None:
    assert endpoint_of("triton+grpc://Host.example:8001/m/2") == "triton+grpc://host.example:8001"
    assert endpoint_of("v2+http://10.0.0.1:8080/m") == endpoint_of("v2+http://10.0.0.1:8080/other")
    assert endpoint_of("models/a.onnx") == "local"
    m = write_jsonl(tmp_path / "m.jsonl", [{"fingerprint": "fp.json", "suspect": "a.onnx", "alpha": 0.001,
                                            "headers": ["X-A: 1"], "test": "sprt"}])
    (p,) = read_manifest(m)
    assert p.id.startswith("a.onnx-") and p.request.fingerprint_path == tmp_path / "fp.json"
    # The id names the line, not its place: the same line after another gets the same id.
    other = {"fingerprint": "fp.json", "suspect": "b.onnx"}
    grown = write_jsonl(tmp_path / "m2.jsonl", [other, json.loads(m.read_text())])
    assert read_manifest(grown)[1].id == p.id != read_manifest(grown)[0].id
    assert p.request.suspect == str(tmp_path / "a.onnx") and p.request.config.alpha == 0.001
    assert p.request.config.test == "sprt" and p.request.headers == ("X-A: 1",)


def test_the_same_scan_through_a_local_ray_cluster(world: Any, scanned: tuple[Path, Path, Any], ray_cluster: str,
                                                   tmp_path: Path) -> None:
    manifest, _, r = scanned
    threads = {p["id"]: p for p in json.loads(r.stdout)["pairs"]}
    got = run_deepcore("audit-many", manifest, "--out", tmp_path / "out", "--ray", ray_cluster, "--json", timeout=600)
    assert got.returncode == 2, got.stderr[-3000:]
    summary = json.loads(got.stdout)
    assert summary["runner"] == f"ray {ray_cluster}"
    by_id = {p["id"]: p for p in summary["pairs"]}
    assert list(by_id) == list(threads)
    for pid, p in by_id.items():
        assert (p["status"], p["queries"]) == (threads[pid]["status"], threads[pid]["queries"]), pid
        if p["status"] != "error":
            v = run("verify-report", tmp_path / "out" / pid / "report.json", "--ledger", tmp_path / "out" / pid / "ledger.jsonl",
                    "--fingerprint", world.fingerprint)
            assert v.exit_code == 0, v.output
            # The same answers: a ledger written by a Ray worker holds what the thread's did.
            mine = [json.loads(x) for x in (tmp_path / "out" / pid / "ledger.jsonl").read_text().splitlines()[1:]]
            theirs = [json.loads(x) for x in (Path(threads[pid]["report"]).parent / "ledger.jsonl").read_text().splitlines()[1:]]
            assert [(e.get("digest"), e.get("answer")) for e in mine] == [(e.get("digest"), e.get("answer")) for e in theirs]


def test_a_ray_address_nobody_answers_is_one_line_and_writes_nothing(world: Any, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = write_jsonl(tmp_path / "m.jsonl", [pair(world, "p", world.pirate_onnx)])
    one_line_error(run("audit-many", manifest, "--out", tmp_path / "out", "--ray", f"127.0.0.1:{port}"), "Ray cluster", str(port))
    one_line_error(run("audit-many", manifest, "--out", tmp_path / "out", "--ray", "nowhere"), "HOST:PORT")
    assert not (tmp_path / "out").exists()
