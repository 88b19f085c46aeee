"""The benchmark's model zoo: an owner, and suspects of every piracy and homologous family.

The training set is split in two halves by a seeded permutation: the owner trains on half A,
the attacker holds half B (same distribution, a strong attacker). Every model is exported to
ONNX and audited through the same adapters users use. What each family is:

piracy (derived from the owner)           homologous (trained independently)
- fine-tune-own: its own data (A)          - same-arch-seed: owner's architecture and data, other seeds
- fine-tune-other: the attacker's data (B) - same-arch-split: owner's architecture, other data (B, or a random half)
- prune: magnitude pruning, then fine-tune - other-arch: other architectures on A or B
- int8: dynamic int8 quantization (ONNX)   - other-task: a 10-way task with other labels
- fp16: float16 conversion (ONNX)            (labels shifted by a seeded offset)
- adv-fine-tune: FGSM adversarial training
- transfer: head replaced and retrained on B, body frozen
- distill-same / distill-other: trained on the owner's probabilities on B
- extract: trained on the owner's top-1 labels on B (label-only model extraction)
- adv-extract: the same, with two thirds of the queries pushed across the student's own boundary
  (adversarial label extraction, as SACBench's)

Besides the evaluated suspects, the zoo trains *calibration references* (independent models,
disjoint from the evaluated ones, that set every method's threshold) and the owner-side models
CAE needs (surrogates derived from the owner on A, references trained on A). Everything is
cached under one directory keyed by the recipe, so a second run only audits. The piracy recipes
themselves are fingerprints.recipes; this module says which member is made by which, with what.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.files import atomic_write
from deepcore_auditor.fingerprints import recipes
from deepcore_auditor.fingerprints.data import DataSplits, channel_stats
from deepcore_auditor.fingerprints.model_cache import load_state, state_bytes
from deepcore_auditor.fingerprints.models import Normalized, TrainConfig, accuracy, build_architecture, clone, export_onnx, train
from deepcore_auditor.fingerprints.progress import QUIET, Progress

logger = logging.getLogger(__name__)

RECIPE = "zoo-v1"  # bump when a recipe below or in fingerprints.recipes changes: the cache is keyed by it
OTHER_ARCHS = ("lenet", "mlp", "cnn-wide", "lenet", "mlp")


@dataclass(frozen=True)
class ZooConfig:
    """How big the zoo is and how long its models train."""

    members: int = 5  # suspects per evaluated family (other-task gets at most 3)
    epochs: int = 3  # epochs of every model trained from scratch
    finetune_epochs: int = 1
    train_samples: int = 0  # cap on each half's size (0: the whole half)
    owner_arch: str = "cnn"
    adv_epsilon: float = 0.1  # L-inf radius of adversarial fine-tuning, canonical [0, 1] space
    calibration_references: int = 6
    seed: int = 0

    def key(self, data_sha: str) -> str:
        text = json.dumps({"recipe": RECIPE, "data": data_sha, **asdict(self)}, sort_keys=True)
        return f"{RECIPE}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Member:
    """One model of the zoo and how to make it."""

    name: str
    kind: str  # piracy | homologous
    family: str
    role: str  # evaluate | calibrate | cae-surrogate | cae-reference
    recipe: str  # fine-tune | prune | int8 | fp16 | adv | transfer | distill | extract | independent | other-task
    arch: str
    data: str  # A | B | R (a random half of the whole training set)
    seed: int
    param: float = 0.0  # prune ratio, fine-tune learning rate, label shift...
    base: str = ""  # int8 / fp16: the member (or "owner") whose ONNX file is converted


@dataclass
class Zoo:
    """The built zoo: the owner (torch), data halves, every member's ONNX file and metadata."""

    root: Path
    owner: Normalized
    convention: InputConvention
    data: DataSplits
    halves: dict[str, tuple[np.ndarray, np.ndarray]]
    members: list[Member]
    paths: dict[str, Path]
    meta: dict[str, Any]
    torch_models: dict[str, nn.Module] = field(default_factory=dict)  # CAE's owner-side models

    def role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]


