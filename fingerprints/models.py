"""Small classifiers and the training steps used to simulate piracy and to train references.

Every model here takes canonical points (float32 [N, C, H, W] in [0, 1]); `Normalized` puts
the owner's input convention in front of an architecture, so gradients flow from canonical
space through the convention into the model, exactly as the owner sees its inputs.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.adapters.files import atomic_write
from deepcore_auditor.adapters.torch import apply_convention_torch
from deepcore_auditor.fingerprints.progress import QUIET, Progress

logger = logging.getLogger(__name__)

ARCHITECTURES = ("cnn", "cnn-wide", "lenet", "mlp")


def build_architecture(name: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A fresh small classifier for inputs of `shape` (C, H, W); see ARCHITECTURES."""
    c, h, w = shape
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Linear(128, num_classes),
        )
    if name == "cnn-wide":
        return nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Linear(128, num_classes),
        )
    if name == "lenet":
        return nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2), 120), nn.Tanh(),
            nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes),
        )
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )
    raise InputError(f"unknown architecture {name!r}: use one of {', '.join(ARCHITECTURES)}")


class Normalized(nn.Module):
    """canonical points -> convention -> net: the form in which every model here is trained."""

    def __init__(self, net: nn.Module, convention: InputConvention) -> None:
        super().__init__()
        self.net = net
        self.convention = convention

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.net(apply_convention_torch(points, self.convention))


def model_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the device of its first parameter (or buffer); the CPU for a model
    with neither. Every function here runs a model where it lies and moves each batch there, so a
    caller chooses the device by moving its models (fingerprints.build); numpy arrays in and out
    stay on the CPU."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def clone(model: nn.Module) -> nn.Module:
    """An independent, trainable copy of any module, TorchScript included.

    (copy.deepcopy of a ScriptModule yields non-leaf parameters that no optimizer accepts.)
    """
    if isinstance(model, Normalized):
        return Normalized(clone(model.net), model.convention)
    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        buf.seek(0)
        return torch.jit.load(buf)
    return copy.deepcopy(model)


def _norm_like(module: nn.Module) -> bool:
    """A normalization layer: it keeps running statistics, or its kind's name says so."""
    kind = getattr(module, "original_name", None) or type(module).__name__
    return any(k in kind for k in ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm")) or any(
        name == "running_mean" for name, _ in module.named_buffers(recurse=False))


