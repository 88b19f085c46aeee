"""Mass audits (not a test of the suite): `deepcore audit-many` over N suspects behind a real
local Triton server, with a round-trip latency added to every request; prints one row per run
and writes them as JSON.

The suspects are the demo's fine-tuned copy and its same-architecture independent model,
served once by one tritonserver, and reached through `--endpoints` HTTP relays
(benchmarks.fault_proxy, each adding `latency` seconds to every request, metadata included):
each relay is an endpoint of its own, as distinct deployments are. Pair i audits model i % 2
through relay i % endpoints, in point order (--seed) i, label-only, budget 100. audit-many runs
as a process of its own, so its CPU time and peak memory are its own (the server and the relays
live in this process and the server's).

Columns: suspects, latency, runner (threads, or ray: a local cluster started here with `ray
start --head`), wall seconds, suspects per hour, CPU seconds per suspect (the audit-many process:
user + system; with Ray, the driver only), peak resident memory of that process, median queries,
and whether every verdict is the one the model deserves (the copy piracy, the independent model
independent).

    python -m deepcore_auditor.benchmarks.mass_audit [--suspects 10,100,1000] [--latency 0.1,0.3] [--ray 100,1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.files import write_json
from deepcore_auditor.adapters.triton.serve import ServedModel, TritonServer, write_model_repository
from deepcore_auditor.benchmarks.fault_proxy import HttpFaultProxy
from deepcore_auditor.benchmarks.local_ray import local_cluster

MODELS = {"copy": ("fine-tuned", "piracy"), "indep": ("same-arch-seed-1", "independent")}


def run_once(fp: Path, proxies: list[HttpFaultProxy], n: int, latency: float, out: Path, jobs: int, per_endpoint: int,
             ray: str | None) -> dict[str, Any]:
    for p in proxies:
        p.latency_s = latency
    names = list(MODELS)
    rows = [{"id": f"s{i:05d}", "fingerprint": str(fp), "suspect": proxies[i % len(proxies)].url(names[i % 2]),
             "access": "labels", "budget": 100, "seed": i, "connect_timeout": 30, "request_timeout": 60}
            for i in range(n)]
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "deepcore_auditor", "audit-many", str(manifest), "--out", str(out / "run"),
           "--jobs", str(jobs), "--per-endpoint", str(per_endpoint), "--json", *(["--ray", ray] if ray else [])]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own CPU time and peak memory
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out_f.read(), err_f.read())
    cpu, maxrss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode not in (0, 2) or not last.startswith("{"):
        raise SystemExit(f"audit-many failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-2000:]}")
    if done.stdout.strip() != last:
        print(f"note: audit-many printed more than its JSON on stdout: {done.stdout[:300]!r}", file=sys.stderr)
    pairs = json.loads(last)["pairs"]
    right = sum(p["status"] == MODELS[names[int(p["id"][1:]) % 2]][1] for p in pairs)
    return {"suspects": n, "latency_s": latency, "runner": "ray" if ray else "threads", "jobs": jobs,
            "per_endpoint": per_endpoint, "endpoints": len(proxies), "wall_s": round(wall, 1),
            "suspects_per_hour": round(3600 * n / wall), "cpu_s_per_suspect": round(cpu / n, 4),
            "peak_rss_mib": round(maxrss / 1024), "median_queries": statistics.median(p["queries"] or 0 for p in pairs),
            "right": right, "errors": sum(p["status"] == "error" for p in pairs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suspects", default="10,100,1000")
    ap.add_argument("--latency", default="0.1,0.3", help="seconds added to every request, comma-separated")
    ap.add_argument("--ray", default="100,1000", help="suspect counts also run through a local Ray cluster ('' for none)")
    ap.add_argument("--endpoints", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--per-endpoint", type=int, default=4)
    ap.add_argument("--out", type=Path, help="write the rows here as JSON")
    ap.add_argument("--demo-cache", type=Path, help="a demo cache folder to take the models from [default: the current demo's]")
    a = ap.parse_args(argv)
    from deepcore_auditor.auditor.demo import RECIPE, prepare
    from deepcore_auditor.fingerprints.data import default_cache_dir

    cache = a.demo_cache or Path(default_cache_dir()) / RECIPE
    _, paths, _ = prepare(cache, lambda m: print(m, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="mass-audit-"))
    ray_counts = {int(x) for x in a.ray.split(",") if x.strip()}
    results: list[dict[str, Any]] = []
    try:
        repo = write_model_repository({name: ServedModel(paths[file]) for name, (file, _) in MODELS.items()},
                                      work / "repository", max_batch_size=64)
        with TritonServer(repo, log_path=work / "tritonserver.log") as server, contextlib.ExitStack() as stack:
            proxies = [HttpFaultProxy(server.http_port) for _ in range(a.endpoints)]
            for p in proxies:
                stack.callback(p.close)
            ray_address = stack.enter_context(local_cluster(cpus=2)) if ray_counts else None
            print(f"{'suspects':>8} {'latency':>7} {'runner':>7} {'wall s':>7} {'per hour':>9} {'cpu s/suspect':>13} "
                  f"{'peak MiB':>8} {'queries':>7} {'right':>7}", flush=True)
            for latency in (float(x) for x in a.latency.split(",")):
                for n in (int(x) for x in a.suspects.split(",")):
                    for ray in (None, ray_address) if n in ray_counts else (None,):
                        out = work / f"{n}-{latency}-{'ray' if ray else 'threads'}"
                        out.mkdir()
                        row = run_once(cache / "fingerprint.json", proxies, n, latency, out, a.jobs, a.per_endpoint, ray)
                        results.append(row)
                        print(f"{n:>8} {latency:>7} {row['runner']:>7} {row['wall_s']:>7} {row['suspects_per_hour']:>9} "
                              f"{row['cpu_s_per_suspect']:>13} {row['peak_rss_mib']:>8} {row['median_queries']:>7} "
                              f"{row['right']:>4}/{n}", flush=True)
                        shutil.rmtree(out / "run", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, {"machine": "2 cores, no GPU", "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
