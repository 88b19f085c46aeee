"""Faults between the auditor and a real tritonserver: rate limits, unavailability, dropped
connections, stalls and restarts, injected by loopback proxies (tests/fault_proxy.py).

Every audit runs through the real CLI with a ledger, and is compared with a fault-free audit of
the same suspect: a fault the retries absorb may cost budget (every attempt is charged, failed
ones included) but never changes the verdict or the answered points; a fault that outlasts the
retries ends the audit with one line (exit 2) within a bounded time, and --resume finishes it
without asking any point twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import audit_args, one_line_error

from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.auditor.report import verify_report

pytest.importorskip("pytriton", reason="nvidia-pytriton (the test extra) is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository  # noqa: E402
from deepcore_auditor.benchmarks.fault_proxy import Counters, Fault, ledger_answers, proxy_for, served_samples  # noqa: E402

PROTOCOLS = ("http", "grpc")
BATCH = 5  # audit_args' --batch-size
BUDGET = 60  # audit_args' --budget
BACKOFF_S = 0.5  # auditor.channel.Retrying's first delay; it doubles per retry
TIMEOUT_S = 1.0  # --request-timeout of the stall tests
# What each protocol says about each fault, as the one-line error shows it.
CAUSE = {
    ("http", "429"): "[429]", ("grpc", "429"): "RESOURCE_EXHAUSTED",
    ("http", "stall"): "timed out", ("grpc", "stall"): "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class Clean:
    """A fault-free audit: exit code, JSON result and the ledger's records."""

    code: int
    result: dict[str, Any]
    records: list[tuple[str, bool]]


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])