def plan_members(config: ZooConfig) -> list[Member]:
    """Every member of the zoo, in build order (a member's base comes before it)."""
    n, arch = config.members, config.owner_arch
    out: list[Member] = []
    s = 100 + 1000 * config.seed

    def add(name: str, kind: str, family: str, recipe: str, arch_: str = arch, data: str = "B",
            param: float = 0.0, base: str = "", role: str = "evaluate") -> None:
        out.append(Member(name, kind, family, role, recipe, arch_, data, s + len(out), param, base))

    lrs = (1e-4, 3e-4, 1e-3, 3e-4, 1e-4)
    for i in range(n):
        add(f"fine-tune-own-{i}", "piracy", "fine-tune-own", "fine-tune", data="A", param=lrs[i % 5])
    for i in range(n):
        add(f"fine-tune-other-{i}", "piracy", "fine-tune-other", "fine-tune", param=lrs[i % 5])
    ratios = (0.3, 0.5, 0.7, 0.8, 0.9)
    for i in range(n):
        add(f"prune-{int(ratios[i % 5] * 100)}-{i}", "piracy", "prune", "prune", param=ratios[i % 5])
    for fam in ("int8", "fp16"):
        for i in range(n):
            add(f"{fam}-{i}", "piracy", fam, fam, base="owner" if i == 0 else f"fine-tune-other-{i - 1}")
    for i in range(n):
        add(f"adv-fine-tune-{i}", "piracy", "adv-fine-tune", "adv", param=config.adv_epsilon * (0.5 + 0.25 * (i % 3)))
    for i in range(n):
        add(f"transfer-{i}", "piracy", "transfer", "transfer")
    for i in range(n):
        add(f"distill-same-{i}", "piracy", "distill-same", "distill")
    for i in range(n):
        add(f"distill-other-{i}", "piracy", "distill-other", "distill", OTHER_ARCHS[i % 5])
    extract_archs = (arch, "lenet", "mlp", arch, "lenet")
    for i in range(n):
        add(f"extract-{extract_archs[i % 5]}-{i}", "piracy", "extract", "extract", extract_archs[i % 5])
    for i in range(n):
        add(f"same-arch-seed-{i}", "homologous", "same-arch-seed", "independent", data="A")
    for i in range(n):
        add(f"same-arch-split-{i}", "homologous", "same-arch-split", "independent", data="B" if i % 2 == 0 else "R")
    for i in range(n):
        add(f"other-arch-{OTHER_ARCHS[i % 5]}-{i}", "homologous", "other-arch", "independent", OTHER_ARCHS[i % 5],
            data="A" if i % 2 == 0 else "B")
    for i in range(min(n, 3)):
        add(f"other-task-{i}", "homologous", "other-task", "other-task", data="A" if i % 2 == 0 else "B", param=float(1 + i * 3))
    # References that set every method's threshold: never evaluated, never used to choose points.
    cal = [(arch, "A"), (arch, "B"), ("lenet", "A"), (arch, "R"), ("mlp", "B"), ("cnn-wide", "A")]
    for i in range(config.calibration_references):
        a, d = cal[i % len(cal)]
        add(f"cal-{a}-{d}-{i}", "homologous", "calibration", "independent", a, d, role="calibrate")
    # CAE's owner-side ensemble: made by the owner on its own data only.
    add("cae-sur-fine-tune", "piracy", "cae", "fine-tune", data="A", param=3e-4, role="cae-surrogate")
    add("cae-sur-distill", "piracy", "cae", "distill", data="A", role="cae-surrogate")
    add("cae-sur-extract-lenet", "piracy", "cae", "extract", "lenet", data="A", role="cae-surrogate")
    add("cae-ref-same-arch", "homologous", "cae", "independent", data="A", role="cae-reference")
    add("cae-ref-same-arch-2", "homologous", "cae", "independent", data="A", role="cae-reference")
    add("cae-ref-lenet", "homologous", "cae", "independent", "lenet", data="A", role="cae-reference")
    # Label extraction with adversarially chosen queries, into the owner's and three other
    # architectures: last, so that every other member's seed (by position) and the zoos cached
    # before it existed stay as they were.
    adv_archs = (arch, "lenet", "mlp", "cnn-wide", arch)
    for i in range(n):
        add(f"adv-extract-{adv_archs[i % 5]}-{i}", "piracy", "adv-extract", "adv-extract", adv_archs[i % 5], param=config.adv_epsilon)
    return out


def _fresh(arch: str, owner: Normalized, shape: tuple[int, int, int], k: int, seed: int) -> Normalized:
    torch.manual_seed(seed)
    return Normalized(build_architecture(arch, shape, k), owner.convention)


