"""Integrity and provenance: signed fingerprints, commitments, self-contained reports that
`verify-report` recomputes, and the repeat check against randomized suspects."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import audit_args, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_format import make

from deepcore_auditor.adapters.base import Access, Oracle, OracleInfo
from deepcore_auditor.adapters.errors import DeepCoreError, InputError
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.auditor.audit import AuditConfig, audit, ledger_header
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.auditor.ledger import QueryLedger
from deepcore_auditor.auditor.report import verify_report
from deepcore_auditor.fingerprints.errors import SignatureError
from deepcore_auditor.fingerprints.format import (
    canonical_digest,
    decode_array,
    encode_array,
    load_fingerprint,
    save_fingerprint,
    sign_fingerprint,
)
from deepcore_auditor.fingerprints.signing import HmacKey, generate_ed25519, load_ed25519_key

SECRET = "correct horse battery staple 42"


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    generate_ed25519(d / "owner.pem", d / "owner.pub.pem")
    generate_ed25519(d / "other.pem", d / "other.pub.pem")
    return {"private": d / "owner.pem", "public": d / "owner.pub.pem", "other_public": d / "other.pub.pem"}


def _resign_content(path: Path, edit: Any) -> None:
    """Edit a document's content and recompute its digest: only a signature can catch this."""
    doc = json.loads(path.read_text())
    edit(doc["content"])
    doc["content_sha256"] = canonical_digest(doc["content"])
    path.write_text(json.dumps(doc))


# ---- signing -----------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: dict[str, Path]) -> None:
    assert stat.S_IMODE(os.stat(keys["private"]).st_mode) == 0o600
    assert load_ed25519_key(keys["private"]).key_id == load_ed25519_key(keys["public"]).key_id
    assert not load_ed25519_key(keys["public"]).can_sign


@pytest.mark.parametrize("kind", ["hmac", "ed25519"])
def test_signed_fingerprint_verifies_and_any_change_is_refused(tmp_path: Path, keys: dict[str, Path], kind: str) -> None:
    signer = HmacKey(SECRET.encode()) if kind == "hmac" else load_ed25519_key(keys["private"])
    verifier = signer if kind == "hmac" else load_ed25519_key(keys["public"])
    path = tmp_path / "fp.json"
    digest = save_fingerprint(make(), path)
    assert sign_fingerprint(path, signer) == digest  # signing never changes the published digest
    assert load_fingerprint(path, verifier).digest == digest
    def changed(c: dict[str, Any], field: str, fn: Any) -> None:
        a = decode_array(c[field], field).copy()
        fn(a)
        c[field] = encode_array(a)

    for edit in (
        lambda c: changed(c, "points", lambda a: a.__setitem__((0, 0, 0, 0), 1 - a[0, 0, 0, 0])),  # a point
        lambda c: changed(c, "owner_labels", lambda a: a.__setitem__(0, (a[0] + 1) % 3)),  # a label
        lambda c: c["method"].__setitem__("seed", 99),  # a parameter
    ):
        tampered = tmp_path / "tampered.json"
        tampered.write_bytes(path.read_bytes())
        _resign_content(tampered, edit)
        load_fingerprint(tampered)  # the digest alone cannot tell: it was recomputed
        with pytest.raises(SignatureError, match="does not verify"):
            load_fingerprint(tampered, verifier)


def test_wrong_key_unsigned_file_and_bad_keys_are_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    path = tmp_path / "fp.json"
    save_fingerprint(make(), path)
    with pytest.raises(SignatureError, match="not signed"):
        load_fingerprint(path, HmacKey(SECRET.encode()))
    sign_fingerprint(path, load_ed25519_key(keys["private"]))
    with pytest.raises(SignatureError, match="signed with key"):
        load_fingerprint(path, load_ed25519_key(keys["other_public"]))
    with pytest.raises(SignatureError, match="ed25519"):
        load_fingerprint(path, HmacKey(SECRET.encode()))
    with pytest.raises(InputError, match="at least 16 bytes"):
        HmacKey(b"short")
    with pytest.raises(InputError, match="public key"):
        sign_fingerprint(path, load_ed25519_key(keys["public"]))
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InputError, match="not a readable PEM key"):
        load_ed25519_key(tmp_path / "junk.pem")


