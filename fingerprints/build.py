"""From an owner model and its data to a DeepCore fingerprint.

1. Simulate piracy on the owner's own data: a fine-tuned copy, a pruned and fine-tuned copy, an
   adversarially fine-tuned copy,
   students distilled from its probabilities (same architecture) and label-extracted from its
   top-1 answers (other architectures).
2. Train independent references: same architecture with other seeds and data subsets, and
   other architectures. Owners may add references they already have.
3. Grow core points jointly against the *selection* simulations and references (fingerprints.core).
4. Record the answers of the held-out *calibration* simulations and references on the points,
   from which the audit's p0/p1 are computed (fingerprints.calibration).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from adapters.base import Access, Oracle
from adapters.errors import InputError
from fingerprints.core import CoreConfig, build_core_points
from fingerprints.format import Fingerprint, ModelAnswers
from fingerprints.models import (
    clone,
    Normalized,
    TrainConfig,
    adversarial_fine_tune,
    build_architecture,
    predict,
    prune_by_magnitude,
    reinitialize,
    train,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModelSpec:
    """One simulated pirate or reference to train: family, architecture, role, seed offset."""

    name: str
    kind: str  # piracy | independent
    family: str  # fine-tune | prune | adv-fine-tune | distill | extract | same-arch | other-arch
    role: str  # selection | calibration
    arch: str = "owner"  # "owner" = the owner's own architecture (re-initialized)


DEFAULT_ZOO: tuple[KnownModelSpec, ...] = (
    # Simulated pirates that shape the points: weight copies and functional copies, the latter
    # in the owner's and in other architectures, so that following the owner is what counts.
    KnownModelSpec("sim-fine-tune", "piracy", "fine-tune", "selection"),
    KnownModelSpec("sim-prune", "piracy", "prune", "selection"),
    # An adversarially fine-tuned copy resists exactly the perturbations core points are made of;
    # unless it is simulated, the points sit where such a copy reverts to the seed's class.
    KnownModelSpec("sim-adv-fine-tune", "piracy", "adv-fine-tune", "selection"),
    KnownModelSpec("sim-distill", "piracy", "distill", "selection"),
    KnownModelSpec("sim-extract", "piracy", "extract", "selection"),
    KnownModelSpec("sim-extract-lenet", "piracy", "extract", "selection", "lenet"),
    KnownModelSpec("sim-extract-mlp", "piracy", "extract", "selection", "mlp"),
    # References the points are pushed away from, in the same architectures as the students.
    KnownModelSpec("ref-same-arch-1", "independent", "same-arch", "selection"),
    KnownModelSpec("ref-same-arch-2", "independent", "same-arch", "selection"),
    KnownModelSpec("ref-lenet", "independent", "other-arch", "selection", "lenet"),
    KnownModelSpec("ref-mlp", "independent", "other-arch", "selection", "mlp"),
    # Held out: they only calibrate the test (p0 from references, p1 from pirates).
    KnownModelSpec("cal-distill", "piracy", "distill", "calibration"),
    KnownModelSpec("cal-extract-lenet", "piracy", "extract", "calibration", "lenet"),
    KnownModelSpec("cal-same-arch-1", "independent", "same-arch", "calibration"),
    KnownModelSpec("cal-same-arch-2", "independent", "same-arch", "calibration"),
    KnownModelSpec("cal-lenet", "independent", "other-arch", "calibration", "lenet"),
    KnownModelSpec("cal-mlp", "independent", "other-arch", "calibration", "mlp"),
    KnownModelSpec("cal-wide-cnn", "independent", "other-arch", "calibration", "cnn-wide"),
)


@dataclass(frozen=True)
class BuildConfig:
    """How to build a fingerprint: core-point parameters and the simulated zoo's training."""

    core: CoreConfig = field(default_factory=CoreConfig)
    zoo: tuple[KnownModelSpec, ...] = DEFAULT_ZOO
    train_samples: int = 50000
    epochs: int = 3
    prune_ratio: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["zoo"] = [asdict(z) for z in self.zoo]
        return d


@dataclass
class KnownModel:
    spec: KnownModelSpec
    model: nn.Module | None = None  # torch model (needed for selection)
    oracle: Oracle | None = None  # any adapter (enough for calibration)


