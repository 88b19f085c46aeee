"""Baseline fingerprints (fingerprints/baselines.py) on a small real Fashion-MNIST world: an owner
CNN trained one epoch on 4,000 samples, a fine-tuned copy of it, and an independent CNN."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.fingerprints.baselines import BASELINES, LABEL_ONLY, BaselineConfig, build_baseline, sac_distance
from deepcore_auditor.fingerprints.data import channel_stats
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint, save_fingerprint
from deepcore_auditor.fingerprints.models import Normalized, TrainConfig, build_architecture, clone, predict, train

SMALL = BaselineConfig(n_points=60, ipguard_steps=100, cae_candidates=150, cae_steps=20, batch_size=250)
IDENTITY = {"sha256": "0" * 64, "name": "owner"}


@dataclass(frozen=True)
class Small:
    owner: Normalized
    fine_tuned: Normalized
    independent: Normalized
    pool_x: np.ndarray
    pool_y: np.ndarray
    classes: tuple[str, ...]

    def build(self, method: str, config: BaselineConfig = SMALL, **kw: object) -> Fingerprint:
        kw = {"surrogates": [self.fine_tuned], "references": [self.independent], **kw}
        return build_baseline(method, self.owner, self.pool_x, self.pool_y, self.classes, IDENTITY, config, **kw)


@pytest.fixture(scope="module")
def small(fmnist) -> Iterator[Small]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tr = fmnist.train
    mean, std = channel_stats(tr)
    conv = InputConvention(mean=mean, std=std)
    x, y = tr.points(slice(0, 8000)), tr.y[:8000]

    def fresh(seed: int) -> Normalized:
        torch.manual_seed(seed)
        return Normalized(build_architecture("cnn", tr.shape, 10), conv)

    owner = train(fresh(1), x[:4000], y[:4000], TrainConfig(epochs=1, seed=1))
    fine_tuned = train(clone(owner), x[4000:6000], y[4000:6000], TrainConfig(epochs=1, lr=3e-4, seed=2))
    independent = train(fresh(4), x[4000:8000], y[4000:8000], TrainConfig(epochs=1, seed=4))
    test = fmnist.test
    yield Small(owner, fine_tuned, independent, test.points(slice(0, 1500)), test.y[:1500], test.classes)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(small: Small) -> dict[str, Fingerprint]:
    return {m: small.build(m) for m in BASELINES}


def labels(model: torch.nn.Module, points: np.ndarray) -> np.ndarray:
    return predict(model, points).argmax(1)


def margins(model: torch.nn.Module, points: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        top2 = torch.topk(model(torch.from_numpy(points)), 2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).numpy()


def test_interface_constants() -> None:
    assert BASELINES == ("random", "ipguard", "akh", "sac-w", "sac-m", "cae")
    assert LABEL_ONLY == {"random", "ipguard", "akh", "cae"}
    assert set(SMALL.to_dict()) == {"n_points", "seed", "ipguard_k", "ipguard_steps", "ipguard_lr", "cae_epsilon",
                                    "cae_steps", "cae_candidates", "batch_size"}


@pytest.mark.parametrize("method", BASELINES)
def test_shape_owner_answers_and_round_trip(
    method: str, small: Small, built: dict[str, Fingerprint], tmp_path: Path
) -> None:
    fp = built[method]
    assert len(fp) == SMALL.n_points
    assert fp.points.dtype == np.float32 and fp.points.shape == (SMALL.n_points, 1, 28, 28)
    assert fp.points.min() >= 0 and fp.points.max() <= 1
    assert fp.owner_labels.dtype == np.int64 and fp.owner_probs.dtype == np.float32
    probs = predict(small.owner, fp.points)
    np.testing.assert_allclose(fp.owner_probs, probs, atol=1e-5)
    np.testing.assert_array_equal(fp.owner_labels, probs.argmax(1))
    assert fp.method == {"name": method, "version": 1, "params": SMALL.to_dict(), "seed": SMALL.seed}
    assert fp.convention == small.owner.convention and fp.classes == small.classes and fp.known_models == ()
    assert fp.created.endswith("+00:00")
    if "pool_index" in fp.extra:  # a seeded random order, not the pool's
        assert fp.extra["pool_index"] != sorted(fp.extra["pool_index"])
    path = tmp_path / "fp.json"
    digest = save_fingerprint(fp, path)
    back = load_fingerprint(path)
    assert back.digest == digest == fp.digest
    np.testing.assert_array_equal(back.points, fp.points)
    np.testing.assert_array_equal(back.owner_labels, fp.owner_labels)
    assert back.extra == fp.extra and back.method == fp.method and back.owner_identity == IDENTITY


@pytest.mark.parametrize("method", BASELINES)
def test_deterministic_per_seed(method: str, small: Small, built: dict[str, Fingerprint]) -> None:
    again = small.build(method)
    np.testing.assert_array_equal(again.points, built[method].points)
    other = small.build(method, replace(SMALL, seed=1))
    assert not np.array_equal(other.points, built[method].points)


@pytest.mark.parametrize("method", ["akh", "sac-w"])
def test_misclassified_pool_points(method: str, small: Small, built: dict[str, Fingerprint]) -> None:
    fp = built[method]
    idx = np.asarray(fp.extra["pool_index"])
    assert len(set(idx.tolist())) == len(idx)
    np.testing.assert_array_equal(fp.points, small.pool_x[idx])
    assert (fp.owner_labels != small.pool_y[idx]).all()
    assert fp.extra["pool_misclassified"] == int((labels(small.owner, small.pool_x) != small.pool_y).sum())


def test_random_points_are_pool_points(small: Small, built: dict[str, Fingerprint]) -> None:
    fp = built["random"]
    np.testing.assert_array_equal(fp.points, small.pool_x[np.asarray(fp.extra["pool_index"])])


def test_akh_and_sacw_draw_independently(built: dict[str, Fingerprint]) -> None:
    assert built["akh"].extra["pool_index"] != built["sac-w"].extra["pool_index"]


def test_misclassified_selection_needs_mistakes_and_warns_when_short(small: Small, caplog: pytest.LogCaptureFixture) -> None:
    owner_says = labels(small.owner, small.pool_x)
    for method in ("akh", "sac-w"):
        with pytest.raises(InputError, match=f"{method}: the owner misclassifies none"):
            build_baseline(method, small.owner, small.pool_x, owner_says, small.classes, IDENTITY, SMALL)
    few_x, few_y = small.pool_x[:100], small.pool_y[:100]
    wrong = int((owner_says[:100] != few_y).sum())
    assert 0 < wrong < SMALL.n_points
    with caplog.at_level(logging.WARNING, logger="deepcore_auditor.fingerprints.baselines"):
        fp = build_baseline("akh", small.owner, few_x, few_y, small.classes, IDENTITY, SMALL)
    assert len(fp) == wrong
    assert any(f"only {wrong} owner-misclassified" in r.getMessage() for r in caplog.records)


def test_ipguard_points_sit_at_the_owner_boundary(small: Small) -> None:
    # A small k: points just past the boundary between the seed's class and the random one (Adam's
    # last step of lr 0.01 on every pixel overshoots it by a few tenths of a logit).
    cfg = replace(SMALL, ipguard_k=0.05)
    fp = small.build("ipguard", cfg)
    idx = np.asarray(fp.extra["pool_index"])
    natural = np.median(margins(small.owner, small.pool_x[idx]))
    near = np.median(margins(small.owner, fp.points))
    assert near < 0.4 * natural, (near, natural)
    assert fp.extra["converged"] > SMALL.n_points // 2
    # Converged points are labelled with the other class j, not the seed's label i.
    assert (fp.owner_labels != labels(small.owner, small.pool_x[idx])).mean() > 0.5


def test_ipguard_k_sets_the_margin(small: Small, built: dict[str, Fingerprint]) -> None:
    fp = built["ipguard"]  # k = 10: converged points lead the seed's class by >= k logits
    m = margins(small.owner, fp.points)
    assert fp.extra["converged"] > 0
    assert np.sum(m >= SMALL.ipguard_k - 1e-3) >= fp.extra["converged"]


def test_ipguard_leaves_owner_trainable(small: Small, built: dict[str, Fingerprint]) -> None:
    assert all(p.requires_grad for p in small.owner.parameters())
    assert all(p.requires_grad for p in small.fine_tuned.parameters())
    assert not small.owner.training


def test_cae_transfers_to_surrogates_not_references(small: Small, built: dict[str, Fingerprint]) -> None:
    fp = built["cae"]
    target, idx = np.asarray(fp.extra["target"]), np.asarray(fp.extra["pool_index"])
    assert (target != small.pool_y[idx]).all()  # seeds were correctly classified; targets another class
    reached = fp.owner_labels == target
    assert reached.sum() == fp.extra["kept_reaching_target"] > 0
    # The points that reach the target come first in the selection: all reachers are kept.
    assert fp.extra["kept_reaching_target"] == min(fp.extra["candidates_reaching_target"], SMALL.n_points)
    # Each point stays within epsilon of its seed.
    assert np.abs(fp.points - small.pool_x[idx]).max() <= SMALL.cae_epsilon + 1e-6
    surrogate = (labels(small.fine_tuned, fp.points) == fp.owner_labels).mean()
    reference = (labels(small.independent, fp.points) == fp.owner_labels).mean()
    assert surrogate > reference, (surrogate, reference)
    s_t = (labels(small.fine_tuned, fp.points) == target)[reached].mean()
    r_t = (labels(small.independent, fp.points) == target)[reached].mean()
    assert s_t > r_t, (s_t, r_t)
    assert 0 < fp.extra["conferrability_mean"] <= 1


def test_cae_needs_surrogates_and_references(small: Small) -> None:
    with pytest.raises(InputError, match="cae needs surrogate and reference"):
        small.build("cae", references=[])
    with pytest.raises(InputError, match="cae needs surrogate and reference"):
        small.build("cae", surrogates=[])


def test_sacm_cutmix_points(small: Small, built: dict[str, Fingerprint]) -> None:
    fp = built["sac-m"]
    pool = {p.tobytes() for p in small.pool_x}
    assert not any(p.tobytes() in pool for p in fp.points)
    assert 0.3 <= fp.extra["box_fraction_mean"] <= 0.7
    # Every pixel of a mixed point comes from some pool image (no new values are painted).
    assert np.isin(fp.points, small.pool_x).all()


@pytest.mark.parametrize("method", ["sac-m", "sac-w"])
def test_sac_distance_separates_copies_from_independents(method: str, small: Small, built: dict[str, Fingerprint]) -> None:
    fp = built[method]
    copy = sac_distance(fp.owner_probs, predict(small.fine_tuned, fp.points))
    independent = sac_distance(fp.owner_probs, predict(small.independent, fp.points))
    assert sac_distance(fp.owner_probs, fp.owner_probs) == pytest.approx(0.0, abs=1e-12)
    assert copy < independent, (copy, independent)


def test_sac_distance_values() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert sac_distance(a, b) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(10), 30), rng.dirichlet(np.ones(10), 30)
    assert sac_distance(p, q) == pytest.approx(sac_distance(q, p))
    assert sac_distance(p, q) > 0
    assert sac_distance(p, 3.0 * p) == pytest.approx(0.0, abs=1e-12)  # cosine: scale-free


def test_sac_distance_refuses_bad_shapes() -> None:
    p = np.full((5, 10), 0.1)
    with pytest.raises(InputError, match="same shape"):
        sac_distance(p, p[:, :9])
    with pytest.raises(InputError, match="same shape"):
        sac_distance(p.ravel(), p.ravel())
    with pytest.raises(InputError, match="at least 2 points"):
        sac_distance(p[:1], p[:1])


def test_unknown_method_and_bad_inputs(small: Small) -> None:
    with pytest.raises(InputError, match="unknown baseline method 'uap'") as e:
        small.build("uap")
    assert all(m in str(e.value) for m in BASELINES)
    with pytest.raises(InputError, match="n_points"):
        BaselineConfig(n_points=0)
    with pytest.raises(InputError, match="pool_y"):
        build_baseline("random", small.owner, small.pool_x, small.pool_y[:10], small.classes, IDENTITY, SMALL)
    with pytest.raises(InputError, match="10 classes but 3 class names"):
        build_baseline("random", small.owner, small.pool_x, small.pool_y % 3, small.classes[:3], IDENTITY, SMALL)
    with pytest.raises(InputError, match="Normalized"):
        build_baseline("random", small.owner.net, small.pool_x, small.pool_y, small.classes, IDENTITY, SMALL)
