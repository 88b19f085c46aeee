"""Image-classification data for fingerprint seeds and for training small models.

`load_data(spec)` accepts:

* ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (IDX files), directory
  overridable with ``$DEEPCORE_FASHION_MNIST_DIR``;
* a path to an ``.npz`` with ``x``, ``y`` (optional ``x_test``, ``y_test``, ``classes``);
* an ImageFolder directory, ``root/{train,test}/<class>/<image>`` or flat ``root/<class>/<image>``;
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of such a tree, read in memory (never extracted).

Images are kept as uint8 [N, C, H, W]; `Dataset.points` gives the canonical float32 view in
[0, 1]. Decoded ImageFolder data is cached as ``.npy`` under ``cache_dir/data/<key>/``.
Without a train/test split in the data, a deterministic 1/6 of it (seed 0) is held out as test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.adapters.files import atomic_write

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "DEEPCORE_FASHION_MNIST_DIR"
CACHE_ENV = "DEEPCORE_CACHE"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
HOLDOUT_DENOMINATOR = 6  # without a given split, 1/6 of the samples become the test set
HOLDOUT_SEED = 0
CACHE_VERSION = 1  # bump when decoding or splitting changes: older entries are rebuilt

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_PIL_FORMATS = ("PNG", "JPEG")
_SPEC_HINT = "give fashion-mnist, an .npz file, an ImageFolder directory or a .tar.gz of one"

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


# --------------------------------------------------------------------------- public helpers


def default_cache_dir() -> Path:
    """`$DEEPCORE_CACHE`, or ``~/.cache/deepcore`` when unset or empty (read at each call)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepcore"


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


