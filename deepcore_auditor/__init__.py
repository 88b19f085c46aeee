"""DeepCore auditor: black-box piracy audits of deep classifiers with core-point fingerprints.

One import package for the whole distribution `deepcore-auditor`. The repository keeps its
folders by job at the top (`adapters/`, `fingerprints/`, `auditor/`, `benchmarks/`); the build
maps each under this package (`deepcore_auditor.adapters`, ...), so nothing generic is installed
at the top of site-packages. Layers, lowest first: adapters <- fingerprints <- auditor <-
benchmarks (checked by import-linter, see pyproject.toml).
"""

from __future__ import annotations

from functools import cache
from importlib import metadata

try:
    __version__ = metadata.version("deepcore-auditor")
except metadata.PackageNotFoundError:  # a checkout used without installing
    __version__ = "0+unknown"


@cache
def source_commit() -> str | None:
    """The git commit the running code came from, or None when that cannot be told.

    Asked once per process: the code a process runs was read when it started, so a later edit or
    checkout of the tree changes nothing it does (and a hub auditing thousands of suspects does
    not start two git processes per audit).

    A checkout (editable install): `git rev-parse HEAD` in the folder holding the package, with
    "-dirty" when tracked files differ from it. A wheel or plain install from a VCS URL: the commit
    pip recorded in the distribution's `direct_url.json`. Anything else: None (say so, never guess).
    """
    import json
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        top, _, commit = head.stdout.strip().partition("\n")
        if head.returncode == 0 and commit and Path(top).resolve() == here.parent:
            dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10)
            return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        direct = metadata.distribution("deepcore-auditor").read_text("direct_url.json")
        commit = json.loads(direct or "{}").get("vcs_info", {}).get("commit_id")
        return str(commit) if commit else None
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        return None


def tool_version() -> str:
    """What every report and fingerprint records as the tool: version and source commit."""
    return f"deepcore-auditor {__version__} (commit {source_commit() or 'unknown'})"
