"""The fixed cost of one audit (not a test of the suite): an in-process `audit` of a local ONNX
suspect against raw ONNX Runtime answering the same points in the same batches.

A hub screening thousands of uploads pays this cost per audit, so it is measured as the hub
would meet it: the fingerprint loaded once (its digest verified at load), the suspect opened
once, then `audit` called again and again with point orders (`--seed`) 0..N-1. The raw
baseline is one `InferenceSession.run` per batch the audit asked, on inputs already in the
model's convention — everything the audit adds (planning, the test, the ledger, the budget and
the answers' checks) is the difference. Target (issue "Audit a thousand deployments an hour"):
median audit wall time <= 1.5 x raw + 10 ms.

    python -m deepcore_auditor.benchmarks.audit_overhead [--repeats 30] [--fingerprint FP --suspect S.onnx ...]

Without files it uses the demo's cached fingerprint and its fine-tuned and same-architecture
suspects (`deepcore demo` makes them; the first run trains them, minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from deepcore_auditor.adapters.open import open_suspect
from deepcore_auditor.auditor.audit import AuditConfig, Plan, audit
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint


def _batches(fp: Fingerprint, config: AuditConfig, queries: list[int], used: int) -> list[np.ndarray]:
    """Batches of the sizes the audit asked: its plan's order cut where its trajectory says a
    batch ended, then what it asked beyond (repeat checks) as one more batch. Under a two-set
    plan's adaptive allocation these are not the very points asked, but as many, of the same
    shape: the same work for the session."""
    order = np.asarray(Plan.make(fp, config).indices)
    cuts, out, start = sorted(set(queries)), [], 0
    for end in cuts:
        out.append(fp.points[order[start:end]])
        start = end
    if used > start:
        out.append(fp.points[order[: used - start]])
    return out


def measure(fp: Fingerprint, suspect: Path, repeats: int, budget: int) -> dict[str, object]:
    import onnxruntime as ort

    with open_suspect(str(suspect), convention=fp.convention, point_shape=fp.point_shape,
                      num_classes=fp.num_classes) as oracle:
        audit(fp, oracle, AuditConfig(budget=budget, seed=0))  # warm-up: sessions, imports, first allocation
        audit_s, plans = [], []
        for seed in range(repeats):
            config = AuditConfig(budget=budget, seed=seed)
            t0 = time.perf_counter()
            r = audit(fp, oracle, config)
            audit_s.append(time.perf_counter() - t0)
            plans.append((config, [s.queries for s in r.trajectory], r.queries_used, r.verdict))
    session = ort.InferenceSession(str(suspect), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    raw_s = []
    for config, queries, used, _ in plans:
        inputs = [fp.convention.apply(b) for b in _batches(fp, config, queries, used)]
        t0 = time.perf_counter()
        for x in inputs:
            session.run(None, {name: x})
        raw_s.append(time.perf_counter() - t0)
    audit_ms, raw_ms = 1000 * statistics.median(audit_s), 1000 * statistics.median(raw_s)
    verdicts = sorted({p[3] for p in plans})
    return {"suspect": suspect.stem, "verdicts": verdicts, "queries_median": statistics.median(p[2] for p in plans),
            "audit_ms": round(audit_ms, 2), "raw_ms": round(raw_ms, 2), "target_ms": round(1.5 * raw_ms + 10, 2),
            "met": audit_ms <= 1.5 * raw_ms + 10}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fingerprint", type=Path)
    ap.add_argument("--suspect", type=Path, action="append", default=[])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--budget", type=int, default=200)
    a = ap.parse_args(argv)
    if a.fingerprint is None:
        from deepcore_auditor.auditor.demo import RECIPE, prepare
        from deepcore_auditor.fingerprints.data import default_cache_dir

        _, paths, _ = prepare(Path(default_cache_dir()) / RECIPE, lambda m: print(m, file=sys.stderr))
        a.fingerprint, a.suspect = Path(default_cache_dir()) / RECIPE / "fingerprint.json", [paths["fine-tuned"], paths["same-arch-seed-1"]]
    fp = load_fingerprint(a.fingerprint)
    print(f"{'suspect':24} {'verdicts':22} {'queries':>7} {'audit ms':>9} {'raw ms':>7} {'target ms':>9}  met")
    for s in a.suspect:
        row = measure(fp, s, a.repeats, a.budget)
        print(f"{row['suspect']:24} {','.join(row['verdicts']):22} {row['queries_median']:>7} {row['audit_ms']:>9} "
              f"{row['raw_ms']:>7} {row['target_ms']:>9}  {'yes' if row['met'] else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
