"""A ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of an ImageFolder tree, read in memory (never
extracted), cached by the archive's sha256."""

from __future__ import annotations

import logging
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.fingerprints.data.cache import _cached_or_built, default_cache_dir
from deepcore_auditor.fingerprints.data.dataset import Dataset, DataSplits
from deepcore_auditor.fingerprints.data.images import _build_imagefolder, _imagefolder_layout, _is_image_name
from deepcore_auditor.fingerprints.data.sources import _base_name, _sha256_file

logger = logging.getLogger(__name__)


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
