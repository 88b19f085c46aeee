"""Auditing Triton-served suspects end to end: `deepcore audit` against a real local tritonserver.

The transport must not change the answer: the world's suspects served over HTTP and gRPC get the
same verdict, queries and trajectory as the same audit through local ONNX Runtime. One server
(module scope) serves them; the fault tests start (and kill) their own.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import audit_args, one_line_error, sigint_as_in_a_terminal

from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.benchmarks.fault_proxy import served_samples
from deepcore_auditor.fingerprints.models import build_architecture, export_onnx

pytest.importorskip("pytriton", reason="nvidia-pytriton (the test extra) is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

from deepcore_auditor.adapters.triton.serve import ServedModel, TritonServer, write_model_repository  # noqa: E402

TOKEN_ENV = "DEEPCORE_TEST_TRITON_AUDIT_TOKEN"
FORWARDED_HEADERS = r"(?i)^(authorization|x-deepcore-trial)$"
SLOW_DELAY_S = 0.2  # per request of the "slow" models: long enough to interrupt an audit midway
# An audit of the independent suspect that runs through (nearly) all its points: the kill and
# Ctrl-C tests interrupt it midway.
LONG = ("--budget", "40", "--alpha", "1e-300", "--beta", "1e-300")
COMPARED = ("verdict", "queries_used", "trajectory", "agreement", "llr", "p0", "p1", "fingerprint_sha256")


@dataclass(frozen=True)
class Trial:
    server: TritonServer
    record: Path  # request parameters seen by model "pirate" (forwarded headers)


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def assert_same_audit(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in COMPARED:
        assert got[key] == expected[key], (key, got[key], expected[key])


def assert_resumed_audit(got: dict[str, Any], expected: dict[str, Any], ledger: Path) -> None:
    """A resumed audit asks the uninterrupted one's points in the same order, but the attempts
    cut short by the interruption were charged, so it may stop earlier: its trajectory is a
    prefix of the uninterrupted one, and what it reports charged is what the ledger charged."""
    assert got["verdict"] == expected["verdict"]
    assert got["trajectory"] == expected["trajectory"][: len(got["trajectory"])], (got["trajectory"], expected["trajectory"])
    charged = sum(json.loads(line).get("charge", 0) for line in ledger.read_text().splitlines()[1:])
    assert got["queries_used"] == charged <= got["budget"]
    assert got["answered"] == got["trajectory"][-1]["queries"] <= got["queries_used"]


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    """The ledger's header and answer lines, parsed: complete lines only (an interrupt may leave a
    torn last one), without the `charge` lines written before each send."""
    return [rec for rec in (json.loads(line) for line in path.read_text().split("\n")[:-1]) if "charge" not in rec]


def count_complete_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def count_answered(path: Path) -> int:
    """Answered queries in a ledger being written: complete lines, less the header and the charges."""
    try:
        lines = path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return 0
    return max(0, sum('"charge"' not in line for line in lines) - 1)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def processes_mentioning(text: str) -> list[int]:
    """Pids (other than ours) whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def trial(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trial]:
    """One real tritonserver serving the world's suspects (and two misfits); always stopped."""
    root = tmp_path_factory.mktemp("triton-audit")
    torch.manual_seed(0)
    five, cifar = root / "five.onnx", root / "cifar.onnx"
    export_onnx(build_architecture("mlp", (1, 28, 28), 5), five, (1, 28, 28))
    export_onnx(build_architecture("mlp", (3, 32, 32), 10), cifar, (3, 32, 32))
    record = root / "pirate-parameters.jsonl"
    models = {
        "pirate": ServedModel(world.pirate_onnx, record_parameters=record),
        "independent": ServedModel(world.independent_onnx),
        "pirate-labels": ServedModel(world.pirate_onnx, labels_output=True),  # INT64 labels only
        "slow": ServedModel(world.independent_onnx, delay_s=SLOW_DELAY_S),
        "five": ServedModel(five),  # 5 classes
        "cifar": ServedModel(cifar),  # 3x32x32 input
    }
    repo = write_model_repository(models, root / "repository", max_batch_size=64)
    extra = [f"--http-header-forward-pattern={FORWARDED_HEADERS}", f"--grpc-header-forward-pattern={FORWARDED_HEADERS}"]
    with TritonServer(repo, log_path=root / "tritonserver.log", extra_args=extra) as server:
        yield Trial(server=server, record=record)


