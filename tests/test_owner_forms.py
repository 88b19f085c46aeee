"""Owners in every form a user hands over (eager, TorchScript traced in eval mode and scripted,
torch.export), with BatchNorm: the builder's references must train from them as from the eager
module, and nothing degenerate may reach selection or calibration."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.benchmarks.owners import fmnist_cnn_bn
from deepcore_auditor.fingerprints.calibration import rates
from deepcore_auditor.fingerprints.core import _RADIUS_LADDER, RADIUS_MAX, RADIUS_MIN, choose_epsilon
from deepcore_auditor.fingerprints.format import FingerprintError, load_fingerprint, save_fingerprint
from deepcore_auditor.fingerprints.models import (
    Normalized,
    TrainConfig,
    accuracy,
    batchnorm_trains,
    clone,
    predict,
    reinitialize,
    train,
)
from deepcore_auditor.fingerprints.quality import accuracy_floor, quality_problem

FORMS = ("eager", "traced", "scripted", "pt2")


def _form(net: nn.Module, form: str) -> nn.Module:
    net = clone(net).eval()
    example = torch.zeros(2, 1, 28, 28)
    if form == "traced":
        with torch.no_grad():
            return torch.jit.trace(net, example)
    if form == "scripted":
        return torch.jit.script(net)
    if form == "pt2":
        return torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    return net


@pytest.fixture(scope="module")
def small(fmnist):
    torch.manual_seed(0)
    x, y = fmnist.train.points(slice(0, 3000)), fmnist.train.y[:3000]
    xt, yt = fmnist.test.points(slice(0, 1000)), fmnist.test.y[:1000]
    conv = InputConvention("NCHW", 1.0, (0.286,), (0.353,))
    owner = train(Normalized(fmnist_cnn_bn(), conv), x, y, TrainConfig(epochs=2, seed=0))
    return owner, conv, x, y, xt, yt


@pytest.mark.parametrize("form", FORMS)
def test_reinitialize_gives_every_layer_its_default(small, form):
    """BatchNorm scale 1, shift 0, statistics 0/1 (zeroing the scale made every BatchNorm output
    0); convolution weights fresh, within torch's default bound."""
    owner, conv, *_ = small
    fresh = reinitialize(Normalized(_form(owner.net, form), conv), seed=3)
    state = {k: v for k, v in fresh.net.state_dict().items()}
    old = owner.net.state_dict()
    for name, value in state.items():
        if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
            assert torch.all(value == 0), name
        elif name.endswith("running_var"):
            assert torch.all(value == 1), name
        elif value.dim() == 1 and name.endswith("weight"):
            assert torch.all(value == 1), name
        elif value.dim() > 1:
            bound = 1 / np.sqrt(value[0].numel())
            assert value.abs().max() <= bound + 1e-6 and not torch.equal(value, old[name]), name


def test_frozen_batchnorm_is_detected(small):
    owner, conv, x, *_ = small
    probe = torch.from_numpy(x[:8])
    found = {form: batchnorm_trains(Normalized(_form(owner.net, form), conv), probe) for form in FORMS}
    assert found == {"eager": True, "traced": False, "scripted": True, "pt2": False}


@pytest.mark.parametrize("form", FORMS)
def test_references_train_from_every_owner_form(small, form):
    """The same recipe, seed and data give a healthy reference from every form; before, a
    re-initialized traced BatchNorm owner trained to one predicted class (0.11 accuracy)."""
    owner, conv, x, y, xt, yt = small
    ref = train(reinitialize(Normalized(_form(owner.net, form), conv), seed=5), x, y, TrainConfig(epochs=2, seed=5))
    acc = accuracy(ref, xt, yt)
    assert acc >= accuracy(owner, xt, yt) - 0.15, acc  # 0.379 at 1 epoch, the same in every form
    assert len(np.unique(ref(torch.from_numpy(xt)).argmax(1).numpy())) == 10
    means = [b for n, b in ref.net.named_buffers() if n.endswith("running_mean")]
    assert means and all(float(m.abs().sum()) > 0 for m in means)  # real statistics, kept in the handed form
    kind = {"eager": nn.Sequential, "traced": torch.jit.ScriptModule, "scripted": torch.jit.ScriptModule,
            "pt2": torch.fx.GraphModule}[form]
    assert isinstance(ref.net, kind)  # the form it was handed in (ONNX export and oracles take it as is)


