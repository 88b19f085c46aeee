"""`load_data`: the dispatcher from a data spec to its loader."""

from __future__ import annotations

import os
from pathlib import Path

from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.fingerprints.data.archive import _load_archive
from deepcore_auditor.fingerprints.data.dataset import DataSplits
from deepcore_auditor.fingerprints.data.folder import _load_imagefolder_dir
from deepcore_auditor.fingerprints.data.idx import _load_fashion_mnist
from deepcore_auditor.fingerprints.data.npz import _load_npz
from deepcore_auditor.fingerprints.data.sources import ARCHIVE_SUFFIXES

_SPEC_HINT = "give fashion-mnist, an .npz file, an ImageFolder directory or a .tar.gz of one"


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
