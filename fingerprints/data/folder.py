"""An ImageFolder directory, cached by its listing (relative paths, sizes, mtimes)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.fingerprints.data.cache import _cached_or_built, default_cache_dir
from deepcore_auditor.fingerprints.data.dataset import Dataset, DataSplits
from deepcore_auditor.fingerprints.data.images import _build_imagefolder, _imagefolder_layout, _is_image_name
from deepcore_auditor.fingerprints.data.sources import _base_name


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