@pytest.mark.parametrize("form", FORMS)
def test_kernels_train_channels_last_and_come_back_contiguous(small, form, tmp_path):
    """`trainable` restrides the convolution kernels of every form to channels-last memory for
    training on the CPU (the faster oneDNN path, benchmarks/train_speed.py) and puts them back,
    also when training fails half-way: state dicts and safetensors (which refuses strided
    tensors) see plain ones."""
    from safetensors.torch import save_file

    from deepcore_auditor.fingerprints.models import trainable

    owner, conv, x, y, *_ = small
    model = reinitialize(Normalized(_form(owner.net, form), conv), seed=6)

    def kernels(net: nn.Module) -> list[torch.Tensor]:
        return [p for p in net.parameters() if p.dim() == 4]

    with trainable(model, x) as handle:
        restrided = kernels(handle.net)
        assert restrided and all(k.is_contiguous(memory_format=torch.channels_last) for k in restrided)
        assert any(not k.is_contiguous() for k in restrided)  # a one-channel kernel is both at once
    assert all(t.is_contiguous() for t in model.state_dict().values())
    with pytest.raises(KeyboardInterrupt), trainable(model, x) as handle:
        raise KeyboardInterrupt
    assert all(t.is_contiguous() for t in list(model.parameters()) + list(handle.net.parameters()))
    train(model, x[:256], y[:256], TrainConfig(epochs=1, seed=6))
    save_file({k: v for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))  # refuses strided tensors


def test_points_grow_through_channels_last_kernels_and_leave_the_models_as_they_came(small):
    """Growing points (core.optimize_points) runs the owner and its known models with their
    kernels in channels-last memory and hands them back contiguous, trainable as they came."""
    from deepcore_auditor.fingerprints.config import CoreConfig
    from deepcore_auditor.fingerprints.core import optimize_points

    owner, conv, x, y, *_ = small
    student = reinitialize(owner, seed=7)
    seen: list[bool] = []
    student.register_forward_pre_hook(
        lambda m, args: seen.append(all(p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() == 4)))
    flags = [p.requires_grad for p in student.parameters()]
    points = optimize_points(owner, [student], [], x[:8], y[:8], CoreConfig(epsilon=0.1, steps=2))
    assert points.shape == x[:8].shape and seen == [True, True]
    assert all(p.is_contiguous() for m in (owner, student) for p in m.parameters())
    assert [p.requires_grad for p in student.parameters()] == flags


def test_a_frozen_model_that_cannot_be_rewritten_is_refused(small):
    """A normalization frozen by hand (running statistics that no train() updates): refused in one
    line that says which forms to give, never trained into a degenerate reference."""
    owner, conv, x, y, *_ = small

    class HandFrozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(1))
            self.register_buffer("running_var", torch.ones(1))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head((t - self.running_mean) / self.running_var.sqrt())

    with pytest.raises(InputError, match="frozen in inference mode.*torch.jit.script.*factory"):
        train(Normalized(HandFrozen(), conv), x[:64], y[:64], TrainConfig(epochs=1))


def test_floors():
    assert accuracy_floor("same-arch", "owner", 0.82, 10) == pytest.approx(0.72)
    assert accuracy_floor("distill", "owner", 0.82, 10) == pytest.approx(0.72)
    assert accuracy_floor("other-arch", "mlp", 0.82, 10) == pytest.approx(0.1 + 0.4 * 0.72)
    assert accuracy_floor("adv-fine-tune", "owner", 0.82, 10) == pytest.approx(0.1 + 0.4 * 0.72)
    assert quality_problem("r", "same-arch", "owner", 0.114, 0.861, 10) is not None
    assert quality_problem("r", "same-arch", "owner", 0.80, 0.861, 10) is None
    assert quality_problem("r", "same-arch", "owner", 0.1, None, 10) is None