def train_member(m: Member, owner: Normalized, halves: dict[str, tuple[np.ndarray, np.ndarray]], config: ZooConfig,
                 k: int) -> nn.Module:
    """Train one torch member (not int8/fp16, which convert an exported file)."""
    x, y = halves[m.data]
    shape = tuple(int(v) for v in x.shape[1:])
    full = TrainConfig(epochs=config.epochs, seed=m.seed)
    short = TrainConfig(epochs=config.finetune_epochs, lr=m.param or 3e-4, seed=m.seed)
    if m.recipe == "fine-tune":
        return recipes.fine_tune(owner, x, y, short)
    if m.recipe == "prune":
        return recipes.prune(owner, x, y, m.param, TrainConfig(epochs=config.finetune_epochs, lr=3e-4, seed=m.seed))
    if m.recipe == "adv":
        return recipes.adv_fine_tune(owner, x, y, m.param, TrainConfig(epochs=config.finetune_epochs, lr=3e-4, seed=m.seed))
    if m.recipe == "transfer":
        return recipes.transfer(owner, x, y, TrainConfig(epochs=config.finetune_epochs, lr=1e-3, seed=m.seed))
    fresh = _fresh(m.arch, owner, shape, k, m.seed)  # type: ignore[arg-type]
    if m.recipe == "distill":
        return recipes.distill(owner, x, fresh, full)
    if m.recipe == "extract":
        return recipes.extract(owner, x, fresh, full)
    if m.recipe == "adv-extract":
        return recipes.adversarial_extract(owner, x, fresh, m.param, full)
    if m.recipe == "other-task":
        return train(fresh, x, (y + int(m.param)) % k, full)
    if m.recipe == "independent":
        return train(fresh, x, y, full)
    raise ValueError(f"unknown recipe {m.recipe!r}")


WEIGHT_COPIES = ("fine-tune", "prune", "adv", "transfer")  # recipes whose model is the owner's architecture

# Trains the members with `fn(shared, member)` elsewhere (a cluster's tasks: auditor.cluster's
# `RayCluster.map`) and yields (member, result) as each is done, in any order.
MemberFanOut = Callable[[Callable[[Any, Member], Any], Any, list[Member]], Iterable[tuple[Member, Any]]]


def train_shipped_member(shared: tuple[Normalized, dict[str, tuple[np.ndarray, np.ndarray]], ZooConfig, int],
                         m: Member) -> tuple[bytes, float]:
    """One member trained by a worker: its state (fingerprints.model_cache.state_bytes) and seconds."""
    owner, halves, config, k = shared
    t0 = time.perf_counter()
    model = train_member(m, owner, halves, config, k)
    return state_bytes(model), time.perf_counter() - t0


def _skeleton(m: Member, owner: Normalized, shape: tuple[int, int, int], k: int) -> Normalized:
    net = clone(owner) if m.recipe in WEIGHT_COPIES else _fresh(m.arch, owner, shape, k, 0)
    assert isinstance(net, Normalized)
    return net