@pytest.fixture(scope="module")
def local(world: Any) -> Callable[..., tuple[int, dict[str, Any]]]:
    """The same audit through local ONNX Runtime (cached): (exit code, JSON result)."""
    cache: dict[tuple[str, ...], tuple[int, dict[str, Any]]] = {}

    def get(name: str, *extra: str) -> tuple[int, dict[str, Any]]:
        key = (name, *extra)
        if key not in cache:
            r = run(*audit_args(world, getattr(world, f"{name}_onnx"), *extra, "--json"))
            assert r.exit_code in (0, 1, 3), r.output
            result = json.loads(r.stdout)
            assert result["suspect"]["kind"] == "onnx" and result["trajectory"]
            cache[key] = (r.exit_code, result)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------
# The transport does not change the answer


@pytest.mark.parametrize("name", ["pirate", "independent"])
def test_triton_audit_equals_local_audit(world: Any, trial: Trial, local: Callable, name: str) -> None:
    code, expected = local(name)
    other = local("independent" if name == "pirate" else "pirate")[1]
    assert other["trajectory"] != expected["trajectory"], "the two suspects must answer differently for this test to mean anything"
    token = f"tok-{name}-{secrets.token_hex(8)}"
    for protocol in ("http", "grpc"):
        r = run(
            *audit_args(world, trial.server.url(name, protocol), "--json"),
            "--concurrency", "2", "--request-timeout", "30", "--connect-timeout", "5",
            "--auth-token-env", TOKEN_ENV, "--header", f"X-DeepCore-Trial: {name}-{protocol}",
            env={TOKEN_ENV: token},
        )
        assert r.exit_code == code, r.output
        got = json.loads(r.stdout)
        assert_same_audit(got, expected)
        assert got["suspect"]["kind"] == "triton"
        assert got["suspect"]["identity"]["model"] == name and got["suspect"]["identity"]["version"] == "1"
        details = got["suspect"]["details"]
        assert details["protocol"] == protocol and details["concurrency"] == 2
        assert details["request_timeout_s"] == 30 and details["connect_timeout_s"] == 5 and details["authenticated"] is True
        assert token not in r.output
    if name == "pirate":  # the token and the header reached the model, over both protocols
        seen = [{k.lower(): v for k, v in json.loads(line).items()} for line in trial.record.read_text().splitlines()]
        for protocol in ("http", "grpc"):
            assert {"authorization": f"Bearer {token}", "x-deepcore-trial": f"pirate-{protocol}"} in seen


def test_triton_asked_as_a_plain_v2_server_gives_the_same_audit(world: Any, trial: Trial, local: Callable) -> None:
    """A `v2+` URL uses the protocol's core alone (no config call, JSON tensors over HTTP, argmax
    labels): Triton answered that way must give the audit that Triton's own extensions give."""
    code, expected = local("pirate")
    for protocol in ("http", "grpc"):
        url = trial.server.url("pirate", protocol).replace("triton+", "v2+", 1)
        r = run(*audit_args(world, url, "--json"))
        assert r.exit_code == code, r.output
        got = json.loads(r.stdout)
        assert_same_audit(got, expected)
        suspect = got["suspect"]
        assert suspect["kind"] == "v2" and suspect["identity"]["server_name"] == "triton"
        assert suspect["identity"]["version"] == "1" and suspect["details"]["labels_via"] == "argmax"
        assert suspect["details"]["tensors"] == ("json" if protocol == "http" else "raw")


