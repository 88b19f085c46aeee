"""Progress bars: drawn on a real terminal (a pseudo-terminal, as a person's shell has), with an
ETA, for training the known models, growing the points and long audits; never in pipes, logs or
`--json` output."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import run_deepcore

from deepcore_auditor.auditor.bars import TerminalBars, terminal_bars
from deepcore_auditor.fingerprints.progress import QUIET

_BAR = re.compile(r"\[[#-]{24}\]\s+\d+%")


def in_a_terminal(*args: object, timeout_s: float = 300) -> tuple[int, str]:
    """`python -m deepcore_auditor ARGS` with stdout and stderr on a pseudo-terminal: (exit, screen text)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "deepcore_auditor", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, close_fds=True, env={**os.environ, "COLUMNS": "120"})
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([leader], [], [], left)[0]:
            proc.kill()
            raise AssertionError(f"no end within {timeout_s} s: {b''.join(chunks)[-2000:]!r}")
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_an_audit_draws_a_bar_on_a_terminal_and_nothing_elsewhere(world: Any) -> None:
    args = ["audit", "--fingerprint", world.fingerprint, "--suspect", world.pirate_onnx, "--budget", "60",
            "--batch-size", "5", "--no-report"]
    code, screen = in_a_terminal(*args)
    assert code == 1, screen
    assert "auditing (budget 60 queries)" in screen and _BAR.search(screen), screen
    assert "verdict: piracy" in screen and " queries  agreement " not in screen  # the bar replaces the step lines
    piped = run_deepcore(*args)
    assert piped.returncode == 1 and "auditing (budget" not in piped.stderr + piped.stdout
    assert " queries  agreement " in piped.stderr  # the plain step lines instead
    code, screen = in_a_terminal(*args, "--json")
    assert code == 1 and "auditing (budget" not in screen and not _BAR.search(screen)
    assert json.loads(screen.strip().splitlines()[-1])["verdict"] == "piracy"


def test_a_fingerprint_build_draws_a_bar_per_model_with_an_eta(world: Any, tmp_path: Path) -> None:
    """A build stopped early on purpose (known models trained too briefly for their floors): the
    bars of the models it trained are on the terminal, each with its ETA, before the one-line error."""
    code, screen = in_a_terminal("fingerprint", "--owner", world.owner_ts, "--data", world.root / "owner-data.npz",
                                 "--out", tmp_path / "fp.json", "--points", "10", "--candidates", "20", "--steps", "5",
                                 "--epsilon", "0.1", "--train-samples", "500", "--epochs", "1", "--max-epochs", "1",
                                 "--cache-dir", tmp_path / "cache")
    assert code == 2, screen
    assert re.search(r"sim-fine-tune \(up to 1 epochs\)\s+\[#{24}\]\s+100%", screen), screen
    assert "deepcore: error: cannot train a trustworthy known model" in screen


def test_bars_only_on_a_terminal(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as f:
        assert terminal_bars(stream=f) is QUIET
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        assert isinstance(terminal_bars(stream=tty), TerminalBars)
        assert terminal_bars(enabled=False, stream=tty) is QUIET
    os.close(leader)
