"""`fingerprint --ray` and `bench --ray` on a real local Ray cluster: every model trained as a
task there, and the files written are the local run's, byte for byte (auditor.cluster). Also the
refusals: a cluster nobody answers at, a cluster too small for the run's threads, a bad
SOURCE_DATE_EPOCH. (`audit-many --ray` is in test_many.py.)"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY, one_line_error, process_error_line, run_deepcore

from deepcore_auditor.fingerprints.format import load_fingerprint

# Two threads, as the suite's world was built with (benchmarks/small_world.py): the local run and
# the tasks must train with as many for their weights to be equal.
THREADS = {"OMP_NUM_THREADS": "2", "RAY_USAGE_STATS_ENABLED": "0"}


def world_build_args(world: Any, out: Path, cache: Path) -> list[object]:
    """The `deepcore fingerprint` command that builds the world's fingerprint (small_world.build_world)."""
    return ["fingerprint", "--owner", world.owner_ts, "--data", world.root / "owner-data.npz", "--out", out,
            "--mean", ",".join(map(str, world.convention.mean)), "--std", ",".join(map(str, world.convention.std)),
            "--cache-dir", cache, *TINY]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_fingerprint_built_on_the_cluster_is_the_local_one(world: Any, ray_cluster: str, tmp_path: Path) -> None:
    """Every known model trains as a task (a fresh cache: none is reused), the owner travels as
    its TorchScript file's bytes, and the file written is the world's, digest for digest, once
    it records the same time (SOURCE_DATE_EPOCH). A world kept by DEEPCORE_TEST_WORLD from older
    code fails here: remove it."""
    mine = load_fingerprint(world.fingerprint)
    epoch = int(datetime.datetime.fromisoformat(mine.created).timestamp())
    out = tmp_path / "fp.json"
    r = run_deepcore(*world_build_args(world, out, tmp_path / "cache"), "--ray", ray_cluster, timeout=900,
                     env={**os.environ, **THREADS, "SOURCE_DATE_EPOCH": str(epoch)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"training {len(mine.known_models)} known models as tasks elsewhere (0 cached)" in r.stderr, r.stderr[-3000:]
    theirs = load_fingerprint(out)
    assert theirs.created == mine.created
    assert theirs.digest == mine.digest, "the cluster's fingerprint differs from the world's (a world from older code?)"
    assert sha256(out) == sha256(world.fingerprint)


@pytest.mark.slow
def test_a_benchmark_run_on_the_cluster_writes_the_local_files(ray_cluster: str, tmp_path: Path) -> None:
    """The zoo's members and DeepCore's known models train as tasks; every model file, every
    fingerprint and every figure but the timings are the local run's."""
    args = ["bench", "--data", "fashion-mnist", "--members", "1", "--epochs", "2", "--train-samples", "1500", "--points", "10",
            "--candidates", "200", "--epsilon", "0.3", "--budgets", "5,10", "--methods", "deepcore-agreement", "--seed", "5"]
    env = {**os.environ, **THREADS, "SOURCE_DATE_EPOCH": "1765000000"}
    runs = {}
    for name, more in (("local", []), ("ray", ["--ray", ray_cluster])):
        r = run_deepcore(*args, "--out", tmp_path / name, "--cache-dir", tmp_path / f"cache-{name}", *more, timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        (zoo,) = (tmp_path / f"cache-{name}" / "bench").iterdir()
        files = {p.name: sha256(p) for p in sorted(zoo.iterdir()) if p.suffix in (".onnx", ".pt", ".json") and p.name != "meta.json"}
        runs[name] = (json.loads((tmp_path / name / "results.json").read_text()), files, r.stderr)
    (local, local_files, _), (ray, ray_files, said) = runs["local"], runs["ray"]
    assert "members as tasks elsewhere" in said and "known models as tasks elsewhere" in said, said[-3000:]
    assert ray["runner"] == f"ray {ray_cluster}" and local["runner"] == "local"
    assert len(local_files) > 30 and ray_files == local_files
    timings = ("build_s", "train_s", "audit_s", "run_s", "zoo_build_s", "created_utc", "answer_queries_per_s",
               "audit_queries_per_s", "runner")

    def figures(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: figures(v) for k, v in x.items() if k not in timings}
        return [figures(v) for v in x] if isinstance(x, list) else x

    assert figures(ray) == figures(local)


def test_a_cluster_nobody_answers_at_is_refused_before_the_build(world: Any, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fp.json"
    r = run_deepcore(*world_build_args(world, out, tmp_path / "cache"), "--ray", f"127.0.0.1:{port}", timeout=120)
    assert r.returncode == 2
    process_error_line(r, "Ray cluster", str(port))
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_cluster_with_fewer_cpus_than_the_runs_threads_is_refused(world: Any, ray_cluster: str, tmp_path: Path) -> None:
    """Three threads here, two CPUs a node there: no task could train what the local run would."""
    out = tmp_path / "fp.json"
    r = run_deepcore(*world_build_args(world, out, tmp_path / "cache"), "--ray", ray_cluster, timeout=300,
                     env={**os.environ, **THREADS, "OMP_NUM_THREADS": "3"})
    assert r.returncode == 2
    process_error_line(r, "has 3 CPUs", "OMP_NUM_THREADS")
    assert not out.exists()


@pytest.mark.parametrize("value", ["yesterday", "-5", "1.5"])
def test_a_bad_source_date_epoch_is_one_line(world: Any, tmp_path: Path, value: str) -> None:
    from click.testing import CliRunner

    from deepcore_auditor.auditor.cli import cli

    out = tmp_path / "fp.json"
    result = CliRunner().invoke(cli, [str(a) for a in world_build_args(world, out, tmp_path / "cache")], env={"SOURCE_DATE_EPOCH": value})
    one_line_error(result, "SOURCE_DATE_EPOCH", value)
    assert not out.exists()
