"""Small classifiers and the training steps used to simulate piracy and to train references.

Every model here takes canonical points (float32 [N, C, H, W] in [0, 1]); `Normalized` puts
the owner's input convention in front of an architecture, so gradients flow from canonical
space through the convention into the model, exactly as the owner sees its inputs.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import InputConvention
from adapters.errors import InputError
from adapters.torch import apply_convention_torch

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


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """A copy of `model` with the same architecture and fresh random weights (any nn.Module)."""
    fresh = clone(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.dim() > 1:
                bound = 1.0 / math.sqrt(p[0].numel())  # torch's default: kaiming_uniform(a=sqrt(5))
                p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
            else:
                p.zero_()
    for buf_name, buf in fresh.named_buffers():
        if buf_name.endswith("running_mean"):
            buf.zero_()
        elif buf_name.endswith("running_var"):
            buf.fill_(1.0)
    return fresh


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0


def train(
    model: nn.Module,
    points: np.ndarray,
    targets: np.ndarray,
    config: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Train `model` (canonical input) on hard labels ([N] int) or soft targets ([N, K] float)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    x_all = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    soft = targets.ndim == 2
    t_all = torch.from_numpy(targets.astype(np.float32 if soft else np.int64))
    for epoch in range(config.epochs):
        order = torch.from_numpy(rng.permutation(len(points)))
        total = 0.0
        for start in range(0, len(points), config.batch_size):
            idx = order[start : start + config.batch_size]
            logits = model(x_all[idx])
            if soft:
                loss = -(t_all[idx] * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
            else:
                loss = F.cross_entropy(logits, t_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{config.epochs} loss {total / len(points):.4f}")
    model.eval()
    return model


def adversarial_fine_tune(model: nn.Module, x: np.ndarray, y: np.ndarray, epsilon: float, config: TrainConfig) -> nn.Module:
    """Train on a half-clean, half-FGSM (random start) mixture: the usual cheap adversarial
    (fine-)tuning. `epsilon` is the L-inf radius in canonical [0, 1] space."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    xs, ys = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    for _ in range(config.epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            xb, yb = xs[idx], ys[idx]
            delta = (torch.rand_like(xb) * 2 - 1) * epsilon
            delta.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model((xb + delta).clamp(0, 1)), yb), delta)
            x_adv = (xb + (delta + 1.25 * epsilon * g.sign()).clamp(-epsilon, epsilon)).clamp(0, 1).detach()
            loss = 0.5 * F.cross_entropy(model(xb), yb) + 0.5 * F.cross_entropy(model(x_adv), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
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
def predict(model: nn.Module, points: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities of `model` on canonical points, as float32 [N, K]."""
    model.eval()
    out = []
    for start in range(0, len(points), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(points[start : start + batch_size], dtype=np.float32))
        out.append(F.softmax(model(x).float(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, points: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, points).argmax(1) == labels).mean())


def export_onnx(model: nn.Module, path: Path, point_shape: tuple[int, int, int]) -> None:
    """Export `model` to ONNX (opset 17, dynamic batch), written atomically to `path`."""
    model = clone(model).eval()
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(model, (torch.zeros(1, *point_shape),), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    tmp.replace(path)
