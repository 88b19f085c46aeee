"""The piracy recipes, in one table: how a pirate derives a model from the owner's.

Weight copies take the owner (a `Normalized` model) and are trained further from its weights:
fine-tuning, magnitude pruning then fine-tuning, adversarial (FGSM) fine-tuning, transfer (the
body frozen, a new head). Functional copies train a fresh `student` (the caller makes it, in
whatever architecture and from whatever seed it chooses) on the owner's answers: distillation
from its probabilities, label extraction from its top-1, adversarial label extraction from its
top-1 on queries pushed across the student's own boundary. The ONNX post-processing recipes take
the path of the owner's exported file and write the converted one: int8 quantization, fp16.

Every training recipe takes a `TrainConfig` (seed, epochs, learning rate...) and the recipe's own
parameter (prune ratio, epsilon), and its callers pass their own values: the fingerprint
builder's simulated zoo (fingerprints.build), the demo's suspects (auditor.demo), the benchmark
zoo (benchmarks.zoo) and the test suite's small world (benchmarks.small_world). The recipes are
shared, the parameters are not. Changing what a recipe does changes the models all of them
train: the demo and the benchmark zoo cache theirs keyed by their RECIPE (bump it), and the
suite's verdicts are asserted on models the small world trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.adapters.files import atomic_write
from deepcore_auditor.fingerprints.models import (
    Normalized,
    TrainConfig,
    adversarial_fine_tune,
    clone,
    fgsm,
    model_device,
    predict,
    prune_by_magnitude,
    set_mode,
    train,
)
from deepcore_auditor.fingerprints.progress import QUIET, Progress

# Every recipe takes `progress` and `label` (keyword-only) for the bar of its training (see
# fingerprints.progress); they change nothing in what is trained.


def fine_tune(owner: nn.Module, x: np.ndarray, y: np.ndarray, config: TrainConfig, *,
              progress: Progress = QUIET, label: str = "fine-tuning") -> nn.Module:
    """A copy of the owner trained further on (`x`, `y`): its own data or the attacker's."""
    return train(clone(owner), x, y, config, progress=progress, label=label)


def prune(owner: nn.Module, x: np.ndarray, y: np.ndarray, ratio: float, config: TrainConfig, *,
          progress: Progress = QUIET, label: str = "pruning") -> nn.Module:
    """A copy of the owner with the smallest `ratio` of each weight matrix/kernel set to zero, then fine-tuned."""
    return train(prune_by_magnitude(owner, ratio), x, y, config, progress=progress, label=label)


def adv_fine_tune(owner: nn.Module, x: np.ndarray, y: np.ndarray, epsilon: float, config: TrainConfig, *,
                  progress: Progress = QUIET, label: str = "adversarial fine-tuning") -> nn.Module:
    """A copy of the owner fine-tuned on a half-clean, half-FGSM mixture of L-inf radius `epsilon`
    (canonical [0, 1] space): a pirate hardening its copy against perturbations."""
    return adversarial_fine_tune(clone(owner), x, y, epsilon, config, progress=progress, label=label)


def _last_linear(net: nn.Module) -> tuple[nn.Module, str]:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InputError("transfer needs a model whose head is a Linear layer")
    *parents, last = names[-1].split(".")
    parent = net.get_submodule(".".join(parents)) if parents else net
    return parent, last


def transfer(owner: Normalized, x: np.ndarray, y: np.ndarray, config: TrainConfig) -> nn.Module:
    """The owner's body, frozen, with a new head trained on the attacker's data."""
    model = clone(owner)
    assert isinstance(model, Normalized)
    for p in model.parameters():
        p.requires_grad_(False)
    parent, name = _last_linear(model.net)
    old = getattr(parent, name)
    torch.manual_seed(config.seed)
    setattr(parent, name, nn.Linear(old.in_features, old.out_features).to(old.weight.device))
    return train(model, x, y, config)


