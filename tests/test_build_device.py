"""Where a fingerprint is built (`deepcore fingerprint --device auto|cpu|cuda`, BuildConfig.device).

No GPU runs the suite: these pin the CPU path (the same seed gives the same points, whatever the
device's name, and the device is in no cache key or recorded parameter) and the refusals;
`scripts/gpu-check` compares CUDA with the CPU on a machine that has a GPU.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import one_line_error
from torch import nn

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.fingerprints.build import build_device, build_fingerprint, training_inputs
from deepcore_auditor.fingerprints.config import BuildConfig, CoreConfig, KnownModelSpec
from deepcore_auditor.fingerprints.model_cache import state_bytes
from deepcore_auditor.fingerprints.models import Normalized, TrainConfig, train

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: cuda is not refused")

# Every recipe the zoo has, on models small enough that a whole build takes about a second.
ZOO = (KnownModelSpec("sim-fine-tune", "piracy", "fine-tune", "selection"),
       KnownModelSpec("sim-prune", "piracy", "prune", "selection"),
       KnownModelSpec("sim-adv-fine-tune", "piracy", "adv-fine-tune", "selection"),
       KnownModelSpec("sim-distill", "piracy", "distill", "selection"),
       KnownModelSpec("sim-extract-mlp", "piracy", "extract", "selection", "mlp"),
       KnownModelSpec("ref-same-arch-1", "independent", "same-arch", "selection"),
       KnownModelSpec("ref-same-arch-2", "independent", "same-arch", "selection", recipe="sgd"),
       KnownModelSpec("cal-same-arch-1", "independent", "same-arch", "calibration"),
       KnownModelSpec("cal-mlp", "independent", "other-arch", "calibration", "mlp"))
CONFIG = BuildConfig(core=CoreConfig(n_candidates=40, n_points=10, steps=15, batch_size=20, min_confidence=0.6), zoo=ZOO,
                     epochs=1, train_samples=2000, device="cpu")
CLASSES = [str(i) for i in range(4)]


@pytest.fixture(scope="module")
def tiny():
    """Four classes of 8x8 images (a brighter quadrant in noise) and a small MLP owner."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2400)
    x = rng.uniform(0, 0.7, (2400, 1, 8, 8)).astype(np.float32)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 0.3
    x = np.clip(x, 0, 1).astype(np.float32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    owner = train(Normalized(net, InputConvention("NCHW", 1.0, (0.5,), (0.3,))), x, y, TrainConfig(epochs=4, seed=0))
    return owner, x, y


def _build(tiny, config: BuildConfig, **kw):
    owner, x, y = tiny
    return build_fingerprint(owner, x, y, CLASSES, {"name": "o"}, config, require_separable=False, **kw)


def _same(a, b) -> None:
    assert len(a) > 0
    assert np.array_equal(a.points, b.points) and np.array_equal(a.owner_labels, b.owner_labels)
    assert np.array_equal(a.owner_probs, b.owner_probs)
    for ma, mb in zip(a.known_models, b.known_models, strict=True):
        assert ma.name == mb.name and np.array_equal(ma.labels, mb.labels) and np.array_equal(ma.owner_prob, mb.owner_prob)


def test_the_same_seed_builds_the_same_points_on_the_cpu_and_the_device_is_in_no_key(tiny, tmp_path, caplog):
    """Two CPU builds with one seed give bit-identical points and answers (the device is chosen by
    moving models, and every seed is still drawn on the CPU); `--device auto` on a machine
    without a GPU is that same CPU build. The device used is recorded in `extra`, never in the
    recorded parameters (the benchmark's cache tags) nor in the known-model cache's keys: a build
    under another device name reuses every cached model."""
    first = _build(tiny, CONFIG, cache_dir=tmp_path)
    again = _build(tiny, CONFIG)  # trained afresh, no cache
    _same(first, again)
    assert first.extra["build_device"] == "cpu" and "device" not in first.method["params"]
    assert CONFIG.to_dict() == dataclasses.replace(CONFIG, device="cuda").to_dict()
    for spec in ZOO:
        assert training_inputs(spec, CONFIG) == training_inputs(spec, dataclasses.replace(CONFIG, device="cuda"))
    if torch.cuda.is_available():
        return  # auto is cuda there: scripts/gpu-check compares the two
    with caplog.at_level(logging.INFO, logger="deepcore_auditor.fingerprints.model_cache"):
        auto = _build(tiny, dataclasses.replace(CONFIG, device="auto"), cache_dir=tmp_path)
    assert sum("reusing the model trained before" in r.getMessage() for r in caplog.records) == len(ZOO)
    _same(first, auto)
    assert auto.extra["build_device"] == "cpu"
    assert next(iter(tiny[0].parameters())).device.type == "cpu"  # the caller's owner is where it was


def test_a_build_without_some_members_reuses_the_others_with_their_seeds(tiny, tmp_path, caplog):
    """`without` (benchmarks.zoo_ablation): the members named are neither trained nor used, every
    other one is the whole zoo's model (its seed by position: the cache, keyed by it, serves each
    one), and the file says what was left out; a name not in the zoo is refused before any work."""
    _build(tiny, CONFIG, cache_dir=tmp_path)
    left_out = ("sim-prune", "cal-mlp")
    with caplog.at_level(logging.INFO):
        fp = _build(tiny, CONFIG, cache_dir=tmp_path, without=left_out)
    said = [r.getMessage() for r in caplog.records]
    assert sum("reusing the model trained before" in m for m in said) == len(ZOO) - 2
    assert any(m.startswith("training sim-fine-tune") for m in said)
    assert not any(m.startswith(("training sim-prune", "training cal-mlp")) for m in said)
    assert {m.name for m in fp.known_models} == {z.name for z in ZOO} - set(left_out)
    assert fp.extra["without"] == sorted(left_out)
    with pytest.raises(InputError, match="cannot leave out nope: not in the zoo"):
        _build(tiny, CONFIG, without=("nope",))
    with pytest.raises(TypeError, match="not one string"):
        _build(tiny, CONFIG, without="sim-prune")


def test_members_left_out_are_not_sent_to_be_trained_elsewhere(tiny, tmp_path):
    """With `fan_out` (a Ray cluster's tasks, here a stand-in that trains in this process, as a
    worker does through `ZooWork.train`), the members `without` names are not among the indices
    sent, the others keep their positions (their seeds), and the file is the one built here."""
    asked: list[int] = []

    def fan_out(work, indices):
        asked.extend(indices)
        for i in indices:
            yield i, state_bytes(work.train(tiny[0], i))

    left_out = ("sim-prune", "cal-mlp")
    elsewhere = _build(tiny, CONFIG, without=left_out, fan_out=fan_out)
    assert sorted(asked) == [i for i, z in enumerate(ZOO) if z.name not in left_out]
    _same(elsewhere, _build(tiny, CONFIG, without=left_out))


@no_gpu
def test_cuda_without_a_gpu_is_refused_in_one_line_before_any_work(tmp_path):
    """`--device cuda` on a machine where PyTorch sees no GPU: exit 2, one line naming cuda, before
    the owner is even looked at (it does not exist here) and before anything is trained."""
    out = tmp_path / "fp.json"
    r = CliRunner().invoke(cli, ["fingerprint", "--owner", str(tmp_path / "absent.pt"), "--data", "fashion-mnist",
                                 "--out", str(out), "--device", "cuda"])
    one_line_error(r, "device cuda requested but PyTorch sees no usable CUDA GPU")
    assert not out.exists()
    assert build_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="no usable CUDA GPU"):
        build_fingerprint(nn.Linear(1, 1), np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.int64), ["a"], {},
                          dataclasses.replace(CONFIG, device="cuda"))


def test_an_unknown_device_is_a_usage_error(tmp_path):
    """A device name that is not auto, cpu or cuda: click's usage error (exit 2, one line naming
    the option) from the command, and one line from the library too."""
    r = CliRunner().invoke(cli, ["fingerprint", "--owner", str(tmp_path / "absent.pt"), "--data", "fashion-mnist",
                                 "--out", str(tmp_path / "fp.json"), "--device", "gpu"])
    one_line_error(r, "--device", "'gpu'", "auto", "cpu", "cuda")
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        build_device("gpu")
