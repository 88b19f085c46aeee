"""DeepCore core-point construction: points far past the owner's decision boundary, chosen where
piracy copies keep the owner's decision and independent models do not.

From a few natural seeds, each point is pushed (within an L-inf ball of radius `epsilon`, so it
stays a plausible input rather than a painting of the target class) towards a target class
other than the seed's own, jointly:
- the owner must become extremely confident in the target (a *core* point, far past its
  boundary: confidence >= `min_confidence`),
- simulated piracy students (the owner's own fine-tuned, pruned, distilled and label-extracted
  copies) are pushed to follow it,
- selection references (independently trained models) are pushed away from the target.
Points are then ranked by (students following - references following) and the best are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepcore_auditor.fingerprints.config import CoreConfig
from deepcore_auditor.fingerprints.models import channels_last, forward_batched, model_device, set_mode, softmax
from deepcore_auditor.fingerprints.progress import QUIET, Advance, Progress

logger = logging.getLogger(__name__)


# The automatic radius: RADIUS_FACTOR times the owner's flip radius, within these bounds.
RADIUS_FACTOR = 3.0
RADIUS_MIN = 2 / 255
RADIUS_MAX = 0.15  # 38/255: beyond it a perturbation is plainly visible on any image
_RADIUS_LADDER = tuple(r / 255 for r in (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48))


@dataclass(frozen=True)
class Robustness:
    """How far the owner must be pushed before it is confidently wrong, measured on its data."""

    flip_radius: float  # smallest ladder radius at which half the probes reach the target confidently
    success: dict[str, float]  # radius (as x/255) -> share of probes that reached it
    probes: int
    epsilon: float  # the radius chosen from it

    def to_dict(self) -> dict[str, object]:
        return {"flip_radius": round(self.flip_radius, 6), "success": self.success, "probes": self.probes,
                "epsilon": round(self.epsilon, 6), "factor": RADIUS_FACTOR}


def choose_epsilon(owner: nn.Module, data_points: np.ndarray, data_labels: np.ndarray, min_confidence: float,
                   *, probes: int = 64, steps: int = 20, seed: int = 0, progress: Progress = QUIET) -> Robustness:
    """The core points' radius from the owner's own robustness, not from a data set's habit.

    Targeted attacks on the owner alone (the seeds and targets core points use) at growing L-inf
    radii find its *flip radius*: the smallest at which half the probes make it confident
    (>= min_confidence) in the target. Core points get RADIUS_FACTOR times that, within
    [RADIUS_MIN, RADIUS_MAX]: room for the joint objective (students follow, references refuse)
    beyond the owner's bare flip, yet small next to a radius that paints the target class in, on
    which every competent model of the task agrees (the failure the fixed 0.15 default had on
    CIFAR-10: 38/255, independent models agreeing 0.975-1.0).
    """
    seed_index, targets = choose_seeds(data_labels, _probs(owner, data_points), probes, seed)
    x0 = data_points[seed_index]
    success: dict[str, float] = {}
    flip = _RADIUS_LADDER[-1]
    with progress.bar(f"the owner's robustness (up to {len(_RADIUS_LADDER)} radii)", len(_RADIUS_LADDER)) as advance:
        for radius in _RADIUS_LADDER:
            cfg = CoreConfig(epsilon=radius, steps=steps, min_confidence=min_confidence, batch_size=probes, seed=seed)
            adv = optimize_points(owner, (), (), x0, targets, cfg)
            lab, conf = _labels(owner, adv)
            rate = float(np.mean((lab == targets) & (conf >= min_confidence)))
            success[f"{radius * 255:g}"] = round(rate, 4)
            advance(1)
            if rate >= 0.5:
                flip = radius
                break
    eps = float(min(RADIUS_MAX, max(RADIUS_MIN, RADIUS_FACTOR * flip)))
    logger.info("owner flip radius %.4f (%.1f/255): epsilon %.4f (%.1f/255)", flip, flip * 255, eps, eps * 255)
    return Robustness(flip, success, len(seed_index), eps)


@dataclass(frozen=True)
class CorePoints:
    points: np.ndarray  # float32 [n, C, H, W] canonical
    targets: np.ndarray  # int64 [n]: the owner's label at each point
    seed_index: np.ndarray  # int64 [n]: which data sample each point grew from
    score: np.ndarray  # float64 [n]: students following - references following, at selection
    owner_confidence: np.ndarray  # float64 [n]


def _follow_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def _refuse_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p_t = F.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    return -torch.log1p(-p_t.clamp(max=1 - 1e-6))


def optimize_points(
    owner: nn.Module,
    students: Sequence[nn.Module],
    references: Sequence[nn.Module],
    seeds: np.ndarray,
    targets: np.ndarray,
    config: CoreConfig,
    *,
    offset: int = 0,
    progress: Progress = QUIET,
) -> np.ndarray:
    """Signed-gradient descent on the joint loss inside the epsilon ball; canonical points out.
    `progress` gets one bar over every candidate's steps.

    Each batch starts from noise seeded by `config.seed` and its position (`offset` + its start):
    candidates grown in two calls (a probe of the first ones, the rest at `offset`) are the
    points one call would grow, as long as the probe is a whole number of batches. The points grow
    on the owner's device (every model must lie there: fingerprints.build moves them); the noise
    is drawn on the CPU, so a seed starts every device from the same points."""
    models = (owner, *students, *references)
    frozen = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for m in models:
        set_mode(m, False)
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with progress.bar(f"growing {len(seeds)} candidate core points", len(seeds) * config.steps) as advance, \
                channels_last(*models):
            return _optimize(owner, students, references, seeds, targets, config, offset, advance)
    finally:  # the models are the caller's: they leave as they came (the zoo trains the owner's copies later)
        for p, flag in frozen:
            p.requires_grad_(flag)


def _optimize(owner: nn.Module, students: Sequence[nn.Module], references: Sequence[nn.Module], seeds: np.ndarray,
              targets: np.ndarray, config: CoreConfig, offset: int, advance: Advance) -> np.ndarray:
    if config.epsilon is None:
        raise ValueError("CoreConfig.epsilon must be resolved (choose_epsilon) before optimizing points")
    if references and config.reference_weight is None:
        raise ValueError("CoreConfig.reference_weight must be resolved before optimizing points against references")
    ref_weight = config.reference_weight or 0.0
    out = np.empty_like(seeds, dtype=np.float32)
    step = 2.5 * config.epsilon / config.steps
    owner_goal = -float(np.log(1 - (1 - config.min_confidence) / 2))
    device = model_device(owner)
    for start in range(0, len(seeds), config.batch_size):
        x0 = torch.from_numpy(np.ascontiguousarray(seeds[start : start + config.batch_size], dtype=np.float32)).to(device)
        t = torch.from_numpy(targets[start : start + config.batch_size].astype(np.int64)).to(device)
        gen = torch.Generator().manual_seed(config.seed + offset + start)
        delta = ((torch.rand(x0.shape, generator=gen) * 2 - 1) * config.epsilon * 0.5).to(device)
        for _ in range(config.steps):
            delta.requires_grad_(True)
            x = (x0 + delta).clamp(0, 1)
            owner_ce = _follow_loss(owner(x), t)
            # The owner is pushed hard until it is confident past the bound, then left alone, so
            # points become core points without being painted into owner-only features.
            loss = config.owner_weight * F.relu(owner_ce - owner_goal)
            if students:
                loss = loss + torch.stack([_follow_loss(s(x), t) for s in students]).mean(0)
            if references:
                loss = loss + ref_weight * torch.stack([_refuse_loss(r(x), t) for r in references]).mean(0)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                delta = (delta - step * grad.sign()).clamp(-config.epsilon, config.epsilon)
                delta = (x0 + delta).clamp(0, 1) - x0
            advance(len(x0))
        out[start : start + len(x0)] = (x0 + delta).clamp(0, 1).cpu().numpy()
    return out


def _probs(model: nn.Module, points: np.ndarray, batch_size: int = 500) -> np.ndarray:
    return forward_batched(model, points, batch_size, softmax)


def _labels(model: nn.Module, points: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    p = _probs(model, points, batch_size)
    return p.argmax(1), p.max(1).astype(np.float64)


def choose_seeds(labels: np.ndarray, owner_probs: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeds the owner classifies correctly, each with a target class other than its own.

    Targets are drawn among the other classes with weights sqrt(owner probability): varied, yet
    mostly reachable within epsilon (uniform targets leave most candidates short of the core).
    """
    rng = np.random.default_rng(seed)
    owner_labels = owner_probs.argmax(1)
    good = np.flatnonzero(labels == owner_labels)
    if len(good) == 0:
        good = np.arange(len(labels))
    picked = rng.choice(good, size=min(n, len(good)), replace=False)
    w = np.sqrt(np.clip(owner_probs[picked].astype(np.float64), 1e-12, None))
    w[np.arange(len(picked)), owner_labels[picked]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    targets = np.array([rng.choice(w.shape[1], p=row) for row in w], dtype=np.int64)
    return picked, targets


def plan_candidates(owner: nn.Module, data_points: np.ndarray, data_labels: np.ndarray,
                    config: CoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """The `n_candidates` seeds (indices into the data) and target classes core points grow from."""
    return choose_seeds(data_labels, _probs(owner, data_points), config.n_candidates, config.seed)


def select_core(
    owner: nn.Module,
    students: Sequence[nn.Module],
    references: Sequence[nn.Module],
    cand: np.ndarray,
    seed_index: np.ndarray,
    targets: np.ndarray,
    n_points: int,
    min_confidence: float,
) -> CorePoints:
    """Keep the `n_points` most discriminative candidates among the core points (owner confident
    in the target): students following minus references following, ties by owner confidence."""
    o_lab, o_conf = _labels(owner, cand)
    follow = np.mean([_labels(s, cand)[0] == o_lab for s in students], axis=0) if students else np.ones(len(cand))
    refuse = np.mean([_labels(r, cand)[0] == o_lab for r in references], axis=0) if references else np.zeros(len(cand))
    score = follow - refuse
    core = (o_lab == targets) & (o_conf >= min_confidence)
    logger.info("%d of %d candidates are core points (owner confidence >= %.3f)", int(core.sum()), len(cand), min_confidence)
    order = np.lexsort((-o_conf, -score))
    keep = [i for i in order if core[i]][:n_points]
    keep_arr = np.asarray(sorted(keep), dtype=np.int64)
    return CorePoints(
        points=cand[keep_arr],
        targets=o_lab[keep_arr].astype(np.int64),
        seed_index=seed_index[keep_arr].astype(np.int64),
        score=score[keep_arr].astype(np.float64),
        owner_confidence=o_conf[keep_arr],
    )


@dataclass(frozen=True)
class ErrorPoints:
    index: np.ndarray  # int64 [m]: which of the natural samples offered
    owner_labels: np.ndarray  # int64 [m]: the owner's (wrong) label there
    score: np.ndarray  # float64 [m]: students' probability of the owner's label - references'
    candidates: int  # how many of the samples offered the owner got wrong


def select_error_points(owner: nn.Module, students: Sequence[nn.Module], references: Sequence[nn.Module],
                        points: np.ndarray, labels: np.ndarray, n: int) -> ErrorPoints:
    """Up to `n` natural samples (`points`, true `labels`, never trained on by the owner) that the
    owner gets wrong, ranked by how much more probability the `students` (functional copies:
    distilled and label-extracted) give the owner's wrong label than the `references` do; only
    samples where the students give it more are kept.

    An independent model errs where the task is ambiguous, and so does the owner, but each in
    its own way; a model trained on the owner's answers errs the owner's way, in any
    architecture. The ranking is by probabilities, not by labels: a handful of simulated models
    agree or not on every candidate alike (on the Fashion-MNIST benchmark's 1,346 owner mistakes,
    34 were copied by every student and by no reference), and the label ranking left the held-out
    references' prediction bound at 0.69-0.72 where the probability ranking left it at 0.60-0.66,
    with the benchmark's students of four architectures at 0.77-0.84 and its homologous models at
    0.51-0.53 or less (2026-12-07, 100-400 points). Weight copies are left out of `students`: a
    copy fine-tuned on true labels unlearns the owner's mistakes, and the core points catch it."""
    o_lab = _labels(owner, points)[0]
    wrong = np.flatnonzero(o_lab != labels)
    if len(wrong) == 0 or n <= 0 or not students:
        empty = np.zeros(0, dtype=np.int64)
        return ErrorPoints(empty, empty, np.zeros(0), len(wrong))
    x, target = points[wrong], o_lab[wrong]

    def owner_label_prob(m: nn.Module) -> np.ndarray:
        return _probs(m, x)[np.arange(len(x)), target].astype(np.float64)

    score = np.mean([owner_label_prob(s) for s in students], axis=0)
    if references:
        score = score - np.mean([owner_label_prob(r) for r in references], axis=0)
    order = np.argsort(-score, kind="stable")
    keep = np.sort(order[: min(n, int((score > 0).sum()))])
    return ErrorPoints(wrong[keep].astype(np.int64), target[keep].astype(np.int64), score[keep].astype(np.float64), len(wrong))


def build_core_points(
    owner: nn.Module,
    students: Sequence[nn.Module],
    references: Sequence[nn.Module],
    data_points: np.ndarray,
    data_labels: np.ndarray,
    num_classes: int,
    config: CoreConfig,
) -> CorePoints:
    """Grow `n_candidates` points from seeds, keep the `n_points` most discriminative core points."""
    seed_index, targets = plan_candidates(owner, data_points, data_labels, config)
    logger.info("optimizing %d candidate points (%d students, %d references)", len(seed_index), len(students), len(references))
    cand = optimize_points(owner, students, references, data_points[seed_index], targets, config)
    return select_core(owner, students, references, cand, seed_index, targets, config.n_points, config.min_confidence)