@pytest.mark.parametrize("which", ["private", "public"])
def test_a_key_of_an_unknown_algorithm_is_an_input_error(tmp_path: Path, keys: dict[str, Path], which: str) -> None:
    # Found by the soak fuzzer: Ed25519's OID 1.3.101.112 changed to 1.3.100.112 made cryptography
    # raise UnsupportedAlgorithm, which escaped as an internal error.
    import base64

    pem = keys[which].read_text().splitlines()
    der = base64.b64decode("".join(pem[1:-1]))
    assert der.count(b"\x06\x03\x2b\x65\x70") == 1
    body = base64.encodebytes(der.replace(b"\x06\x03\x2b\x65\x70", b"\x06\x03\x2b\x64\x70")).decode()
    (tmp_path / "odd.pem").write_text(f"{pem[0]}\n{body}{pem[-1]}\n")
    with pytest.raises(InputError, match="odd.pem holds a key of another type"):
        load_ed25519_key(tmp_path / "odd.pem")


def test_a_key_openssl_cannot_parse_is_an_input_error(tmp_path: Path) -> None:
    # The soak fuzzer's input: an X448 private key (OID 1.3.101.111) of 32 bytes; cryptography
    # raised InternalError ("Unknown OpenSSL error"), which escaped as an internal error.
    (tmp_path / "x448.pem").write_text("-----BEGIN PRIVATE KEY-----\n"
                                       "MC4CAQAwBQYDK2VvBCIEILZGjqlAnD6D0sDShoeVGzE9RmCi7qMP5zgcStkipps5\n"
                                       "-----END PRIVATE KEY-----\n")
    with pytest.raises(InputError, match="x448.pem is not a readable PEM key"):
        load_ed25519_key(tmp_path / "x448.pem")


def test_cli_sign_inspect_and_key_errors(tmp_path: Path, keys: dict[str, Path]) -> None:
    path = tmp_path / "fp.json"
    save_fingerprint(make(), path)
    env = {"FP_KEY": SECRET}
    r = run("sign", str(path), "--hmac-key-env", "FP_KEY", env=env)
    assert r.exit_code == 0 and "signed" in r.output
    d = json.loads(run("inspect", str(path), "--json", "--hmac-key-env", "FP_KEY", env=env).stdout)
    assert d["signature"].startswith("hmac-sha256") and d["signature"].endswith("verified")
    assert "not verified" in json.loads(run("inspect", str(path), "--json").stdout)["signature"]
    assert SECRET not in r.output
    one_line_error(run("inspect", str(path), "--hmac-key-env", "FP_KEY", env={"FP_KEY": SECRET + "x"}), "does not verify")
    one_line_error(run("inspect", str(path), "--hmac-key-env", "NO_SUCH_VAR"), "NO_SUCH_VAR", "not set")
    one_line_error(run("inspect", str(path), "--key", str(keys["public"]), "--hmac-key-env", "FP_KEY", env=env), "one key")
    one_line_error(run("sign", str(path)), "needs a key")
    one_line_error(run("keygen", "--private", str(keys["private"]), "--public", str(tmp_path / "p.pem")), "already exists")
    assert not (tmp_path / "p.pem").exists()


# ---- commitment, report, verify-report -----------------------------------------------------------