def distill(owner: nn.Module, x: np.ndarray, student: nn.Module, config: TrainConfig, *,
            until: Callable[[nn.Module], bool] | None = None, progress: Progress = QUIET,
            label: str = "distillation") -> nn.Module:
    """`student` trained on the owner's probabilities on `x` (`until` as in `train`)."""
    return train(student, x, predict(owner, x), config, until=until, progress=progress, label=label)


def extract(owner: nn.Module, x: np.ndarray, student: nn.Module, config: TrainConfig, *,
            until: Callable[[nn.Module], bool] | None = None, progress: Progress = QUIET,
            label: str = "extraction") -> nn.Module:
    """`student` trained on the owner's top-1 labels on `x`: label-only model extraction (`until` as in `train`)."""
    return train(student, x, predict(owner, x).argmax(1), config, until=until, progress=progress, label=label)


def _pushed_across(student: nn.Module, x: np.ndarray, epsilon: float, seed: int, batch_size: int = 500) -> np.ndarray:
    """`x` moved by one FGSM step (random start, L-inf `epsilon`, canonical space) away from the
    student's own label at each point: towards where the student's boundary lies."""
    device = model_device(student)
    set_mode(student, False)
    labels = predict(student, x).argmax(1)
    gen = torch.Generator().manual_seed(seed)
    out = np.empty_like(x, dtype=np.float32)
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
        yb = torch.from_numpy(labels[start : start + batch_size].astype(np.int64))
        start_delta = ((torch.rand(xb.shape, generator=gen) * 2 - 1) * epsilon).to(device)
        out[start : start + len(xb)] = fgsm(student, xb.to(device), yb.to(device), start_delta, epsilon).cpu().numpy()
    return out


def adversarial_extract(owner: nn.Module, x: np.ndarray, student: nn.Module, epsilon: float, config: TrainConfig, *,
                        rounds: int = 3, progress: Progress = QUIET, label: str = "adversarial extraction") -> nn.Module:
    """Label-only extraction whose queries the attacker chooses adversarially (SACBench's
    adversarial extraction; the idea of CloudLeak and of Papernot et al.'s Jacobian augmentation):
    the attacker's pool `x` is split into `rounds` parts; the first is asked as it is, each later
    one is first pushed across the student's current boundary (`_pushed_across`), so the owner's
    top-1 answers land where the student is least sure of it; after each round the student trains
    `config.epochs` on everything asked so far. It asks len(x) queries, as `extract` does."""
    parts = np.array_split(np.random.default_rng(config.seed).permutation(len(x)), rounds)
    asked: list[np.ndarray] = []
    answers: list[np.ndarray] = []
    for r, index in enumerate(parts):
        q = x[index] if r == 0 else _pushed_across(student, x[index], epsilon, config.seed + r)
        asked.append(q)
        answers.append(predict(owner, q).argmax(1))
        student = train(student, np.concatenate(asked), np.concatenate(answers), replace(config, seed=config.seed + r),
                        progress=progress, label=f"{label}, round {r + 1} of {rounds}")
    return student


def quantize_int8(src: Path, dst: Path) -> None:
    """The ONNX file `src` with its weights dynamically quantized to int8, written atomically to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(tmp: Path) -> None:
        logging.disable(logging.WARNING)  # onnxruntime's advice to pre-process, on the root logger
        try:
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)

    atomic_write(dst, write, by_name=True, suffix=".onnx")


def convert_fp16(src: Path, dst: Path) -> None:
    """The whole graph in float16, input and output included (as a converted deployment has it)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    atomic_write(dst, lambda tmp: onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=False), str(tmp)),
                 by_name=True, suffix=".onnx")


# Every recipe by name. Training recipes: (owner, x, y, [ratio | epsilon], config) for weight
# copies, (owner, x, student, [epsilon], config) for functional copies; ONNX ones: (src, dst).
RECIPES: Mapping[str, Callable[..., object]] = {
    "fine-tune": fine_tune,
    "prune": prune,
    "adv-fine-tune": adv_fine_tune,
    "transfer": transfer,
    "distill": distill,
    "extract": extract,
    "adv-extract": adversarial_extract,
    "int8": quantize_int8,
    "fp16": convert_fp16,
}
