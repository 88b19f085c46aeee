"""Image decoding and the ImageFolder layout, shared by the directory and the archive loaders.

Layout: ``root/{train,test}/<class>/<image>`` or flat ``root/<class>/<image>``, below any folders
that hold everything; classes are the sorted train folder names.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.fingerprints.data.dataset import _HOLDOUT_NOTE, Dataset, _holdout_splits

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PIL_FORMATS = ("PNG", "JPEG")


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
