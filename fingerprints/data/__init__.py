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

Layout, by job: `dataset` (`Dataset`, `DataSplits`, `channel_stats`, the holdout split), `load`
(`load_data`, the dispatcher), one loader per format (`idx` for Fashion-MNIST, `npz`, `folder`
for directories, `archive`), `images` (decoding and the ImageFolder layout that `folder` and
`archive` share), `sources` (a data file's sha256 and base name) and `cache` (decoded arrays).
"""

from deepcore_auditor.fingerprints.data.cache import CACHE_ENV, CACHE_VERSION, default_cache_dir
from deepcore_auditor.fingerprints.data.dataset import (
    HOLDOUT_DENOMINATOR,
    HOLDOUT_SEED,
    Dataset,
    DataSplits,
    Index,
    channel_stats,
)
from deepcore_auditor.fingerprints.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_ENV
from deepcore_auditor.fingerprints.data.images import IMAGE_SUFFIXES
from deepcore_auditor.fingerprints.data.load import load_data
from deepcore_auditor.fingerprints.data.sources import ARCHIVE_SUFFIXES

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CACHE_ENV",
    "CACHE_VERSION",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "HOLDOUT_DENOMINATOR",
    "HOLDOUT_SEED",
    "IMAGE_SUFFIXES",
    "DataSplits",
    "Dataset",
    "Index",
    "channel_stats",
    "default_cache_dir",
    "load_data",
]
