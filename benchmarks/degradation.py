"""Benchmark (not a test): how the verdict degrades when a suspect perturbs what it is asked or
what it answers.

    python -m deepcore_auditor.benchmarks.degradation WORLD_DIR [--seeds 5] [--budget 100] [--batch-size 5]
    python -m deepcore_auditor.benchmarks.degradation WORLD_DIR --fingerprint FP --suspect NAME=FILE.onnx[:TRUTH] ...

Without --fingerprint, a small Fashion-MNIST world like the test suite's (owner, fine-tuned
pirate, distilled copy, independent model, scaled-down fingerprint) is built once and cached in
WORLD_DIR (a few minutes on 2 cores); later runs reuse it. Every suspect is a real ONNX Runtime
session; the transformations wrap it as an in-process oracle:

* input noise: Gaussian noise of standard deviation sigma (canonical [0, 1] pixel units, clipped
  to [0, 1]) added to every point before the model sees it, fresh per query;
* rounding: the probability vector rounded to 2 or 1 decimals (what a terse API returns), either
  handed to the audit as is ("raw") or read the way the ONNX Runtime and Triton adapters read a
  model's outputs (`adapters.base.to_probabilities`: rows of values in [0, 1] summing to 0.5..1.5
  are renormalized, anything else is softmaxed as logits);
* one-hot: only the top-1 class, as a one-hot probability vector;
* label flipping: with probability q the answer is replaced by a uniformly random other class
  (a randomized defence), applied to the label and to the probability vector (the two classes'
  probabilities swapped).

Each transformation x suspect x mode is audited over --seeds query orders (the transformation's
randomness is seeded with the same seed): verdict counts, median queries (all sent, repeat checks
included) and mean label agreement. The default budget (100) exceeds the world's 60 points plus the
audit's repeat check, so audits end on the test or on the points, not on the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepcore_auditor.adapters.base import Access, Oracle, OracleWrapper, to_probabilities
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.auditor.audit import AuditConfig, audit
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint

MODES: tuple[tuple[str, Access], ...] = (
    ("agreement", Access.LABELS),
    ("similarity", Access.PROBS),
    ("clustering", Access.PROBS),
)
WORLD_SUSPECTS = ("pirate", "distilled", "independent")
TRUTH = {"pirate": "piracy", "distilled": "piracy", "independent": "independent"}


# ---------------------------------------------------------------------------------------------
# Transformations: oracles wrapping a real oracle


@dataclass(frozen=True)
class Transformation:
    """A named way a suspect may degrade its answers; `wrap` builds the degraded oracle."""

    name: str
    kind: str  # "none", "noise", "round", "round-raw", "onehot", "flip"
    value: float = 0.0

    def wrap(self, inner: Oracle, seed: int) -> Oracle:
        if self.kind == "none":
            return inner
        if self.kind == "noise":
            return NoisyInput(inner, sigma=self.value, seed=seed)
        if self.kind in ("round", "round-raw"):
            return RoundedProbabilities(inner, decimals=int(self.value), as_read=self.kind == "round")
        if self.kind == "onehot":
            return OneHotTop1(inner)
        if self.kind == "flip":
            return FlippedLabels(inner, rate=self.value, seed=seed)
        raise ValueError(f"unknown transformation kind {self.kind!r}")


TRANSFORMATIONS: tuple[Transformation, ...] = (
    Transformation("none", "none"),
    *(Transformation(f"noise {s}", "noise", s) for s in (0.02, 0.05, 0.1, 0.2, 0.3)),
    Transformation("round 2 raw", "round-raw", 2),
    Transformation("round 1 raw", "round-raw", 1),
    Transformation("round 2 read", "round", 2),
    Transformation("round 1 read", "round", 1),
    Transformation("one-hot", "onehot"),
    *(Transformation(f"flip {q}", "flip", q) for q in (0.05, 0.1, 0.2, 0.3)),
)


class _Wrapper(OracleWrapper):
    """An oracle holding a real one; `info` is the inner oracle's. Its answers are new (degraded),
    so they are checked as a backend's are."""

    query = Oracle.query


class NoisyInput(_Wrapper):
    """Adds N(0, sigma^2) noise to every pixel of every query (clipped to [0, 1])."""

    def __init__(self, inner: Oracle, *, sigma: float, seed: int) -> None:
        super().__init__(inner)
        self.sigma = float(sigma)
        self._rng = np.random.default_rng(seed)

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        noisy = points + self._rng.normal(0.0, self.sigma, size=points.shape).astype(np.float32)
        return self.inner.query(np.clip(noisy, 0.0, 1.0).astype(np.float32), access)


class RoundedProbabilities(_Wrapper):
    """Rounds the probability vector to `decimals` (labels: the argmax of the rounded vector,
    i.e. the lowest class among those tied after rounding). `as_read`: the rounded batch goes
    through `to_probabilities`, as a model's raw outputs do in the ONNX Runtime and Triton
    adapters."""

    def __init__(self, inner: Oracle, *, decimals: int, as_read: bool) -> None:
        super().__init__(inner)
        self.decimals, self.as_read = int(decimals), as_read

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        probs = np.round(self.inner.query(points, Access.PROBS), self.decimals)
        if self.as_read:
            probs = to_probabilities(probs)[0]
        return probs.argmax(axis=1).astype(np.int64) if access is Access.LABELS else probs


class OneHotTop1(_Wrapper):
    """Answers only the top-1 class: labels as they are, probabilities as one-hot vectors."""

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        labels = self.inner.query(points, Access.LABELS)
        if access is Access.LABELS:
            return labels
        k = self.info.num_classes
        assert k is not None
        return np.eye(k, dtype=np.float64)[labels]


