"""`fingerprint --ray` and `bench --ray`'s zoo on a real local Ray cluster: every model trained
as a task there, and the files written are the local run's, byte for byte (auditor.cluster).
Also the refusals: a cluster nobody answers at, a cluster too small for the run's threads, a bad
SOURCE_DATE_EPOCH. (`audit-many --ray` is in test_many.py; `bench --ray` end to end, the
benchmark's DeepCore fingerprint included, is benchmarks/cluster_build.py, whose figures say
whether its files matched.)"""

from __future__ import annotations

import hashlib
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
    """The world's build run twice as `deepcore fingerprint`, plainly and with every known model
    a task (fresh caches: none is reused; the owner travels as its TorchScript file's bytes):
    the two files are equal byte for byte, once they record the same time (SOURCE_DATE_EPOCH)."""
    env = {**os.environ, **THREADS, "SOURCE_DATE_EPOCH": "1765000000"}
    runs = {}
    for name, more in (("local", []), ("ray", ["--ray", ray_cluster])):
        out = tmp_path / f"{name}.json"
        r = run_deepcore(*world_build_args(world, out, tmp_path / f"cache-{name}"), *more, timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (out, r.stderr)
    (local, _), (ray, said) = runs["local"], runs["ray"]
    zoo = len(load_fingerprint(local).known_models)
    assert f"training {zoo} known models as tasks elsewhere (0 cached)" in said, said[-3000:]
    assert load_fingerprint(ray).created == "2025-12-06T05:46:40+00:00"
    assert sha256(ray) == sha256(local)


def test_the_benchmark_zoo_trained_on_the_cluster_is_the_local_one(fmnist: Any, ray_cluster: str, tmp_path: Path) -> None:
    """`bench --ray`'s zoo (benchmarks.zoo.build_zoo with the cluster's map): every member but
    the owner and the int8/fp16 conversions a task; every model file the local run's."""
    from deepcore_auditor.auditor.cluster import RayCluster
    from deepcore_auditor.benchmarks.zoo import ZooConfig, build_zoo

    config = ZooConfig(members=1, epochs=1, train_samples=600, calibration_references=2, seed=5)
    local = build_zoo(fmnist, tmp_path / "local", config)
    said: list[str] = []
    with RayCluster(ray_cluster) as cluster:
        ray = build_zoo(fmnist, tmp_path / "ray", config, said.append, fan_out=cluster.training())
    assert any("members as tasks elsewhere (2 cached or converted here)" in s for s in said), said
    files = {name: {p.name: sha256(p) for p in sorted(zoo.root.iterdir()) if p.suffix in (".onnx", ".pt")}
             for name, zoo in (("local", local), ("ray", ray))}
    assert len(files["local"]) > 25 and files["ray"] == files["local"]


def test_a_cluster_too_small_for_the_runs_threads_is_refused(ray_cluster: str) -> None:
    """Identical weights need the local run's threads: tasks that no node could run are refused
    before any starts, in one line that says how to fix it."""
    from deepcore_auditor.adapters.errors import InputError
    from deepcore_auditor.auditor.cluster import RayCluster

    with RayCluster(ray_cluster) as cluster:
        cluster.require(2)
        with pytest.raises(InputError, match="has 3 CPUs.*OMP_NUM_THREADS"):
            cluster.require(3)
        with pytest.raises(InputError, match="has a GPU"):
            cluster.require(1, gpus=1)
        with pytest.raises(InputError, match="has 3 CPUs"):
            list(cluster.map(sha256, None, [Path("x")], threads=3))


def test_a_cluster_nobody_answers_at_is_refused_before_the_build(world: Any, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fp.json"
    r = run_deepcore(*world_build_args(world, out, tmp_path / "cache"), "--ray", f"127.0.0.1:{port}", timeout=120)
    assert r.returncode == 2
    process_error_line(r, "Ray cluster", str(port))
    assert not out.exists() and not (tmp_path / "cache").exists()
    r = run_deepcore("bench", "--data", "fashion-mnist", "--out", tmp_path / "r", "--ray", f"127.0.0.1:{port}", timeout=120)
    assert r.returncode == 2
    process_error_line(r, "Ray cluster", str(port))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["yesterday", "-5", "1.5"])
def test_a_bad_source_date_epoch_is_one_line(world: Any, tmp_path: Path, value: str) -> None:
    from click.testing import CliRunner

    from deepcore_auditor.auditor.cli import cli

    out = tmp_path / "fp.json"
    result = CliRunner().invoke(cli, [str(a) for a in world_build_args(world, out, tmp_path / "cache")], env={"SOURCE_DATE_EPOCH": value})
    one_line_error(result, "SOURCE_DATE_EPOCH", value)
    assert not out.exists()
