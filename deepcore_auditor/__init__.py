"""DeepCore auditor: black-box piracy audits of deep classifiers with core-point fingerprints.

One import package for the whole distribution `deepcore-auditor`. The repository keeps its
folders by job at the top (`adapters/`, `fingerprints/`, `auditor/`, `benchmarks/`); the build
maps each under this package (`deepcore_auditor.adapters`, ...), so nothing generic is installed
at the top of site-packages. Layers, lowest first: adapters <- fingerprints <- auditor <-
benchmarks (checked by import-linter, see pyproject.toml).
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("deepcore-auditor")
except metadata.PackageNotFoundError:  # a checkout used without installing
    __version__ = "0+unknown"
