"""Write a benchmark run's results: results.json, results.md, roc.png and errors.png.

Every file is written to a temporary name and renamed, so a failed run leaves no half file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.files import atomic_write


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def _per_set(method: str, per_set: dict[str, Any], members: dict[str, Any]) -> list[str]:
    """Per family, the agreement on each set of points over all of them: mean (min–max)."""
    names = list(per_set["p0"])
    by_family: dict[str, list[dict[str, float]]] = {}
    for m, a in per_set["models"].items():
        z = members.get(m, {})
        key = "calibration references" if z.get("role") == "calibrate" else f"{z.get('family', m)} ({z.get('kind', '?')})"
        by_family.setdefault(key, []).append(a)

    def cell(values: list[float]) -> str:
        return f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})"

    rows = [[f, len(v), *[cell([a[k] for a in v]) for k in names]] for f, v in by_family.items()]
    return [f"## Agreement per set of points: {method} (every point of each set; mean, min–max)", "",
            "p0 the audit holds each set to: " + ", ".join(f"{k} {v}" for k, v in per_set["p0"].items()) + ".", "",
            *_table(["family", "models", *names], rows), ""]


def markdown(r: dict[str, Any]) -> str:
    methods = r["methods"]
    budgets = [int(b) for b in next(iter(methods.values()))["budgets"]]
    env, owner = r["environment"], r["owner"]
    members = r["zoo"]
    n_pir = sum(1 for m in members.values() if m["kind"] == "piracy" and m["role"] == "evaluate")
    n_hom = sum(1 for m in members.values() if m["kind"] == "homologous" and m["role"] == "evaluate")
    n_cal = sum(1 for m in members.values() if m["role"] == "calibrate")
    lines = [
        f"# Piracy vs homologous benchmark: {r['data']['spec']}",
        "",
        f"Run {r['created_utc']} on {env['cpus']} CPU(s) ({env['platform']}), Python {env['python']}, torch {env['torch']}, "
        f"ONNX Runtime {env['onnxruntime']}; seed {r['config']['seed']}, zoo seed {r['config']['zoo']['seed']}. "
        f"Whole run {r['run_s']:.0f} s (zoo training {r['zoo_build_s']:.0f} s, cached between runs).",
        "",
        f"Owner: {owner['arch']}, test accuracy **{owner['test_accuracy']:.4f}**. Zoo: {n_pir} piracy and {n_hom} homologous "
        f"suspects audited, {n_cal} calibration references (never evaluated) set every threshold at alpha "
        f"{r['config']['alpha']}. Every suspect is an ONNX file asked through the project's ONNX Runtime adapter."
        + "".join(f" {m}'s L-inf radius {v * 255:.1f}/255." for m, v in r.get("radius", {}).items()),
        "",
        *[line for mode, bar in r["bar"].items() for line in (
            f"## The bar: {mode} (label-only)", "",
            *_table(["criterion", "met", "measured"], [[b["criterion"], "yes" if b["met"] else "**no**", b["measured"]] for b in bar]),
            "")],
        "## AUC, piracy against homologous (all families pooled)",
        "",
        *_table(["method", "label-only", *[f"{b} q" for b in budgets]],
                [[n, "yes" if e["label_only"] else "no", *[e["budgets"][str(b)]["auc"] for b in budgets]] for n, e in methods.items()]),
        "",
        "## TPR at FPR <= 1% (the threshold read on the homologous suspects; under 100 of them, FPR 0)",
        "",
        *_table(["method", "label-only", *[f"{b} q" for b in budgets]],
                [[n, "yes" if e["label_only"] else "no", *[e["budgets"][str(b)].get("tpr_at_fpr_1pct", "-") for b in budgets]]
                 for n, e in methods.items()]),
        "",
        f"## FIR / MIR at the calibrated threshold (alpha {r['config']['alpha']})",
        "",
        *_table(["method", *[f"{b} q" for b in budgets]],
                [[n, *[f"{e['budgets'][str(b)]['fir']:.2f} / {e['budgets'][str(b)]['mir']:.2f}" for b in budgets]] for n, e in methods.items()]),
        "",
    ]
    for b in [x for x in (50, 200) if x in budgets] or budgets[-1:]:
        fams = next(iter(methods.values()))["budgets"][str(b)]["families"]
        rows = []
        for f, row in fams.items():
            key = "mir" if "mir" in row else "fir"
            rows.append([f"{f} ({key.upper()}, {row['members']})",
                         *[methods[n]["budgets"][str(b)]["families"][f][key] for n in methods]])
        lines += [f"## Per family at {b} queries: MIR for piracy families, FIR for homologous ones", "",
                  *_table(["family", *methods], rows), ""]
    seq_methods = {n: e for n, e in methods.items() if "sequential" in e}
    if seq_methods:
        lines += ["## Sequential audit (batch 1, no repeat check; each method's test in the table below): verdicts and median queries", "",
                  "Per family: piracy / independent / inconclusive verdicts, median queries of the caught, the minimum "
                  "ln(1/alpha)/KL(p_family || p_references) for the measured agreement rates, and their ratio.", ""]
        fams = next(iter(seq_methods.values()))["sequential"]["families"]
        rows = []
        for f in fams:
            row: list[Any] = [f]
            for e in seq_methods.values():
                s = e["sequential"]["families"][f]
                cell = f"{s['piracy']}/{s['independent']}/{s['inconclusive']}"
                if "measured_agreement" in s:
                    cell += f", {_fmt(s.get('median_queries_caught'))} q (min {_fmt(s.get('minimum_queries'))})"
                else:
                    cell += f", {_fmt(s['median_queries'])} q"
                row.append(cell)
            rows.append(row)
        lines += _table(["family", *seq_methods], rows) + [""]
        lines += ["Pirates missed by the sequential audit as it runs, within b queries (not called `piracy` by then; "
                  "a budget at which `auto` would pick another test is left out):", ""]
        for n, e in seq_methods.items():
            within = e["sequential"].get("missed_within")
            if not within:
                continue
            fams = {f: s["missed_within"] for f, s in e["sequential"]["families"].items() if "missed_within" in s}
            lines += _table([f"{n}: family", *[f"{b} q" for b in within]],
                            [["all pirates", *within.values()], *[[f, *[v.get(b, "-") for b in within]] for f, v in fams.items()]])
            lines.append("")
        lines += _table(["method", "test", "p0 (test)", "p1 (test)", "reference agreement"],
                        [[n, e["sequential"].get("test") or "sprt", e["sequential"]["p0"], e["sequential"]["p1"],
                          e["sequential"]["reference_agreement"]] for n, e in seq_methods.items()])
        lines.append("")
    for n, e in methods.items():
        if "agreement_per_set" in e:
            lines += _per_set(n, e["agreement_per_set"], members)
    lines += ["## Cost", "",
              *_table(["fingerprint", "build s", "points"], [[n, e["build_s"], e["points"]] for n, e in methods.items()
                                                             if n == e["fingerprint"] or n.endswith("-agreement")]),
              "",
              f"Answers gathered at {_fmt(r['answer_queries_per_s'])} queries/s (batched); sequential audits ran at "
              f"{_fmt(r['audit_queries_per_s'])} queries/s (one point per query, ledger included).",
              "", "## Zoo: test accuracy by family", ""]
    by_family: dict[str, list[float]] = {}
    for m in members.values():
        if "test_accuracy" in m:
            by_family.setdefault(f"{m['family']} ({m['kind']})", []).append(m["test_accuracy"])
    lines += _table(["family", "models", "test accuracy (min–max)"],
                    [[f, len(v), f"{min(v):.3f}–{max(v):.3f}"] for f, v in by_family.items()])
    lines += ["", "int8 and fp16 suspects are conversions of the owner and of fine-tuned copies (no training).", ""]
    return "\n".join(lines)


def _save(fig: Any, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    atomic_write(path, buf.getvalue())
    plt.close(fig)
    return path


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepcore_auditor.benchmarks.metrics import roc_curve

    methods = r["methods"]
    name = Path(str(r["data"]["spec"])).name
    budgets = [int(b) for b in next(iter(methods.values()))["budgets"]]
    shown = [b for b in (20, 50, 200) if b in budgets] or budgets[:3]
    written = []
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.6), squeeze=False)
    for ax, b in zip(axes[0], shown, strict=False):
        for n, e in methods.items():
            bb = e["budgets"][str(b)]
            pir = [v for k, v in bb["scores"].items() if r["zoo"][k]["kind"] == "piracy"]
            hom = [v for k, v in bb["scores"].items() if r["zoo"][k]["kind"] == "homologous"]
            fpr, tpr = roc_curve(pir, hom)
            ax.plot(fpr, tpr, lw=2.2 if n.startswith("deepcore") else 1.2, ls="-" if n.startswith("deepcore") else "--",
                    label=f"{n} ({bb['auc']:.2f})")
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        ax.set(title=f"{b} queries", xlabel="homologous flagged (FPR)", ylabel="piracy caught (TPR)", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
    written.append(_save(fig, out / "roc.png", f"ROC, piracy vs homologous suspects: {name} (AUC in brackets)"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for n, e in methods.items():
        style = {"lw": 2.2 if n.startswith("deepcore") else 1.2, "ls": "-" if n.startswith("deepcore") else "--", "marker": "o", "ms": 3}
        axes[0].plot(budgets, [e["budgets"][str(b)]["mir"] for b in budgets], label=n, **style)
        axes[1].plot(budgets, [e["budgets"][str(b)]["fir"] for b in budgets], label=n, **style)
    for ax, what in zip(axes, ("MIR: piracy suspects missed", "FIR: homologous suspects flagged"), strict=False):
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set(title=what, xlabel="queries", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    written.append(_save(fig, out / "errors.png", f"Error rates against queries at alpha {r['config']['alpha']}: {name}"))
    return written


def write_outputs(r: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.md, roc.png, errors.png in `out` (an existing directory)."""
    paths = plots(r, out)
    atomic_write(out / "results.json", (json.dumps(r, indent=1) + "\n").encode())
    atomic_write(out / "results.md", markdown(r).encode())
    return [out / "results.json", out / "results.md", *paths]
