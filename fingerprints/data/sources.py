"""What the file loaders record about a data file: its sha256 and the dataset's base name."""

from __future__ import annotations

import hashlib
from pathlib import Path

from deepcore_auditor.adapters.errors import InputError, first_line

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


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
