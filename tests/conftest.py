"""A small real world shared by the audit, CLI and pipeline tests: a Fashion-MNIST owner,
pirated and independent suspects exported to ONNX, and a scaled-down fingerprint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapters.base import InputConvention
from fingerprints.data import Dataset, channel_stats, load_data
from fingerprints.models import (
    Normalized,
    TrainConfig,
    build_architecture,
    clone,
    export_onnx,
    predict,
    train,
)

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


# Small enough for the suite, large enough that the verdicts mean something.
TINY = ["--points", "60", "--candidates", "200", "--steps", "60", "--train-samples", "6000", "--epochs", "3"]


@dataclass(frozen=True)
class World:
    root: Path
    owner_ts: Path  # TorchScript of the owner's net (normalized input)
    owner_onnx: Path
    pirate_onnx: Path  # fine-tuned copy
    distilled_onnx: Path
    independent_onnx: Path  # same architecture, other seed and data
    convention: InputConvention
    fingerprint: Path
    test: Dataset


@pytest.fixture(scope="session")
def fmnist():
    return load_data("fashion-mnist")


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, fmnist) -> World:
    from auditor.service import FingerprintRequest, make_fingerprint

    # DEEPCORE_TEST_WORLD=DIR keeps the world between runs while developing (CI never sets it).
    keep = os.environ.get("DEEPCORE_TEST_WORLD")
    root = Path(keep) if keep else tmp_path_factory.mktemp("world")
    tr = fmnist.train
    mean, std = channel_stats(tr)
    conv = InputConvention(mean=mean, std=std)
    names = ("owner", "pirate", "distilled", "independent")
    if keep and (root / "fp.json").is_file():
        return World(root, root / "owner.pt", *(root / f"{n}.onnx" for n in names), conv, root / "fp.json", fmnist.test)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    x, y = tr.points(slice(0, 12000)), tr.y[:12000]
    a, b = slice(0, 6000), slice(6000, 12000)
    shape = tr.shape

    def fresh(seed: int) -> Normalized:
        torch.manual_seed(seed)
        return Normalized(build_architecture("cnn", shape, 10), conv)

    owner = train(fresh(1), x[a], y[a], TrainConfig(epochs=3, seed=1))
    pirate = train(clone(owner), x[b], y[b], TrainConfig(epochs=1, lr=3e-4, seed=2))
    distilled = train(fresh(3), x[b], predict(owner, x[b]), TrainConfig(epochs=3, seed=3))
    independent = train(fresh(4), x[b], y[b], TrainConfig(epochs=3, seed=4))
    owner_ts = root / "owner.pt"
    torch.jit.save(torch.jit.trace(clone(owner.net).eval(), torch.zeros(1, *shape)), str(owner_ts))
    paths = {}
    for name, m in [("owner", owner), ("pirate", pirate), ("distilled", distilled), ("independent", independent)]:
        paths[name] = root / f"{name}.onnx"
        export_onnx(m.net, paths[name], shape)
    data = root / "owner-data.npz"
    np.savez(data, x=tr.x[:6000], y=tr.y[:6000], x_test=fmnist.test.x[:2000], y_test=fmnist.test.y[:2000])
    fp = root / "fp.json"
    args = dict(zip(TINY[::2], TINY[1::2]))
    make_fingerprint(FingerprintRequest(
        owner=str(owner_ts), data=str(data), out=fp, mean=",".join(map(str, mean)), std=",".join(map(str, std)), n_points=int(args["--points"]), candidates=int(args["--candidates"]),
        steps=int(args["--steps"]), train_samples=int(args["--train-samples"]), epochs=int(args["--epochs"]),
    ))
    return World(root, owner_ts, paths["owner"], paths["pirate"], paths["distilled"], paths["independent"], conv, fp, fmnist.test)