def test_label_only_endpoints_give_the_same_audit(world: Any, trial: Trial, local: Callable) -> None:
    code, expected = local("pirate")
    cases = [
        ("pirate", "http", ["--labels-via", "classification"], "classification"),  # only top-1 crosses the wire
        ("pirate", "grpc", ["--labels-via", "classification"], "classification"),
        ("pirate", "http", ["--labels-via", "argmax"], "argmax"),
        ("pirate-labels", "grpc", [], "labels"),  # a model that answers INT64 labels
    ]
    for model, protocol, extra, via in cases:
        r = run(*audit_args(world, trial.server.url(model, protocol), "--json", *extra))
        assert r.exit_code == code, (model, protocol, r.output)
        got = json.loads(r.stdout)
        assert_same_audit(got, expected)
        assert got["suspect"]["details"]["labels_via"] == via
        assert got["suspect"]["access"] == (["labels"] if model == "pirate-labels" else ["labels", "probs"])
    labels_only = trial.server.url("pirate-labels", "http")
    one_line_error(run(*audit_args(world, labels_only, "--access", "probs")), "only answers labels")
    one_line_error(run(*audit_args(world, labels_only, "--labels-via", "classification")), "already answers labels")


# ---------------------------------------------------------------------------------------------
# Interrupted audits lose nothing


def test_server_killed_mid_audit_then_resume_on_a_new_server(world: Any, local: Callable, tmp_path: Path) -> None:
    code, expected = local("independent", *LONG)
    assert expected["queries_used"] >= 20, "the audit must be long enough to interrupt"
    repo = write_model_repository({"independent": ServedModel(world.independent_onnx, delay_s=SLOW_DELAY_S)}, tmp_path / "repository")
    ledger = tmp_path / "ledger.jsonl"
    args = [*LONG, "--json", "--ledger", str(ledger), "--retries", "2", "--connect-timeout", "3", "--request-timeout", "10"]

    first = TritonServer(repo, log_path=tmp_path / "first.log")
    with first:
        def kill_after_two_batches() -> None:
            wait_for(lambda: count_complete_lines(ledger) >= 1 + 10, 60, "two answered batches")
            first.kill()

        killer = threading.Thread(target=kill_after_two_batches, daemon=True)
        killer.start()
        r = run(*audit_args(world, first.url("independent", "http"), *args))
        killer.join(timeout=5)
    assert not first.is_running()
    line = one_line_error(r, "--resume")
    held = len(ledger_lines(ledger)) - 1
    assert f"the ledger {ledger} holds {held} answered queries" in line, line
    assert 10 <= held < expected["queries_used"]

    # A new server on other ports, asked over the other protocol: the URL changes, the model does not.
    second = TritonServer(repo, log_path=tmp_path / "second.log")
    with second:
        r = run(*audit_args(world, second.url("independent", "grpc"), *args, "--resume"))
        asked_again = served_samples(second, "independent")
    assert r.exit_code == code, r.output
    got = json.loads(r.stdout)
    assert got["replayed_from_ledger"] == held
    assert_resumed_audit(got, expected, ledger)
    entries = ledger_lines(ledger)
    assert "url" not in entries[0]["ledger"]["suspect"] and entries[0]["ledger"]["suspect"]["model"] == "independent"
    digests = [e["digest"] for e in entries[1:]]
    assert len(digests) == len(set(digests)) == got["answered"]
    assert asked_again == got["answered"] - held, "the new server was asked points the ledger held"


