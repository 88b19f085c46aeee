"""An ``.npz`` with ``x``, ``y`` (optional ``x_test``, ``y_test``, ``classes``); never unpickled."""

from __future__ import annotations

import logging
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.fingerprints.data.dataset import _HOLDOUT_NOTE, Dataset, DataSplits, _holdout_splits
from deepcore_auditor.fingerprints.data.sources import _base_name, _sha256_file

logger = logging.getLogger(__name__)


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
        for k, a in arrays.items():  # numpy hands back a member that is not an .npy file as bytes
            if not isinstance(a, np.ndarray):
                raise InputError(f"{path}: {k} is not an .npy array inside the archive")
    except InputError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise InputError(
                f"{path}: refusing object arrays or pickled data in .npz (store plain arrays)"
            ) from e
        raise InputError(f"cannot read {path} as .npz: {first_line(e, whole=True)}") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError, RuntimeError,
            tokenize.TokenError, SyntaxError) as e:
        # zipfile raises NotImplementedError for a compression method or zip version it lacks and
        # RuntimeError for an encrypted member; numpy's .npy header parser lets tokenize's and
        # ast's errors through (all found by benchmarks/soak.py's fuzzer)
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
