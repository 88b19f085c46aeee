"""The decoded-data cache: ImageFolder arrays as ``.npy`` under ``cache_dir/data/<key>/``.

The key is the archive's sha256 or the directory listing's (names, sizes, mtimes); meta.json is
written last, so an entry without it is never read. An unusable entry is rebuilt, never an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.adapters.files import atomic_write
from deepcore_auditor.fingerprints.data.dataset import Dataset

logger = logging.getLogger(__name__)

CACHE_ENV = "DEEPCORE_CACHE"
CACHE_VERSION = 1  # bump when decoding or splitting changes: older entries are rebuilt


def default_cache_dir() -> Path:
    """`$DEEPCORE_CACHE`, or ``~/.cache/deepcore`` when unset or empty (read at each call)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepcore"


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