def test_ctrl_c_mid_audit_keeps_the_ledger_and_resume_finishes(world: Any, trial: Trial, local: Callable, tmp_path: Path) -> None:
    # One point a request: 40 slow requests leave seconds to interrupt after the first answers
    # (batches of 5 sent 4 at a time could all be answered before the signal arrives).
    one_by_one = (*LONG, "--batch-size", "1")
    code, expected = local("independent", *one_by_one)
    ledger = tmp_path / "ledger.jsonl"
    cmd = [sys.executable, "-m", "deepcore_auditor", *audit_args(world, trial.server.url("slow", "http"), *one_by_one, "--json", "--ledger", str(ledger))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal)
    try:
        wait_for(lambda: count_answered(ledger) >= 5 or p.poll() is not None, 60, "five answered queries")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 2, (p.returncode, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    held = len(ledger_lines(ledger)) - 1
    assert len(lines) == 1 and lines[0].startswith("deepcore: error: interrupted"), err
    assert f"holds {held} answered queries" in lines[0] and "--resume" in lines[0], lines[0]
    assert 5 <= held < expected["queries_used"] and out == ""

    r = run(*audit_args(world, trial.server.url("slow", "grpc"), *one_by_one, "--json", "--ledger", str(ledger), "--resume"))
    assert r.exit_code == code, r.output
    got = json.loads(r.stdout)
    assert got["replayed_from_ledger"] == held
    assert_resumed_audit(got, expected, ledger)
    digests = [e["digest"] for e in ledger_lines(ledger)[1:]]
    assert len(digests) == len(set(digests)) == got["answered"]


def test_resume_after_a_torn_write_keeps_the_ledger_readable(world: Any, local: Callable, tmp_path: Path) -> None:
    code, expected = local("independent", *LONG)
    ledger = tmp_path / "ledger.jsonl"

    def audit_with_budget(budget: int, *extra: str) -> Any:  # the last --budget given wins
        return run(*audit_args(world, world.independent_onnx, *LONG, "--budget", str(budget), "--json", "--ledger", str(ledger), *extra))

    assert audit_with_budget(10).exit_code == 3
    with open(ledger, "a") as f:  # a write cut short by an interrupt
        f.write('{"digest": "0123')
    r = audit_with_budget(20, "--resume")
    assert r.exit_code == 3 and json.loads(r.stdout)["replayed_from_ledger"] == 10, r.output
    r = audit_with_budget(40, "--resume")  # still readable after the first resume appended to it
    assert r.exit_code == code, r.output
    got = json.loads(r.stdout)
    assert got["replayed_from_ledger"] == 20
    assert_same_audit(got, expected)
    assert len(ledger_lines(ledger)) == 1 + expected["queries_used"]


# ---------------------------------------------------------------------------------------------
# One line, exit 2


def test_unusable_triton_suspects_are_one_line_errors(world: Any, trial: Trial) -> None:
    port = free_port()
    for scheme in ("triton+http", "triton+grpc"):
        one_line_error(run(*audit_args(world, f"{scheme}://127.0.0.1:{port}/pirate", "--connect-timeout", "2")), "unreachable", str(port))
    one_line_error(run(*audit_args(world, trial.server.url("no-such-model", "http"))), "does not serve", "no-such-model")
    one_line_error(run(*audit_args(world, trial.server.url("pirate", "grpc", version=7))), "does not serve", "version 7")
    one_line_error(run(*audit_args(world, trial.server.url("cifar", "http"))), "shape", "32")
    one_line_error(run(*audit_args(world, trial.server.url("five", "grpc"))), "5 classes")
    url = trial.server.url("pirate", "http")
    one_line_error(run(*audit_args(world, url, "--concurrency", "0")), "concurrency")
    one_line_error(run(*audit_args(world, url, "--auth-token-env", "DEEPCORE_TEST_UNSET_VARIABLE")), "DEEPCORE_TEST_UNSET_VARIABLE")
    one_line_error(run(*audit_args(world, url, "--header", "Authorization Bearer s3cret")), "Name: value")
    assert "s3cret" not in run(*audit_args(world, url, "--header", "Authorization Bearer s3cret")).output
    one_line_error(run(*audit_args(world, url, "--ssl-insecure")), "TLS")
    one_line_error(run(*audit_args(world, url, "--retries", "0")), "--retries")


def test_audit_many_over_triton_with_a_broken_endpoint_a_kill_and_a_resume(world: Any, trial: Trial, local: Callable,
                                                                          tmp_path: Path, ray_cluster: str) -> None:
    """20 pairs (pirate and independent, HTTP and gRPC, five point orders), one endpoint that serves
    no such model, and two slow ones; the scan is killed (SIGKILL: no handler runs) while the slow
    ones are mid-audit, then run again: every verdict is the single local audit's, the broken pair
    is the one error, and no ledger holds a point twice. Then the same scan through a real local
    Ray cluster, from scratch: the same summary."""
    rows = [{"id": f"{name}-{proto}-{seed}", "fingerprint": str(world.fingerprint), "suspect": trial.server.url(name, proto),
             "budget": 60, "batch-size": 5, "seed": seed}
            for name in ("pirate", "independent") for proto in ("http", "grpc") for seed in range(5)]
    rows += [{"id": f"slow-{proto}", "fingerprint": str(world.fingerprint), "suspect": trial.server.url("slow", proto),
              "budget": 60, "batch-size": 1, "concurrency": 1} for proto in ("http", "grpc")]
    rows.append({"id": "broken", "fingerprint": str(world.fingerprint), "suspect": trial.server.url("no-such-model", "grpc")})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deepcore_auditor", "audit-many", str(manifest), "--out", str(out), "--jobs", "6"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: all(count_answered(out / f"slow-{proto}" / "ledger.jsonl") >= 2 for proto in ("http", "grpc"))
                 or p.poll() is not None, 120, "the slow pairs' first answers")
        p.kill()
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not (out / "slow-http" / "report.json").exists() and not (out / "slow-grpc" / "report.json").exists()
    held = {proto: count_answered(out / f"slow-{proto}" / "ledger.jsonl") for proto in ("http", "grpc")}

    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    summary = json.loads(r.stdout)
    by_id = {pr["id"]: pr for pr in summary["pairs"]}
    assert list(by_id) == [row["id"] for row in rows]
    assert summary["counts"]["error"] == 1 and "does not serve" in by_id["broken"]["error"]
    for name in ("pirate", "independent"):
        for seed in range(5):
            _, expected = local(name, "--seed", str(seed))
            for proto in ("http", "grpc"):
                got = by_id[f"{name}-{proto}-{seed}"]
                assert (got["status"], got["queries"]) == (expected["verdict"], expected["queries_used"]), got
                report = json.loads((out / got["id"] / "report.json").read_text())["content"]["result"]
                assert_same_audit(report, expected)
    _, slow_expected = local("independent", "--batch-size", "1")
    for proto in ("http", "grpc"):
        got = by_id[f"slow-{proto}"]
        assert got["resumed"] == "continued" and got["status"] == slow_expected["verdict"], got
        digests = [e["digest"] for e in ledger_lines(out / f"slow-{proto}" / "ledger.jsonl")[1:] if not e.get("repeat")]
        assert len(digests) == len(set(digests)) >= held[proto]  # repeat checks apart, each point asked once
    for pid in by_id:
        if pid != "broken":
            v = run("verify-report", out / pid / "report.json", "--ledger", out / pid / "ledger.jsonl", "--fingerprint", world.fingerprint)
            assert v.exit_code == 0, (pid, v.output)

    r = subprocess.run([sys.executable, "-m", "deepcore_auditor", "audit-many", str(manifest), "--out", str(tmp_path / "ray"),
                        "--ray", ray_cluster, "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    on_ray = json.loads(r.stdout)
    assert on_ray["runner"] == f"ray {ray_cluster}"
    assert [(p["id"], p["status"]) for p in on_ray["pairs"]] == [(p["id"], p["status"]) for p in summary["pairs"]]
    for p in on_ray["pairs"]:  # a killed scan's slow pairs were charged the request in flight: compare them to the single audit
        expected = slow_expected["queries_used"] if p["id"].startswith("slow-") else by_id[p["id"]]["queries"]
        assert p["queries"] == expected, p


@pytest.mark.parametrize(
    "option",
    [["--concurrency", "2"], ["--connect-timeout", "5"], ["--header", "X-A: b"],
     ["--labels-via", "argmax"], ["--ssl"], ["--auth-token-env", TOKEN_ENV]],
)
def test_triton_options_with_a_local_suspect_are_refused(world: Any, option: list[str]) -> None:
    one_line_error(run(*audit_args(world, world.pirate_onnx, *option)), "Triton and v2 server suspects only")


def test_request_timeout_bounds_an_onnx_suspect_and_is_refused_for_torchscript(world: Any) -> None:
    """--request-timeout bounds each batch of an ONNX suspect too (tests/test_hanging.py); a
    TorchScript suspect has no such bound, and says so naming the flag as typed."""
    assert run(*audit_args(world, world.pirate_onnx, "--request-timeout", "60")).exit_code == 1
    one_line_error(run(*audit_args(world, world.owner_ts, "--request-timeout", "60")), "--request-timeout", "server and ONNX")


# ---------------------------------------------------------------------------------------------
# deepcore serve-triton and deepcore demo --triton


def test_serve_triton_command_serves_until_sigterm(world: Any, local: Callable, tmp_path: Path) -> None:
    code, expected = local("pirate")
    repo = tmp_path / "repo"
    cmd = [sys.executable, "-m", "deepcore_auditor", "serve-triton", str(world.pirate_onnx), "--name", "served-pirate",
           "--repository", str(repo), "--max-batch-size", "8"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(ln.strip()) for ln in p.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        urls: list[str] = []
        deadline = time.monotonic() + 90
        while len(urls) < 2:
            try:
                urls.append(lines.get(timeout=0.5))
            except queue.Empty:
                if p.poll() is not None:
                    pytest.fail(f"serve-triton exited with {p.returncode}: {p.stderr.read()}")  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "serve-triton printed no URLs within 90 s"
        assert urls[0].startswith("triton+http://127.0.0.1:") and urls[1].startswith("triton+grpc://127.0.0.1:"), urls
        assert all(u.endswith("/served-pirate") for u in urls), urls
        for url in urls:
            r = run(*audit_args(world, url, "--json"))
            assert r.exit_code == code, r.output
            got = json.loads(r.stdout)
            assert_same_audit(got, expected)
            assert got["suspect"]["details"]["max_batch_size"] == 8
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in processes_mentioning(str(repo.resolve())):  # only what this test started
            os.kill(pid, signal.SIGKILL)
    err = p.stderr.read()  # type: ignore[union-attr]
    assert rc == 0, err
    assert "tritonserver stopped (SIGTERM)" in err
    assert processes_mentioning(str(repo.resolve())) == [], "server or stub left running"
    for url in urls:
        port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert (repo / "served-pirate" / "config.pbtxt").is_file(), "a --repository given by the user is kept"


def test_serve_triton_refuses_bad_input_before_starting(world: Any, tmp_path: Path) -> None:
    one_line_error(run("serve-triton", str(world.pirate_onnx), "--name", "a", "--name", "b"), "one per model")
    one_line_error(run("serve-triton", str(tmp_path / "missing.onnx")), "not found")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    one_line_error(run("serve-triton", str(world.pirate_onnx), "--repository", str(tmp_path / "full")), "new or empty")
    one_line_error(run("serve-triton", str(world.pirate_onnx), "--name", "bad/name"), "bad/name")


def test_demo_over_triton_gives_the_local_verdicts(world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepcore_auditor.auditor.demo as demo

    # Two of the demo's suspects (one with a name Triton does not accept as is), from a prepared
    # cache so that nothing is trained: the world's pirate and independent models stand in.
    piracy = [s for s in demo.SUSPECTS if s.truth == "piracy"]
    unsafe = [s for s in piracy if not s.name.replace("-", "").replace("_", "").replace(".", "").isalnum()]
    chosen = ((unsafe or piracy)[0], next(s for s in demo.SUSPECTS if s.truth == "independent"))
    monkeypatch.setattr(demo, "SUSPECTS", chosen)
    cache = tmp_path / demo.RECIPE
    cache.mkdir()
    shutil.copyfile(world.fingerprint, cache / "fingerprint.json")
    (cache / "meta.json").write_text(json.dumps({"owner_test_accuracy": 0.0, "suspects": {}}))
    for s in chosen:
        shutil.copyfile(world.pirate_onnx if s.truth == "piracy" else world.independent_onnx, cache / f"{s.name}.onnx")

    local_rows = demo.run_demo(cache_dir=tmp_path, budget=60, transports=("onnx",))["suspects"]
    r = run("demo", "--triton", "--json", "--cache-dir", str(tmp_path), "--budget", "60")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["suspects"]
    assert [(row["name"], row["transport"]) for row in rows] == [(s.name, t) for s in chosen for t in ("http", "grpc")]
    by_name = {row["name"]: row for row in local_rows}
    for row in rows:
        for key in ("truth", "verdict", "queries_used", "agreement"):
            assert row[key] == by_name[row["name"]][key], (row, by_name[row["name"]])
    table = run("demo", "--cache-dir", str(tmp_path), "--budget", "60")
    assert table.exit_code == 0, table.output
    assert [ln.split()[1] for ln in table.stdout.splitlines()[1:-1]] == ["onnx", "onnx"]
