"""Many audits at once against one real tritonserver: each gets the answer it gets alone.

Eight `deepcore audit` processes (pirate and independent suspects, HTTP and gRPC, two query
orders), each with its own ledger, run at the same time through counting proxies in front of
one local Triton server, while the proxies refuse a few requests (429 / RESOURCE_EXHAUSTED).
Every audit must reach the verdict, trajectory and ledger it reaches alone, charged exactly its
retried attempts on top; and what the server answered must add up to the ledgers' entries.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import audit_args

from deepcore_auditor.auditor.cli import cli

pytest.importorskip("pytriton", reason="nvidia-pytriton (the test extra) is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository  # noqa: E402
from deepcore_auditor.benchmarks.fault_proxy import Fault, GrpcFaultProxy, HttpFaultProxy, ledger_answers, served_samples  # noqa: E402

BATCH = 5  # audit_args' --batch-size
MODELS = ("pirate", "independent")
AUDITS = 8
WALL_LIMIT_S = 60.0


@dataclass(frozen=True)
class Job:
    model: str
    protocol: str
    seed: int

    def args(self, world: Any, proxies: dict[str, Any], ledger: Path) -> list[str]:
        url = proxies[self.protocol].url(self.model)
        return [str(a) for a in audit_args(world, url, "--seed", self.seed, "--concurrency", 2, "--json", "--ledger", ledger)]


@dataclass(frozen=True)
class Outcome:
    code: int
    result: dict[str, Any]
    records: list[tuple[str, bool]]
    retries: int  # failed attempts the audit retried (from its result's notes)


JOBS = [Job(MODELS[i % 2], ("http", "grpc")[i // 2 % 2], i // 4) for i in range(AUDITS)]






@pytest.fixture(scope="module")
def server(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("load")
    repo = write_model_repository({"pirate": world.pirate_onnx, "independent": world.independent_onnx}, root / "repository")
    with TritonServer(repo, log_path=root / "tritonserver.log") as s:
        yield s


def test_concurrent_audits_each_get_their_alone_answer_and_nothing_is_lost(world: Any, server: TritonServer, tmp_path: Path) -> None:
    with HttpFaultProxy(server.http_port) as http_proxy, GrpcFaultProxy(server.grpc_port) as grpc_proxy:
        proxies = {"http": http_proxy, "grpc": grpc_proxy}

        # Alone: one audit at a time (in process), fault-free.
        alone: dict[Job, Outcome] = {}
        for i, job in enumerate(JOBS):
            ledger = tmp_path / f"alone-{i}.jsonl"
            r = CliRunner().invoke(cli, job.args(world, proxies, ledger))
            assert r.exit_code in (0, 1, 3), r.output
            alone[job] = Outcome(r.exit_code, json.loads(r.stdout), ledger_answers(ledger), 0)
        assert {o.result["verdict"] for o in alone.values()} == {"piracy", "independent"}

        # Together: all at once, as separate processes, with a few requests refused on the way.
        before = {p: proxies[p].counters for p in proxies}
        served_before = served_samples(server)
        for proxy in proxies.values():  # at most 2 faults per proxy: no batch can exhaust --retries 3
            proxy.add(Fault("429", count=2, after=6))
        start = time.monotonic()
        procs = []
        for i, job in enumerate(JOBS):
            cmd = [sys.executable, "-m", "deepcore_auditor", *job.args(world, proxies, tmp_path / f"together-{i}.jsonl")]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = []
        try:
            for p in procs:
                outputs.append(p.communicate(timeout=max(1.0, WALL_LIMIT_S - (time.monotonic() - start))))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        wall = time.monotonic() - start
        after = {p: proxies[p].counters for p in proxies}
        served = served_samples(server) - served_before

    together: dict[Job, Outcome] = {}
    for i, (job, p, (out, err)) in enumerate(zip(JOBS, procs, outputs, strict=False)):
        assert p.returncode in (0, 1, 3), (job, p.returncode, err)
        result = json.loads(out)
        retries = sum(int(m.group(1)) for n in result["notes"] if (m := re.match(r"(\d+) failed attempts were retried", n)))
        together[job] = Outcome(p.returncode, result, ledger_answers(tmp_path / f"together-{i}.jsonl"), retries)

    assert wall < WALL_LIMIT_S
    for job in JOBS:
        got, ref = together[job], alone[job]
        assert (got.code, got.result["verdict"], got.result["trajectory"]) == (ref.code, ref.result["verdict"], ref.result["trajectory"]), job
        assert got.records == ref.records, f"{job}: ledger entries lost, added or reordered under load"
        assert len(set(got.records)) == len(got.records), f"{job}: a ledger entry recorded twice"
        # Every attempt is charged: more than alone exactly when a request was refused; within the budget.
        extra = got.result["queries_used"] - ref.result["queries_used"]
        assert (extra > 0) == (got.retries > 0) and extra >= 0 and got.result["queries_used"] <= 60, (job, extra, got.retries)

    faulted = sum(after[p].faulted_samples - before[p].faulted_samples for p in proxies)
    forwarded = sum(after[p].forwarded_samples - before[p].forwarded_samples for p in proxies)
    answered = sum(after[p].answered_samples - before[p].answered_samples for p in proxies)
    entries = sum(len(o.records) for o in together.values())
    assert sum(o.retries for o in together.values()) == 4 and faulted >= 4 * BATCH
    assert forwarded == answered == served == entries, "the server answered a point no ledger holds, or twice"
    # The charges add up: every answered entry plus every refused sample, nothing else.
    assert sum(o.result["queries_used"] for o in together.values()) == entries + faulted
    assert sum(o.result["queries_used"] - alone[job].result["queries_used"] for job, o in together.items()) == faulted
