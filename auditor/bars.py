"""Progress bars with an ETA on the user's terminal (click's progress bar), for the CLI only.

`terminal_bars()` gives bars drawn on stderr when stderr is a terminal, and `QUIET` otherwise:
pipes, log files, CI and `--json` output never see a bar (the commands print their plain phase
lines there). Library code only knows the `fingerprints.progress.Progress` protocol.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

import click

from deepcore_auditor.fingerprints.progress import QUIET, Advance, Progress


class TerminalBars:
    """One click progress bar per piece of work, on `stream`; cleared of its line when done."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    @contextlib.contextmanager
    def bar(self, label: str, total: int) -> Iterator[Advance]:
        with click.progressbar(length=max(1, total), label=label, file=self.stream, show_eta=True, show_percent=True,
                               show_pos=False, width=24) as bar:
            yield bar.update


def terminal_bars(enabled: bool = True, stream: TextIO | None = None) -> Progress:
    """Bars on `stream` (default stderr) when it is a terminal and `enabled`; else QUIET."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        tty = False
    return TerminalBars(stream) if enabled and tty else QUIET


__all__ = ["TerminalBars", "terminal_bars"]
