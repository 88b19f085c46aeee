"""Load test (not a test of the suite): N `deepcore audit` processes at once against one local
Triton server, N in 1, 4, 8, 16; prints one row per N.

Audit i asks the pirated suspect (i even) or the independent one (i odd), over HTTP
(i // 2 even) or gRPC, in query order (seed) i // 4; each has its own ledger and its own
counting proxy (tests/fault_proxy.py, no faults) in front of the one server, so that what
each audit sent is known exactly. Before the rows, every audit configuration is run alone once:
under load, each audit must reach the same verdict and ledger.

Columns: wall time of the burst; queries charged (sum of `queries_used`) per second of wall
time; p50/p95 audit latency (process start to exit, Python start-up included) and p50 of the
audit loop alone (the result's `elapsed_s`: queries and test, once the suspect is open);
audits whose verdict, trajectory or ledger differ from the alone run; ledger entries lost
(answered by the server but in no ledger, or held alone but not under load); duplicated
entries; budget overruns (audits that sent, or were charged, more samples than --budget).

    python -m deepcore_auditor.benchmarks.load_test [--audits 1,4,8,16] [--budget 60] [--batch-size 5]
    python -m deepcore_auditor.benchmarks.load_test --fingerprint FP --pirate P.onnx --independent I.onnx

Without files it uses the demo's cached models (`deepcore demo` makes them; the first run
trains them, minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository
from deepcore_auditor.benchmarks.fault_proxy import GrpcFaultProxy, HttpFaultProxy, ledger_answers, served_samples

MODELS = ("pirate", "independent")


@dataclass(frozen=True)
class Job:
    model: str
    protocol: str
    seed: int


@dataclass(frozen=True)
class Done:
    code: int
    result: dict[str, Any]
    records: list[tuple[str, bool]]
    latency_s: float
    sent: int  # samples that reached this audit's proxy
    answered: int  # samples the server answered through it


def job(i: int) -> Job:
    return Job(MODELS[i % 2], ("http", "grpc")[i // 2 % 2], i // 4)






def run_audits(jobs: list[Job], server: TritonServer, fingerprint: Path, a: argparse.Namespace, work: Path) -> tuple[list[Done], float]:
    """Start one audit process per job at once (each behind its own proxy); wait for all."""
    proxies = [HttpFaultProxy(server.http_port) if j.protocol == "http" else GrpcFaultProxy(server.grpc_port, max_workers=8) for j in jobs]
    ledgers = [work / f"{k}.jsonl" for k in range(len(jobs))]
    finished: list[tuple[int, str, str, float]] = [(0, "", "", 0.0)] * len(jobs)

    def one(k: int) -> None:
        j, proxy = jobs[k], proxies[k]
        cmd = [sys.executable, "-m", "deepcore_auditor", "audit", "--fingerprint", str(fingerprint), "--suspect", proxy.url(j.model),
               "--budget", str(a.budget), "--batch-size", str(a.batch_size), "--seed", str(j.seed),
               "--concurrency", str(a.concurrency), "--json", "--ledger", str(ledgers[k]),
               "--report", str(ledgers[k].with_suffix(".report.json"))]  # each audit writes its report, as users' do
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        finished[k] = (p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    try:
        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(jobs))]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        done = []
        for k, proxy in enumerate(proxies):
            code, out, err, latency = finished[k]
            if code not in (0, 1, 3):
                raise SystemExit(f"audit {k} failed (exit {code}): {err.strip()}")
            c = proxy.counters
            done.append(Done(code, json.loads(out), ledger_answers(ledgers[k]), latency, c.forwarded_samples + c.faulted_samples, c.answered_samples))
        return done, wall
    finally:
        for proxy in proxies:
            proxy.close()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation, as numpy's default."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def models(a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(fingerprint, pirated suspect, independent suspect): given, or the demo's cached ones."""
    if a.fingerprint or a.pirate or a.independent:
        if not (a.fingerprint and a.pirate and a.independent):
            raise SystemExit("give --fingerprint, --pirate and --independent together")
        return Path(a.fingerprint), Path(a.pirate), Path(a.independent)
    from deepcore_auditor.auditor.demo import RECIPE, SUSPECTS, prepare
    from deepcore_auditor.fingerprints.data import default_cache_dir

    cache = Path(a.cache_dir or default_cache_dir()) / RECIPE
    _, paths, _ = prepare(cache, lambda m: print(m, file=sys.stderr))
    pirate = next(r.name for r in SUSPECTS if r.truth == "piracy")
    independent = next(r.name for r in SUSPECTS if r.truth == "independent")
    return cache / "fingerprint.json", paths[pirate], paths[independent]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audits", default="1,4,8,16", help="comma-separated numbers of audits run at once")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight per audit")
    ap.add_argument("--fingerprint", type=Path)
    ap.add_argument("--pirate", type=Path, help="ONNX file of a pirated suspect")
    ap.add_argument("--independent", type=Path, help="ONNX file of an independent suspect")
    ap.add_argument("--cache-dir", type=Path, help="the demo's cache (without --fingerprint)")
    a = ap.parse_args()
    levels = [int(n) for n in a.audits.split(",")]
    fingerprint, pirate, independent = models(a)

    with tempfile.TemporaryDirectory(prefix="deepcore-load-") as tmp:
        work = Path(tmp)
        repo = write_model_repository({"pirate": pirate, "independent": independent}, work / "repository")
        with TritonServer(repo, log_path=work / "tritonserver.log") as server:
            jobs = [job(i) for i in range(max(levels))]
            alone: dict[Job, Done] = {}
            for k, j in enumerate(dict.fromkeys(jobs)):  # each configuration alone, one after the other
                (work / f"alone-{k}").mkdir()
                alone[j] = run_audits([j], server, fingerprint, a, work / f"alone-{k}")[0][0]
            print(f"one tritonserver {server.http_address}, {len(alone)} audit configurations run alone first; "
                  f"budget {a.budget}, batch {a.batch_size}, {a.concurrency} requests in flight per audit")
            print(f"{'audits':>6} {'wall s':>7} {'queries':>8} {'q/s':>7} {'p50 s':>6} {'p95 s':>6} {'loop p50':>8} "
                  f"{'differ':>6} {'lost':>5} {'dup':>4} {'overruns':>8}")
            for n in levels:
                out = work / f"n{n}"
                out.mkdir()
                before = served_samples(server)
                done, wall = run_audits(jobs[:n], server, fingerprint, a, out)
                served = served_samples(server) - before
                queries = sum(d.result["queries_used"] for d in done)
                differ = sum(
                    (d.result["verdict"], d.result["trajectory"], d.records)
                    != (alone[j].result["verdict"], alone[j].result["trajectory"], alone[j].records)
                    for j, d in zip(jobs, done, strict=False)
                )
                entries = sum(len(d.records) for d in done)
                lost = sum(sum((Counter(alone[j].records) - Counter(d.records)).values()) for j, d in zip(jobs, done, strict=False))
                lost += max(0, served - entries) + sum(max(0, d.answered - len(d.records)) for d in done)
                dup = sum(len(d.records) - len(set(d.records)) for d in done)
                overruns = sum(d.sent > a.budget or d.result["queries_used"] > a.budget for d in done)
                latencies = [d.latency_s for d in done]
                loops = [float(d.result["elapsed_s"]) for d in done]
                print(f"{n:>6} {wall:>7.2f} {queries:>8} {queries / wall:>7.1f} {percentile(latencies, 0.5):>6.2f} "
                      f"{percentile(latencies, 0.95):>6.2f} {percentile(loops, 0.5):>8.2f} {differ:>6} {lost:>5} {dup:>4} {overruns:>8}")


if __name__ == "__main__":
    main()