def test_choose_epsilon_follows_the_owners_robustness(small):
    owner, _, x, y, *_ = small
    r = choose_epsilon(owner, x[:500], y[:500], 0.9, probes=16, steps=10)
    assert RADIUS_MIN <= r.epsilon <= RADIUS_MAX
    assert r.epsilon == pytest.approx(min(RADIUS_MAX, max(RADIUS_MIN, 3 * r.flip_radius)))
    rates_seen = list(r.success.values())
    assert all(v < 0.5 for v in rates_seen[:-1])  # the ladder stops at the first radius that flips half
    assert rates_seen[-1] >= 0.5 or r.flip_radius == _RADIUS_LADDER[-1]
    # The owner trains afterwards (the zoo's copies start from it): its parameters are left trainable.
    assert all(p.requires_grad for p in owner.parameters())


def _with_quality(fp, name, accuracy):
    known = tuple(dataclasses.replace(m, quality={**m.quality, "accuracy": accuracy}) if m.name == name else m
                  for m in fp.known_models)
    return dataclasses.replace(fp, known_models=known)


def test_calibration_refuses_an_implausible_reference(world, tmp_path):
    fp = load_fingerprint(world.fingerprint)
    assert all(m.quality is not None for m in fp.known_models)
    rates(fp, "agreement")  # the world's own references pass
    bad = _with_quality(fp, "cal-same-arch-1", 0.114)
    with pytest.raises(InputError, match="cal-same-arch-1 .* held-out accuracy 0.114 .* below its floor"):
        rates(bad, "agreement")
    path = tmp_path / "bad.json"
    save_fingerprint(bad, path)
    runner = CliRunner()
    r = runner.invoke(cli, ["audit", "--fingerprint", str(path), "--suspect", str(world.independent_onnx), "--no-report"])
    assert r.exit_code == 2 and "cal-same-arch-1" in r.output and len(r.output.strip().splitlines()) == 1
    i = runner.invoke(cli, ["inspect", str(path), "--json"])
    assert i.exit_code == 0 and json.loads(i.stdout)["calibration"].startswith("refused: ")


def test_quality_round_trips_and_malformed_quality_is_refused(world, tmp_path):
    fp = load_fingerprint(world.fingerprint)
    path = tmp_path / "fp.json"
    save_fingerprint(fp, path)
    again = load_fingerprint(path)
    assert again.digest == fp.digest and [m.quality for m in again.known_models] == [m.quality for m in fp.known_models]
    broken = _with_quality(fp, "cal-mlp", 1.5)
    save_fingerprint(broken, path)
    with pytest.raises(FingerprintError, match="cal-mlp.*malformed quality"):
        load_fingerprint(path)


def test_the_sgd_recipe_trains_a_healthy_reference_and_refuses_an_early_stop(small):
    """The held-out references' second recipe (SGD, one-cycle, translations) learns the task from a
    traced BatchNorm owner; its schedule has a fixed length, so an `until` test is refused."""
    owner, conv, x, y, xt, yt = small
    cfg = TrainConfig(epochs=2, lr=0.05, seed=3, shift=3, optimizer="sgd")
    ref = train(reinitialize(Normalized(_form(owner.net, "traced"), conv), seed=3), x, y, cfg)
    assert accuracy(ref, xt, yt) >= accuracy(owner, xt, yt) - 0.15
    with pytest.raises(ValueError, match="no `until`"):
        train(reinitialize(owner, seed=4), x[:64], y[:64], cfg, until=lambda m: True)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train(reinitialize(owner, seed=4), x[:64], y[:64], dataclasses.replace(cfg, optimizer="rmsprop"))