def _default_init(module: nn.Module, gen: torch.Generator) -> None:
    """torch's default initialization of one layer, from its parameters' names and shapes.

    For modules whose Python class is gone (TorchScript, torch.export): weights of two or more
    dimensions kaiming_uniform(a=sqrt(5)) as Conv/Linear do, their bias uniform(+-1/sqrt(fan_in));
    a normalization layer's scale 1 and shift 0 (zeroing the scale, as this module once did, makes
    every BatchNorm output 0 and the network untrainable); running statistics 0/1.
    """
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    norm = _norm_like(module)
    for name, p in params.items():
        if p.dim() > 1:
            bound = 1.0 / math.sqrt(p[0].numel())
            p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
        elif name == "bias" and weight is not None and weight.dim() > 1 and not norm:
            bound = 1.0 / math.sqrt(weight[0].numel())
            p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
        elif name == "weight" and norm:
            p.fill_(1.0)
        else:
            p.zero_()
    for name, buf in module.named_buffers(recurse=False):
        if name == "running_var":
            buf.fill_(1.0)
        elif name in ("running_mean", "num_batches_tracked"):
            buf.zero_()


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """A copy of `model` with the same architecture and fresh random weights (any nn.Module).

    Each layer gets its own default initialization: an eager module's `reset_parameters` where
    it has one (seeded; the global RNG is left as it was), otherwise `_default_init` by the
    parameters' names and shapes, which also serves TorchScript and torch.export modules.
    The weights are drawn on the CPU whatever the model's device (the fresh copy is then moved
    to it), so a seed gives the same model on every device.
    """
    device = model_device(model)
    fresh = clone(model)
    if device.type != "cpu":
        fresh = fresh.to("cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            reset = getattr(type(module), "reset_parameters", None)
            if callable(reset) and not isinstance(module, torch.jit.ScriptModule):
                module.reset_parameters()
                if _norm_like(module) and hasattr(module, "reset_running_stats"):
                    module.reset_running_stats()
            else:
                _default_init(module, gen)
    return fresh if device.type == "cpu" else fresh.to(device)


def set_mode(model: nn.Module, training: bool) -> None:
    """train()/eval() where the module allows it (a torch.export module refuses both)."""
    try:
        model.train(training)
    except NotImplementedError:
        pass


def _running_means(model: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in model.named_buffers() if name.endswith("running_mean")]


def batchnorm_trains(model: nn.Module, probe: torch.Tensor) -> bool:
    """Whether a train-mode forward pass updates the model's BatchNorm statistics (on a copy).

    A module traced in eval mode (`torch.jit.trace(model.eval(), x)`) or exported with
    torch.export keeps BatchNorm in inference mode whatever `train()` says: trained that way it
    never sees batch statistics. True also for a model without BatchNorm.
    """
    if not _running_means(model):  # nothing to freeze: no copy needed
        return True
    trial = clone(model)
    before = [b.clone() for b in _running_means(trial)]
    set_mode(trial, True)
    try:
        with torch.no_grad():
            trial(probe)
    except Exception as e:  # any framework error: the model cannot be trained on such batches
        raise InputError(f"the model fails on a training batch of {len(probe)} ({type(e).__name__}: "
                         f"{first_line(e, empty='')}); a torch.export "
                         "program must be exported with a dynamic batch dimension") from e
    return any(not torch.equal(a, b) for a, b in zip(before, _running_means(trial), strict=False))


def thaw_batchnorm(model: nn.Module) -> int:
    """Rewrite, in place, every batch_norm call frozen in inference mode into a training one.

    Works on TorchScript (the constant `training` argument of `aten::batch_norm` in each
    submodule's graph, before the graph first runs) and on torch.export graph modules (the
    same argument of `aten.batch_norm`). Returns how many calls were rewritten.
    """
    if isinstance(model, Normalized):
        return thaw_batchnorm(model.net)
    count = 0
    if isinstance(model, torch.jit.ScriptModule):
        for _, sub in model.named_modules():
            try:
                graph = sub.graph
            except (AttributeError, RuntimeError):
                continue
            for node in graph.nodes():
                if node.kind() == "aten::batch_norm":
                    flag = graph.insertConstant(True)
                    flag.node().moveBefore(node)
                    node.replaceInput(5, flag)
                    count += 1
        return count
    graph_module = model if isinstance(model, torch.fx.GraphModule) else None
    if graph_module is None:
        return 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.batch_norm.default and len(node.args) > 5:
            node.args = (*node.args[:5], True, *node.args[6:])
            count += 1
    if count:
        graph_module.recompile()
    return count


class _Trainable:
    """What `trainable` yields: `net` to optimize, and `settled()` to read the model as trained so far."""

    def __init__(self, model: nn.Module, net: nn.Module) -> None:
        self.model, self.net = model, net

    def settled(self) -> nn.Module:
        """`model` in eval mode with the weights and statistics trained so far (training may go on)."""
        if self.net is not self.model:
            with torch.no_grad():
                target = dict(self.model.state_dict(keep_vars=True))
                for name, value in self.net.state_dict().items():
                    target[name].copy_(value)
        set_mode(self.model, False)
        return self.model

    def resume(self) -> None:
        set_mode(self.net, True)


@contextmanager
def trainable(model: nn.Module, probe: np.ndarray) -> Iterator[_Trainable]:
    """The module to optimize in place of `model`, in training mode; `model` ends in eval mode
    holding the trained weights and statistics.

    Usually `model` itself. When its BatchNorm is frozen in inference mode (see
    `batchnorm_trains`), a copy with its batch_norm calls rewritten to training mode is trained
    and its state copied back, so the model keeps the form it was handed in (ONNX export, the
    oracle) while its statistics are real ones. A frozen model that cannot be rewritten is
    refused: trained as it is, it would be a degenerate reference (see fingerprints.quality).
    """
    x = torch.from_numpy(np.ascontiguousarray(probe[:8], dtype=np.float32)).to(model_device(model))
    if batchnorm_trains(model, x):
        net = model
    else:
        net = clone(model)
        if thaw_batchnorm(net) == 0 or not batchnorm_trains(net, x):
            raise InputError(
                f"the model's BatchNorm is frozen in inference mode ({type(getattr(model, 'net', model)).__name__}) "
                "and could not be put in training mode: give the owner as TorchScript from torch.jit.script, "
                "or as package.module:factory with --owner-weights")
        logger.info("BatchNorm frozen in inference mode (traced or exported model): training a rewritten copy")
    handle = _Trainable(model, net)
    handle.resume()
    with channels_last(net):
        yield handle
    handle.settled()


@contextmanager
def channels_last(*models: nn.Module) -> Iterator[None]:
    """Within: the convolution kernels of `models` in channels-last memory when they compute on
    the CPU; after (a failure included): back in the usual layout, so state dicts, clones,
    safetensors and ONNX export see plain contiguous tensors as before. Used for training
    (`trainable`) and for growing points through the owner and its known models (fingerprints.core).

    Why: oneDNN's CPU convolutions run channels-last kernels when the weight is in that layout,
    which on this project's 2-core machine makes a training step of the zoo's CNNs and LeNets
    8-24% cheaper (nothing for the MLP; `benchmarks/train_speed.py`) and a step of point growth
    through the owner, students and references about a third cheaper (`benchmarks/core_speed.py`). The
    arithmetic is the same up to float rounding. Left alone: models without 4-D parameters
    (nothing to gain), models not on the CPU (not measured there), models whose kernels are in
    some other layout already (their owner's choice, which they keep), and any model whose
    parameters refuse the change.
    """
    changed = [m for m in models if _to_channels_last(m)]
    try:
        yield
    finally:
        for m in changed:
            m.to(memory_format=torch.contiguous_format)


def _to_channels_last(net: nn.Module) -> bool:
    tensors = list(itertools.chain(net.parameters(), net.buffers()))
    if (model_device(net).type != "cpu" or not any(p.dim() == 4 for p in net.parameters())
            or any(t.dim() == 5 for t in tensors) or not all(t.is_contiguous() for t in tensors if t.dim() == 4)):
        # not on the CPU, nothing to restride, 5-D tensors (`Module.to` restrides those too, and
        # fails on them), or a layout its owner chose: left as it is
        return False
    try:
        net.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError) as e:  # a module type whose _apply cannot restride
        net.to(memory_format=torch.contiguous_format)  # children converted before the failure go back
        logger.debug("kept the usual memory layout (%s)", e)
        return False
    return True


