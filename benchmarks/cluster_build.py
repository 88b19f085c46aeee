"""Build time on a Ray cluster against the plain run (not a test of the suite): `deepcore
fingerprint` and `deepcore bench` run twice each, plainly and with `--ray` on a local cluster
started here (benchmarks.local_ray), each from an empty cache so that every model trains; prints
the wall times, checks that both runs wrote the same files, and projects a cluster of N workers.

On this 2-core machine a cluster has the same two cores as the plain run: it can only show
Ray's overhead, never a speed-up. The projection says what N workers (each with this run's torch
threads, which the tasks need for identical weights: auditor.cluster) would do, from the measured
per-task times: the part that stays on the driver (loading, the owner's radius, the core points'
growth, the benchmark's fingerprints and audits) plus the zoo's training spread over N workers,
never shorter than its longest task, plus the overhead measured here:

    wall(N) ~ driver + max(longest task, sum of tasks / N) + overhead

    python -m deepcore_auditor.benchmarks.cluster_build --owner OWNER.pt --data DATA.npz [-- FINGERPRINT OPTIONS]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.files import write_json
from deepcore_auditor.benchmarks.local_ray import local_cluster

BENCH = ["--data", "fashion-mnist", "--members", "1", "--epochs", "2", "--train-samples", "1500", "--points", "10",
         "--candidates", "200", "--epsilon", "0.3", "--budgets", "5,10", "--methods", "deepcore-agreement", "--seed", "5"]
WORKERS = (1, 2, 4, 8, 16, 32)
_TRAINED = re.compile(r"^  (\S+): held-out accuracy .*\(([\d.]+) s\)$")


def _run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "deepcore_auditor", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"deepcore {args[0]} failed: {r.stderr[-2000:]}")
    return wall, r.stderr


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _projection(driver: float, tasks: list[float], overhead: float) -> dict[str, float]:
    return {str(n): round(driver + max(max(tasks, default=0.0), sum(tasks) / n) + max(overhead, 0.0), 1) for n in WORKERS}


def fingerprint(owner: str, data: str, options: list[str], address: str, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Both builds; the per-model times are the plain build's ('(N s)' of each model's line)."""
    runs: dict[str, Any] = {}
    for name, more in (("plain", []), ("ray", ["--ray", address])):
        out = work / f"fp-{name}.json"
        wall, said = _run(["fingerprint", "--owner", owner, "--data", data, "--out", str(out), "--cache-dir",
                           str(work / f"cache-fp-{name}"), *options, *more], env)
        runs[name] = {"wall_s": round(wall, 1), "sha256": _digest(out), "said": said}
    tasks = [float(m.group(2)) for line in runs["plain"]["said"].splitlines() if (m := _TRAINED.match(line))]
    overhead = runs["ray"]["wall_s"] - runs["plain"]["wall_s"]
    driver = runs["plain"]["wall_s"] - sum(tasks)
    return {"plain_s": runs["plain"]["wall_s"], "ray_s": runs["ray"]["wall_s"], "overhead_s": round(overhead, 1),
            "same_file": runs["plain"]["sha256"] == runs["ray"]["sha256"], "sha256": runs["plain"]["sha256"],
            "tasks": len(tasks), "task_s_sum": round(sum(tasks), 1), "task_s_max": max(tasks, default=0.0),
            "driver_s": round(driver, 1), "projected_s_by_workers": _projection(driver, tasks, overhead)}


def bench(address: str, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Both benchmark runs; the per-member times are the plain run's zoo (its meta.json)."""
    runs: dict[str, Any] = {}
    for name, more in (("plain", []), ("ray", ["--ray", address])):
        # One cache path for both runs (the first moved aside after): the benchmark's fingerprints
        # name the owner's file, whose path holds the cache's.
        cache = work / "cache-bench"
        wall, _ = _run(["bench", *BENCH, "--out", str(work / f"bench-{name}"), "--cache-dir", str(cache), *more], env)
        cache = cache.rename(work / f"cache-bench-{name}")
        (zoo,) = (cache / "bench").iterdir()
        files = {p.name: _digest(p) for p in sorted(zoo.iterdir()) if p.suffix in (".onnx", ".pt", ".json") and p.name != "meta.json"}
        runs[name] = {"wall_s": round(wall, 1), "files": files, "meta": json.loads((zoo / "meta.json").read_text())}
    members = [v["train_s"] for v in runs["plain"]["meta"]["members"].values() if v.get("family") not in ("int8", "fp16")]
    overhead = runs["ray"]["wall_s"] - runs["plain"]["wall_s"]
    driver = runs["plain"]["wall_s"] - sum(members)
    return {"plain_s": runs["plain"]["wall_s"], "ray_s": runs["ray"]["wall_s"], "overhead_s": round(overhead, 1),
            "same_files": runs["plain"]["files"] == runs["ray"]["files"], "files": len(runs["plain"]["files"]),
            "files_differing": sorted(k for k in runs["plain"]["files"] if runs["plain"]["files"][k] != runs["ray"]["files"].get(k)),
            "tasks": len(members), "task_s_sum": round(sum(members), 1), "task_s_max": max(members, default=0.0),
            "driver_s": round(driver, 1), "projected_s_by_workers": _projection(driver, members, overhead)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--owner", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--no-bench", action="store_true", help="time the fingerprint build only")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    ap.add_argument("options", nargs="*", help="more `deepcore fingerprint` options (after --)")
    a = ap.parse_args(argv)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1765000000", "RAY_USAGE_STATS_ENABLED": "0"}
    with tempfile.TemporaryDirectory(prefix="cluster-build-") as d, local_cluster(cpus=os.cpu_count() or 2) as address:
        work = Path(d)
        result: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, no GPU; local Ray cluster of one node",
                                  "fingerprint_options": a.options}
        result["fingerprint"] = fingerprint(a.owner, a.data, a.options, address, work, env)
        print(json.dumps({"fingerprint": result["fingerprint"]}, indent=1), flush=True)
        if not a.no_bench:
            result["bench"] = {"options": BENCH, **bench(address, work, env)}
            print(json.dumps({"bench": result["bench"]}, indent=1), flush=True)
    if a.out:
        write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
