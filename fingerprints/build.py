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

import dataclasses
import datetime as _dt
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepcore_auditor.adapters.base import Access, Oracle
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.adapters.images import to_uint8_grid
from deepcore_auditor.adapters.torch import resolve_device
from deepcore_auditor.fingerprints import recipes
from deepcore_auditor.fingerprints.calibration import MIN_GAP, point_sets, rates, set_view
from deepcore_auditor.fingerprints.config import REFERENCE_WEIGHTS, BuildConfig, KnownModelSpec
from deepcore_auditor.fingerprints.core import choose_epsilon, optimize_points, plan_candidates, select_core, select_error_points
from deepcore_auditor.fingerprints.format import Fingerprint, ModelAnswers
from deepcore_auditor.fingerprints.model_cache import KnownModelCache, load_state, state_bytes
from deepcore_auditor.fingerprints.models import (
    Normalized,
    TrainConfig,
    build_architecture,
    clone,
    model_device,
    predict,
    reinitialize,
    train,
)
from deepcore_auditor.fingerprints.progress import QUIET, Progress
from deepcore_auditor.fingerprints.quality import OWNER_ARCH_GAP, Quality, accuracy_floor, quality_problem
from deepcore_auditor.fingerprints.stats import Bettor

logger = logging.getLogger(__name__)


@dataclass
class KnownModel:
    spec: KnownModelSpec
    model: nn.Module | None = None  # torch model (needed for selection)
    oracle: Oracle | None = None  # any adapter (enough for calibration)
    quality: Quality | None = None


@dataclass(frozen=True)
class Holdout:
    """Natural held-out samples (never trained on) on which every known model is measured."""

    points: np.ndarray
    labels: np.ndarray
    owner_labels: np.ndarray

    def measure(self, labels: np.ndarray) -> Quality:
        return Quality(accuracy=float(np.mean(labels == self.labels)), agreement=float(np.mean(labels == self.owner_labels)),
                       samples=len(self.labels))


@dataclass(frozen=True)
class ZooWork:
    """What training any known model of one build reads, but the owner: everything a worker
    elsewhere needs (`build_fingerprint(fan_out=...)` ships it once to every worker), and the one
    way a known model is trained here too, so that both train the same model."""

    points: np.ndarray
    labels: np.ndarray
    num_classes: int
    config: BuildConfig  # its epsilon resolved
    holdout: Holdout
    owner_accuracy: float

    def train(self, owner: Normalized, index: int, retry: bool = False, bars: Progress = QUIET) -> nn.Module:
        """Train `config.zoo[index]` from `owner` (on the device it lies on)."""
        spec = self.config.zoo[index]
        return train_known_model(spec, owner, self.points, self.labels, self.num_classes, self.config, index,
                                 target_accuracy=self.owner_accuracy - OWNER_ARCH_GAP / 2,
                                 floor=accuracy_floor(spec.family, spec.arch, self.owner_accuracy, self.num_classes),
                                 holdout=self.holdout, retry=retry, progress=bars)


# Trains the known models at these indices elsewhere (a cluster's tasks, `train_shipped`) and
# yields each one's state (`model_cache.state_bytes`) as it is done, in any order.
FanOut = Callable[[ZooWork, Sequence[int]], Iterable[tuple[int, bytes]]]


class Given:
    """An owner handed to workers as itself: an eager module, which pickles (a TorchScript or
    torch.export owner does not, and is shipped as its file instead: auditor.commands.ShippedOwner)."""

    def __init__(self, owner: Normalized) -> None:
        self.owner = owner

    def __call__(self) -> Normalized:
        return self.owner


def train_shipped(shipped: tuple[Callable[[], Normalized], ZooWork], index: int) -> bytes:
    """One known model trained by a worker: the owner loaded there (`shipped[0]()`), moved to the
    build's device, trained as `build_fingerprint` trains it; its state goes back as bytes."""
    load_owner, work = shipped
    owner = _on(load_owner(), build_device(work.config.device))
    return state_bytes(work.train(owner, index))


