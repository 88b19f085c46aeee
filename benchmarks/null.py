"""False accusations measured where they would happen: hundreds of independently trained models
audited against the owner's default fingerprint.

The owner is the piracy benchmark's (`zoo.py`: its cached owner on half A, reused or trained);
the fingerprint is the one `deepcore fingerprint` makes with every flag at its default
(`BuildConfig()`), or with `--zoo small|large` (`--zoo`), built once and cached. The independent
models are new: none is among the fingerprint's known models or the zoo's members (their seeds
start at NULL_SEED). Families:

- same-arch-seed: the owner's architecture, recipe and data (half A), other seeds;
- same-arch-other-data: the owner's architecture on the attacker's half B or a random half;
- other-arch: the other architectures (lenet, mlp, cnn-wide) on half A or B;
- other-task: a 10-way task with other labels (shifted by a seeded offset), any architecture.

Every model is exported to ONNX and audited label-only through the product's ONNX adapter by the
real `audit` at the default budget, once under each sequential test. The summary gives the
accusations per family and the one-sided 95% (Clopper-Pearson) upper bound on the
false-identification rate: 0 of n bounds it by 1 - 0.05^(1/n) (0.99% for n = 300).

    python -m deepcore_auditor.benchmarks.null --data fashion-mnist --out benchmarks/results/null
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.adapters.files import atomic_write
from deepcore_auditor.adapters.onnx import file_sha256
from deepcore_auditor.adapters.open import open_suspect
from deepcore_auditor.auditor.audit import AuditConfig, audit
from deepcore_auditor.benchmarks.zoo import Member, ZooConfig, build_zoo, train_member
from deepcore_auditor.fingerprints.build import BuildConfig, build_fingerprint
from deepcore_auditor.fingerprints.calibration import (
    PREDICTION_LEVEL,
    SET_NAMES,
    point_sets,
    rates,
    reference_kinds,
    set_means,
    set_view,
)
from deepcore_auditor.fingerprints.config import (
    DEFAULT_CALIBRATION_REFERENCES,
    DEFAULT_SELECTION_REFERENCES,
    ZOO_SIZES,
    zoo_counts,
    zoo_of,
)
from deepcore_auditor.fingerprints.data import default_cache_dir, load_data
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint, save_fingerprint
from deepcore_auditor.fingerprints.models import accuracy, export_onnx
from deepcore_auditor.fingerprints.stats import (
    TESTS,
    Bettor,
    clopper_pearson_upper,
    pooled_arcsine_spread,
    prediction_upper_per_group,
)

logger = logging.getLogger(__name__)

NULL_SEED = 50_000  # far from every seed the zoo (100 + 1000 * seed + i) and the builder use
FAMILIES = {  # family -> (architectures, data halves, label task) cycled over the family's members
    "same-arch-seed": (("owner",), ("A",), False),
    "same-arch-other-data": (("owner",), ("B", "R"), False),
    "other-arch": (("lenet", "mlp", "cnn-wide"), ("A", "B"), False),
    "other-task": (("owner", "lenet", "mlp", "cnn-wide"), ("A", "B"), True),
}


@dataclass(frozen=True)
class NullConfig:
    """How many independent models of each family, and how they are audited."""

    same_arch_seed: int = 100
    same_arch_other_data: int = 50
    other_arch: int = 100
    other_task: int = 50
    budget: int = AuditConfig.budget  # the audit's defaults: what a user's audit would do
    alpha: float = AuditConfig.alpha
    seed: int = 0
    epochs: int = ZooConfig.epochs  # the owner's and every independent model's (the bench's --epochs)

    def counts(self) -> dict[str, int]:
        return {"same-arch-seed": self.same_arch_seed, "same-arch-other-data": self.same_arch_other_data,
                "other-arch": self.other_arch, "other-task": self.other_task}


def plan_models(config: NullConfig, owner_arch: str) -> list[Member]:
    out: list[Member] = []
    for family, count in config.counts().items():
        archs, halves, other_task = FAMILIES[family]
        for i in range(count):
            arch = archs[i % len(archs)]
            arch = owner_arch if arch == "owner" else arch
            seed = NULL_SEED + 1000 * config.seed + len(out)
            out.append(Member(f"{family}-{arch}-{i}", "homologous", family, "evaluate", "other-task" if other_task else "independent",
                              arch, halves[i % len(halves)], seed, param=float(1 + i % 9) if other_task else 0.0))
    return out


def _fp_path(root: Path, references: int, selection: int = DEFAULT_SELECTION_REFERENCES) -> Path:
    return root / (f"fp-references-{references}.json" if selection == 1 else f"fp-references-{references}-selection-{selection}.json")


def default_fingerprint(zoo: Any, root: Path, references: int = DEFAULT_CALIBRATION_REFERENCES,
                        selection: int = DEFAULT_SELECTION_REFERENCES) -> Fingerprint:
    """The fingerprint `deepcore fingerprint` makes for the zoo's owner with default flags (and
    `--calibration-references references`, `--selection-references selection`). Cached by both
    counts (a file without the second was built with one selection reference per recipe, the
    default before 2026-12-07)."""
    path = _fp_path(root, references, selection)
    if path.is_file():
        return load_fingerprint(path)
    x, y = zoo.halves["A"]
    owner_id = {"path": str(zoo.paths["owner"]), "sha256": file_sha256(zoo.paths["owner"])}
    logger.info("building the default fingerprint with %d calibration references", references)
    t0 = time.perf_counter()
    fp = build_fingerprint(zoo.owner, x, y, zoo.data.train.classes, owner_id, BuildConfig(zoo=zoo_of(references, selection)),
                           progress=logger.info, require_separable=False, cache_dir=root)  # known models another K's build trained are reused
    save_fingerprint(fp, path)
    (path.with_suffix(".build_s")).write_text(f"{time.perf_counter() - t0:.1f}")
    return fp


def _audit_all(fp: Fingerprint, models: list[Member], paths: dict[str, Path], config: NullConfig,
               tests: tuple[str, ...] = TESTS) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in models:
        row: dict[str, Any] = {"family": m.family, "arch": m.arch, "data": m.data}
        with open_suspect(str(paths[m.name]), convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes) as oracle:
            labels = oracle.query(fp.points, Access.LABELS)
            row["agreement_all_points"] = round(float(np.mean(labels == fp.owner_labels)), 4)
            per_set = set_means(fp, labels == fp.owner_labels)
            if per_set:  # each set is its own test, held to its own p0
                row["agreement_per_set"] = per_set
            for test in tests:
                r = audit(fp, oracle, AuditConfig(budget=config.budget, alpha=config.alpha, seed=config.seed, test=test))
                row[test] = {"verdict": r.verdict, "queries": r.queries_used, "agreement": r.agreement}
        out[m.name] = row
    return out


def summarize(dataset: str, rows: dict[str, dict[str, Any]], fp: Fingerprint, config: NullConfig,
              accuracies: dict[str, float]) -> dict[str, Any]:
    """The summary.json entry for one data set (and zoo size, which `run` adds): accusations per
    family and test, with bounds."""
    per_test: dict[str, Any] = {}
    for test in TESTS:
        families: dict[str, Any] = {}
        p0 = _set_p0(fp, test)
        for fam in config.counts():
            mine = [r for r in rows.values() if r["family"] == fam]
            if not mine:
                continue
            accused = sum(r[test]["verdict"] == "piracy" for r in mine)
            agree = [r["agreement_all_points"] for r in mine]
            families[fam] = {
                "models": len(mine), "accused": accused, "above_p0": sum(_above_p0(r, p0) for r in mine),
                "fir_upper_95": round(clopper_pearson_upper(accused, len(mine), 0.95), 4),
                "verdicts": {v: sum(r[test]["verdict"] == v for r in mine) for v in ("independent", "inconclusive", "piracy")},
                "median_queries": float(np.median([r[test]["queries"] for r in mine])),
                "agreement_on_points": {"min": min(agree), "median": float(np.median(agree)), "max": max(agree)},
            }
        n = sum(f["models"] for f in families.values())
        k = sum(f["accused"] for f in families.values())
        per_test[test] = {"independent_models": n, "accused": k, "fir_upper_95": round(clopper_pearson_upper(k, n, 0.95), 4),
                          "per_family": families, "p0": rates(fp, "agreement", test).summary["p0"], "p0_per_set": p0,
                          "p1": rates(fp, "agreement", test).summary["p1"]}
    best = per_test["betting"]
    return {
        "dataset": dataset, "alpha": config.alpha, "test": "betting",
        "independent_models": best["independent_models"], "accused": best["accused"], "fir_upper_95": best["fir_upper_95"],
        "per_family": best["per_family"], "by_test": per_test, "budget": config.budget,
        "fingerprint_sha256": fp.digest, "fingerprint_points": len(fp),
        "test_accuracy": {"min": min(accuracies.values()), "median": float(np.median(list(accuracies.values()))),
                          "max": max(accuracies.values())},
        "config": asdict(config),
    }


# The null's families whose models are of a kind the builder's references stand for: trained
# from scratch on the owner's data (half A) by the owner's recipe (Adam), as the references are.
_KIND_FAMILIES = ("same-arch-seed", "other-arch")


def _set_p0(fp: Fingerprint, test: str) -> dict[str, float]:
    """Each set's p0 under `test` (the core points' alone for a fingerprint of one set)."""
    summary = rates(fp, "agreement", test).summary
    if point_sets(fp).max() == 0:
        return {SET_NAMES[0]: float(summary["p0"])}  # type: ignore[arg-type]
    return {SET_NAMES[0]: float(summary["p0"]), SET_NAMES[1]: float(summary["error_points"]["p0"])}  # type: ignore[arg-type,index]


def _above_p0(row: dict[str, Any], p0: dict[str, float]) -> bool:
    """Whether the model agrees more than p0 (`_set_p0`) on any set of the fingerprint's points
    (its null, the one each set's test holds it to, fails for it there)."""
    per_set = row.get("agreement_per_set", {SET_NAMES[0]: row["agreement_all_points"]})
    return any(per_set[name] > bound for name, bound in p0.items())


def kind_coverage(fp: Fingerprint, rows: dict[str, dict[str, Any]], owner_arch: str) -> list[dict[str, Any]]:
    """Per set of points and kind of calibration reference (architecture, recipe), the bound p0's
    prediction bound gives one new model of that kind (`stats.prediction_upper_per_group`, at the
    level p0 is read at) beside the null's models of that kind — trained on the owner's data by
    Adam — and how many of them exceed it (the null's models train the bench's fixed epochs on all
    of half A, the builder's references until they reach the owner's accuracy on five sixths of
    it: alike, not the same recipe): the check of the bound's model (normal on the arcsine scale,
    one spread shared by every kind) that a hundred models of one kind can make and a dozen
    references cannot. The rows' agreement per set (`agreement_per_set`), or over all the points
    for a fingerprint of one set.

    Beside each bound, the spread it assumes — the references' seed-to-seed standard deviation on
    the arcsine-square-root scale, pooled over every kind (`stats.prediction_upper_per_group`) —
    and the spread the null's models of that kind show on the same scale (for a kind of three
    models or more; None below): where the second is larger, the bound's model understates how far
    one more model of the kind can land."""
    two = point_sets(fp).max() > 0
    out = []
    for k in range(len(SET_NAMES) if two else 1):
        view = set_view(fp, k) if two else fp
        indep = [m for m in view.known_models if m.kind == "independent" and m.role == "calibration"]
        kinds = reference_kinds(view, indep, soft=False)
        each = prediction_upper_per_group(list(kinds.values()), PREDICTION_LEVEL)
        if each is None:
            continue
        pooled = pooled_arcsine_spread(list(kinds.values()))[0]
        for (arch, recipe), refs, bound in zip(kinds, kinds.values(), each[0], strict=True):
            name = owner_arch if arch == "owner" else arch
            mine = sorted(r["agreement_per_set"][SET_NAMES[k]] if two else r["agreement_all_points"] for r in rows.values()
                          if recipe == "adam" and r["arch"] == name and r["data"] == "A" and r["family"] in _KIND_FAMILIES)
            out.append({"set": SET_NAMES[k], "arch": name, "recipe": recipe, "references": [round(v, 4) for v in refs],
                        "bound": round(bound, 4), "models": len(mine), "above_bound": sum(a > bound for a in mine),
                        "max": mine[-1] if mine else None, "median": float(np.median(mine)) if mine else None,
                        "references_spread": round(pooled, 4),
                        "models_spread": round(pooled_arcsine_spread([mine])[0], 4) if len(mine) >= 3 else None})
    return out


def references_curve(zoo: Any, root: Path, models: list[Member], paths: dict[str, Path], config: NullConfig,
                     counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """How p0, the queries an exact copy needs and the accusations among the independent models
    move with the number of calibration references (the points are grown against the selection
    models only, so they stay the same unless the reference-weight ladder picks another rung)."""
    out = []
    base = default_fingerprint(zoo, root)
    for k in counts:
        fp = default_fingerprint(zoo, root, k)
        r = rates(fp, "agreement", "betting")
        rows = _audit_all(fp, models, paths, config, tests=("betting",))
        accused = sum(row["betting"]["verdict"] == "piracy" for row in rows.values())
        p0 = float(r.summary["p0"])  # type: ignore[arg-type]
        per_set = _set_p0(fp, "betting")
        build_s = _fp_path(root, k).with_suffix(".build_s")
        out.append({
            "calibration_references": k, "p0": p0, "p1": r.summary["p1"],
            "prediction_bound": r.summary.get("prediction_bound"), "prediction_dof": r.summary.get("prediction_dof"),
            "exact_copy_needs": Bettor(len(fp) * p0, len(fp)).best_case_needs(math.log(1 / config.alpha), len(fp)),
            "independent_models": len(rows), "accused": accused,
            "above_p0": sum(_above_p0(row, per_set) for row in rows.values()),
            "same_points_as_default": bool(np.array_equal(fp.points, base.points)),
            "build_s": float(build_s.read_text()) if build_s.is_file() else None,
        })
        logger.info("K=%d: p0 %.4f, %d of %d accused", k, p0, accused, len(rows))
    return out


def run(data_spec: str, out: Path, config: NullConfig, cache_dir: Path | None = None,
        curve: tuple[int, ...] = (), zoo_size: str = "default") -> dict[str, Any]:
    """The null on the fingerprint `deepcore fingerprint --zoo zoo_size` makes (its reference
    counts, `config.ZOO_SIZES`); summary.json keeps one entry per data set and zoo size."""
    try:
        counts = zoo_counts(zoo_size)
    except ValueError as e:
        raise InputError(str(e)) from None
    if config.epochs < 1:
        raise InputError(f"--epochs must be 1 or more, got {config.epochs}")
    if curve and zoo_size != "default":
        raise InputError("--references-curve rebuilds the default zoo's fingerprint with other calibration counts: "
                         "not with --zoo " + zoo_size)
    data = load_data(data_spec, cache_dir=cache_dir)
    cache = Path(cache_dir or default_cache_dir())
    zoo_config = ZooConfig(epochs=config.epochs)
    zoo = build_zoo(data, cache / "bench", zoo_config, owner_only=True)
    root = zoo.root / "null"
    root.mkdir(exist_ok=True)
    fp = default_fingerprint(zoo, root, *counts)
    k = data.train.num_classes
    shape = tuple(int(v) for v in data.train.shape)
    meta_path = root / "models.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    models = plan_models(config, zoo.meta["owner"]["arch"])
    paths: dict[str, Path] = {}
    test_x, test_y = data.test.points(), data.test.y
    t0 = time.perf_counter()
    for i, m in enumerate(models):
        path = root / f"{m.name}-{m.seed}.onnx"
        paths[m.name] = path
        if path.is_file() and m.name in meta:
            continue
        t = time.perf_counter()
        model = train_member(m, zoo.owner, zoo.halves, zoo_config, k)
        export_onnx(model.net, path, shape)  # type: ignore[union-attr]
        meta[m.name] = {"test_accuracy": round(accuracy(model, test_x, test_y), 4), "train_s": round(time.perf_counter() - t, 1)}
        atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        logger.info("trained %s (%d/%d): accuracy %.4f in %.1f s", m.name, i + 1, len(models), meta[m.name]["test_accuracy"],
                    meta[m.name]["train_s"])
    train_s = time.perf_counter() - t0
    rows = _audit_all(fp, models, paths, config)
    accuracies = {m.name: meta[m.name]["test_accuracy"] for m in models if m.family != "other-task"}
    entry = summarize(data_spec, rows, fp, config, accuracies)
    entry["zoo_size"] = zoo_size
    entry["owner"] = {k: zoo.meta["owner"][k] for k in ("arch", "test_accuracy")}
    entry["kind_coverage"] = kind_coverage(fp, rows, zoo.meta["owner"]["arch"])
    if curve:
        entry["references_curve"] = references_curve(zoo, root, models, paths, config, curve)
    entry["run"] = {"train_s_this_run": round(train_s, 1), "train_s_all_models": round(sum(meta[m.name]["train_s"] for m in models), 1),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    existing = json.loads(summary_path.read_text()) if summary_path.is_file() else []
    summary = [e for e in existing if (e.get("dataset"), e.get("zoo_size", "default")) != (data_spec, zoo_size)] + [entry]
    atomic_write(summary_path, json.dumps(summary, indent=1).encode())
    name = Path(data_spec).name + ("" if zoo_size == "default" else f"-zoo-{zoo_size}")
    atomic_write(out / f"models-{name}.json", json.dumps(rows, indent=1).encode())
    return entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--same-arch-seed", type=int, default=NullConfig.same_arch_seed)
    p.add_argument("--same-arch-other-data", type=int, default=NullConfig.same_arch_other_data)
    p.add_argument("--other-arch", type=int, default=NullConfig.other_arch)
    p.add_argument("--other-task", type=int, default=NullConfig.other_task)
    p.add_argument("--budget", type=int, default=NullConfig.budget)
    p.add_argument("--epochs", type=int, default=NullConfig.epochs,
                   help="Epochs of the owner and of every independent model (as the bench's --epochs; CIFAR-10: 6).")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--zoo", default="default", choices=list(ZOO_SIZES), help="The fingerprint's zoo size (as fingerprint's).")
    p.add_argument("--references-curve", default="", help="Calibration reference counts to rebuild the fingerprint with, e.g. 5,10,20.")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = NullConfig(a.same_arch_seed, a.same_arch_other_data, a.other_arch, a.other_task, a.budget, epochs=a.epochs)
    curve = tuple(int(v) for v in a.references_curve.split(",") if v.strip())
    entry = run(a.data, a.out, config, a.cache_dir, curve, a.zoo)
    for test, t in entry["by_test"].items():
        print(f"{test}: {t['accused']} of {t['independent_models']} accused, FIR <= {t['fir_upper_95']} (95%), p0 {t['p0']}")
        for fam, f in t["per_family"].items():
            print(f"  {fam}: {f['accused']}/{f['models']} accused, verdicts {f['verdicts']}, agreement {f['agreement_on_points']}")
    for c in entry["kind_coverage"]:
        print(f"{c['set']}: kind {c['arch']}/{c['recipe']}: bound {c['bound']} from references {c['references']}; "
              f"{c['above_bound']} of {c['models']} such models above it (max {c['max']}); spread (arcsine scale) "
              f"assumed {c['references_spread']}, the models' {c['models_spread']}")
    for c in entry.get("references_curve", []):
        print(f"K={c['calibration_references']}: p0 {c['p0']}, exact copy needs {c['exact_copy_needs']}, "
              f"{c['accused']} of {c['independent_models']} accused, {c['above_p0']} above p0")


if __name__ == "__main__":
    main()