def train_known_model(
    spec: KnownModelSpec,
    owner: Normalized,
    points: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: BuildConfig,
    index: int,
) -> nn.Module:
    """Train one simulated pirate or reference on (a seeded subset of) the owner's data."""
    seed = config.seed * 1000 + index + 1
    rng = np.random.default_rng(seed)
    subset = rng.choice(len(points), size=min(config.train_samples, len(points)), replace=False)
    x = points[subset]
    tc = TrainConfig(epochs=config.epochs, seed=seed)
    if spec.family == "fine-tune":
        return train(clone(owner), x, labels[subset], TrainConfig(epochs=1, lr=1e-4, seed=seed))
    if spec.family == "prune":
        return train(prune_by_magnitude(owner, config.prune_ratio), x, labels[subset], TrainConfig(epochs=1, lr=1e-4, seed=seed))
    if spec.family == "adv-fine-tune":
        # A pirate hardening its copy against perturbations: half the core points' radius.
        return adversarial_fine_tune(clone(owner), x, labels[subset], config.core.epsilon / 2, TrainConfig(epochs=1, lr=3e-4, seed=seed))
    if spec.arch == "owner":
        student: nn.Module = reinitialize(owner, seed)
    else:
        torch.manual_seed(seed)
        c, h, w = points.shape[1:]
        student = Normalized(build_architecture(spec.arch, (int(c), int(h), int(w)), num_classes), owner.convention)
    if spec.family == "distill":
        return train(student, x, predict(owner, x), tc)
    if spec.family == "extract":
        return train(student, x, predict(owner, x).argmax(1), tc)
    return train(student, x, labels[subset], tc)  # independent: the true labels


def _answers(spec: KnownModelSpec, km: KnownModel, points: np.ndarray, owner_labels: np.ndarray) -> ModelAnswers:
    if km.model is not None:
        probs = predict(km.model, points).astype(np.float64)
    else:
        assert km.oracle is not None
        probs = km.oracle.query(points, Access.PROBS)
    labels = probs.argmax(1).astype(np.int64)
    return ModelAnswers(spec.name, spec.kind, spec.family, spec.role, labels, probs[np.arange(len(points)), owner_labels])


def build_fingerprint(
    owner: Normalized,
    points: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    owner_identity: dict[str, str],
    config: BuildConfig,
    *,
    extra_references: Sequence[tuple[KnownModelSpec, Oracle | nn.Module]] = (),
    progress: Callable[[str], None] | None = None,
) -> Fingerprint:
    """Build a DeepCore fingerprint for `owner` from its training data (canonical points)."""
    say = progress or logger.info
    num_classes = len(classes)
    torch.manual_seed(config.seed)
    known: list[KnownModel] = []
    for i, spec in enumerate(config.zoo):
        say(f"training {spec.name} ({spec.kind}, {spec.family}, {spec.role})")
        known.append(KnownModel(spec, model=train_known_model(spec, owner, points, labels, num_classes, config, i)))
    for spec, m in extra_references:
        known.append(KnownModel(spec, model=m) if isinstance(m, nn.Module) else KnownModel(spec, oracle=m))
    students = [k.model for k in known if k.spec.kind == "piracy" and k.spec.role == "selection" and k.model is not None]
    refs = [k.model for k in known if k.spec.kind == "independent" and k.spec.role == "selection" and k.model is not None]
    say(f"growing {config.core.n_candidates} candidate core points against {len(students)} simulations and {len(refs)} references")
    cp = build_core_points(owner, students, refs, points, labels, num_classes, config.core)
    if len(cp.points) == 0:
        raise InputError("no candidate reached the owner confidence bound: lower --min-confidence or raise --epsilon")
    owner_probs = predict(owner, cp.points)
    answers = tuple(_answers(k.spec, k, cp.points, cp.targets) for k in known)
    say(f"kept {len(cp.points)} core points")
    return Fingerprint(
        points=cp.points,
        owner_labels=cp.targets,
        owner_probs=owner_probs,
        convention=owner.convention,
        classes=tuple(classes),
        owner_identity=owner_identity,
        method={"name": "deepcore", "version": 1, "params": config.to_dict(), "seed": config.seed},
        known_models=answers,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"seed_index": cp.seed_index.tolist(), "selection_score": cp.score.round(4).tolist(),
               "owner_confidence_min": float(cp.owner_confidence.min())},
    )