HOLDOUT_SAMPLES = 2000  # enough for a standard error of about 0.01 on an accuracy
# The corrected recipe for a model below its floor: another seed, half the step (a model that
# diverged to one class), twice the epochs and random translations of up to 1/8 of the image (a
# model that stalled while overfitting the owner's data, as a label-extracted CIFAR-10 student
# did at 0.71 against a floor of 0.75). Translations are not in the first round: they make
# another recipe, and a reference trained by another recipe than the owner's agrees less with it
# than the owner's real competitors do (2026-12-06, the suite's Fashion-MNIST world, an Adam
# owner without augmentation, beside an SGD reference: a held-out Adam reference with
# translations agreed 0.38 on the kept points and p0 was 0.467, under the 0.58 of the world's
# independent model of the owner's own recipe; without them it agreed 0.79, p0 0.878).
RETRAIN_LR_FACTOR = 0.5
SGD_LR = 0.05  # the one-cycle peak of the "sgd" recipe (batch 128)


def _recipe(config: BuildConfig, spec: KnownModelSpec, seed: int, retry: bool, height: int) -> TrainConfig:
    if spec.recipe == "sgd":  # a fixed schedule, with random translations as such recipes have
        fixed = (config.sgd_epochs or 2 * config.epochs + 2) * (2 if retry else 1)
        return TrainConfig(epochs=fixed, lr=SGD_LR * (RETRAIN_LR_FACTOR if retry else 1.0), seed=seed,
                           shift=max(1, height // 8), optimizer="sgd")
    if spec.recipe != "adam":
        raise InputError(f"known model {spec.name}: unknown training recipe {spec.recipe!r} (adam or sgd)")
    most = config.max_epochs or 4 * config.epochs
    if not retry:
        return TrainConfig(epochs=config.epochs, max_epochs=most, seed=seed)
    return TrainConfig(epochs=config.epochs, max_epochs=2 * most, lr=1e-3 * RETRAIN_LR_FACTOR, seed=seed,
                       shift=max(1, height // 8))


def training_inputs(spec: KnownModelSpec, config: BuildConfig) -> dict[str, object]:
    """The parameters of `config` that `train_known_model` reads for `spec`, and no others: what
    the known-model cache keys an entry by (fingerprints.model_cache), so that a flag which does
    not change a model (a radius for a reference, epochs for a weight copy) does not retrain it.
    Keep it in step with `train_known_model` and `_recipe`. Never the device (`config.device`): a
    model trained on a GPU is an entry a CPU build reuses, and the other way round."""
    inputs: dict[str, object] = {"seed": config.seed, "train_samples": config.train_samples}
    if spec.family == "prune":
        inputs["prune_ratio"] = config.prune_ratio
    elif spec.family == "adv-fine-tune":
        inputs["epsilon"] = config.core.epsilon
    elif spec.family != "fine-tune":  # trained from scratch
        inputs["epochs"] = config.epochs
        inputs["max_epochs" if spec.recipe != "sgd" else "sgd_epochs"] = (
            config.max_epochs if spec.recipe != "sgd" else config.sgd_epochs)
    return inputs


def train_known_model(
    spec: KnownModelSpec,
    owner: Normalized,
    points: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: BuildConfig,
    index: int,
    *,
    target_accuracy: float | None = None,
    floor: float = 0.0,
    holdout: Holdout | None = None,
    retry: bool = False,
    progress: Progress = QUIET,
) -> nn.Module:
    """Train one simulated pirate or reference on (a seeded subset of) the owner's data.

    Models trained from scratch train at least `config.epochs` and, given a `holdout` and a
    `target_accuracy`, go on (up to `max_epochs`) until they reach it, or stop improving once
    above `floor`: a reference must be as good as the competitors it stands for
    (fingerprints.quality).
    """
    seed = config.seed * 1000 + index + 1 + (7919 if retry else 0)
    lr_factor = RETRAIN_LR_FACTOR if retry else 1.0
    watch = {"progress": progress, "label": spec.name + (" (retry)" if retry else "")}  # the bar only: not trained from
    rng = np.random.default_rng(seed)
    subset = rng.choice(len(points), size=min(config.train_samples, len(points)), replace=False)
    x = points[subset]
    if spec.family == "fine-tune":
        return recipes.fine_tune(owner, x, labels[subset], TrainConfig(epochs=1, lr=1e-4 * lr_factor, seed=seed), **watch)
    if spec.family == "prune":
        return recipes.prune(owner, x, labels[subset], config.prune_ratio, TrainConfig(epochs=1, lr=1e-4 * lr_factor, seed=seed),
                             **watch)
    if spec.family == "adv-fine-tune":
        # A pirate hardening its copy against perturbations: half the core points' radius.
        assert config.core.epsilon is not None, "epsilon is resolved before the zoo is trained"
        return recipes.adv_fine_tune(owner, x, labels[subset], config.core.epsilon / 2,
                                     TrainConfig(epochs=1, lr=3e-4 * lr_factor, seed=seed), **watch)
    if spec.arch == "owner":
        student: nn.Module = reinitialize(owner, seed)
    else:
        torch.manual_seed(seed)
        student = _skeleton(spec, owner, points.shape[1:], num_classes)
    until = None
    if holdout is not None and target_accuracy is not None and spec.recipe != "sgd":
        history: list[float] = []

        def until(model: nn.Module) -> bool:
            acc = holdout.measure(predict(model, holdout.points).argmax(1)).accuracy
            stalled = bool(history) and acc < history[-1] + 0.005
            history.append(acc)
            logger.debug("%s: held-out accuracy %.4f after an epoch", spec.name, acc)
            return acc >= target_accuracy or (stalled and acc >= floor)

    tc = _recipe(config, spec, seed, retry, int(points.shape[2]))
    if spec.family == "distill":
        return recipes.distill(owner, x, student, tc, until=until, **watch)
    if spec.family == "extract":
        return recipes.extract(owner, x, student, tc, until=until, **watch)
    return train(student, x, labels[subset], tc, until=until, **watch)  # independent: the true labels


def _answers(spec: KnownModelSpec, km: KnownModel, points: np.ndarray, owner_labels: np.ndarray) -> ModelAnswers:
    if km.model is not None:
        probs = predict(km.model, points).astype(np.float64)
    else:
        assert km.oracle is not None
        probs = km.oracle.query(points, Access.PROBS)
    labels = probs.argmax(1).astype(np.int64)
    quality = None
    if km.quality is not None:
        quality = {"arch": spec.arch, "accuracy": round(km.quality.accuracy, 4),
                   "agreement": round(km.quality.agreement, 4), "samples": km.quality.samples}
    return ModelAnswers(spec.name, spec.kind, spec.family, spec.role, labels, probs[np.arange(len(points)), owner_labels], quality)


def _labels_of(km: KnownModel, points: np.ndarray) -> np.ndarray:
    if km.model is not None:
        return predict(km.model, points).argmax(1)
    assert km.oracle is not None
    return km.oracle.query(points, Access.LABELS).astype(np.int64)


def _skeleton(spec: KnownModelSpec, owner: Normalized, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """An untrained model of `spec`'s architecture, for a cached state to be loaded into, on the
    owner's device (initialized on the CPU, as everywhere: the same seed, the same weights)."""
    if spec.arch == "owner":
        return clone(owner)
    c, h, w = (int(v) for v in shape)
    return Normalized(build_architecture(spec.arch, (c, h, w), num_classes), owner.convention).to(model_device(owner))


def build_device(name: str) -> torch.device:
    """`BuildConfig.device` resolved (adapters.torch.resolve_device: `cuda` without a usable GPU
    is refused in one line), a GPU with its index."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _describe(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` itself when it computes on `device`, else a copy moved there: the caller's model
    stays where it was (a benchmark goes on using its owner on the CPU)."""
    return model if model_device(model) == device else clone(model).to(device)


def _trained_and_checked(spec: KnownModelSpec, owner: Normalized, work: ZooWork, index: int, say: Callable[[str], None],
                         cache: KnownModelCache | None = None, bars: Progress = QUIET,
                         ready: nn.Module | None = None) -> KnownModel:
    """Train one known model (or reuse the one `cache` holds, or the one trained elsewhere,
    `ready`), measure it, retrain once here with the corrected recipe if it is below its floor,
    and refuse the build (one line naming it) if it still is: never is a degenerate model used for
    selection or calibration. A cached model is measured again like a fresh one."""
    floor = accuracy_floor(spec.family, spec.arch, work.owner_accuracy, work.num_classes)
    problem = ""
    for attempt in range(2):
        t0 = time.monotonic()
        retry = attempt == 1
        inputs = training_inputs(spec, work.config)
        skeleton = lambda: _skeleton(spec, owner, work.points.shape[1:], work.num_classes)  # noqa: E731
        model = cache.get(spec, index, retry, inputs, skeleton) if cache else None
        if model is None:
            model = ready if ready is not None and not retry else work.train(owner, index, retry, bars)
            if cache is not None:
                cache.put(spec, index, retry, inputs, model)
        q = work.holdout.measure(predict(model, work.holdout.points).argmax(1))
        say(f"  {spec.name}: held-out accuracy {q.accuracy:.3f} (floor {floor:.3f}), agreement with the owner "
            f"{q.agreement:.3f} ({time.monotonic() - t0:.1f} s)")
        problem = quality_problem(spec.name, spec.family, spec.arch, q.accuracy, work.owner_accuracy, work.num_classes) or ""
        if not problem:
            return KnownModel(spec, model=model, quality=q)
        if attempt == 0:
            say(f"  {spec.name} is below its floor: retraining (another seed, learning rate x{RETRAIN_LR_FACTOR}, "
                "twice the epochs, random translations)")
    raise InputError(f"cannot train a trustworthy known model: {problem}, also after retraining; give more "
                     "training data, real held-out data (x_test/y_test: measured on samples the owner trained on, "
                     "its accuracy is overstated), or check the owner's input convention")


def build_fingerprint(
    owner: Normalized,
    points: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    owner_identity: dict[str, str],
    config: BuildConfig,
    *,
    holdout: tuple[np.ndarray, np.ndarray] | None = None,
    extra_references: Sequence[tuple[KnownModelSpec, Oracle | nn.Module]] = (),
    progress: Callable[[str], None] | None = None,
    require_separable: bool = True,
    cache_dir: Path | None = None,
    bars: Progress = QUIET,
    fan_out: FanOut | None = None,
    created: str | None = None,
    without: Collection[str] = (),
) -> Fingerprint:
    """Build a DeepCore fingerprint for `owner` from its training data (canonical points).

    `holdout` (natural samples never trained on; by default a seeded sixth of the data is set
    aside for it) measures the owner and every known model; see fingerprints.quality.
    `require_separable=False` only reports what `check_separable` would refuse: for benchmarks,
    which measure fingerprints rather than ship them. With `cache_dir`, trained known models are
    kept there and reused by a later build of the same owner, data and training parameters
    (fingerprints.model_cache). `progress` gets a line per stage; `bars` a bar (with an ETA) per
    model trained and for the growth of the core points (fingerprints.progress).

    The zoo trains, and the points grow, on `config.device` (a copy of the owner is moved there;
    every array in and out stays on the CPU), recorded in `extra["build_device"]`. The owner's
    held-out answers, which key the known-model cache, are computed where the owner was handed in
    (the CPU, from the CLI), so that a GPU build and a CPU build share the cached models.

    With `fan_out`, the known models the cache lacks are first trained elsewhere (a Ray
    cluster's tasks: auditor.cluster), all at once, then measured here like cached ones; a model
    below its floor is retrained here. The models are the ones this process would train (the
    same `ZooWork.train`), so the fingerprint is the same. `created` (ISO 8601) replaces the time
    the file records (its only field that changes from one identical build to the next), for
    builds whose digests are to be compared (`SOURCE_DATE_EPOCH`, by the CLI).

    `without` names members of `config.zoo` neither trained nor used, the others keeping the
    seeds (and cached copies) they have in the whole zoo: what a member buys is measured by
    building without it (benchmarks.zoo_ablation). The file records them (`extra.without`).
    """
    if isinstance(without, str):
        raise TypeError("without is a collection of model names, not one string")
    unknown = sorted(set(without) - {spec.name for spec in config.zoo})
    if unknown:
        raise InputError(f"cannot leave out {', '.join(unknown)}: not in the zoo")
    say = progress or logger.info
    device = build_device(config.device)
    num_classes = len(classes)
    torch.manual_seed(config.seed)
    if holdout is None:  # a seeded sixth of the data, never trained on
        order = np.random.default_rng(config.seed).permutation(len(points))
        cut = len(points) - max(1, len(points) // 6)
        keep, out = np.sort(order[:cut]), np.sort(order[cut:])
        points, labels, holdout = points[keep], labels[keep], (points[out], labels[out])
    hx, hy = holdout[0][:HOLDOUT_SAMPLES], holdout[1][:HOLDOUT_SAMPLES]
    if len(hy) == 0:
        raise InputError("no held-out samples to measure the known models on")
    owner_held = predict(owner, hx)
    given, owner = owner, _on(owner, device)
    held = Holdout(hx, hy, owner_held.argmax(1))
    owner_accuracy = float(np.mean(held.owner_labels == hy))
    say(f"owner: held-out accuracy {owner_accuracy:.3f} on {len(hy)} samples; training and growing points on {_describe(device)}")
    robustness = None
    stages: dict[str, float] = {}  # seconds per stage, printed at the end (never recorded: the file stays reproducible)
    t0 = start = time.monotonic()
    if config.core.epsilon is None:
        robustness = choose_epsilon(owner, points, labels, config.core.min_confidence, seed=config.seed, progress=bars)
        config = dataclasses.replace(config, core=dataclasses.replace(config.core, epsilon=robustness.epsilon))
        say(f"owner flips at L-inf {robustness.flip_radius * 255:.1f}/255: core points get epsilon "
            f"{robustness.epsilon:.4f} ({robustness.epsilon * 255:.1f}/255; {time.monotonic() - t0:.0f} s)")
    stages["robustness"] = time.monotonic() - t0
    cache = (KnownModelCache(cache_dir, given, owner_held, points, labels, hx, hy, num_classes,
                             factory_args=owner_identity.get("factory_args", "")) if cache_dir is not None else None)
    work = ZooWork(points, labels, num_classes, config, held, owner_accuracy)
    t0 = time.monotonic()
    ready = _trained_elsewhere(work, owner, fan_out, cache, say, bars, without) if fan_out is not None else {}
    if fan_out is not None:
        stages["trained elsewhere"] = time.monotonic() - t0
    known: list[KnownModel] = []
    for i, spec in enumerate(config.zoo):
        if spec.name in without:
            continue
        say(f"training {spec.name} ({spec.kind}, {spec.family}, {spec.role})")
        t1 = time.monotonic()
        known.append(_trained_and_checked(spec, owner, work, i, say, cache, bars, ready.pop(i, None)))
        stages[f"{spec.role} models"] = stages.get(f"{spec.role} models", 0.0) + time.monotonic() - t1
    for spec, m in extra_references:
        km = KnownModel(spec, model=m) if isinstance(m, nn.Module) else KnownModel(spec, oracle=m)
        km.quality = held.measure(_labels_of(km, hx))
        problem = quality_problem(spec.name, spec.family, spec.arch, km.quality.accuracy, owner_accuracy, num_classes)
        if problem:
            raise InputError(f"refusing a supplied reference: {problem}")
        known.append(km)
    extra: dict[str, object] = {"owner_holdout_accuracy": round(owner_accuracy, 4), "build_device": _describe(device)}
    if without:
        extra["without"] = sorted(without)
    if robustness is not None:
        extra["robustness"] = robustness.to_dict()
    t0 = time.monotonic()
    fp = _grow(owner, known, points, labels, classes, owner_identity, config, extra, say, bars)
    stages["core points"] = time.monotonic() - t0
    say(f"core points grown in {stages['core points']:.0f} s")
    t0 = time.monotonic()
    fp = _with_error_points(fp, owner, known, holdout, config, say)
    stages["error points"] = time.monotonic() - t0
    say(f"built in {time.monotonic() - start:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    if created is not None:
        fp = dataclasses.replace(fp, created=created)
    check_separable(fp, say, refuse=require_separable)
    return fp


def _trained_elsewhere(work: ZooWork, owner: Normalized, fan_out: FanOut, cache: KnownModelCache | None,
                       say: Callable[[str], None], bars: Progress, without: Collection[str] = ()) -> dict[int, nn.Module]:
    """The zoo's models the cache lacks (but those `without` names), trained by `fan_out`, each
    loaded into its skeleton here."""
    zoo = work.config.zoo
    todo = [i for i, spec in enumerate(zoo) if spec.name not in without
            and (cache is None or not cache.has(spec, i, False, training_inputs(spec, work.config)))]
    say(f"training {len(todo)} known models as tasks elsewhere ({len(zoo) - len(set(without)) - len(todo)} cached)")
    ready: dict[int, nn.Module] = {}
    t0 = time.monotonic()
    with bars.bar(f"known models ({len(todo)} tasks)", len(todo)) as advance:
        for i, blob in fan_out(work, todo):
            ready[i] = load_state(_skeleton(zoo[i], owner, work.points.shape[1:], work.num_classes), blob)
            advance(1)
    say(f"{len(todo)} known models trained elsewhere in {time.monotonic() - t0:.0f} s")
    return ready


def _grow(owner: Normalized, known: Sequence[KnownModel], points: np.ndarray, labels: np.ndarray, classes: Sequence[str],
          owner_identity: dict[str, str], config: BuildConfig, extra: dict[str, object],
          say: Callable[[str], None], bars: Progress = QUIET) -> Fingerprint:
    """Grow the core points against the selection models and record every known model's answers.

    The reference weight, when None (the default), is the smallest on the ladder at which the
    held-out references leave an exact copy identifiable within a quarter of the points asked for.
    Each rung grows only a probe, the first batch of candidates — the very points a full growth at
    that weight starts with — and the rest are grown once, at the weight kept: the ladder costs at
    most (rungs x probe + rest) candidates, not rungs x all of them (on a CIFAR-10 owner, growing
    600 candidates is the cost of some 17 training epochs). This choice reads the calibration
    references (a few rungs, each harder on the selection references only); p0 is still their
    bound on the points finally kept. A rung whose probe keeps fewer core points than the first
    rung's is never taken, and ends the climb: pushing harder only makes the owner's confidence
    bound harder to reach, and a fingerprint that lost points lost evidence.
    """
    core = config.core
    students = [k.model for k in known if k.spec.kind == "piracy" and k.spec.role == "selection" and k.model is not None]
    refs = [k.model for k in known if k.spec.kind == "independent" and k.spec.role == "selection" and k.model is not None]
    seed_index, targets = plan_candidates(owner, points, labels, core)
    fixed = core.reference_weight is not None or not refs  # with no references the weight is moot
    probe = len(seed_index) if fixed else min(len(seed_index), core.batch_size)
    probe_keep = max(1, round(core.n_points * probe / max(1, len(seed_index))))

    def grow(weight: float | None, lo: int, hi: int) -> np.ndarray:
        c = dataclasses.replace(core, reference_weight=weight)
        grown = optimize_points(owner, students, refs, points[seed_index[lo:hi]], targets[lo:hi], c, offset=lo, progress=bars)
        return to_uint8_grid(grown) if core.uint8_points else grown

    def fingerprint(weight: float | None, cand: np.ndarray, n: int, ladder: list[dict[str, float | int]] | None) -> Fingerprint:
        cp = select_core(owner, students, refs, cand, seed_index[: len(cand)], targets[: len(cand)], n, core.min_confidence)
        if len(cp.points) == 0:
            raise InputError("no candidate reached the owner confidence bound: lower --min-confidence or raise --epsilon")
        trial = dataclasses.replace(config, core=dataclasses.replace(core, reference_weight=weight))
        more = {"reference_weight_ladder": ladder} if ladder is not None else {}
        return Fingerprint(
            points=cp.points,
            owner_labels=cp.targets,
            owner_probs=predict(owner, cp.points),
            convention=owner.convention,
            classes=tuple(classes),
            owner_identity=owner_identity,
            method={"name": "deepcore", "version": 1, "params": trial.to_dict(), "seed": config.seed},
            known_models=tuple(_answers(k.spec, k, cp.points, cp.targets) for k in known),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            extra={"seed_index": cp.seed_index.tolist(), "selection_score": cp.score.round(4).tolist(),
                   "owner_confidence_min": float(cp.owner_confidence.min()), **extra, **more},
        )

    if fixed:
        say(f"growing {len(seed_index)} candidate core points against {len(students)} simulations and "
            f"{len(refs)} references (reference weight {core.reference_weight})")
        fp = fingerprint(core.reference_weight, grow(core.reference_weight, 0, len(seed_index)), core.n_points, None)
        say(f"kept {len(fp)} core points")
        return fp
    say(f"choosing the reference weight on a probe of {probe} of {len(seed_index)} candidates, against "
        f"{len(students)} simulations and {len(refs)} references")
    ladder: list[dict[str, float | int]] = []
    best: tuple[float, np.ndarray] | None = None
    best_need = math.inf
    for weight in REFERENCE_WEIGHTS:
        cand = grow(weight, 0, probe)
        trial = fingerprint(weight, cand, probe_keep, None)
        need = copy_needs(*_p0_p1(trial))
        ladder.append({"reference_weight": weight, "probe_candidates": probe, "points": len(trial),
                       "p0": round(_p0_p1(trial)[0], 4), "exact_copy_needs": need if math.isfinite(need) else -1})
        say(f"  reference weight {weight:g}: {len(trial)} probe core points, an exact copy would need {need}")
        if best is not None and len(trial) < int(ladder[0]["points"]):
            break
        if best is None or need < best_need:
            best, best_need = (weight, cand), need
        if need <= max(1, core.n_points // 4):
            break
    assert best is not None
    weight, cand = best
    if probe < len(seed_index):
        say(f"growing the other {len(seed_index) - probe} candidates at reference weight {weight:g}")
        cand = np.concatenate([cand, grow(weight, probe, len(seed_index))])
    fp = fingerprint(weight, cand, core.n_points, ladder)
    say(f"kept {len(fp)} core points (reference weight {weight:g})")
    return fp


FUNCTIONAL_FAMILIES = ("distill", "extract")  # the simulated students error points are chosen for
MIN_ERROR_POINTS = 20  # fewer error points than this make no test worth running: none are kept


def _with_error_points(fp: Fingerprint, owner: Normalized, known: Sequence[KnownModel],
                       natural: tuple[np.ndarray, np.ndarray], config: BuildConfig, say: Callable[[str], None]) -> Fingerprint:
    """`fp` with the owner's mistakes on the natural held-out samples appended as a second set of
    points (`core.select_error_points`, `calibration.point_sets`), every known model's answers
    recorded on them too: calibration references set their p0 as they set the core points'.
    Their count is `extra["error_points"]`; `seed_index` and `selection_score` stay the core
    points' own. Chosen for the simulated functional copies only (`FUNCTIONAL_FAMILIES`).
    Fewer than MIN_ERROR_POINTS qualifying (an owner that is rarely wrong on its held-out data,
    or whose mistakes its simulated students do not share): none are kept. Nor
    are they where the held-out simulated students (calibration role, functional families) agree
    with the owner's mistakes on average less than MIN_GAP above the error points' p0: the second
    test would cost queries and half of alpha for no power (measured 2026-12-07 on the CIFAR-10
    regression world: the held-out distilled student agreed 0.635 and the LeNet extraction 0.38
    with 200 owner mistakes, the references up to 0.66, p0 0.796; on Fashion-MNIST 0.93-0.975
    against p0 0.58-0.73). The decision reads the held-out students, as p1 does, and is recorded."""
    want = config.core.error_points
    if want <= 0:
        return fp
    students = [k.model for k in known if k.spec.kind == "piracy" and k.spec.role == "selection"
                and k.spec.family in FUNCTIONAL_FAMILIES and k.model is not None]
    refs = [k.model for k in known if k.spec.kind == "independent" and k.spec.role == "selection" and k.model is not None]
    ep = select_error_points(owner, students, refs, natural[0], natural[1], want)
    if len(ep.index) < MIN_ERROR_POINTS:
        say(f"no error points: {len(ep.index)} of the owner's {ep.candidates} mistakes on {len(natural[1])} held-out "
            f"samples get more probability from its simulated students than from its references (at least {MIN_ERROR_POINTS} needed)")
        return dataclasses.replace(fp, extra={**fp.extra, "error_candidates": ep.candidates})
    x, wrong = natural[0][ep.index].astype(np.float32), ep.owner_labels
    if config.core.uint8_points:  # natural images from 8-bit files already are; data given as floats may not be
        x = to_uint8_grid(x)
        same = predict(owner, x).argmax(1) == wrong  # a sample whose rounding changed the owner's answer is dropped
        x, wrong, ep = x[same], wrong[same], dataclasses.replace(ep, index=ep.index[same], owner_labels=wrong[same], score=ep.score[same])
    points = np.concatenate([fp.points, x])
    labels = np.concatenate([fp.owner_labels, wrong])
    extra = {**fp.extra, "error_points": len(ep.index), "error_candidates": ep.candidates,
             "error_selection_score": ep.score.round(4).tolist()}
    say(f"{len(ep.index)} error points offered: held-out samples the owner gets wrong ({ep.candidates} of "
        f"{len(natural[1])}) to which its simulated students give more probability than its references")
    # Every known model answers the new points only; its answers on the core points are in `fp` already.
    known_models = tuple(dataclasses.replace(m, labels=np.concatenate([m.labels, a.labels]),
                                             owner_prob=np.concatenate([m.owner_prob, a.owner_prob]))
                         for m, a in zip(fp.known_models, (_answers(k.spec, k, x, wrong) for k in known), strict=True))
    both = dataclasses.replace(fp, points=points, owner_labels=labels, owner_probs=np.concatenate([fp.owner_probs, predict(owner, x)]),
                               known_models=known_models, extra=extra)
    # A second test costs queries and half of alpha: kept only where the held-out simulated
    # students show it has power, agreeing with the owner's mistakes clearly above their p0.
    errors = set_view(both, 1)
    p0 = float(rates(errors, "agreement", "betting").p0.max())
    held = [float(np.mean(m.labels == errors.owner_labels)) for m in errors.known_models
            if m.kind == "piracy" and m.role == "calibration" and m.family in FUNCTIONAL_FAMILIES]
    if held and float(np.mean(held)) < p0 + MIN_GAP:
        say(f"no error points: the held-out simulated students agree {', '.join(f'{a:.3f}' for a in held)} with the owner's "
            f"mistakes, not {MIN_GAP} above their p0 {p0:.3f}: a second test would have no power here")
        return dataclasses.replace(fp, extra={**fp.extra, "error_candidates": ep.candidates, "error_points_dropped": {
            "p0": round(p0, 4), "held_out_students": [round(a, 4) for a in held], "offered": len(ep.index)}})
    return both


SEPARABLE_ALPHA = 0.01  # the audit's default alpha and beta


def _p0_p1(fp: Fingerprint) -> tuple[float, float]:
    """The fingerprint's agreement-mode p0 (its largest) and p1 (its smallest)."""
    r = rates(fp, "agreement")
    return float(r.p0.max()), float(r.p1.min())


def copy_needs(p0: float, p1: float) -> float:
    """How many agreeing points an exact copy needs to reach Wald's piracy threshold at alpha =
    beta = SEPARABLE_ALPHA under agreement rates p0/p1 (inf: never)."""
    step = math.log(p1 / p0) if p1 > p0 else 0.0
    return math.ceil(math.log((1 - SEPARABLE_ALPHA) / SEPARABLE_ALPHA) / step) if step > 0 else math.inf


def check_separable(fp: Fingerprint, say: Callable[[str], None], *, refuse: bool = True) -> None:
    """Report the held-out references' agreement on the kept points, and refuse a fingerprint on
    which they agree so highly that no verdict could tell an independent model from a pirate:
    when even an exact copy, agreeing on every point, would not reach the piracy threshold at
    alpha = beta = 0.01 within the fingerprint's points — under Wald's test (p0/p1 of old) or
    under the betting test, the audit's default, whose p0 may be the higher (a prediction bound).
    The refusal reads the core points alone; error points, a second test, are reported."""
    sets = point_sets(fp)
    if sets.max() > 0:
        errors = set_view(fp, 1)
        r = rates(errors, "agreement", "betting")
        cal = [m for m in errors.known_models if m.role == "calibration"]
        say(f"{len(errors)} error points: held-out references agree " + ", ".join(
            f"{m.name} {float(np.mean(m.labels == errors.owner_labels)):.3f}" for m in cal if m.kind == "independent")
            + "; held-out students " + ", ".join(
            f"{m.name} {float(np.mean(m.labels == errors.owner_labels)):.3f}" for m in cal if m.kind == "piracy")
            + f"; their p0 {float(r.p0.max()):.3f}")
        fp = set_view(fp, 0)
    held = [m for m in fp.known_models if m.kind == "independent" and m.role == "calibration"]
    for m in held:
        say(f"  held-out reference {m.name}: agreement {float(np.mean(m.labels == fp.owner_labels)):.3f} on the kept points")
    p0_wald, p1 = _p0_p1(fp)
    bet = rates(fp, "agreement", "betting")
    p0_bet = float(bet.p0.max())
    wald_need = copy_needs(p0_wald, p1)
    bet_need = Bettor(len(fp) * p0_bet, len(fp)).best_case_needs(math.log(1 / SEPARABLE_ALPHA), len(fp))
    need, p0 = max((wald_need, p0_wald), (bet_need, p0_bet))
    say(f"p0 {p0_bet:.3f} (the betting test's bound for independent models; Wald's {p0_wald:.3f}, p1 {p1:.3f}): an exact "
        f"copy is identified after {bet_need if bet_need <= len(fp) else 'more than ' + str(len(fp))} of {len(fp)} points "
        f"(Wald's test: {wald_need})")
    if need > len(fp) and not refuse:
        say(f"warning: even an exact copy would need {need} points to be identified; the fingerprint has {len(fp)}")
    elif need > len(fp):
        worst = max(held, key=lambda m: float(np.mean(m.labels == fp.owner_labels)), default=None)
        figure = f" ({worst.name} agrees {float(np.mean(worst.labels == fp.owner_labels)):.3f})" if worst else ""
        raise InputError(f"independent references agree with the owner on the kept points up to p0 {p0:.3f}{figure}: "
                         f"even an exact copy would need more than {len(fp)} points to be identified and the fingerprint has "
                         f"{len(fp)}; rebuild with a larger --reference-weight (references pushed away harder), a smaller --epsilon or more --points")
