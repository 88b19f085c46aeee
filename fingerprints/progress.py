"""Progress of long work (training the known models, growing the core points), for bars with an ETA.

Library code never draws anything: it opens a `bar(label, total)` on the `Progress` it was
handed and advances it as work gets done. The CLI hands in bars drawn on a terminal
(`auditor.bars`); everyone else gets `QUIET`, which does nothing, so that logs, pipes and
`--json` output never carry a bar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

Advance = Callable[[int], None]  # advance(n): n more units of the bar's total are done


class Progress(Protocol):
    def bar(self, label: str, total: int) -> AbstractContextManager[Advance]:
        """A bar of `total` units for one piece of work; closed when the work ends (early or not)."""
        ...


class Quiet:
    """Progress that shows nothing."""

    @contextlib.contextmanager
    def bar(self, label: str, total: int) -> Iterator[Advance]:
        yield _ignore


def _ignore(n: int) -> None:
    return None


QUIET: Progress = Quiet()

__all__ = ["QUIET", "Advance", "Progress", "Quiet"]
