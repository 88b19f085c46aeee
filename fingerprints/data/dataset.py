"""The dataset types: `Dataset` (labelled uint8 images), `DataSplits` (train, test, source),
`channel_stats`, and the deterministic holdout used when the data gives no train/test split.

Images are kept as uint8 [N, C, H, W]; `Dataset.points` gives the canonical float32 view in
[0, 1]. Without a train/test split in the data, a deterministic 1/6 of it (seed 0) is held out as test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deepcore_auditor.adapters.errors import InputError

HOLDOUT_DENOMINATOR = 6  # without a given split, 1/6 of the samples become the test set
HOLDOUT_SEED = 0

Index = int | slice | Sequence[int] | np.ndarray | None


# --------------------------------------------------------------------------- data classes


def _select(arr: np.ndarray, index: Index) -> np.ndarray:
    """`arr[index]`, always keeping the leading sample axis (an int picks a batch of one)."""
    if index is None:
        return arr
    if isinstance(index, slice):
        return arr[index]
    idx = np.asarray(index)
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.size == 0:
        idx = idx.astype(np.intp)
    if idx.dtype != np.bool_ and not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"index must be integers, a boolean mask or a slice, not {idx.dtype}")
    return arr[idx]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled images: `x` uint8 [N, C, H, W], `y` int64 [N] indexing `classes`."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        x, y = self.x, np.asarray(self.y)
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            raise InputError(f"dataset '{self.name}': x must be uint8 [N, C, H, W], got {got}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise InputError(
                f"dataset '{self.name}': y must be 1-D integer labels, "
                f"got {y.dtype} {list(y.shape)}"
            )
        if len(y) != len(x):
            raise InputError(f"dataset '{self.name}': {len(x)} images but {len(y)} labels")
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise InputError(f"dataset '{self.name}': no class names")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise InputError(
                f"dataset '{self.name}': labels out of range: {int(y.min())}..{int(y.max())} "
                f"for {len(classes)} classes"
            )
        object.__setattr__(self, "y", y.astype(np.int64, copy=False))
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of `classes`, not just those present)."""
        return len(self.classes)

    def points(self, index: Index = None) -> np.ndarray:
        """Images as canonical points: float32 [n, C, H, W] in [0, 1] (x / 255)."""
        out = _select(self.x, index).astype(np.float32)
        out /= np.float32(255.0)
        return out

    def subset(self, index: Index) -> Dataset:
        """The samples at `index` (indices, boolean mask or slice) as a new Dataset."""
        return Dataset(self.name, _select(self.x, index), _select(self.y, index), self.classes)


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A train and a test set, plus what was loaded (`source`: spec, kind, path, sha256...)."""

    train: Dataset
    test: Dataset
    source: dict[str, str]


def channel_stats(ds: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of x / 255, computed exactly from integer sums."""
    n = len(ds)
    if n == 0:
        raise InputError(f"dataset '{ds.name}' is empty: no channel statistics")
    c, h, w = ds.shape
    total = [0] * c
    total_sq = [0] * c
    chunk = max(1, (1 << 22) // max(1, c * h * w))
    for start in range(0, n, chunk):
        block = ds.x[start : start + chunk].astype(np.int64)
        for ch, s in enumerate(block.sum(axis=(0, 2, 3))):
            total[ch] += int(s)
        for ch, s in enumerate((block * block).sum(axis=(0, 2, 3))):
            total_sq[ch] += int(s)
    count = n * h * w
    means = tuple(s / (255 * count) for s in total)
    # var * 255^2 * count^2 = count * sum(v^2) - sum(v)^2, exact in Python integers
    stds = tuple(
        float(np.sqrt(max(count * sq - s * s, 0))) / (255 * count)
        for s, sq in zip(total, total_sq, strict=False)
    )
    return means, stds


# --------------------------------------------------------------------------- holdout


def _holdout(n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of range(n): (train, test) indices, test ~1/6, both sorted."""
    if n < 2:
        raise InputError(f"{what}: {n} sample(s) cannot be split into train and test")
    n_test = max(1, n // HOLDOUT_DENOMINATOR)
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _holdout_splits(base: str, x: np.ndarray, y: np.ndarray, classes: tuple[str, ...],
                    what: str) -> tuple[Dataset, Dataset]:
    train_idx, test_idx = _holdout(len(x), what)
    return (Dataset(f"{base}/train", x[train_idx], y[train_idx], classes),
            Dataset(f"{base}/test", x[test_idx], y[test_idx], classes))


_HOLDOUT_NOTE = f"holdout 1/{HOLDOUT_DENOMINATOR} seed {HOLDOUT_SEED}"
