"""Baseline fingerprints the benchmark compares DeepCore against, each a `Fingerprint` file.

All are black-box at audit time: a suspect only answers queries on the stored points. The owner
(and, for CAE, surrogate and reference models) are used with gradients at build time only.

- `random`: natural pool points drawn at random (the floor). Scored by label agreement.
- `ipguard` (Cao et al., AsiaCCS 2021): from random pool seeds (owner label i, a random other
  class j), Adam on the input, clamped to [0, 1], minimizes
  ReLU(Z_i - Z_j + k) + ReLU(max_{t!=i,j} Z_t - Z_i) on the owner's logits Z, each point stopped
  once its loss is 0: points in the i/j boundary region, j ahead of i by k logits and i second.
  The owner's label at the final point is recorded. Scored by label agreement.
- `akh` (Godinot et al., AAAI 2025): natural pool points the owner misclassifies; a suspect that
  makes the same mistakes is flagged. Scored by label agreement.
- `sac-w` (Guan et al., NeurIPS 2022): owner-misclassified natural points (akh's rule, its own
  draw). Scored by `sac_distance` on probabilities.
- `sac-m` (same paper): CutMix images, a random box (area fraction ~ U(0.3, 0.7)) of one pool
  image pasted into another. Scored by `sac_distance` on probabilities.
- `cae` (Lukas et al., ICLR 2021): conferrable adversarial examples. From seeds the owner
  classifies correctly, signed-gradient PGD in an L-inf ball towards a random other class t
  maximizes conferrability mean_s p_s(t) * (1 - max_r p_r(t)) over surrogates s (derived
  models) and references r (independent models), plus the owner's cross-entropy to t; the most
  conferrable candidates at which the owner predicts t are kept. Scored by label agreement.

`LABEL_ONLY` lists the methods whose score needs only top-1 labels. `sac_distance` compares two
models' N x N cosine-similarity matrices of their outputs on the same N points (0: alike).
Besides scalar statistics, a fingerprint's `extra` holds per-point lists in point order:
`pool_index` (the pool point each point is or grew from; all but sac-m) and `target` (cae).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.fingerprints.format import Fingerprint
from deepcore_auditor.fingerprints.models import forward_batched, set_mode

logger = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("random", "ipguard", "akh", "sac-w", "sac-m", "cae")
LABEL_ONLY: frozenset[str] = frozenset({"random", "ipguard", "akh", "cae"})
VERSION = 1


@dataclass(frozen=True)
class BaselineConfig:
    """Parameters of every baseline (each method reads the ones it needs)."""

    n_points: int = 400
    seed: int = 0
    ipguard_k: float = 1.0  # logits past the boundary: near it, yet not inside a copy's rounding noise
    ipguard_steps: int = 300  # Adam, lr ipguard_lr, on the input clamped to [0, 1]
    ipguard_lr: float = 0.01
    cae_epsilon: float = 0.05  # L-inf radius in canonical [0, 1] space
    cae_steps: int = 40
    cae_candidates: int = 1000  # grown, then the n_points most conferrable kept
    batch_size: int = 250

    def __post_init__(self) -> None:
        try:
            for name in ("n_points", "seed", "ipguard_steps", "cae_steps", "cae_candidates", "batch_size"):
                v = getattr(self, name)
                if isinstance(v, bool) or int(v) != v:
                    raise ValueError(f"{name} must be an integer, got {v!r}")
                object.__setattr__(self, name, int(v))
            for name in ("ipguard_k", "ipguard_lr", "cae_epsilon"):
                object.__setattr__(self, name, float(getattr(self, name)))
        except (TypeError, ValueError) as e:
            raise InputError(f"baseline config: {e}") from None
        positive = ("n_points", "ipguard_steps", "cae_steps", "cae_candidates", "batch_size", "ipguard_lr", "cae_epsilon")
        bad = [n for n in positive if not (getattr(self, n) > 0 and math.isfinite(getattr(self, n)))]
        if not (self.ipguard_k >= 0 and math.isfinite(self.ipguard_k)):
            bad.append("ipguard_k")
        if self.seed < 0:
            bad.append("seed")
        if bad:
            raise InputError(f"baseline config: {', '.join(bad)} out of range (counts, lr and epsilon > 0; k, seed >= 0)")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


# --------------------------------------------------------------------------- helpers


@contextmanager
def _frozen(models: Sequence[nn.Module]) -> Iterator[None]:
    """Models in eval mode with parameters not requiring grad; both restored on exit."""
    params = [(p, p.requires_grad) for m in models for p in m.parameters()]
    modes = [(m, m.training) for m in models]
    for m in models:
        set_mode(m, False)
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in reversed(params):
            p.requires_grad_(flag)
        for m, training in reversed(modes):
            m.train(training)


def _labels(model: nn.Module, points: np.ndarray, batch_size: int) -> np.ndarray:
    return forward_batched(model, points, batch_size).argmax(1).astype(np.int64)


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int, what: str) -> np.ndarray:
    """Up to n of `pool` (indices) in random order; fewer with a warning."""
    if len(pool) < n:
        logger.warning("only %d %s available for %d points: keeping all of them", len(pool), what, n)
    return rng.choice(pool, size=min(n, len(pool)), replace=False).astype(np.int64)


def _misclassified(owner: nn.Module, pool_x: np.ndarray, pool_y: np.ndarray, method: str, bs: int) -> np.ndarray:
    wrong = np.flatnonzero(_labels(owner, pool_x, bs) != pool_y)
    if len(wrong) == 0:
        raise InputError(f"{method}: the owner misclassifies none of the {len(pool_x)} pool points; "
                         "give a larger or harder pool")
    return wrong


# A method returns its points, per-point int arrays for `extra` (e.g. the pool index each came
# from), and scalar info for `extra`.
_Made = tuple[np.ndarray, dict[str, np.ndarray], dict[str, object]]


def _random(
    owner: nn.Module, x: np.ndarray, y: np.ndarray, cfg: BaselineConfig, rng: np.random.Generator, **_: object
) -> _Made:
    idx = _draw(rng, np.arange(len(x)), cfg.n_points, "pool points")
    return x[idx], {"pool_index": idx}, {"pool_size": len(x)}


def _akh(
    owner: nn.Module, x: np.ndarray, y: np.ndarray, cfg: BaselineConfig, rng: np.random.Generator,
    *, method: str, **_: object
) -> _Made:
    wrong = _misclassified(owner, x, y, method, cfg.batch_size)
    idx = _draw(rng, wrong, cfg.n_points, "owner-misclassified pool points")
    return x[idx], {"pool_index": idx}, {"pool_size": len(x), "pool_misclassified": len(wrong)}


def _cutmix(
    owner: nn.Module, x: np.ndarray, y: np.ndarray, cfg: BaselineConfig, rng: np.random.Generator, **_: object
) -> _Made:
    if len(x) < 2:
        raise InputError("sac-m needs at least 2 pool points to mix")
    _, _, h, w = x.shape
    out = np.empty((cfg.n_points, *x.shape[1:]), np.float32)
    lams = rng.uniform(0.3, 0.7, size=cfg.n_points)
    for n, lam in enumerate(lams):
        a, b = rng.choice(len(x), size=2, replace=False)
        bh, bw = max(1, round(h * math.sqrt(lam))), max(1, round(w * math.sqrt(lam)))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out[n] = x[a]
        out[n, :, top : top + bh, left : left + bw] = x[b, :, top : top + bh, left : left + bw]
    return out, {}, {"pool_size": len(x), "box_fraction_mean": float(lams.mean())}


def _ipguard_loss(z: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: float) -> torch.Tensor:
    rows = torch.arange(len(z))
    z_i, z_j = z[rows, i], z[rows, j]
    others = z.clone()
    others[rows, i] = -torch.inf
    others[rows, j] = -torch.inf
    return F.relu(z_i - z_j + k) + F.relu(others.max(1).values - z_i)


def _ipguard(
    owner: nn.Module, x: np.ndarray, y: np.ndarray, cfg: BaselineConfig, rng: np.random.Generator,
    *, num_classes: int, **_: object
) -> _Made:
    idx = _draw(rng, np.arange(len(x)), cfg.n_points, "pool seeds")
    seeds = x[idx]
    i_all = _labels(owner, seeds, cfg.batch_size)
    j_all = (i_all + rng.integers(1, num_classes, size=len(i_all))) % num_classes
    out = np.empty_like(seeds, dtype=np.float32)
    steps_used = []
    for start in range(0, len(seeds), cfg.batch_size):
        x0 = torch.from_numpy(np.ascontiguousarray(seeds[start : start + cfg.batch_size], dtype=np.float32))
        i = torch.from_numpy(i_all[start : start + len(x0)])
        j = torch.from_numpy(j_all[start : start + len(x0)])
        xv = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([xv], lr=cfg.ipguard_lr)
        final = x0.clone()
        active = torch.ones(len(x0), dtype=torch.bool)
        done_at = np.full(len(x0), cfg.ipguard_steps)
        for step in range(cfg.ipguard_steps + 1):
            act = active.nonzero().squeeze(1)
            loss = _ipguard_loss(owner(xv[act]), i[act], j[act], cfg.ipguard_k)
            reached = act[loss.detach() <= 1e-5]
            final[reached] = xv.detach()[reached]  # early stop: the point as it reached zero loss
            active[reached] = False
            done_at[reached.numpy()] = step
            if step == cfg.ipguard_steps or not bool(active.any()):
                break
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                xv.clamp_(0.0, 1.0)
        final[active] = xv.detach()[active]
        out[start : start + len(x0)] = final.numpy()
        steps_used.append(done_at)
    used = np.concatenate(steps_used)
    return out, {"pool_index": idx}, {"converged": int((used < cfg.ipguard_steps).sum()), "steps_mean": float(used.mean())}


def _conferrability(
    x: torch.Tensor, t: torch.Tensor, surrogates: Sequence[nn.Module], references: Sequence[nn.Module]
) -> torch.Tensor:
    """mean_s p_s(t | x) * (1 - max_r p_r(t | x)), per point."""
    rows = torch.arange(len(x))
    p_s = torch.stack([F.softmax(s(x).float(), dim=1)[rows, t] for s in surrogates])
    p_r = torch.stack([F.softmax(r(x).float(), dim=1)[rows, t] for r in references])
    return (p_s * (1 - p_r.max(0).values)).mean(0)


def _cae(
    owner: nn.Module, x: np.ndarray, y: np.ndarray, cfg: BaselineConfig, rng: np.random.Generator,
    *, num_classes: int, surrogates: Sequence[nn.Module], references: Sequence[nn.Module], **_: object
) -> _Made:
    right = np.flatnonzero(_labels(owner, x, cfg.batch_size) == y)
    if len(right) == 0:
        raise InputError("cae: the owner classifies none of the pool points correctly; no seeds to grow from")
    idx = _draw(rng, right, cfg.cae_candidates, "correctly classified pool seeds")
    targets = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    gen = torch.Generator().manual_seed(cfg.seed)
    eps, step = cfg.cae_epsilon, 2.5 * cfg.cae_epsilon / cfg.cae_steps
    cand = np.empty_like(x[idx], dtype=np.float32)
    conf = np.empty(len(idx), np.float64)
    o_lab = np.empty(len(idx), np.int64)
    for start in range(0, len(idx), cfg.batch_size):
        x0 = torch.from_numpy(np.ascontiguousarray(x[idx[start : start + cfg.batch_size]], dtype=np.float32))
        t = torch.from_numpy(targets[start : start + len(x0)].astype(np.int64))
        delta = (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps * 0.5
        delta = (x0 + delta).clamp(0, 1) - x0
        for _ in range(cfg.cae_steps):
            delta.requires_grad_(True)
            xa = x0 + delta
            c = _conferrability(xa, t, surrogates, references)
            loss = -torch.log(c + 1e-12) + F.cross_entropy(owner(xa), t, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                delta = (delta - step * grad.sign()).clamp(-eps, eps)
                delta = (x0 + delta).clamp(0, 1) - x0
        with torch.no_grad():
            xa = x0 + delta
            cand[start : start + len(x0)] = xa.numpy()
            conf[start : start + len(x0)] = _conferrability(xa, t, surrogates, references).double().numpy()
            o_lab[start : start + len(x0)] = owner(xa).argmax(1).numpy()
    hit = o_lab == targets
    order = np.lexsort((-conf, ~hit))  # points at which the owner predicts t first, each group by conferrability
    keep = order[: cfg.n_points]
    if int(hit.sum()) < len(keep):
        logger.warning("cae: only %d of %d candidates reach the target class on the owner; filling up with the most "
                       "conferrable of the rest", int(hit.sum()), len(idx))
    if len(keep) < cfg.n_points:
        logger.warning("cae: only %d candidates for %d points: keeping all of them", len(keep), cfg.n_points)
    return cand[keep], {"pool_index": idx[keep], "target": targets[keep]}, {
        "candidates": len(idx), "candidates_reaching_target": int(hit.sum()),
        "kept_reaching_target": int(hit[keep].sum()), "conferrability_mean": float(conf[keep].mean()),
        "surrogates": len(surrogates), "references": len(references),
    }


_METHODS: dict[str, Callable[..., _Made]] = {
    "random": _random, "ipguard": _ipguard, "akh": _akh, "sac-w": _akh, "sac-m": _cutmix, "cae": _cae,
}


def _json_number(v: object) -> object:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"non-finite value {f} in fingerprint extra")
        return round(f, 6)
    return v


def _check_pool(pool_x: np.ndarray, pool_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(pool_x, np.ndarray) or pool_x.ndim != 4 or pool_x.dtype.kind != "f":
        raise InputError(f"pool_x must be float canonical points [N, C, H, W], got {getattr(pool_x, 'dtype', type(pool_x))} "
                         f"{list(getattr(pool_x, 'shape', []))}")
    y = np.asarray(pool_y)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(pool_x):
        raise InputError(f"pool_y must be {len(pool_x)} integer labels, got {y.dtype} {list(y.shape)}")
    if len(pool_x) == 0:
        raise InputError("the pool is empty")
    if not np.isfinite(pool_x).all() or pool_x.min() < 0 or pool_x.max() > 1:
        raise InputError("pool_x must be canonical points in [0, 1]")
    return np.ascontiguousarray(pool_x, dtype=np.float32), y.astype(np.int64)


# --------------------------------------------------------------------------- public


def build_baseline(
    method: str,
    owner: nn.Module,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    classes: Sequence[str],
    owner_identity: dict[str, str],
    config: BaselineConfig,
    *,
    surrogates: Sequence[nn.Module] = (),
    references: Sequence[nn.Module] = (),
) -> Fingerprint:
    """A baseline fingerprint of `owner` (a `Normalized` model) by `method`, one of BASELINES.

    `pool_x`/`pool_y`: the auditor's natural points (canonical [N, C, H, W]) and true labels.
    `surrogates` (derived models) and `references` (independent models) are needed by `cae` only.
    The points (at most `config.n_points`) come in a seeded random order; the owner's labels and
    probabilities on them are recorded; `known_models` is left empty (attach reference answers
    with dataclasses.replace). `extra` holds scalar statistics and the per-point lists named in
    the module docstring. Gradients flow through the owner, surrogates and references during
    point optimization only; their parameters' requires_grad and train/eval modes are restored.
    """
    if method not in BASELINES:
        raise InputError(f"unknown baseline method {method!r}: use one of {', '.join(BASELINES)}")
    if method == "cae" and (not surrogates or not references):
        raise InputError(f"cae needs surrogate and reference models (got {len(surrogates)} surrogates, "
                         f"{len(references)} references)")
    convention = getattr(owner, "convention", None)
    if convention is None:
        raise InputError("the owner must be a fingerprints.models.Normalized (it carries the input convention)")
    x, y = _check_pool(pool_x, pool_y)
    num_classes = len(classes)
    if num_classes < 2 or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise InputError(f"pool labels span {int(y.min())}..{int(y.max())} but {num_classes} classes were given")
    rng = np.random.default_rng([config.seed, BASELINES.index(method)])
    models = [owner, *surrogates, *references]
    with _frozen(models):
        out_k = forward_batched(owner, x[:1], 1).shape[1]
        if out_k != num_classes:
            raise InputError(f"the owner outputs {out_k} classes but {num_classes} class names were given")
        points, per_point, info = _METHODS[method](
            owner, x, y, config, rng, method=method, num_classes=num_classes, surrogates=surrogates, references=references
        )
        points = np.clip(points, 0.0, 1.0).astype(np.float32)
        flat = points.reshape(len(points), -1)
        first = np.sort(np.unique(flat, axis=0, return_index=True)[1])
        if len(first) < len(points):
            logger.warning("%s: dropped %d duplicate points", method, len(points) - len(first))
        perm = first[rng.permutation(len(first))]
        points = points[perm]
        logits = torch.from_numpy(forward_batched(owner, points, config.batch_size))
    probs = F.softmax(logits, dim=1).numpy().astype(np.float32)
    top2 = torch.topk(logits, 2, dim=1).values
    extra = {k: _json_number(v) for k, v in info.items()}
    extra["owner_logit_margin_mean"] = _json_number(float((top2[:, 0] - top2[:, 1]).mean()))
    extra["owner_confidence_mean"] = _json_number(probs.max(1).mean())
    for name, values in per_point.items():
        extra[name] = [int(v) for v in values[perm]]
    logger.info("%s: %d points", method, len(points))
    return Fingerprint(
        points=points,
        owner_labels=probs.argmax(1).astype(np.int64),
        owner_probs=probs,
        convention=convention,
        classes=tuple(str(c) for c in classes),
        owner_identity={str(k): str(v) for k, v in owner_identity.items()},
        method={"name": method, "version": VERSION, "params": config.to_dict(), "seed": config.seed},
        known_models=(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra=extra,
    )


def sac_distance(owner_outputs: np.ndarray, suspect_outputs: np.ndarray) -> float:
    """SAC's correlation distance: the mean absolute difference of the two models' N x N
    cosine-similarity matrices of their output rows on the same N points (0: identical)."""
    a, b = np.asarray(owner_outputs, dtype=np.float64), np.asarray(suspect_outputs, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(f"sac_distance needs two [N, K] output arrays of the same shape, "
                         f"got {list(a.shape)} and {list(b.shape)}")
    if len(a) < 2:
        raise InputError(f"sac_distance needs at least 2 points, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("sac_distance: outputs contain non-finite values")

    def cosine(m: np.ndarray) -> np.ndarray:
        m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
        return m @ m.T

    return float(np.abs(cosine(a) - cosine(b)).mean())