class FlippedLabels(_Wrapper):
    """A randomized defence: each answer's top-1 class is swapped, with probability `rate`, for
    a uniformly random other class (in a probability vector the two classes trade places)."""

    def __init__(self, inner: Oracle, *, rate: float, seed: int) -> None:
        super().__init__(inner)
        self.rate = float(rate)
        self._rng = np.random.default_rng(seed)

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        k = self.info.num_classes
        assert k is not None
        probs = self.inner.query(points, Access.PROBS)
        top = probs.argmax(axis=1)
        flip = self._rng.random(len(points)) < self.rate
        other = (top + self._rng.integers(1, k, size=len(points))) % k
        rows = np.nonzero(flip)[0]
        swapped = probs.copy()
        swapped[rows, top[rows]], swapped[rows, other[rows]] = probs[rows, other[rows]], probs[rows, top[rows]]
        if access is Access.LABELS:
            return np.where(flip, other, top).astype(np.int64)
        return swapped


# ---------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class World:
    fingerprint: Path
    suspects: dict[str, Path]


def build_world(root: Path, say: Callable[[str], None]) -> World:
    """The test suite's small world (tests/small_world.py), built once and cached under `root`."""
    from deepcore_auditor.benchmarks.small_world import build_world as build_small_world
    from deepcore_auditor.fingerprints.data import load_data

    t0 = time.perf_counter()
    w = build_small_world(root, load_data("fashion-mnist"), say)
    say(f"world ready in {time.perf_counter() - t0:.0f} s under {root}")
    paths = {"pirate": w.pirate_onnx, "distilled": w.distilled_onnx, "independent": w.independent_onnx}
    return World(w.fingerprint, {n: paths[n] for n in WORLD_SUSPECTS})


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass(frozen=True)
class Row:
    transformation: str
    suspect: str
    truth: str
    mode: str
    verdicts: list[str]
    queries: list[int]
    agreements: list[float]

    def counts(self) -> str:
        short = {"piracy": "P", "independent": "I", "inconclusive": "?"}
        return " ".join(f"{short[v]}{self.verdicts.count(v)}" for v in ("piracy", "independent", "inconclusive") if v in self.verdicts)


def run(fp: Fingerprint, suspects: dict[str, Path], truth: dict[str, str], seeds: int, budget: int, batch_size: int,
        transformations: tuple[Transformation, ...] = TRANSFORMATIONS) -> list[Row]:
    rows = []
    for t in transformations:
        for name, path in suspects.items():
            for mode, access in MODES:
                verdicts, queries, agreements = [], [], []
                for seed in range(seeds):
                    inner = OnnxOracle(path, convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes, device="cpu")
                    with t.wrap(inner, seed) as suspect:
                        r = audit(fp, suspect, AuditConfig(access=access, mode=mode, budget=budget, batch_size=batch_size, seed=seed))
                    verdicts.append(r.verdict)
                    queries.append(r.queries_used)
                    agreements.append(r.agreement)
                rows.append(Row(t.name, name, truth.get(name, "?"), mode, verdicts, queries, agreements))
    return rows


def print_table(rows: list[Row], seeds: int) -> None:
    modes = [m for m, _ in MODES]
    head = f"{'transformation':<16}{'suspect':<13}" + "".join(f"{m:<27}" for m in modes)
    print(f"verdicts over {seeds} query orders (P piracy, I independent, ? inconclusive) | median queries | mean agreement")
    print(head)
    print("-" * len(head))
    by_key = {(r.transformation, r.suspect, r.mode): r for r in rows}
    for t in dict.fromkeys(r.transformation for r in rows):
        for s in dict.fromkeys(r.suspect for r in rows):
            cells = []
            for m in modes:
                r = by_key[(t, s, m)]
                cell = f"{r.counts():<9}{statistics.median(r.queries):>4.0f}q  {np.mean(r.agreements):.2f}"
                cells.append(f"{cell:<27}")
            print(f"{t:<16}{s:<13}" + "".join(cells))
    accused = sum(v == "piracy" for r in rows if r.truth == "independent" for v in r.verdicts)
    total = sum(len(r.verdicts) for r in rows if r.truth == "independent")
    print(f"independent suspects accused: {accused} of {total} audits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world_dir", type=Path, help="where the small world is built and cached")
    ap.add_argument("--fingerprint", type=Path, help="use this fingerprint instead of the world's")
    ap.add_argument("--suspect", action="append", default=[], metavar="NAME=FILE.onnx[:TRUTH]",
                    help="a suspect (with --fingerprint); TRUTH is piracy or independent; repeatable")
    ap.add_argument("--seeds", type=int, default=5, help="query orders per cell")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if a.fingerprint is not None:
        suspects: dict[str, Path] = {}
        truth: dict[str, str] = {}
        for item in a.suspect:
            name, _, rest = item.partition("=")
            file, _, t = rest.partition(":")
            suspects[name], truth[name] = Path(file), t or "?"
        if not suspects:
            ap.error("--fingerprint needs at least one --suspect NAME=FILE.onnx")
        fp_path = a.fingerprint
    else:
        world = build_world(a.world_dir, say)
        fp_path, suspects, truth = world.fingerprint, world.suspects, dict(TRUTH)
    fp = load_fingerprint(fp_path)
    t0 = time.perf_counter()
    rows = run(fp, suspects, truth, a.seeds, a.budget, a.batch_size)
    print(f"fingerprint {fp_path} ({len(fp)} points, sha256 {fp.digest[:16]}..), budget {a.budget}, "
          f"batches of {a.batch_size}, alpha 0.01")
    print_table(rows, a.seeds)
    print(f"{len(rows) * a.seeds} audits in {time.perf_counter() - t0:.1f} s")
    if a.json:
        a.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
