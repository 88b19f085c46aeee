"""What each simulated family of DeepCore's zoo buys: the benchmark's DeepCore arm built again
without it, every other known model keeping its seed (fingerprints.build: `without`), and the
same suspects audited.

    python -m deepcore_auditor.benchmarks.zoo_ablation --out DIR [--data fashion-mnist]
        [--candidates 1200] [--variants NAME,...]

Each variant is one `deepcore bench --methods deepcore-agreement --without ...` (or `--zoo
small`) into DIR/<variant>/, on the benchmark's cached zoo of suspects; the known models of
DeepCore's whole zoo are trained once and cached under the benchmark's zoo, so a variant costs
its core points' growth only. It prints, per variant: the models its build trains, the core
points' p0 (the audit's bound), the weight copies' median queries (the
sequential audit, label-only, alpha 0.01, batch 1, budget 400), how many of each other piracy
family are caught, how many homologous suspects are accused, MIR at 100 queries and TPR at FPR
<= 1% at 20 and 100 queries (fixed budgets, the bench's calibrated threshold). Results go to
DIR/ablation.json and DIR/ablation.md.

Read it as evidence from one owner and data set: a family that buys nothing here may buy
something on another owner (the defaults are not set from it alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.errors import DeepCoreError
from deepcore_auditor.benchmarks.piracy import BenchConfig, run_bench
from deepcore_auditor.fingerprints.config import ZOO_SIZES

logger = logging.getLogger(__name__)

# name -> (zoo size, members left out)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "whole-zoo": ("default", ()),
    "no-weight-copies": ("default", ("sim-fine-tune", "sim-prune")),
    "no-adv-fine-tune": ("default", ("sim-adv-fine-tune",)),
    "no-same-arch-students": ("default", ("sim-distill", "sim-extract")),
    "no-other-arch-students": ("default", ("sim-extract-lenet", "sim-extract-mlp")),
    "no-other-arch-references": ("default", ("ref-lenet", "ref-mlp")),
    "no-sgd-selection-references": ("default", ("ref-same-arch-2", "ref-same-arch-sgd-2", "ref-same-arch-sgd-3")),
    "small": ("small", ()),
    "large": ("large", ()),
}
WEIGHT_COPIES = ("fine-tune-own", "fine-tune-other", "int8", "fp16", "transfer")
HOMOLOGOUS = ("same-arch-seed", "same-arch-split", "other-arch", "other-task")
METHOD = "deepcore-agreement"


def summarize(name: str, results: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    """One variant's row, from its `run_bench` results."""
    m = results["methods"][METHOD]
    seq = m["sequential"]
    families = seq["families"]
    copies = [v["queries"] for v in seq["verdicts"].values() if v["family"] in WEIGHT_COPIES and v["verdict"] == "piracy"]
    n_copies = sum(1 for v in seq["verdicts"].values() if v["family"] in WEIGHT_COPIES)
    zoo = config.deepcore_zoo()
    return {
        "variant": name,
        "zoo_size": config.zoo_size,
        "without": list(config.without),
        "known_models": len(zoo) - len(config.without),
        "build_s": m["build_s"],
        "p0": seq["p0"],
        "weight_copies_caught": f"{len(copies)}/{n_copies}",
        "weight_copies_median_queries": statistics.median(copies) if copies else None,
        "caught": {f: f"{v['piracy']}/{v['piracy'] + v['independent'] + v['inconclusive']}" for f, v in families.items()
                   if f not in WEIGHT_COPIES and f not in HOMOLOGOUS},
        "homologous_accused": sum(families[f]["piracy"] for f in HOMOLOGOUS if f in families),
        "homologous": sum(families[f]["piracy"] + families[f]["independent"] + families[f]["inconclusive"]
                          for f in HOMOLOGOUS if f in families),
        "mir_100": m["budgets"]["100"]["mir"],
        "fir_100": m["budgets"]["100"]["fir"],
        "tpr_at_fpr_1pct": {b: m["budgets"][b]["tpr_at_fpr_1pct"] for b in ("20", "100")},
    }


def markdown(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    fams = list(rows[0]["caught"]) if rows else []
    head = (["variant", "models", "p0", "copies (median q)"] + fams
            + ["homologous accused", "MIR@100", "TPR@1% 20/100 q", "build s (models cached)"])
    lines = [f"# What each simulated family buys ({config['data']}, {config['candidates']} candidates)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["known_models"]), f"{r['p0']:.3f}",
                 f"{r['weight_copies_caught']} ({r['weight_copies_median_queries']})"]
        cells += [r["caught"].get(f, "-") for f in fams]
        cells += [f"{r['homologous_accused']}/{r['homologous']}", f"{r['mir_100']:.2f}",
                  f"{r['tpr_at_fpr_1pct']['20']:.3f}/{r['tpr_at_fpr_1pct']['100']:.3f}", f"{r['build_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--candidates", type=int, default=1200)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, among: " + ", ".join(VARIANTS))
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        print(f"error: unknown variant(s) {', '.join(unknown) or '(none)'}: use some of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"error: cannot write to {args.out}: directory {args.out.parent} does not exist", file=sys.stderr)
        return 2
    args.out.mkdir(exist_ok=True)
    rows = []
    base = {"data": args.data, "candidates": args.candidates, "zoo_sizes": ZOO_SIZES}
    for name in names:
        size, without = VARIANTS[name]
        config = BenchConfig(data=args.data, candidates=args.candidates, methods=(METHOD,), zoo_size=size, without=without)
        t0 = time.perf_counter()
        try:
            results = run_bench(config, args.out / name, cache_dir=args.cache_dir, progress=lambda m: logger.info(m))
        except DeepCoreError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        row = summarize(name, results, config)
        row["run_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "ablation.json").write_text(json.dumps({**base, "rows": rows}, indent=1))
        (args.out / "ablation.md").write_text(markdown(rows, base))
    print(markdown(rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