def test_the_reference_weight_is_chosen_from_the_ladder_unless_given(small):
    """With reference_weight None (the default) the builder climbs REFERENCE_WEIGHTS until an exact
    copy is identifiable within a quarter of the points or a rung keeps fewer points than the
    first, records every rung and keeps the best rung that lost no points; a weight given is used
    as it is, with no ladder."""
    from deepcore_auditor.fingerprints.build import _p0_p1, build_fingerprint, copy_needs
    from deepcore_auditor.fingerprints.config import REFERENCE_WEIGHTS, BuildConfig, CoreConfig, KnownModelSpec

    owner, conv, x, y, *_ = small
    zoo = (KnownModelSpec("sim-fine-tune", "piracy", "fine-tune", "selection"),
           KnownModelSpec("ref-same-arch-1", "independent", "same-arch", "selection"),
           KnownModelSpec("cal-same-arch-1", "independent", "same-arch", "calibration", recipe="sgd"),
           KnownModelSpec("cal-lenet", "independent", "other-arch", "calibration", "lenet"))
    cfg = BuildConfig(core=CoreConfig(n_candidates=60, n_points=20, steps=10, reference_weight=None), zoo=zoo, epochs=1,
                      train_samples=2000)
    classes = [str(i) for i in range(10)]
    auto = build_fingerprint(owner, x, y, classes, {"name": "o"}, cfg, require_separable=False)
    ladder = auto.extra["reference_weight_ladder"]
    chosen = auto.method["params"]["core"]["reference_weight"]
    assert [r["reference_weight"] for r in ladder] == list(REFERENCE_WEIGHTS[: len(ladder)])
    assert chosen in [r["reference_weight"] for r in ladder]
    eligible = [r for r in ladder if r["points"] >= ladder[0]["points"]]  # never fewer points than the first rung
    assert ladder[1:-1] == eligible[1:len(ladder) - 1]  # only the last rung may have lost points (and ends the climb)
    last = ladder[-1]
    stopped_early = len(ladder) < len(REFERENCE_WEIGHTS)
    assert not stopped_early or last not in eligible or last["exact_copy_needs"] <= max(1, last["points"] // 4)
    assert len(auto) >= ladder[0]["points"]
    assert copy_needs(*_p0_p1(auto)) == min(r["exact_copy_needs"] if r["exact_copy_needs"] >= 0 else float("inf") for r in eligible)
    given = build_fingerprint(owner, x, y, classes, {"name": "o"},
                              dataclasses.replace(cfg, core=dataclasses.replace(cfg.core, reference_weight=3.0)),
                              require_separable=False)
    assert given.method["params"]["core"]["reference_weight"] == 3.0
    assert "reference_weight_ladder" not in given.extra
    assert {m.name: m.quality["arch"] for m in given.known_models}["cal-same-arch-1"] == "owner"


def test_a_second_build_reuses_every_trained_model_and_a_bad_entry_is_trained_again(small, tmp_path, caplog):
    """The known-model cache (fingerprints.model_cache): a second build of the same traced owner,
    data and training parameters trains nothing and makes the same fingerprint; a corrupt entry
    is a warning and that model is trained again; other training parameters share no entry."""
    import logging

    from deepcore_auditor.adapters.images import on_uint8_grid
    from deepcore_auditor.fingerprints.build import build_fingerprint
    from deepcore_auditor.fingerprints.config import BuildConfig, CoreConfig, KnownModelSpec

    owner, conv, x, y, *_ = small
    traced = Normalized(_form(owner.net, "traced"), conv)
    zoo = (KnownModelSpec("sim-fine-tune", "piracy", "fine-tune", "selection"),
           KnownModelSpec("ref-same-arch-1", "independent", "same-arch", "selection"),
           KnownModelSpec("cal-same-arch-1", "independent", "same-arch", "calibration"),
           KnownModelSpec("cal-lenet", "independent", "other-arch", "calibration", "lenet"))
    cfg = BuildConfig(core=CoreConfig(n_candidates=30, n_points=10, steps=20, reference_weight=2.0, epsilon=0.15,
                                      min_confidence=0.6), zoo=zoo, epochs=1, train_samples=2000)
    classes = [str(i) for i in range(10)]

    def build(c: BuildConfig):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="deepcore_auditor.fingerprints.model_cache"):
            fp = build_fingerprint(traced, x, y, classes, {"name": "o"}, c, require_separable=False, cache_dir=tmp_path)
        return fp, sum("reusing the model trained before" in r.getMessage() for r in caplog.records)

    first, reused = build(cfg)
    entries = sorted((tmp_path / "known-models").glob("*.safetensors"))
    assert reused == 0 and len(entries) == len(zoo)
    second, reused = build(cfg)
    assert reused == len(zoo)
    assert np.array_equal(first.points, second.points) and np.array_equal(first.owner_labels, second.owner_labels)
    for a, b in zip(first.known_models, second.known_models, strict=True):
        assert a.name == b.name and a.quality == b.quality and np.array_equal(a.labels, b.labels)
    bad = next(e for e in entries if e.name.startswith("ref-same-arch-1-"))
    bad.write_bytes(b"not a safetensors file")
    third, reused = build(cfg)
    assert reused == len(zoo) - 1 and any("ignoring unusable cached model" in r.getMessage() for r in caplog.records)
    assert [m.quality for m in third.known_models] == [m.quality for m in first.known_models]  # trained again, the same
    # 8-bit points (for image endpoints): a core-point parameter, so nothing is trained again;
    # every point is an 8-bit image the owner still labels with its confidence bound.
    grid, reused = build(dataclasses.replace(cfg, core=dataclasses.replace(cfg.core, uint8_points=True)))
    assert reused == len(zoo) and len(grid) > 0 and grid.method["params"]["core"]["uint8_points"] is True
    assert on_uint8_grid(grid.points) and not on_uint8_grid(first.points)
    assert np.array_equal(grid.owner_probs.argmax(1), grid.owner_labels) and grid.owner_probs.max(1).min() >= 0.6
    _, reused = build(dataclasses.replace(cfg, train_samples=1900))
    assert reused == 0