def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The backoff delays the auditor announced (auditor.channel.Retrying's warnings)."""
    messages = [r.getMessage() for r in caplog.records if r.name == "deepcore_auditor.auditor.channel"]
    return [float(m.rsplit(" in ", 1)[1].rstrip("s")) for m in messages if "; retry " in m]




@pytest.fixture(scope="module")
def repo(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    return write_model_repository({"pirate": world.pirate_onnx, "independent": world.independent_onnx}, root / "repository")


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[TritonServer]:
    """One real tritonserver for the tests that do not stop theirs."""
    with TritonServer(repo, log_path=repo.parent / "tritonserver.log") as server:
        yield server


@pytest.fixture(scope="module")
def clean(world: Any, served: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Clean]:
    """The fault-free audit of a model (straight to the server, with a ledger), cached."""
    cache: dict[tuple[str, ...], Clean] = {}
    root = tmp_path_factory.mktemp("clean")

    def get(model: str, *extra: str) -> Clean:
        key = (model, *extra)
        if key not in cache:
            ledger = root / f"{len(cache)}.jsonl"
            r = run(*audit_args(world, served.url(model, "http"), *extra, "--json", "--ledger", ledger))
            assert r.exit_code in (0, 1, 3), r.output
            cache[key] = Clean(r.exit_code, json.loads(r.stdout), ledger_answers(ledger))
            assert len(cache[key].records) >= 4 * BATCH, "the audit must be long enough to fault midway"
        return cache[key]

    return get


def assert_same_audit(got: dict[str, Any], ledger: Path, expected: Clean) -> None:
    """Same verdict and trajectory as the fault-free audit; the same points answered, each once."""
    assert got["verdict"] == expected.result["verdict"]
    assert got["trajectory"] == expected.result["trajectory"]
    held = ledger_answers(ledger)
    assert held == expected.records, "points lost, added or reordered"
    assert len(set(held)) == len(held), "a point recorded twice"


def charged(c: Counters) -> int:
    """Samples sent to the proxy, answered or not: what the budget must have been charged."""
    return c.forwarded_samples + c.faulted_samples


# ---------------------------------------------------------------------------------------------
# Faults the retries absorb


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", ["429", "503", "drop", "stall"])
def test_faults_within_the_retries_cost_budget_not_answers(
    world: Any, served: TritonServer, clean: Callable[..., Clean], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    protocol: str, kind: str,
) -> None:
    expected = clean("pirate")
    ledger = tmp_path / "ledger.jsonl"
    caplog.set_level(logging.INFO, logger="deepcore_auditor.auditor.channel")
    with proxy_for(protocol, served) as proxy:
        proxy.add(Fault(kind, count=2, after=1, retry_after_s=1, stall_s=3 * TIMEOUT_S))  # batch 2 answered on its 3rd attempt
        start = time.monotonic()
        r = run(*audit_args(world, proxy.url("pirate"), "--json", "--ledger", ledger, "--retries", "3", "--request-timeout", TIMEOUT_S))
        elapsed = time.monotonic() - start
        c = proxy.counters
    assert r.exit_code == expected.code, r.output
    got = json.loads(r.stdout)
    assert_same_audit(got, ledger, expected)
    assert (c.faulted_requests, c.faulted_samples) == (2, 2 * BATCH)
    assert c.forwarded_samples == c.answered_samples == len(expected.records), "the server was asked a point twice"
    # Every attempt is charged: the answered points plus the two failed attempts of batch 2.
    assert got["queries_used"] == expected.result["queries_used"] + 2 * BATCH == charged(c) <= BUDGET
    # Backoff happened: two retries announced, 0.5 s then 1 s, and the proxy saw the gaps.
    assert retry_delays(caplog) == [BACKOFF_S, 2 * BACKOFF_S]
    times = [t for t, _ in c.attempts]
    kinds = [k for _, k in c.attempts]
    assert kinds[:4] == ["ok", kind, kind, "ok"], kinds
    assert times[2] - times[1] >= BACKOFF_S and times[3] - times[2] >= 2 * BACKOFF_S
    if kind == "stall":  # each stalled attempt waited out --request-timeout, no longer
        assert times[2] - times[1] >= TIMEOUT_S + BACKOFF_S and times[3] - times[2] >= TIMEOUT_S + 2 * BACKOFF_S
        assert elapsed < 2 * TIMEOUT_S + 3 * BACKOFF_S + 10


def test_a_rate_limited_endpoint_gets_the_backoff_asked_for(
    world: Any, served: TritonServer, clean: Callable[..., Clean], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    expected = clean("pirate")
    caplog.set_level(logging.INFO, logger="deepcore_auditor.auditor.channel")
    with proxy_for("http", served) as proxy:
        proxy.add(Fault("429", count=2, after=1))
        r = run(*audit_args(world, proxy.url("pirate"), "--json", "--ledger", tmp_path / "l.jsonl", "--retry-backoff", "0.8"))
        times = [t for t, _ in proxy.counters.attempts]
    assert r.exit_code == expected.code, r.output
    assert retry_delays(caplog) == [0.8, 1.6]
    assert times[2] - times[1] >= 0.8 and times[3] - times[2] >= 1.6


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retries_never_charge_past_the_budget(world: Any, served: TritonServer, clean: Callable[..., Clean], tmp_path: Path, protocol: str) -> None:
    expected = clean("pirate")
    ledger = tmp_path / "ledger.jsonl"
    budget = 3 * BATCH
    with proxy_for(protocol, served) as proxy:
        proxy.add(Fault("429", count=2, after=1))  # batch 2 fails twice: the third attempt would pass the budget
        r = run(*audit_args(world, proxy.url("pirate"), "--json", "--ledger", ledger, "--retries", "3", "--budget", budget))
        c = proxy.counters
    assert r.exit_code == 3, r.output
    got = json.loads(r.stdout)
    assert got["verdict"] == "inconclusive" and got["queries_used"] == budget == charged(c)
    assert any("budget" in note for note in got["notes"]), got["notes"]
    assert (c.faulted_requests, c.forwarded_samples) == (2, BATCH), "a third attempt was sent past the budget"
    assert ledger_answers(ledger) == expected.records[:BATCH]


# ---------------------------------------------------------------------------------------------
# Faults that outlast the retries: one line, then --resume


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rate_limit_outlasting_the_retries_then_resume_asks_nothing_twice(
    world: Any, served: TritonServer, clean: Callable[..., Clean], tmp_path: Path, protocol: str
) -> None:
    expected = clean("pirate")
    ledger = tmp_path / "ledger.jsonl"
    args = ("--json", "--ledger", ledger, "--retries", "2")
    with proxy_for(protocol, served) as proxy:
        proxy.add(Fault("429", count=2, after=2))  # batches 1-2 answered, both attempts of batch 3 refused
        r = run(*audit_args(world, proxy.url("pirate"), *args))
        first = proxy.counters
        line = one_line_error(r, "rate limit exceeded", CAUSE[(protocol, "429")], "--resume")
        held = len(ledger_answers(ledger))
        assert held == 2 * BATCH and f"the ledger {ledger} holds {held} answered queries" in line, line
        assert (first.answered_samples, first.faulted_requests) == (held, 2)

        assert proxy.pending_faults() == 0  # the limit is over: resume on the same URL
        report = tmp_path / "report.json"
        r = run(*audit_args(world, proxy.url("pirate"), *args, "--resume", "--report", report))
        second = proxy.counters
    assert r.exit_code == expected.code, r.output
    got = json.loads(r.stdout)
    assert_same_audit(got, ledger, expected)
    assert got["replayed_from_ledger"] == held
    resumed = second.forwarded_samples - first.forwarded_samples
    assert resumed == second.answered_samples - first.answered_samples == len(expected.records) - held, "resume asked a held point"
    assert second.faulted_requests == 2
    # Charged exactly: the points held and asked plus the two refused attempts; never past the budget.
    assert got["queries_used"] == held + resumed + 2 * BATCH <= BUDGET
    # The report of the resumed audit stands on its own: replayed from its ledger, it verifies.
    v = verify_report(report, ledger_path=ledger)
    assert (v.verdict, v.queries_used) == (got["verdict"], got["queries_used"])


def restart_behind(proxy: Any, protocol: str, old: TritonServer, new: TritonServer) -> None:
    """Kill `old`, start `new` (other ports) and point the proxy at it: the URL stays the same."""
    old.kill()
    new.start()
    proxy.retarget(new.http_port if protocol == "http" else new.grpc_port)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stall_past_the_request_timeout_ends_in_bounded_time_then_resume_after_a_restart(
    world: Any, repo: Path, clean: Callable[..., Clean], tmp_path: Path, protocol: str
) -> None:
    """A hung server: each attempt times out, the audit stops within timeout x attempts + backoff;
    the server is then killed and restarted on other ports behind the same URL, and resumed."""
    expected = clean("pirate")
    ledger = tmp_path / "ledger.jsonl"
    attempts = 2
    args = ("--json", "--ledger", ledger, "--retries", attempts, "--request-timeout", TIMEOUT_S, "--connect-timeout", 5)
    old = TritonServer(repo, log_path=tmp_path / "old.log")
    new = TritonServer(repo, log_path=tmp_path / "new.log")
    try:
        old.start()
        with proxy_for(protocol, old) as proxy:
            proxy.add(Fault("stall", count=1000, after=2, stall_s=120))  # from batch 3 on, nothing comes back
            start = time.monotonic()
            r = run(*audit_args(world, proxy.url("pirate"), *args))
            elapsed = time.monotonic() - start
            first = proxy.counters
            line = one_line_error(r, CAUSE[(protocol, "stall")], "--resume")
            held = len(ledger_answers(ledger))
            assert held == 2 * BATCH and f"holds {held} answered queries" in line, line
            assert first.faulted_requests == attempts and first.answered_samples == held
            wait_s = attempts * TIMEOUT_S + BACKOFF_S * (2 ** (attempts - 1) - 1)  # the timeouts and the backoff between them
            assert wait_s <= elapsed < wait_s + 8, f"the audit took {elapsed:.1f} s for {wait_s:.1f} s of timeouts and backoff"

            restart_behind(proxy, protocol, old, new)
            proxy.clear_faults()
            r = run(*audit_args(world, proxy.url("pirate"), *args, "--resume"))
            second = proxy.counters
            asked_again = served_samples(new, "pirate")
    finally:
        old.kill()
        new.kill()
    assert r.exit_code == expected.code, r.output
    got = json.loads(r.stdout)
    assert_same_audit(got, ledger, expected)
    assert got["replayed_from_ledger"] == held
    assert second.answered_samples - first.answered_samples == asked_again == len(expected.records) - held
    assert second.faulted_requests == first.faulted_requests, "faults after clear_faults()"


# ---------------------------------------------------------------------------------------------
# A restart the retries ride out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_restart_behind_the_same_url_is_ridden_out_by_the_retries(
    world: Any, repo: Path, clean: Callable[..., Clean], tmp_path: Path, protocol: str
) -> None:
    """The server dies with batch 3 in flight and comes back on other ports behind the same URL
    while the auditor backs off: the audit finishes in one run, with the fault-free answers."""
    extra = ("--budget", "100")  # room for the attempts the restart costs
    expected = clean("pirate", *extra)
    ledger = tmp_path / "ledger.jsonl"
    old = TritonServer(repo, log_path=tmp_path / "old.log")
    new = TritonServer(repo, log_path=tmp_path / "new.log")
    outcome: dict[str, Any] = {}
    try:
        old.start()
        with proxy_for(protocol, old) as proxy:
            proxy.add(Fault("hold", count=1, after=2))  # batch 3 waits at the proxy

            def audit() -> None:
                outcome["result"] = run(*audit_args(world, proxy.url("pirate"), *extra, "--json", "--ledger", ledger, "--retries", "7"))

            auditor = threading.Thread(target=audit, daemon=True)
            auditor.start()
            assert proxy.held.wait(60), "batch 3 never reached the proxy"
            old.kill()
            proxy.release()  # batch 3 goes on to the dead server: 502 / UNAVAILABLE, and the retries start
            restart_behind(proxy, protocol, old, new)
            auditor.join(timeout=120)
            assert not auditor.is_alive(), "the audit hangs"
            c = proxy.counters
            after_restart = served_samples(new, "pirate")
    finally:
        old.kill()
        new.kill()
    r = outcome["result"]
    assert r.exit_code == expected.code, r.output
    got = json.loads(r.stdout)
    assert_same_audit(got, ledger, expected)
    failed = c.forwarded_requests - c.answered_requests  # attempts that met the dead server or none
    assert failed >= 1 and c.faulted_requests == 0
    assert c.answered_samples == len(expected.records)
    assert after_restart == len(expected.records) - 2 * BATCH, "a point answered before the restart was asked again"
    assert got["queries_used"] == expected.result["queries_used"] + failed * BATCH == charged(c) <= 100