def load_data(spec: str | os.PathLike[str], *, cache_dir: Path | None = None) -> DataSplits:
    """Load `spec` (``fashion-mnist``, an .npz, an ImageFolder directory or a .tar.gz of one).

    `cache_dir` (default `default_cache_dir()`) holds decoded ImageFolder arrays. Raises
    `InputError` for anything missing or malformed.
    """
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"unknown data {text!r}: {_SPEC_HINT}")
    if text.strip().lower() == "fashion-mnist":
        return _load_fashion_mnist(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_imagefolder_dir(text, path, cache_dir)
    if path.is_file():
        lower = path.name.lower()
        if lower.endswith(".npz"):
            return _load_npz(text, path)
        if lower.endswith(ARCHIVE_SUFFIXES):
            return _load_archive(text, path, cache_dir)
        raise InputError(f"unsupported data file '{text}': {_SPEC_HINT}")
    raise InputError(f"unknown data '{text}': {_SPEC_HINT}")


# --------------------------------------------------------------------------- small utilities


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise InputError(f"cannot read {path}: {first_line(e, whole=True)}") from e
    return h.hexdigest()


def _base_name(path: Path) -> str:
    name = path.name
    for suffix in (*ARCHIVE_SUFFIXES, ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name or str(path)


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


# --------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(name: str, raw: bytes, magic: int, ndim: int) -> np.ndarray:
    """Parse a gzip-compressed IDX file (big-endian header, then unsigned bytes)."""
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"fashion-mnist file {name} is not valid gzip: {first_line(e, whole=True)}") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(f"fashion-mnist file {name} is too short for an IDX header")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise InputError(
            f"fashion-mnist file {name}: IDX magic {got:#010x}, expected {magic:#010x}"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise InputError(
            f"fashion-mnist file {name}: header says {dims} ({expected} bytes), "
            f"file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_fashion_mnist(spec: str) -> DataSplits:
    root = Path(os.environ.get(FASHION_MNIST_ENV, "").strip() or FASHION_MNIST_DIR).expanduser()
    names = {
        (split, kind): f"{prefix}-{kind}-ubyte.gz"
        for split, prefix in (("train", "train"), ("test", "t10k"))
        for kind in ("images-idx3", "labels-idx1")
    }
    if not all((root / n).is_file() for n in names.values()):
        raise InputError(
            f"fashion-mnist not found in {root}: install it with "
            f"'apt-get install dataset-fashion-mnist' or pass a data path"
        )
    digest = hashlib.sha256()
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for key, name in sorted(names.items(), key=lambda kv: kv[1]):
        try:
            raw = (root / name).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {root / name}: {first_line(e, whole=True)}") from e
        digest.update(f"{name} {hashlib.sha256(raw).hexdigest()}\n".encode())
        if key[1] == "images-idx3":
            arrays[key] = _read_idx(name, raw, _IDX_IMAGES_MAGIC, 3)
        else:
            arrays[key] = _read_idx(name, raw, _IDX_LABELS_MAGIC, 1)
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[(split, "images-idx3")], arrays[(split, "labels-idx1")]
        if len(x) != len(y):
            raise InputError(f"fashion-mnist {split}: {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise InputError(f"fashion-mnist {split} set is empty")
        if int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise InputError(f"fashion-mnist {split}: label {int(y.max())} out of range 0..9")
        splits[split] = Dataset(
            f"fashion-mnist/{split}", x[:, None], y.astype(np.int64), FASHION_MNIST_CLASSES
        )
    logger.info("loaded fashion-mnist from %s: %d train, %d test",
                root, len(splits["train"]), len(splits["test"]))
    source = {"spec": spec, "kind": "fashion-mnist", "path": str(root),
              "sha256": digest.hexdigest(), "split": "given"}
    return DataSplits(splits["train"], splits["test"], source)


# --------------------------------------------------------------------------- .npz


def _npz_images(a: np.ndarray, what: str) -> np.ndarray:
    """[N,H,W] / [N,C,H,W] / [N,H,W,C] (C in 1, 3), uint8 or float in [0, 1] -> uint8 NCHW."""
    if a.dtype.kind not in "iuf":
        raise InputError(f"{what} must be uint8 or float images, not {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[1] in (1, 3):
            pass  # NCHW (preferred when both axes could be channels)
        elif a.shape[3] in (1, 3):
            a = a.transpose(0, 3, 1, 2)
        else:
            raise InputError(
                f"{what} has shape {list(a.shape)}: no channel axis of size 1 or 3 "
                f"(expected [N,H,W], [N,C,H,W] or [N,H,W,C])"
            )
    else:
        raise InputError(
            f"{what} has shape {list(a.shape)}: expected [N,H,W], [N,C,H,W] or [N,H,W,C]"
        )
    if a.shape[0] == 0 or a.size == 0:
        raise InputError(f"{what} is empty")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or float(a.min()) < 0.0 or float(a.max()) > 1.0:
            raise InputError(f"{what} is float but not within [0, 1]")
        a = np.rint(a.astype(np.float32) * np.float32(255.0)).astype(np.uint8)
    elif a.dtype != np.uint8:
        if int(a.min()) < 0 or int(a.max()) > 255:
            raise InputError(f"{what} is {a.dtype} with values outside 0..255")
        a = a.astype(np.uint8)
    return np.ascontiguousarray(a)


def _npz_labels(a: np.ndarray, n: int, what: str) -> np.ndarray:
    if a.ndim != 1:
        raise InputError(f"{what} must be 1-D integer labels, got shape {list(a.shape)}")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise InputError(f"{what} must be integer labels, got non-integral floats")
    elif a.dtype.kind not in "iu":
        raise InputError(f"{what} must be integer labels, not {a.dtype}")
    if len(a) != n:
        raise InputError(f"{what} has {len(a)} labels for {n} images")
    y = a.astype(np.int64)
    if y.size and int(y.min()) < 0:
        raise InputError(f"{what}: labels out of range: negative label {int(y.min())}")
    return y


def _load_npz(spec: str, path: Path) -> DataSplits:
    sha = _sha256_file(path)
    wanted = ("x", "y", "x_test", "y_test", "classes")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy (or pickle) renamed .npz
            raise InputError(f"{path} is not an .npz archive (got a single array)")
        with loaded as z:
            arrays = {k: z[k] for k in wanted if k in z.files}
    except InputError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise InputError(
                f"{path}: refusing object arrays or pickled data in .npz (store plain arrays)"
            ) from e
        raise InputError(f"cannot read {path} as .npz: {first_line(e, whole=True)}") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise InputError(f"cannot read {path} as .npz: {first_line(e, whole=True)}") from e
    for key in ("x", "y"):
        if key not in arrays:
            raise InputError(
                f"{path} has no '{key}' array (keys: x, y, optional x_test, y_test, classes)"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise InputError(f"{path}: x_test and y_test must be given together")

    x = _npz_images(arrays["x"], f"{path.name}: x")
    y = _npz_labels(arrays["y"], len(x), f"{path.name}: y")
    if "x_test" in arrays:
        x_test = _npz_images(arrays["x_test"], f"{path.name}: x_test")
        y_test = _npz_labels(arrays["y_test"], len(x_test), f"{path.name}: y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise InputError(
                f"{path.name}: x_test images are {list(x_test.shape[1:])}, "
                f"x are {list(x.shape[1:])}"
            )
    else:
        x_test = y_test = None

    if "classes" in arrays:
        names = arrays["classes"]
        if names.ndim != 1 or names.dtype.kind not in "US" or names.size == 0:
            raise InputError(f"{path.name}: classes must be a non-empty 1-D string array")
        classes = tuple(
            n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()
        )
    else:
        top = max(int(y.max()), int(y_test.max()) if y_test is not None else 0)
        classes = tuple(str(i) for i in range(top + 1))
    for what, labels in (("y", y), ("y_test", y_test)):
        if labels is not None and int(labels.max()) >= len(classes):
            raise InputError(
                f"{path.name}: {what} labels out of range: {int(labels.max())} "
                f"for {len(classes)} classes"
            )

    base = _base_name(path)
    if x_test is not None:
        train = Dataset(f"{base}/train", x, y, classes)
        test = Dataset(f"{base}/test", x_test, y_test, classes)
        split = "given"
    else:
        train, test = _holdout_splits(base, x, y, classes, str(path))
        split = _HOLDOUT_NOTE
    logger.info("loaded %s: %d train, %d test, shape %s", path, len(train), len(test), train.shape)
    source = {"spec": spec, "kind": "npz", "path": str(path.resolve()), "sha256": sha,
              "split": split}
    return DataSplits(train, test, source)


# --------------------------------------------------------------------------- ImageFolder


@dataclass(frozen=True)
class _Layout:
    """Where each image goes: (key, label) per split; `test` is None for a flat tree."""

    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]] | None


def _is_image_name(parts: Sequence[str]) -> bool:
    """An image file by suffix, with no hidden component (``.DS_Store``, ``._x.jpg``...)."""
    return (bool(parts) and not any(p.startswith(".") for p in parts)
            and parts[-1].lower().endswith(IMAGE_SUFFIXES))


def _imagefolder_layout(keys: Sequence[str], where: str) -> _Layout:
    """Map relative POSIX paths of images to classes, skipping common top-level folders."""
    parts = {k: PurePosixPath(k).parts for k in keys}
    if not parts:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {where}")
    depth = 0
    while True:  # strip folders that hold everything (e.g. cifar10/train/... -> train/...)
        firsts = {p[depth] if len(p) >= depth + 3 else None for p in parts.values()}
        if len(firsts) != 1 or None in firsts:
            break
        depth += 1
    tops = {p[depth] for p in parts.values()}
    split_form = "train" in tops and "test" in tops

    groups: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    skipped: list[str] = []
    for key, p in parts.items():
        rest = p[depth:]
        if split_form and len(rest) == 3 and rest[0] in groups:
            groups[rest[0]].append((rest[1], key))
        elif not split_form and len(rest) == 2:
            groups["train"].append((rest[0], key))
        else:
            skipped.append(key)
    if skipped:
        logger.warning("%d image(s) in %s are outside the ImageFolder layout and were skipped, "
                       "e.g. %s", len(skipped), where, sorted(skipped)[0])
    if not groups["train"]:
        raise InputError(
            f"no images in ImageFolder layout in {where}: expected <class>/<image> "
            f"or train/<class>/<image> and test/<class>/<image>"
        )
    if split_form and not groups["test"]:
        raise InputError(f"no images in test/<class>/<image> in {where}")
    classes = tuple(sorted({c for c, _ in groups["train"]}))
    if split_form:
        extra = sorted({c for c, _ in groups["test"]} - set(classes))
        if extra:
            raise InputError(f"test class '{extra[0]}' in {where} has no train folder")
    label = {c: i for i, c in enumerate(classes)}

    def items(group: list[tuple[str, str]]) -> list[tuple[str, int]]:
        return [(key, label[c]) for c, key in sorted(group)]

    return _Layout(classes, items(groups["train"]), items(groups["test"]) if split_form else None)


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [H, W] (grey) or [H, W, 3] (everything else, as RGB)."""
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            mode = im.mode
            if mode == "I" or mode == "F" or mode.startswith("I;"):
                raise InputError(f"image {where} has mode {mode}: only 8-bit images are supported")
            if mode == "L":
                im.load()
                out = im
            elif mode in ("1", "LA", "La"):
                out = im.convert("L")
            elif mode == "RGB":
                im.load()
                out = im
            else:  # P, PA, RGBA, CMYK, YCbCr...
                out = im.convert("RGB")
            return np.asarray(out, dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError, EOFError) as e:
        raise InputError(f"cannot decode image {where}: {first_line(e, whole=True)}") from e


def _decode_all(keys: Sequence[str], read: Callable[[str], bytes],
                where: Callable[[str], str]) -> np.ndarray:
    """Decode images into uint8 [N, C, H, W]; C is 1 only when every image is grey."""
    x: np.ndarray | None = None
    first = ""
    all_grey = True
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        arr = _decode_image(read(key), where(key))
        h, w = arr.shape[:2]
        if x is None:
            x = np.empty((len(keys), 3, h, w), dtype=np.uint8)
            first = key
        elif (h, w) != x.shape[2:]:
            raise InputError(
                f"image sizes differ: {where(key)} is {w}x{h} but {where(first)} is "
                f"{x.shape[3]}x{x.shape[2]}; all images must have the same size"
            )
        if arr.ndim == 2:
            x[i] = arr  # broadcast to the 3 channels, in case a colour image follows
        else:
            x[i] = arr.transpose(2, 0, 1)
            all_grey = False
        if (i + 1) % 10000 == 0:
            logger.debug("decoded %d/%d images", i + 1, len(keys))
    assert x is not None  # keys is never empty here
    if all_grey:
        x = np.ascontiguousarray(x[:, :1])
    logger.info("decoded %d images in %.1f s", len(keys), time.perf_counter() - t0)
    return x


def _build_imagefolder(base: str, layout: _Layout, read: Callable[[str], bytes],
                       where: Callable[[str], str]) -> tuple[Dataset, Dataset, str]:
    """Decode the images of a layout into (train, test, split note)."""
    train_keys = [k for k, _ in layout.train]
    test_keys = [k for k, _ in layout.test] if layout.test is not None else []
    logger.info("decoding %d images of %s", len(train_keys) + len(test_keys), base)
    x = _decode_all(train_keys + test_keys, read, where)
    y_train = np.array([lab for _, lab in layout.train], dtype=np.int64)
    if layout.test is None:
        train, test = _holdout_splits(base, x, y_train, layout.classes, base)
        return train, test, _HOLDOUT_NOTE
    y_test = np.array([lab for _, lab in layout.test], dtype=np.int64)
    n = len(train_keys)
    return (Dataset(f"{base}/train", x[:n], y_train, layout.classes),
            Dataset(f"{base}/test", x[n:], y_test, layout.classes), "given")


# --------------------------------------------------------------------------- cache

_CACHE_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cache(entry: Path, base: str) -> tuple[Dataset, Dataset, str] | None:
    """A cached (train, test, split note), or None when absent or unusable."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"cache version {meta.get('version')!r}")
        classes = meta["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("bad class list")
        arrays = {k: np.load(entry / f"{k}.npy", allow_pickle=False) for k in _CACHE_ARRAYS}
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if (x.dtype != np.uint8 or y.dtype != np.int64 or len(x) != meta[f"n_{split}"]
                    or list(x.shape[1:]) != meta["shape"]):
                raise ValueError(f"{split} arrays do not match meta.json")
        train = Dataset(f"{base}/train", arrays["x_train"], arrays["y_train"], tuple(classes))
        test = Dataset(f"{base}/test", arrays["x_test"], arrays["y_test"], tuple(classes))
        split = str(meta.get("split", ""))
    except (OSError, ValueError, EOFError, KeyError, TypeError, InputError) as e:
        logger.warning("ignoring unusable cache entry %s (%s): rebuilding", entry, first_line(e, whole=True))
        return None
    logger.info("loaded %s from cache %s", base, entry)
    return train, test, split


def _write_cache(entry: Path, train: Dataset, test: Dataset, split: str) -> None:
    """Store decoded arrays (meta.json last); failure to write only costs a warning."""
    arrays = {"x_train": train.x, "y_train": train.y, "x_test": test.x, "y_test": test.y}
    meta = {"version": CACHE_VERSION, "classes": list(train.classes), "n_train": len(train),
            "n_test": len(test), "shape": list(train.shape), "split": split}
    try:
        entry.mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            atomic_write(entry / f"{name}.npy",
                          lambda f, a=arr: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
        atomic_write(entry / "meta.json",
                      lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))
    except OSError as e:
        logger.warning("could not write data cache %s: %s", entry, first_line(e, whole=True))
        return
    logger.info("cached decoded arrays in %s", entry)


_Built = tuple[Dataset, Dataset, str]  # train, test, split note


def _cached_or_built(entry: Path, base: str, build: Callable[[], _Built]) -> _Built:
    """The cache entry if usable, else `build()` (then cached)."""
    hit = _read_cache(entry, base)
    if hit is not None:
        return hit
    train, test, split = build()
    _write_cache(entry, train, test, split)
    return train, test, split


# --------------------------------------------------------------------------- directory / archive


def _scan_dir(root: Path) -> dict[str, os.stat_result]:
    """Image files under `root` (relative POSIX path -> stat), hidden entries skipped."""
    found: dict[str, os.stat_result] = {}

    def fail(e: OSError) -> None:
        raise InputError(f"cannot list {e.filename or root}: {first_line(e, whole=True)}") from e

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for fname in filenames:
            rel = (rel_dir / fname).as_posix()
            if not _is_image_name(PurePosixPath(rel).parts):
                continue
            try:
                st = (Path(dirpath) / fname).stat()
            except OSError as e:
                raise InputError(f"cannot read {Path(dirpath) / fname}: {first_line(e, whole=True)}") from e
            found[rel] = st
    return found


def _load_imagefolder_dir(spec: str, root: Path, cache_dir: Path | None) -> DataSplits:
    files = _scan_dir(root)
    layout = _imagefolder_layout(sorted(files), str(root))
    listing = hashlib.sha256()
    for rel in sorted(files):
        st = files[rel]
        line = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
        listing.update(line.encode("utf-8", "surrogateescape"))
    key = listing.hexdigest()
    base = _base_name(root.resolve())

    def read(rel: str) -> bytes:
        try:
            return (root / rel).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {root / rel}: {first_line(e, whole=True)}") from e

    def build() -> tuple[Dataset, Dataset, str]:
        return _build_imagefolder(base, layout, read, lambda rel: str(root / rel))

    entry = (cache_dir if cache_dir is not None else default_cache_dir()) / "data" / key
    train, test, split = _cached_or_built(entry, base, build)
    source = {"spec": spec, "kind": "imagefolder", "path": str(root.resolve()),
              "listing_sha256": key, "split": split}
    return DataSplits(train, test, source)


def _read_archive(path: Path) -> dict[str, bytes]:
    """Image members of a tar archive, by normalised relative path; nothing touches the disk."""
    members: dict[str, bytes] = {}
    unsafe = 0
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if not m.isreg():
                    continue  # directories, links, devices...
                raw = PurePosixPath(m.name)
                parts = tuple(p for p in raw.parts if p not in ("", "."))
                if raw.is_absolute() or ".." in parts:
                    unsafe += 1
                    continue
                if not _is_image_name(parts):
                    continue
                f = tf.extractfile(m)
                if f is None:  # pragma: no cover - regular members always have data
                    continue
                members["/".join(parts)] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read archive {path}: {first_line(e, whole=True)}") from e
    if unsafe:
        logger.warning("skipped %d member(s) of %s with absolute or '..' paths", unsafe, path)
    return members


def _load_archive(spec: str, path: Path, cache_dir: Path | None) -> DataSplits:
    sha = _sha256_file(path)
    base = _base_name(path)

    def build() -> tuple[Dataset, Dataset, str]:
        members = _read_archive(path)
        layout = _imagefolder_layout(sorted(members), str(path))
        return _build_imagefolder(base, layout, members.__getitem__, lambda k: f"{path}:{k}")

    entry = (cache_dir if cache_dir is not None else default_cache_dir()) / "data" / sha
    train, test, split = _cached_or_built(entry, base, build)
    source = {"spec": spec, "kind": "archive", "path": str(path.resolve()), "sha256": sha,
              "split": split}
    return DataSplits(train, test, source)
