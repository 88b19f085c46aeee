"""Benchmark (not a test): fingerprint build time, and per suspect the queries and time to a
verdict in each identification mode, over several query orders, on the demo's Fashion-MNIST zoo.

    python -m deepcore_auditor.benchmarks.audit_benchmark [--cache-dir DIR] [--orders 5] [--budget 200]

The first run trains the demo's models (minutes); later runs reuse the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from deepcore_auditor.adapters.base import Access
from deepcore_auditor.adapters.open import open_suspect
from deepcore_auditor.auditor.audit import AuditConfig, audit
from deepcore_auditor.auditor.demo import RECIPE, SUSPECTS, prepare
from deepcore_auditor.fingerprints.data import default_cache_dir

MODES = [("agreement", Access.LABELS), ("similarity", Access.PROBS), ("clustering", Access.LABELS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--orders", type=int, default=5, help="query orders (audit seeds) per suspect and mode")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    cache = Path(a.cache_dir or default_cache_dir()) / RECIPE
    t0 = time.perf_counter()
    fp, paths, meta = prepare(cache, lambda m: print(m, file=sys.stderr))
    print(f"fingerprint: {len(fp)} points; build (all demo models + fingerprint) {meta.get('build_s', '?')} s "
          f"when first made; load now {time.perf_counter() - t0:.2f} s")
    rows = []
    print(f"{'suspect':<26}{'truth':<12}{'mode':<11}{'verdicts':<28}{'median q':>9}{'max q':>7}{'median ms':>10}{'q/s':>9}")
    for r in SUSPECTS:
        for mode, access in MODES:
            verdicts, queries, times = [], [], []
            for seed in range(a.orders):
                with open_suspect(str(paths[r.name]), convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes) as s:
                    res = audit(fp, s, AuditConfig(access=access, mode=mode, budget=a.budget, alpha=a.alpha, seed=seed))
                verdicts.append(res.verdict)
                queries.append(res.queries_used)
                times.append(res.elapsed_s)
            summary = ", ".join(f"{v}:{verdicts.count(v)}" for v in sorted(set(verdicts)))
            mq, mt = statistics.median(queries), statistics.median(times)
            qps = sum(queries) / max(sum(times), 1e-9)
            rows.append({"suspect": r.name, "truth": r.truth, "mode": mode, "verdicts": verdicts, "queries": queries,
                         "median_queries": mq, "median_s": mt, "queries_per_s": round(qps)})
            print(f"{r.name:<26}{r.truth:<12}{mode:<11}{summary:<28}{mq:>9}{max(queries):>7}{mt * 1000:>10.1f}{qps:>9.0f}")
    wrong = sum(v not in (row["truth"], "inconclusive") for row in rows for v in row["verdicts"])
    accused = sum(v == "piracy" for row in rows if row["truth"] == "independent" for v in row["verdicts"])
    print(f"wrong verdicts: {wrong}; independent suspects accused: {accused}")
    if a.json:
        a.json.write_text(json.dumps({"fingerprint_sha256": fp.digest, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