def _halves(data: DataSplits, config: ZooConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    points, labels = data.train.points(), data.train.y
    perm = np.random.default_rng(config.seed).permutation(len(points))
    half = len(perm) // 2
    cap = config.train_samples or half
    a, b = perm[:half][:cap], perm[half:][:cap]
    r = np.random.default_rng(config.seed + 1).permutation(len(points))[: min(half, cap)]
    return {"A": (points[a], labels[a]), "B": (points[b], labels[b]), "R": (points[r], labels[r])}


def _save_state(model: nn.Module, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def _load_state(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def build_zoo(data: DataSplits, cache: Path, config: ZooConfig, say: Callable[[str], None] = logger.info,
              bars: Progress = QUIET, fan_out: MemberFanOut | None = None, owner_only: bool = False) -> Zoo:
    """Train (or reuse from `cache`) the owner and every member; returns the zoo.

    `owner_only`: the owner alone (trained and cached where the whole zoo keeps it, so a later
    whole build reuses it), a zoo with no members — for benchmarks that need only the owner and
    its data halves (the null benchmark trains its own independent models).

    With `fan_out`, the members the cache lacks that train in torch are trained elsewhere first,
    all at once (the owner, which they all derive from, trains here); each comes back as its
    weights and is then measured, exported and cached here exactly as one trained here is, so
    the zoo's files are the local run's. int8/fp16 members convert their base's file here."""
    root = cache / config.key(data.source.get("sha256", data.source.get("spec", "")))
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "meta.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {"members": {}, "config": asdict(config)}
    shape, k = data.train.shape, data.train.num_classes
    mean, std = channel_stats(data.train)
    convention = InputConvention(mean=mean, std=std)
    halves = _halves(data, config)
    test_x, test_y = data.test.points(), data.test.y
    # Seeded before it is built: torch's own seed differs from process to process, and an owner
    # initialized from it made every uncached zoo another one (found 2026-12-07, when the same zoo
    # trained twice differed in every file). Zoos cached before hold one such draw each; they stay
    # valid as they are (their owner.pt is what is reused), so RECIPE is unchanged.
    torch.manual_seed(1 + 1000 * config.seed)
    owner = Normalized(build_architecture(config.owner_arch, shape, k), convention)
    owner_state = root / "owner.pt"
    if owner_state.is_file() and "owner" in meta:
        _load_state(owner, owner_state)
    else:
        say(f"training the owner ({config.owner_arch}, half A: {len(halves['A'][0])} samples, {config.epochs} epochs)")
        t0 = time.perf_counter()
        owner = train(owner, *halves["A"], TrainConfig(epochs=config.epochs, seed=1 + 1000 * config.seed))
        _save_state(owner, owner_state)
        meta["owner"] = {"test_accuracy": round(accuracy(owner, test_x, test_y), 4), "train_s": round(time.perf_counter() - t0, 1),
                         "arch": config.owner_arch}
        atomic_write(meta_path, json.dumps(meta, indent=1).encode())
    owner_onnx = root / "owner.onnx"
    if not owner_onnx.is_file():
        export_onnx(owner.net, owner_onnx, shape)
    say(f"owner test accuracy {meta['owner']['test_accuracy']:.4f}")
    paths: dict[str, Path] = {"owner": owner_onnx}
    if owner_only:
        return Zoo(root, owner, convention, data, halves, [], paths, meta)
    members = plan_members(config)
    torch_models: dict[str, nn.Module] = {}
    ready: dict[str, tuple[nn.Module, float]] = {}
    if fan_out is not None:
        todo = [m for m in members if m.recipe not in ("int8", "fp16") and not _cached(m, root, meta)]
        say(f"training {len(todo)} members as tasks elsewhere ({len(members) - len(todo)} cached or converted here)")
        with bars.bar(f"benchmark zoo ({len(todo)} tasks)", len(todo)) as advance:
            for m, (blob, train_s) in fan_out(train_shipped_member, (owner, halves, config, k), todo):
                ready[m.name] = (load_state(_skeleton(m, owner, shape, k), blob), train_s)
                advance(1)
    with bars.bar(f"benchmark zoo ({len(members)} models)", len(members)) as advance:
        for m in members:
            _member(m, root, owner, shape, k, halves, config, test_x, test_y, meta, meta_path, paths, torch_models, say,
                    ready.pop(m.name, None))
            advance(1)
    meta["build_s"] = round(meta.get("owner", {}).get("train_s", 0) + sum(v.get("train_s", 0) for v in meta["members"].values()), 1)
    atomic_write(meta_path, json.dumps(meta, indent=1).encode())
    return Zoo(root, owner, convention, data, halves, members, paths, meta, torch_models)


def _cached(m: Member, root: Path, meta: dict[str, Any]) -> bool:
    """Whether `m` is in the zoo already: recorded, its file there (and its state, CAE's side)."""
    done = m.name in meta["members"] and (root / f"{m.name}.onnx").is_file()
    return done and (not m.role.startswith("cae-") or (root / f"{m.name}.pt").is_file())


def _member(m: Member, root: Path, owner: Normalized, shape: tuple[int, int, int], k: int,
            halves: dict[str, tuple[np.ndarray, np.ndarray]], config: ZooConfig, test_x: np.ndarray, test_y: np.ndarray,
            meta: dict[str, Any], meta_path: Path, paths: dict[str, Path], torch_models: dict[str, nn.Module],
            say: Callable[[str], None], ready: tuple[nn.Module, float] | None = None) -> None:
    """Train (or find cached, or take the one trained elsewhere: `ready`, with its training
    seconds) one member of the zoo, export it, record it in the metadata."""
    path = root / f"{m.name}.onnx"
    paths[m.name] = path
    owner_side = m.role.startswith("cae-")
    state = root / f"{m.name}.pt"
    if _cached(m, root, meta):
        if owner_side:
            torch_models[m.name] = _load_state(_skeleton(m, owner, shape, k), state)
        return
    say(f"training {m.name} ({m.kind}, {m.family}, {m.role})" if ready is None else f"{m.name}: trained elsewhere")
    t0 = time.perf_counter() - (ready[1] if ready else 0.0)
    info: dict[str, Any] = {"kind": m.kind, "family": m.family, "role": m.role, "arch": m.arch, "data": m.data}
    if m.recipe in ("int8", "fp16"):
        recipes.RECIPES[m.recipe](paths[m.base], path)  # int8 / fp16: fingerprints.recipes
        info["base"] = m.base
    else:
        model = ready[0] if ready else train_member(m, owner, halves, config, k)
        info["test_accuracy"] = round(accuracy(model, test_x, test_y), 4)
        assert isinstance(model, Normalized)
        export_onnx(model.net, path, shape)
        if owner_side:
            _save_state(model, state)
            torch_models[m.name] = model
    info["train_s"] = round(time.perf_counter() - t0, 1)
    meta["members"][m.name] = info
    atomic_write(meta_path, json.dumps(meta, indent=1).encode())
