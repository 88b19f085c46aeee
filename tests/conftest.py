"""Shared fixtures: the small real world (tests/small_world.py: a Fashion-MNIST owner, pirated
and independent suspects exported to ONNX, a scaled-down fingerprint) and CLI helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepcore_auditor.benchmarks.local_ray import local_cluster
from deepcore_auditor.benchmarks.small_world import TINY, World, build_world
from deepcore_auditor.fingerprints.data import load_data

__all__ = ["TINY", "World", "audit_args", "one_line_error", "process_error_line", "run_deepcore", "sigint_as_in_a_terminal"]


def audit_args(world: "World", suspect: object, *extra: str) -> list[str]:
    """`deepcore audit` arguments for a world suspect, budget 60 in batches of 5."""
    return ["audit", "--fingerprint", str(world.fingerprint), "--suspect", str(suspect), "--budget", "60", "--batch-size", "5", *extra]


def one_line_error(result: Any, *words: str) -> str:
    """Assert a CLI result is the project's one-line error (exit 2) naming `words`."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepcore: error: "), result.output
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def run_deepcore(*args: object, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`python -m deepcore_auditor ARGS` as a process of its own: the exit status and streams a
    user's shell sees (keyword arguments go to `subprocess.run`; both streams piped unless given)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("timeout", 300)
    return subprocess.run([sys.executable, "-m", "deepcore_auditor", *map(str, args)], text=True, **kw)


def sigint_as_in_a_terminal() -> None:
    """For `preexec_fn`: in the child, before exec, SIGINT handled by default and not blocked,
    whatever the test runner's state. A signal mask or an ignored SIGINT is inherited across exec
    (a runner started in the background by a non-interactive shell ignores SIGINT, and Python then
    installs no KeyboardInterrupt handler): tests that send Ctrl-C saw the audit run on as if it
    never came."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def process_error_line(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """`one_line_error` for a `run_deepcore` process: exit 2, one line on stderr naming `words`."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepcore: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def fmnist():
    return load_data("fashion-mnist")


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, fmnist) -> World:
    # DEEPCORE_TEST_WORLD=DIR keeps the world between runs while developing; .ci/run sets it to a new
    # directory so that its core-install job can audit the same world after the suite.
    keep = os.environ.get("DEEPCORE_TEST_WORLD")
    return build_world(Path(keep) if keep else tmp_path_factory.mktemp("world"), fmnist)


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded data and trained known models go to a temporary cache, not the home: every run
    trains its own models, so the suite's verdicts are asserted on models today's code trained."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPCORE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session", autouse=True)
def reports_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Audits keep a report by default: the suite's go to a temporary directory, not the home."""
    path = tmp_path_factory.mktemp("reports")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPCORE_REPORTS", str(path))
        yield path


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A real local Ray cluster (benchmarks.local_ray: `ray start --head`, 2 CPUs, on 127.0.0.1),
    one a module that asks for it; always stopped."""
    with local_cluster(cpus=2) as address:
        yield address
