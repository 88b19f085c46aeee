"""Can a pirate spot the core points and lie about them? (not a test of the suite)

A pirate serving a copy can run an out-of-distribution detector on its own model and answer every
query it flags with a fixed wrong label — the same answer each time, so the audit's repeat check
never sees a change. This measures, on a fingerprint and the pirate's ONNX model (logits out):

- two detectors any pirate can run from its own logits: the energy score (-logsumexp of the
  logits; Liu et al., 2020) and the maximum softmax probability (Hendrycks & Gimpel, 2017), each
  thresholded where it flags `--false-alarms` (5%) of natural held-out images: the share of core
  points flagged, and the AUROC of core points against natural images;
- the audit (the real `auditor.audit`, label-only, the fingerprint's own test, `--budget`) over
  `--orders` point orders, of the pirate as it is and of the pirate answering every query its
  detector flags with one fixed class — the one the owner gives least often on the points, so
  that nearly every flagged answer is wrong; and, for the attack's reach, of the pirate answering
  every query so (a perfect detector).

    python -m deepcore_auditor.benchmarks.stealth --fingerprint FP --pirate PIRATE.onnx --data DATA [--out FILE]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access, Oracle, OracleWrapper
from deepcore_auditor.adapters.files import write_json
from deepcore_auditor.adapters.open import open_suspect
from deepcore_auditor.auditor.audit import AuditConfig, audit
from deepcore_auditor.benchmarks.metrics import auc
from deepcore_auditor.fingerprints.data import load_data
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint

DETECTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # Higher = more out-of-distribution, for both.
    "energy": lambda z: -(z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))),
    "msp": lambda z: -(1.0 / np.exp(z - z.max(1, keepdims=True)).sum(1)),
}


class Logits:
    """The pirate's own view of its model: raw logits of canonical points (its input convention applied)."""

    def __init__(self, path: Path, fp: Fingerprint) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        self.convention = fp.convention

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.name: self.convention.apply(points)})[0], dtype=np.float64)


class Evasive(OracleWrapper):
    """A pirate that answers `wrong` to every query its detector scores above `threshold`."""

    def __init__(self, inner: Oracle, logits: Logits, detector: Callable[[np.ndarray], np.ndarray], threshold: float,
                 wrong: int) -> None:
        super().__init__(inner)
        self.logits, self.detector, self.threshold, self.wrong = logits, detector, threshold, wrong

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        labels = self.inner.query(points, Access.LABELS).copy()
        labels[self.detector(self.logits(points)) > self.threshold] = self.wrong
        return labels


def _audits(fp: Fingerprint, make: Callable[[], Oracle], orders: int, budget: int) -> dict[str, Any]:
    verdicts: Counter[str] = Counter()
    queries = []
    for seed in range(orders):
        suspect = make()
        try:
            r = audit(fp, suspect, AuditConfig(access=Access.LABELS, budget=budget, seed=seed))
        finally:
            suspect.close()
        verdicts[r.verdict] += 1
        queries.append(r.queries_used)
    return {"verdicts": dict(verdicts), "median_queries": float(np.median(queries))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fingerprint", type=Path, required=True)
    ap.add_argument("--pirate", type=Path, required=True, help="the pirate's ONNX model, logits out")
    ap.add_argument("--data", required=True, help="the data set whose test split gives the natural images")
    ap.add_argument("--natural", type=int, default=2000, help="natural held-out images to set the thresholds on")
    ap.add_argument("--false-alarms", type=float, default=0.05, help="share of natural images each detector flags")
    ap.add_argument("--orders", type=int, default=8)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    fp = load_fingerprint(a.fingerprint)
    natural = load_data(a.data).test.points()[: a.natural]
    logits = Logits(a.pirate, fp)
    z_nat, z_core = logits(natural), logits(fp.points)
    counts = Counter(int(c) for c in fp.owner_labels)
    wrong = min(range(len(fp.classes)), key=lambda c: (counts.get(c, 0), c))

    def pirate() -> Oracle:
        return open_suspect(str(a.pirate), convention=fp.convention, point_shape=tuple(fp.points.shape[1:]),
                            num_classes=len(fp.classes))

    result: dict[str, Any] = {"fingerprint": str(a.fingerprint), "digest": fp.digest, "points": len(fp), "pirate": str(a.pirate),
                              "natural_images": len(natural), "false_alarms": a.false_alarms, "wrong_label": wrong,
                              "wrong_label_share_of_points": round(counts.get(wrong, 0) / len(fp), 4),
                              "honest": _audits(fp, pirate, a.orders, a.budget), "detectors": {}}
    print(f"{len(fp)} core points, {len(natural)} natural images; the honest pirate: {result['honest']}", flush=True)
    for name, detector in DETECTORS.items():
        s_nat, s_core = detector(z_nat), detector(z_core)
        threshold = float(np.quantile(s_nat, 1 - a.false_alarms))
        flagged = float(np.mean(s_core > threshold))
        evasive = _audits(fp, lambda d=detector, t=threshold: Evasive(pirate(), logits, d, t, wrong), a.orders, a.budget)
        result["detectors"][name] = {"threshold": threshold, "core_points_flagged": round(flagged, 4),
                                     "auroc_core_vs_natural": round(auc(list(s_core), list(s_nat)), 4), "evasive": evasive}
        print(f"{name}: flags {flagged:.1%} of core points at {a.false_alarms:.0%} natural false alarms, AUROC "
              f"{result['detectors'][name]['auroc_core_vs_natural']}; the evasive pirate: {evasive}", flush=True)
    # The attack's reach, were a detector perfect: every query answered with the wrong class.
    result["every_point_flagged"] = _audits(fp, lambda: Evasive(pirate(), logits, DETECTORS["energy"], -np.inf, wrong),
                                            a.orders, a.budget)
    print(f"were every point flagged, the evasive pirate: {result['every_point_flagged']}", flush=True)
    if a.out:
        write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