@pytest.fixture(scope="module")
def signed_world(world: Any, tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("signed")
    fp = d / "fp.json"
    sign_fingerprint(world.fingerprint, load_ed25519_key(keys["private"]), fp)
    assert run("commit", str(fp), "--out", str(d / "commitment.json"), "--key", str(keys["private"])).exit_code == 0
    return {"fingerprint": fp, "commitment": d / "commitment.json", "dir": d}


def _audit(world: Any, fp: Path, suspect: Path, tmp: Path, *extra: str) -> tuple[Any, Path, Path]:
    report, ledger = tmp / "report.json", tmp / "ledger.jsonl"
    args = audit_args(world, suspect, "--report", str(report), "--ledger", str(ledger), "--json", *extra)
    args[args.index("--fingerprint") + 1] = str(fp)
    return run(*args), report, ledger


def test_report_stands_on_its_own_and_verify_report_recomputes_it(world: Any, signed_world: dict[str, Path], keys: dict[str, Path], tmp_path: Path) -> None:
    r, report, ledger = _audit(world, signed_world["fingerprint"], world.pirate_onnx, tmp_path,
                               "--key", str(keys["private"]), "--commitment", str(signed_world["commitment"]))
    assert r.exit_code == 1, r.output
    doc = json.loads(report.read_text())
    c = doc["content"]
    assert doc["signature"]["scheme"] == "ed25519"
    assert c["tool"].startswith("deepcore-auditor") and c["started_utc"] <= c["finished_utc"]
    # the version and the source commit: this checkout's HEAD (dirty or not), never a guess
    import deepcore_auditor
    head = subprocess.run(["git", "-C", str(Path(deepcore_auditor.__file__).parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert c["tool"].startswith(f"deepcore-auditor {deepcore_auditor.__version__} (commit {head}"), c["tool"]
    assert c["fingerprint"]["signature_verified"] and c["fingerprint"]["commitment"]["content"]["fingerprint_sha256"] == c["fingerprint"]["sha256"]
    assert c["suspect"]["identity"]["sha256"] and c["test"]["alpha"] == 0.01
    records = [x for x in c["ledger"]["records"] if "answer" in x]
    charged = sum(x.get("charge", 0) for x in c["ledger"]["records"])
    assert len(records) == c["result"]["answered"] == c["result"]["queries_used"] == charged
    assert all(len(x["digest"]) == 64 and "answer" in x and x["t"] > 0 for x in records)
    v = run("verify-report", str(report), "--ledger", str(ledger), "--fingerprint", str(signed_world["fingerprint"]), "--key", str(keys["public"]))
    assert v.exit_code == 0, v.output
    assert "verdict piracy" in v.output and "plan (points, owner labels, rates) recomputed" in v.output
    # Without a key the report still verifies by its digest, and says the signature was not checked.
    assert "not verified" in run("verify-report", str(report)).output


@pytest.mark.parametrize("tamper, words", [
    ("answer", "recomputed verdict"),  # every answer flipped to what an independent model would say
    ("verdict", "recomputed verdict"),
    ("drop-record", "recomputed verdict"),
    ("p1", "recomputed"),
    ("budget", "within the budget"),
    ("alpha", "stated test parameters"),  # a parameter shown in the report but not the one replayed
    ("repeat-claim", "stated repeat check"),
])
def test_verify_report_refuses_an_edited_report(world: Any, tmp_path: Path, tamper: str, words: str) -> None:
    r, report, _ = _audit(world, world.fingerprint, world.pirate_onnx, tmp_path)
    assert r.exit_code == 1, r.output

    def edit(c: dict[str, Any]) -> None:
        if tamper == "answer":
            for rec in c["ledger"]["records"]:
                if "answer" in rec:
                    rec["answer"] = (rec["answer"] + 1) % 10
        elif tamper == "verdict":
            c["result"]["verdict"] = "independent"
        elif tamper == "drop-record":
            c["ledger"]["records"].pop()
        elif tamper == "p1":
            c["ledger"]["header"]["plan"]["p1"][0] = 0.999
        elif tamper == "budget":
            c["test"]["budget"] = c["result"]["queries_used"] - 1
        elif tamper == "alpha":
            c["test"]["alpha"] = 1e-9
        else:
            c["result"]["repeat_check"] = {"asked": 10, "differing": 0}

    _resign_content(report, edit)
    one_line_error(run("verify-report", str(report)), words)


def test_verify_report_catches_a_changed_digest_signature_ledger_and_fingerprint(world: Any, tmp_path: Path) -> None:
    env = {"AUDIT_KEY": SECRET}
    report, ledger = tmp_path / "report.json", tmp_path / "ledger.jsonl"
    args = audit_args(world, world.independent_onnx, "--report", str(report), "--ledger", str(ledger), "--json", "--hmac-key-env", "AUDIT_KEY")
    # A key given means the fingerprint must carry its signature: the world's is unsigned.
    one_line_error(CliRunner().invoke(cli, args, env=env), "not signed")
    assert not report.exists() and not ledger.exists()
    sign_fingerprint(world.fingerprint, HmacKey(SECRET.encode()), tmp_path / "fp.json")
    args[args.index("--fingerprint") + 1] = str(tmp_path / "fp.json")
    r = CliRunner().invoke(cli, args, env=env)
    assert r.exit_code == 0, r.output
    ok = CliRunner().invoke(cli, ["verify-report", str(report), "--ledger", str(ledger), "--hmac-key-env", "AUDIT_KEY"], env=env)
    assert ok.exit_code == 0, ok.output
    assert SECRET not in report.read_text() + ledger.read_text() + r.output + ok.output
    # A changed ledger file, another fingerprint, a changed field in the report, a changed byte.
    with open(ledger, "a") as f:
        f.write("\n")
    one_line_error(run("verify-report", str(report), "--ledger", str(ledger)), "sha256")
    other = tmp_path / "other.json"
    fp = load_fingerprint(world.fingerprint)
    save_fingerprint(dataclasses.replace(fp, created="another day"), other)
    one_line_error(run("verify-report", str(report), "--fingerprint", str(other)), "is the audited one")
    _resign_content(report, lambda c: c.__setitem__("finished_utc", "2000-01-01"))
    one_line_error(CliRunner().invoke(cli, ["verify-report", str(report), "--hmac-key-env", "AUDIT_KEY"], env=env), "does not verify")
    report.write_text(report.read_text().replace("2000-01-01", "2000-01-02"))
    one_line_error(run("verify-report", str(report)), "sha256")


def test_commitment_refuses_another_fingerprint(world: Any, signed_world: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    save_fingerprint(dataclasses.replace(load_fingerprint(world.fingerprint), created="another day"), other)
    args = audit_args(world, world.pirate_onnx, "--commitment", str(signed_world["commitment"]))
    args[args.index("--fingerprint") + 1] = str(other)
    one_line_error(run(*args), "not the one committed to")


# ---- repeat check: randomized defences ---------------------------------------------------------------


class Randomized(Oracle):
    """A pirate that answers a random label with probability `rate`: a randomized defence."""

    def __init__(self, inner: Oracle, rate: float, seed: int) -> None:
        self.inner, self.rate, self.rng = inner, rate, np.random.default_rng(seed)

    @property
    def info(self) -> OracleInfo:
        return self.inner.info

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        labels = self.inner.query(points, Access.LABELS)
        flip = self.rng.random(len(labels)) < self.rate
        return np.where(flip, self.rng.integers(0, 10, len(labels)), labels)


def _suspect(world: Any, path: Path) -> OnnxOracle:
    return OnnxOracle(path, convention=world.convention, point_shape=(1, 28, 28), num_classes=10)


def test_randomized_pirate_gets_inconclusive_not_independent(world: Any, tmp_path: Path) -> None:
    fp = load_fingerprint(world.fingerprint)
    cfg = AuditConfig(budget=60, batch_size=5)
    plain = audit(fp, Randomized(_suspect(world, world.pirate_onnx), 0.7, seed=1), AuditConfig(budget=60, batch_size=5, repeat_checks=0))
    assert plain.verdict == "independent"  # what the defence buys without the check
    suspect = Randomized(_suspect(world, world.pirate_onnx), 0.7, seed=1)
    ledger = QueryLedger.open(tmp_path / "l.jsonl", ledger_header(fp, suspect, cfg), resume=False)
    res = audit(fp, suspect, cfg, ledger=ledger)
    assert res.verdict == "inconclusive" and res.repeat_check["differing"] > 0, res
    assert res.queries_used == res.answered + res.repeat_check["asked"] == len(ledger) + len(ledger.repeats)
    assert any("randomizes its answers" in n for n in res.notes)


def test_deterministic_independent_passes_the_repeat_check_and_report_replays_it(world: Any, tmp_path: Path) -> None:
    r, report, ledger = _audit(world, world.fingerprint, world.independent_onnx, tmp_path)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    k = min(10, d["answered"])  # the repeat check asks again at most the points already answered
    assert k >= 5 and d["repeat_check"] == {"asked": k, "differing": 0} and d["queries_used"] == d["answered"] + k
    lines = [json.loads(x) for x in ledger.read_text().splitlines()[1:]]
    assert sum(1 for x in lines if x.get("repeat")) == k
    v = verify_report(report)
    assert v.verdict == "independent" and any(f"0 of {k} repeated answers differ" in c for c in v.checks)


# ---- fuzzing the parsers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_bytes(world: Any, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("fuzz")
    r, report, _ = _audit(world, world.fingerprint, world.pirate_onnx, tmp)
    assert r.exit_code == 1
    return report.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_reports_and_ledgers_raise_only_the_projects_errors(report_bytes: bytes, tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(report_bytes)
    how = data.draw(st.sampled_from(["flip", "truncate", "splice", "json"]))
    if how == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "splice":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(max_size=40))
    else:  # structurally valid JSON with a field replaced, digest recomputed: only semantics can catch it
        doc = json.loads(report_bytes)
        c = doc["content"]
        section = data.draw(st.sampled_from(["ledger", "result", "test", "fingerprint"]))
        keys = sorted(c[section])
        c[section][data.draw(st.sampled_from(keys))] = data.draw(
            st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
        doc["content_sha256"] = canonical_digest(c)
        raw = bytearray(json.dumps(doc).encode())
    path = tmp_path / "fuzzed.json"
    path.write_bytes(bytes(raw))
    try:
        verify_report(path)
    except DeepCoreError:
        pass
    ledger = tmp_path / "fuzzed.jsonl"
    ledger.write_bytes(bytes(raw[:200]) + b"\n" + bytes(raw[200:400]))
    try:
        QueryLedger.read(ledger, quiet=True)
    except DeepCoreError:
        pass


def test_no_code_path_unpickles() -> None:
    """Every load of a file a user hands over refuses pickles: np.load(allow_pickle=False),
    torch.load(weights_only=True), and no pickle.load(s) at all."""
    import ast

    root = Path(__file__).resolve().parent.parent
    calls = 0
    for path in [p for d in ("adapters", "auditor", "fingerprints", "benchmarks") for p in (root / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(root)}:{node.lineno}"
            assert not (owner == "pickle" and node.func.attr in ("load", "loads")), where
            if (owner, node.func.attr) == ("np", "load"):
                calls += 1
                assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
            if (owner, node.func.attr) == ("torch", "load"):
                calls += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
    assert calls >= 3  # the checker sees the loads it is meant to check


class CoreEvader(Oracle):
    """Answers like `copy` on everything but the fingerprint's core points, which it recognises
    (here by digest: the strongest evader, one that knows the points) and answers like `other`."""

    def __init__(self, copy: Oracle, other: Oracle, core_digests: set[str]) -> None:
        self.copy, self.other, self.core = copy, other, core_digests

    @property
    def info(self) -> OracleInfo:
        return self.copy.info

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        from deepcore_auditor.auditor.ledger import point_digest

        core = np.array([point_digest(p) in self.core for p in points])
        return np.where(core, self.other.query(points, access), self.copy.query(points, access))


def test_a_suspect_that_agrees_on_natural_data_but_not_on_core_points_is_not_accused(world: Any) -> None:
    """Behaving like the owner on natural data is what homologous models do: the audit must not
    accuse such a suspect. (The flip side, stated in the README: a pirate that could recognise
    the secret core points would pass as independent; keeping the points secret until the audit,
    and publishing only their digest, is what stands against that.)"""
    from deepcore_auditor.auditor.ledger import point_digest

    fp = load_fingerprint(world.fingerprint)
    owner = _suspect(world, world.owner_onnx)
    evader = CoreEvader(owner, _suspect(world, world.independent_onnx), {point_digest(p) for p in fp.points})
    natural = world.test.points(slice(0, 500))
    assert np.array_equal(evader.query(natural, Access.LABELS), owner.query(natural, Access.LABELS))
    for seed in range(3):
        res = audit(fp, evader, AuditConfig(budget=60, batch_size=5, seed=seed))
        assert res.verdict == "independent", res


def test_verify_report_with_the_ledger_compares_every_record_not_just_the_named_digest(world: Any, tmp_path: Path) -> None:
    """An unsigned report keeps the genuine ledger file's sha256 while its embedded records are
    edited (here a time, which no replay can see): the file's records must equal the embedded ones."""
    r, report, ledger = _audit(world, world.fingerprint, world.independent_onnx, tmp_path)
    assert r.exit_code == 0, r.output
    assert run("verify-report", str(report), "--ledger", str(ledger)).exit_code == 0

    def edit(c: dict[str, Any]) -> None:
        next(rec for rec in c["ledger"]["records"] if "answer" in rec)["t"] += 3600

    _resign_content(report, edit)
    assert run("verify-report", str(report)).exit_code == 0  # the replay alone cannot tell
    one_line_error(run("verify-report", str(report), "--ledger", str(ledger)), "holds exactly the header and records")


def test_resume_below_what_was_charged_and_a_report_over_an_input_are_refused(world: Any, tmp_path: Path) -> None:
    r, report, ledger = _audit(world, world.fingerprint, world.pirate_onnx, tmp_path)
    assert r.exit_code == 1, r.output
    charged = json.loads(r.stdout)["queries_used"]
    args = audit_args(world, world.pirate_onnx, "--ledger", str(ledger), "--resume")
    args[args.index("--budget") + 1] = str(charged - 5)
    one_line_error(run(*args), "already charged", str(charged))
    before = ledger.read_bytes()
    one_line_error(run(*audit_args(world, world.pirate_onnx, "--ledger", str(ledger), "--resume", "--report", str(ledger))), "--ledger input", "would be destroyed")
    assert ledger.read_bytes() == before
    one_line_error(run("inspect", str(world.fingerprint), "--hmac-key-env", ""), "empty name")


def test_every_audit_keeps_a_report_unless_told_not_to(world: Any, reports_dir: Path) -> None:
    before = set(reports_dir.iterdir())
    r = run(*audit_args(world, world.pirate_onnx, "--json"))
    assert r.exit_code == 1, r.output
    path = Path(json.loads(r.stdout)["report"])
    assert set(reports_dir.iterdir()) - before == {path} and path.name.startswith("audit-") and "-piracy-" in path.name
    assert verify_report(path).verdict == "piracy"
    r = run(*audit_args(world, world.pirate_onnx, "--json", "--no-report"))
    assert r.exit_code == 1 and json.loads(r.stdout)["report"] is None
    assert set(reports_dir.iterdir()) - before == {path}
    one_line_error(run(*audit_args(world, world.pirate_onnx, "--no-report", "--report", str(path))), "contradict")
