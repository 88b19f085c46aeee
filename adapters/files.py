"""Whole-file writes that are all or nothing: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from deepcore_auditor.adapters.errors import InputError


def atomic_write(path: str | os.PathLike[str], content: bytes | Callable[[Any], Any], *, by_name: bool = False,
                 suffix: str = "", mode: int = 0o644) -> None:
    """Write `path` all or nothing: a temp file beside it, fsynced, renamed over it, and the
    directory fsynced; the file gets `mode` (readable by all by default, not mkstemp's 0600: what
    is written here is meant to be read, published or reused).

    `content` is the bytes to write, or a function that writes them: called with the temp file
    open for binary writing, or, with `by_name`, with the temp file's path (for tools that write
    only to a file name). `suffix` ends the temp file's name (for tools that go by extension).
    On any failure the temp file is removed and the target left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.parent)
    try:
        if by_name:
            os.close(fd)
            content(Path(tmp))  # type: ignore[operator]
            os.chmod(tmp, mode)  # the tool may have made the file afresh
            _fsync_path(tmp)
        else:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                _write(f, content)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """`value` as indented JSON ending in a newline, written all or nothing (`atomic_write`),
    its folder made first: how summaries and benchmark results are kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(value, indent=1) + "\n").encode())


def _write(f: BinaryIO, content: bytes | Callable[[Any], Any]) -> None:
    if callable(content):
        content(f)
    else:
        f.write(content)


def _fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file, however spelled: by inode when both exist (hard links,
    symlinks, `./x` and `/abs/x`), else by resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_output(path: str | os.PathLike[str], option: str, inputs: dict[str, Any], *, force: bool = False) -> None:
    """Refuse, in one line naming `option`, an output path that is one of the command's `inputs`
    (option -> path, or a sequence of paths; None skipped) — never, even with `force` — or a file
    that already exists, unless `force`. Called before any work, so nothing is half-done."""
    for name, value in inputs.items():
        for given in value if isinstance(value, (list, tuple)) else (value,):
            if given is not None and Path(str(given)).exists() and same_file(path, str(given)):
                raise InputError(f"{option} {path} is this command's {name} input: it would be destroyed; choose another path")
    if os.path.lexists(path):
        if Path(path).is_dir():
            raise InputError(f"{option} {path} is a directory: give a file path")
        if not force:
            raise InputError(f"{option} {path} already exists: pass --force to replace it, or choose another path")
