"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzip-compressed IDX files),
directory overridable with ``$DEEPCORE_FASHION_MNIST_DIR``; train and test as given."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.fingerprints.data.dataset import Dataset, DataSplits

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

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


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