@dataclass(frozen=True)
class TrainConfig:
    """`epochs` always run; with an `until` test given to `train`, training goes on one epoch at a
    time up to `max_epochs` (0: no more than `epochs`) while the test says no."""

    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    max_epochs: int = 0
    shift: int = 0  # random translations of up to this many pixels (zero-padded) per sample; 0: none
    # "adam" (constant `lr`), or "sgd": Nesterov momentum 0.9, weight decay 5e-4 and a one-cycle
    # schedule peaking at `lr` over the epochs that will run (so no `until` early stop with it) —
    # the recipe most published CNNs are trained with.
    optimizer: str = "adam"


def translate(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by a random offset of up to `shift` pixels, the border zero-padded: the one
    augmentation that keeps the label of nearly every image task (flips do not, for digits)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    oy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    # Every h x w window of the padded image, as a view [n, c, 2s+1, 2s+1, h, w]; picking one per
    # sample copies only the batch (a third of the time of indexing every pixel, the same values).
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(n), :, oy, ox]


def train(
    model: nn.Module,
    points: np.ndarray,
    targets: np.ndarray,
    config: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
    until: Callable[[nn.Module], bool] | None = None,
    progress: Progress = QUIET,
    label: str = "training",
) -> nn.Module:
    """Train `model` (canonical input) on hard labels ([N] int) or soft targets ([N, K] float).

    `until(model)` (the model in eval mode, as trained so far) is asked after each epoch from
    `config.epochs` on; training stops when it says True or at `config.max_epochs`. `progress`
    gets one bar, `label`, over every batch of the longest run (one that stops early ends it early).
    Trained on `model`'s device (`model_device`): the data stay on the CPU, where the order and the
    translations are drawn, and each batch is moved there.
    """
    device = model_device(model)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    x_all = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    soft = targets.ndim == 2
    t_all = torch.from_numpy(targets.astype(np.float32 if soft else np.int64))
    last = max(config.epochs, config.max_epochs) if until is not None else config.epochs
    gen = torch.Generator().manual_seed(config.seed)
    if config.optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    if config.optimizer == "sgd" and until is not None:
        raise ValueError("the sgd recipe's one-cycle schedule needs its length fixed: no `until` with it")
    batches = (len(points) + config.batch_size - 1) // config.batch_size
    with trainable(model, points) as handle, progress.bar(f"{label} (up to {last} epochs)", last * batches) as advance:
        net = handle.net
        params = [p for p in net.parameters() if p.requires_grad]
        sched = None
        if config.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
            steps = last * ((len(points) + config.batch_size - 1) // config.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.25)
        else:
            opt = torch.optim.Adam(params, lr=config.lr)
        for epoch in range(last):
            order = torch.from_numpy(rng.permutation(len(points)))
            total = 0.0
            for start in range(0, len(points), config.batch_size):
                idx = order[start : start + config.batch_size]
                xb = translate(x_all[idx], config.shift, gen) if config.shift else x_all[idx]
                xb, tb = xb.to(device), t_all[idx].to(device)
                logits = net(xb)
                if soft:
                    loss = -(tb * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
                else:
                    loss = F.cross_entropy(logits, tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if log:  # only for the log: on a GPU, reading the loss waits for the batch
                    total += loss.item() * len(idx)
                advance(1)
            if log:
                log(f"epoch {epoch + 1}/{last} loss {total / len(points):.4f}")
            if until is not None and epoch + 1 >= config.epochs and epoch + 1 < last:
                if until(handle.settled()):
                    break
                handle.resume()
    return model


def fgsm(net: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One FGSM step of L-inf radius `epsilon` (canonical [0, 1] space) from the random start
    `start`, raising `net`'s loss on labels `y`; the points out, detached."""
    start.requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net((x + start).clamp(0, 1)), y), start)
    return (x + (start + 1.25 * epsilon * g.sign()).clamp(-epsilon, epsilon)).clamp(0, 1).detach()


def adversarial_fine_tune(model: nn.Module, x: np.ndarray, y: np.ndarray, epsilon: float, config: TrainConfig, *,
                          progress: Progress = QUIET, label: str = "adversarial fine-tuning") -> nn.Module:
    """Train on a half-clean, half-FGSM (random start) mixture: the usual cheap adversarial
    (fine-)tuning. `epsilon` is the L-inf radius in canonical [0, 1] space. Trained on `model`'s
    device, as `train`."""
    device = model_device(model)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    xs, ys = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    batches = (len(x) + config.batch_size - 1) // config.batch_size
    with trainable(model, x) as handle, progress.bar(label, config.epochs * batches) as advance:
        net = handle.net
        opt = torch.optim.Adam(net.parameters(), lr=config.lr)
        for _ in range(config.epochs):
            order = torch.from_numpy(rng.permutation(len(x)))
            for start in range(0, len(x), config.batch_size):
                idx = order[start : start + config.batch_size]
                xb, yb = xs[idx].to(device), ys[idx].to(device)
                x_adv = fgsm(net, xb, yb, (torch.rand_like(xb) * 2 - 1) * epsilon, epsilon)
                loss = 0.5 * F.cross_entropy(net(xb), yb) + 0.5 * F.cross_entropy(net(x_adv), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                advance(1)
    return model


def prune_by_magnitude(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of `model` with the smallest `ratio` of each weight matrix/kernel set to zero."""
    pruned = clone(model)
    with torch.no_grad():
        for p in pruned.parameters():
            if p.dim() > 1:
                k = int(p.numel() * ratio)
                if k > 0:
                    threshold = p.abs().flatten().kthvalue(k).values
                    p.mul_((p.abs() > threshold).to(p.dtype))
    return pruned


@torch.no_grad()
def forward_batched(model: nn.Module, points: np.ndarray, batch_size: int = 512,
                    fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """`fn` of `model`'s float32 outputs (the outputs themselves when None) on canonical points,
    batch by batch without gradients, as one numpy array; [0, 0] for no points. The model's mode
    is left as it is; it runs on its own device (`model_device`), each batch moved there."""
    device = model_device(model)
    out = []
    for start in range(0, len(points), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(points[start : start + batch_size], dtype=np.float32)).to(device)
        y = model(x).float()
        out.append((y if fn is None else fn(y)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities over the classes (dim 1), for `forward_batched`."""
    return F.softmax(logits, dim=1)


def predict(model: nn.Module, points: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities of `model` on canonical points, as float32 [N, K]."""
    set_mode(model, False)
    return forward_batched(model, points, batch_size, softmax)


def accuracy(model: nn.Module, points: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, points).argmax(1) == labels).mean())


def export_onnx(model: nn.Module, path: Path, point_shape: tuple[int, int, int]) -> None:
    """Export `model` to ONNX (opset 17, dynamic batch), written atomically to `path`."""
    model = clone(model)
    set_mode(model, False)
    atomic_write(path, lambda tmp: torch.onnx.export(
        model, (torch.zeros(1, *point_shape, device=model_device(model)),), str(tmp), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False), by_name=True)