def test_the_cache_key_follows_everything_a_model_is_trained_from(small, tmp_path):
    """Owner weights, input convention, data, the parameters the model's recipe reads, spec,
    retry: each changes the entry; a parameter its recipe does not read (a radius for a
    reference, epochs for a weight copy, a core-point parameter) does not."""
    from deepcore_auditor.fingerprints.build import training_inputs
    from deepcore_auditor.fingerprints.config import BuildConfig, CoreConfig, KnownModelSpec
    from deepcore_auditor.fingerprints.model_cache import KnownModelCache

    owner, conv, x, y, xt, yt = small
    ref = KnownModelSpec("ref-same-arch-1", "independent", "same-arch", "selection")
    adv = KnownModelSpec("sim-adv-fine-tune", "piracy", "adv-fine-tune", "selection")
    ft = KnownModelSpec("sim-fine-tune", "piracy", "fine-tune", "selection")
    cfg = BuildConfig(core=CoreConfig(epsilon=0.1))

    def key(o=owner, xs=x, c=cfg, s=ref, retry=False, factory_args=""):
        return KnownModelCache(tmp_path, o, predict(o, xt[:100]), xs[:500], y[:500], xt[:100], yt[:100], 10,
                               factory_args=factory_args)._path(s, 7, retry, training_inputs(s, c)).name

    base = key()
    other_conv = Normalized(owner.net, dataclasses.replace(conv, mean=(0.3,)))
    changed = [key(o=other_conv), key(o=reinitialize(owner, 1)), key(xs=x[1:]), key(c=dataclasses.replace(cfg, epochs=4)),
               key(c=dataclasses.replace(cfg, train_samples=100)), key(s=dataclasses.replace(ref, recipe="sgd")),
               key(retry=True), key(factory_args='{"dropout": 0.5}')]
    assert base not in changed and len(set(changed)) == len(changed)
    wider = dataclasses.replace(cfg, core=CoreConfig(epsilon=0.2, n_points=50, reference_weight=8.0))
    assert key(c=wider) == base and key(s=adv, c=wider) != key(s=adv)
    assert key(s=ft, c=dataclasses.replace(cfg, epochs=4, max_epochs=9)) == key(s=ft)


def test_translate_moves_each_image_by_its_own_offset_with_a_zero_border():
    """models.translate against the definition: image i moved by (dy, dx) in [-shift, shift],
    the border zero, drawn from the generator (the same draws give the same batch)."""
    from deepcore_auditor.fingerprints.models import translate

    x = torch.rand(16, 3, 9, 7) + 0.5  # no zero pixel inside, so the border is told apart
    out = translate(x, 2, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    oy, ox = torch.randint(0, 5, (16,), generator=gen), torch.randint(0, 5, (16,), generator=gen)
    for i in range(16):
        dy, dx = 2 - int(oy[i]), 2 - int(ox[i])  # the content moves by minus the window's offset
        expect = torch.zeros(3, 9, 7)
        src = x[i][:, max(0, -dy) : 9 - max(0, dy), max(0, -dx) : 7 - max(0, dx)]
        expect[:, max(0, dy) : max(0, dy) + src.shape[1], max(0, dx) : max(0, dx) + src.shape[2]] = src
        assert torch.equal(out[i], expect)
    assert torch.equal(out, translate(x, 2, torch.Generator().manual_seed(4)))
