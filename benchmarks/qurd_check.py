"""The akh, sac-w and sac-m baselines against their authors' code, on the same models and points.

`python3 -m deepcore_auditor.benchmarks.qurd_check --reference-src QURD --zoo ZOO --out DIR [--sac-src SAC]`

QURD is a checkout of QuRD (Godinot et al., "Queries, Representation & Detection", MIT): the
reference code of AKH (the authors' own scheme) and their implementation of SAC. SAC (optional) is
a checkout of the SAC paper's own repository (Guan et al., NeurIPS 2022). Their functions are
imported from those checkouts, never copied here; where one cannot be imported (QuRD needs
torchvision, numba, foolbox and scikit-image; the SAC repository's module imports h5py, cv2,
scikit-learn and torchvision) the script names it in one line and exits 2.

ZOO is a benchmark zoo built by `deepcore bench` (its meta.json, owner.onnx, one ONNX file a
member and the cached fp-akh-*, fp-sac-w-* and fp-sac-m-* fingerprints): the models and points
the benchmark scored. Every fingerprint's points are taken in the audit's order (plan_order,
seed 0) and every suspect and calibration reference answers them. Scores, higher = more alike:

- `ours`: the benchmark's own score (benchmarks.piracy._score): -sac_distance on the owner's
  recorded probabilities and the suspect's probabilities; for akh the top-1 label agreement.
- `ours-logits`: -sac_distance on both models' raw outputs (logits).
- `qurd`: QuRD's pipeline: representation.SAC (cosine correlation matrix of the model's outputs,
  here logits) and distance.l2 (root mean square of the matrices' difference), negated; for akh
  representation.HardLabels and 1 - distance.hamming.
- `qurd-probs`: the same QuRD functions on models that answer probabilities (our representation,
  their distance).
- `sac` (with --sac-src): correlation_wrong.correlation ((1 - cosine) / 2) on logits, aggregated
  as that file's cal_correlation does in line (sum of absolute differences / N^2), negated.

For each score: AUC of piracy against homologous suspects (pooled, as the benchmark reports it)
at every budget b (the first b points), TPR at FPR <= 1%, and the rank correlation with `ours`
over the suspects. Besides the scores, QuRD's own sampler (queries.RandomNegativeQueries, the one
its AKH and SAC use) draws from the same pool with the same owner: its points are checked to be
owner-misclassified pool points like ours, and scored like ours; and once more from a pool cut
short so that it fills the budget with CutMix and flips, its augmentation path.
Writes results.json under --out and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from deepcore_auditor.adapters.base import InputConvention, to_probabilities
from deepcore_auditor.adapters.errors import first_line
from deepcore_auditor.adapters.onnx import run_in_batches
from deepcore_auditor.auditor.audit import plan_order
from deepcore_auditor.benchmarks.metrics import auc, tpr_at_fpr
from deepcore_auditor.benchmarks.piracy import BUDGETS, MAX_FPR
from deepcore_auditor.fingerprints.baselines import sac_distance
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint

METHODS = ("akh", "sac-w", "sac-m")
SAC_SCORES = ("ours", "ours-logits", "qurd", "qurd-probs", "sac")
AKH_SCORES = ("ours", "qurd")
# What of the authors' code this check cannot call, and why (written into results.json).
NOT_COMPARED = {
    "SAC repository cut_mix.py (SAC-m's points)": "a script, not a function: importing it downloads CIFAR-10 and "
    "it calls np.int (gone since numpy 1.24) and .cuda(); its rule (rand_bbox) is a fixed box of 0.2 x the side "
    "centred near a corner, one box and one partner permutation for a batch of 100 test images",
    "SAC repository SAC-w point selection": "no code: correlation_wrong.py reads the points from dataset_common.h5, "
    "a data file distributed apart from the repository",
}
BATCH = 256  # the ONNX adapter's largest batch (OnnxOracle max_batch), in which the benchmark asked


class ReferenceMissing(Exception):
    """A reference function that cannot be imported (or a checkout that is not one), or a zoo
    directory that is not a benchmark zoo with the fingerprints compared."""


@dataclass(frozen=True)
class Reference:
    """The authors' functions, as imported from the user's checkouts."""

    sac_repr: type  # qurd.fingerprint.representation.SAC
    hard_labels: type  # qurd.fingerprint.representation.HardLabels
    l2: Callable[[torch.Tensor, torch.Tensor], float]  # qurd.fingerprint.distance.l2
    hamming: Callable[[torch.Tensor, torch.Tensor], float]  # qurd.fingerprint.distance.hamming
    negatives: type  # qurd.fingerprint.queries.RandomNegativeQueries
    v2: ModuleType  # torchvision.transforms.v2 (QuRD's transforms)
    qurd: dict[str, Any]  # where it came from
    sac_correlation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # correlation_wrong.correlation
    sac: dict[str, Any] | None


def _git(src: Path) -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"src": str(src), "commit": run("rev-parse", "HEAD") or "unknown (not a git checkout)",
            "modified_files": len([ln for ln in run("status", "--porcelain").splitlines() if ln.strip()])}


def _import(src: Path, module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # an ImportError, or whatever a dependency raises while it loads
        raise ReferenceMissing(f"cannot import {module}.{name} from {src}: {type(e).__name__}: {first_line(e)}") from None


def import_reference(qurd_src: Path, sac_src: Path | None) -> Reference:
    """QuRD's (and optionally the SAC repository's) functions, imported from the checkouts."""
    if not (qurd_src / "qurd" / "fingerprint" / "representation.py").is_file():
        raise ReferenceMissing(f"{qurd_src} is not a QuRD checkout (no qurd/fingerprint/representation.py)")
    sys.path.insert(0, str(qurd_src))
    ref: dict[str, Any] = {
        "sac_repr": _import(qurd_src, "qurd.fingerprint.representation", "SAC"),
        "hard_labels": _import(qurd_src, "qurd.fingerprint.representation", "HardLabels"),
        "l2": _import(qurd_src, "qurd.fingerprint.distance", "l2"),
        "hamming": _import(qurd_src, "qurd.fingerprint.distance", "hamming"),
        "negatives": _import(qurd_src, "qurd.fingerprint.queries", "RandomNegativeQueries"),
        "v2": importlib.import_module("torchvision.transforms.v2"),  # QuRD itself imported it above
    }
    correlation, sac_info = None, None
    if sac_src is not None:
        if not (sac_src / "correlation_wrong.py").is_file():
            raise ReferenceMissing(f"{sac_src} is not a checkout of the SAC repository (no correlation_wrong.py)")
        sys.path.insert(0, str(sac_src))
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:  # the module (and model_load, which it imports) set CUDA_VISIBLE_DEVICES when imported
            correlation = _import(sac_src, "correlation_wrong", "correlation")
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        sac_info = _git(sac_src)
    return Reference(**ref, qurd=_git(qurd_src), sac_correlation=correlation, sac=sac_info)


class OnnxNet(nn.Module):
    """An ONNX model as an eval-only torch module (the reference code calls torch modules):
    normalized float input -> its raw outputs (logits), or their softmax with probs=True. One
    ONNX Runtime thread."""

    def __init__(self, path: Path, num_classes: int, probs: bool = False) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = {"tensor(float16)": np.float16, "tensor(float)": np.float32}[inp.type]
        self.probs = probs
        self.pretrained_cfg = {"num_classes": num_classes}  # what QuRD's CutMix path reads off a timm model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(self.input_dtype)})[0]
        z = torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(len(x), -1))
        return torch.softmax(z, dim=-1) if self.probs else z


class PoolDataset(torch.utils.data.Dataset):
    """Canonical pool points and labels as the torch Dataset QuRD's samplers read; QuRD sets
    `transform` (its transform less the normalization) and expects the dataset to apply it."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y.astype(np.int64))
        self.transform: Any = None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        return (self.transform(x) if self.transform is not None else x), self.y[i]


@dataclass
class Zoo:
    root: Path
    convention: InputConvention
    owner_accuracy: float
    kinds: dict[str, str]  # evaluated suspect -> piracy | homologous
    families: dict[str, str]
    references: list[str]  # calibration references
    fingerprints: dict[str, tuple[Path, Fingerprint]]


def open_zoo(root: Path) -> Zoo:
    try:
        return _open_zoo(root)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing or foreign meta.json, a file that is not ours
        raise ReferenceMissing(f"{root} is not a benchmark zoo built by `deepcore bench`: {first_line(e)}") from None


def _open_zoo(root: Path) -> Zoo:
    meta = json.loads((root / "meta.json").read_text())
    fps: dict[str, tuple[Path, Fingerprint]] = {}
    for method in METHODS:
        found = sorted(root.glob(f"fp-{method}-*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ReferenceMissing(f"{root} holds no fp-{method}-*.json: run `deepcore bench` on it first")
        fps[method] = (found[-1], load_fingerprint(found[-1]))
        if method != "sac-m" and "pool_index" not in fps[method][1].extra:
            raise ReferenceMissing(f"{found[-1]} records no pool_index: not a fingerprint of `deepcore bench`'s {method}")
        if len(fps[method][1]) < max(BUDGETS):
            raise ReferenceMissing(f"{found[-1]} holds {len(fps[method][1])} points, fewer than the largest budget "
                                   f"{max(BUDGETS)}")
    members = meta["members"]
    evaluated = {n: m for n, m in members.items() if m["role"] == "evaluate" and (root / f"{n}.onnx").is_file()}
    refs = [n for n, m in members.items() if m["role"] == "calibrate" and (root / f"{n}.onnx").is_file()]
    conv = fps["sac-w"][1].convention
    if conv.layout != "NCHW" or conv.scale != 1.0 or conv.dtype != "float32":
        raise ReferenceMissing(f"the zoo's input convention {conv.to_dict()} is not the NCHW float [0, 1] one QuRD's "
                               "Normalize transform reproduces")
    return Zoo(root, conv, float(meta["owner"]["test_accuracy"]), {n: m["kind"] for n, m in evaluated.items()},
               {n: m["family"] for n, m in evaluated.items()}, refs, fps)


class Scorer:
    """Every model's answers on one point set, and each score of each model at each budget.

    Every model answers all the points once, in the ONNX adapter's batches (BATCH): an int8 model
    quantizes its activations per batch, so its answers depend on the batches. A score at budget b
    reads the first b answers, as the benchmark does; for QuRD's representations that is the
    leading b x b block of the correlation matrix (the matrix of the first b rows) or the first b
    labels."""

    def __init__(self, ref: Reference, zoo: Zoo, nets: dict[str, OnnxNet], prob_nets: dict[str, OnnxNet],
                 points: np.ndarray, owner_probs: np.ndarray | None, owner_labels: np.ndarray | None) -> None:
        self.ref, self.zoo = ref, zoo
        self.n = len(points)
        q = torch.from_numpy(np.ascontiguousarray(points, np.float32))
        normalize = ref.v2.Normalize(mean=list(zoo.convention.mean), std=list(zoo.convention.std))
        x = zoo.convention.apply(points)
        with torch.no_grad():
            self.logits = {n: run_in_batches(x, lambda c, net=net: net(torch.from_numpy(c)).double().numpy(), None, BATCH)
                           for n, net in nets.items()}
        # The benchmark's answers: the ONNX adapter's reading of the outputs (adapters.base.to_probabilities).
        self.probs = {n: to_probabilities(z)[0] for n, z in self.logits.items()}
        self.owner_probs = self.probs["owner"] if owner_probs is None else owner_probs.astype(np.float64)
        self.owner_labels = self.probs["owner"].argmax(1) if owner_labels is None else owner_labels
        sac, labels = ref.sac_repr(batch_size=BATCH), ref.hard_labels(batch_size=BATCH)
        self.qurd_sac = {n: sac(q, net, normalize) for n, net in nets.items()}
        self.qurd_sac_probs = {n: sac(q, net, normalize) for n, net in prob_nets.items()}
        self.qurd_labels = {n: labels(q, net, normalize) for n, net in nets.items()}

    def sac(self, model: str, b: int) -> dict[str, float]:
        qs, qp = self.qurd_sac, self.qurd_sac_probs
        out = {
            "ours": -sac_distance(self.owner_probs[:b], self.probs[model][:b]),
            "ours-logits": -sac_distance(self.logits["owner"][:b], self.logits[model][:b]),
            "qurd": -self.ref.l2(qs["owner"][:b, :b], qs[model][:b, :b]),
            "qurd-probs": -self.ref.l2(qp["owner"][:b, :b], qp[model][:b, :b]),
        }
        if self.ref.sac_correlation is not None:
            corr = self.ref.sac_correlation
            a, c = torch.from_numpy(self.logits["owner"][:b]).float(), torch.from_numpy(self.logits[model][:b]).float()
            ca, cm = corr(a, a), corr(c, c)
            # correlation_wrong.py cal_correlation, in line: sum(|C_suspect - C_owner|) / (N * N)
            out["sac"] = -float(torch.sum(torch.abs(cm - ca)) / (ca.shape[0] * ca.shape[1]))
        return out

    def akh(self, model: str, b: int) -> dict[str, float]:
        ql = self.qurd_labels
        return {
            "ours": float((self.probs[model][:b].argmax(1) == self.owner_labels[:b]).mean()),
            "qurd": 1.0 - self.ref.hamming(ql["owner"][:b], ql[model][:b]),
        }


def evaluate(scorer: Scorer, kind: str, budgets: Sequence[int]) -> dict[str, Any]:
    """Scores of every evaluated suspect and reference, and per score AUC, TPR at FPR <= 1% and
    the rank correlation with `ours`, at every budget."""
    zoo = scorer.zoo
    models = [*zoo.kinds, *zoo.references]
    n = scorer.n
    budgets = [b for b in budgets if b <= n]
    score = scorer.akh if kind == "akh" else scorer.sac
    names = list(AKH_SCORES if kind == "akh" else SAC_SCORES)
    if kind != "akh" and scorer.ref.sac_correlation is None:
        names.remove("sac")
    per_budget: dict[str, Any] = {}
    at_max: dict[str, dict[str, float]] = {}
    for b in budgets:
        s = {m: score(m, b) for m in models}
        pirates = [m for m in zoo.kinds if zoo.kinds[m] == "piracy"]
        homologous = [m for m in zoo.kinds if zoo.kinds[m] == "homologous"]
        row: dict[str, Any] = {}
        for name in names:
            tpr, _ = tpr_at_fpr([s[m][name] for m in pirates], [s[m][name] for m in homologous], MAX_FPR)
            row[name] = {
                "auc": round(auc([s[m][name] for m in pirates], [s[m][name] for m in homologous]), 4),
                "tpr_at_fpr_1pct": round(tpr, 4),
                "spearman_vs_ours": round(float(spearmanr([s[m][name] for m in zoo.kinds], [s[m]["ours"] for m in zoo.kinds])[0]), 4),
            }
        per_budget[str(b)] = row
        at_max = {name: {m: round(s[m][name], 6) for m in models} for name in names}
    families: dict[str, dict[str, float]] = {}
    b = max(budgets)
    homologous = [m for m in zoo.kinds if zoo.kinds[m] == "homologous"]
    for fam in dict.fromkeys(zoo.families[m] for m in zoo.kinds if zoo.kinds[m] == "piracy"):
        ms = [m for m in zoo.kinds if zoo.families[m] == fam]
        families[fam] = {name: round(auc([at_max[name][m] for m in ms], [at_max[name][m] for m in homologous]), 4)
                         for name in names}
    return {"points": n, "budgets": per_budget, "family_auc_at_max_budget": families, "scores_at_max_budget": at_max}


def _index_of(pool: np.ndarray) -> dict[bytes, list[int]]:
    out: dict[bytes, list[int]] = {}
    for i, p in enumerate(pool):
        out.setdefault(hashlib.sha256(np.ascontiguousarray(p, np.float32).tobytes()).digest(), []).append(i)
    return out


def sampler_check(ref: Reference, zoo: Zoo, nets: dict[str, OnnxNet], prob_nets: dict[str, OnnxNet],
                  pool_x: np.ndarray, pool_y: np.ndarray, n: int, draws: int, budgets: Sequence[int]) -> dict[str, Any]:
    """QuRD's RandomNegativeQueries (augment=True, as its AKH and SAC use it) on the same pool and
    owner: are its points owner-misclassified pool points like ours, and do they score alike?"""
    owner = nets["owner"]
    # QuRD splits its transform into the Normalize (applied before the model) and the rest (set on the
    # dataset), and refuses an empty rest: timm's has Resize and CenterCrop; the canonical points need none.
    transform = ref.v2.Compose([ref.v2.Identity(),
                                ref.v2.Normalize(mean=list(zoo.convention.mean), std=list(zoo.convention.std))])
    with torch.no_grad():
        owner_pool = torch.cat([owner(torch.from_numpy(zoo.convention.apply(pool_x[i : i + 1000])))
                                for i in range(0, len(pool_x), 1000)]).argmax(1).numpy()
    wrong = set(np.flatnonzero(owner_pool != pool_y).tolist())
    index = _index_of(pool_x)
    ours = {}
    for method in ("akh", "sac-w"):
        fp = zoo.fingerprints[method][1]
        idx = np.asarray(fp.extra["pool_index"])
        ours[method] = {"points_equal_pool_points": bool(np.array_equal(fp.points, pool_x[idx])),
                        "owner_misclassified": int(sum(int(i) in wrong for i in idx)), "points": len(idx),
                        "pool_misclassified_recorded": fp.extra.get("pool_misclassified")}
    out: dict[str, Any] = {"pool": len(pool_x), "owner_misclassified_in_pool": len(wrong), "ours": ours, "qurd_draws": []}

    def draw(dataset: PoolDataset, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        sampler = ref.negatives(augment=True, device="cpu", batch_size=64)
        q = sampler.sample(dataset, n, source_model=owner, source_transform=transform)
        return q.numpy()

    for seed in range(draws):
        q = draw(PoolDataset(pool_x, pool_y), seed)
        hits = [index.get(hashlib.sha256(np.ascontiguousarray(p, np.float32).tobytes()).digest(), []) for p in q]
        row: dict[str, Any] = {"sampler": "negatives", "seed": seed, "points": len(q),
                               "pool_points": sum(bool(h) for h in hits),
                               "owner_misclassified": sum(any(i in wrong for i in h) for h in hits)}
        row.update(_draw_scores(ref, zoo, nets, prob_nets, q, budgets))
        out["qurd_draws"].append(row)
    # The augmentation path: a pool cut where it holds n // 4 owner mistakes, so that QuRD fills
    # the other 3/4 of the budget with CutMix of them and their horizontal and vertical flips.
    order = np.flatnonzero(owner_pool != pool_y)
    cut = int(order[n // 4 - 1]) + 1 if len(order) >= n // 4 else len(pool_x)
    for seed in range(draws):
        q = draw(PoolDataset(pool_x[:cut], pool_y[:cut]), seed)
        row = {"sampler": "negatives+cutmix", "seed": seed, "points": len(q), "pool_cut": cut,
               "pool_points": sum(hashlib.sha256(np.ascontiguousarray(p, np.float32).tobytes()).digest() in index for p in q)}
        row.update(_draw_scores(ref, zoo, nets, prob_nets, q, budgets))
        out["qurd_draws"].append(row)
    return out


def _draw_scores(ref: Reference, zoo: Zoo, nets: dict[str, OnnxNet], prob_nets: dict[str, OnnxNet],
                 q: np.ndarray, budgets: Sequence[int]) -> dict[str, Any]:
    """AUC per budget of akh's and SAC's scores on a QuRD draw (in its own order)."""
    scorer = Scorer(ref, zoo, nets, prob_nets, np.clip(q, 0.0, 1.0), None, None)
    res = {"akh": evaluate(scorer, "akh", budgets), "sac": evaluate(scorer, "sac", budgets)}
    return {k: {b: {name: v["auc"] for name, v in row.items()} for b, row in r["budgets"].items()} for k, r in res.items()}


def _checks(scorers: dict[str, Scorer], results: dict[str, Any]) -> dict[str, Any]:
    """Identities the comparison rests on."""
    out: dict[str, Any] = {}
    worst = 0.0
    for s in scorers.values():
        for m, z in s.logits.items():
            p = torch.softmax(torch.from_numpy(z), -1).numpy()
            worst = max(worst, float(np.abs(p - s.probs[m]).max()))
    out["adapter_probs_vs_softmax_of_logits_max_abs"] = worst
    sw = scorers["sac-w"]
    out["owner_probs_recorded_vs_owner_onnx_max_abs"] = float(np.abs(sw.owner_probs - sw.probs["owner"]).max())
    for method in ("sac-w", "sac-m"):
        r = results[method]["scores_at_max_budget"]
        if "sac" in r:
            out[f"{method}_sac_minus_half_ours_logits_max_abs"] = max(abs(r["sac"][m] - r["ours-logits"][m] / 2) for m in r["sac"])
    r = results["akh"]["scores_at_max_budget"]
    out["akh_qurd_minus_ours_max_abs"] = max(abs(r["qurd"][m] - r["ours"][m]) for m in r["qurd"])
    return out


def _bench_match(bench: Path, results: dict[str, Any]) -> dict[str, Any]:
    """`ours` against a benchmark run's recorded scores on the same zoo (results.json)."""
    data = json.loads(bench.read_text())
    out: dict[str, Any] = {"file": str(bench), "created_utc": data.get("created_utc")}
    for method in METHODS:
        rec = data["methods"].get(method, {}).get("budgets", {})
        mine = results[method]["scores_at_max_budget"]["ours"]
        b = str(results[method]["points"])
        if b in rec:
            stored = {**rec[b]["scores"], **rec[b]["reference_scores"]}
            out[method] = {"budget": int(b), "models": len(stored),
                           "max_abs": max(abs(stored[m] - mine[m]) for m in stored if m in mine),
                           "auc_recorded": rec[b]["auc"], "auc_here": results[method]["budgets"][b]["ours"]["auc"]}
    return out


def print_table(results: dict[str, Any], budgets: Sequence[int]) -> None:
    print(f"\nAUC, piracy vs homologous (pooled); at {max(budgets)} points the rank correlation with `ours`")
    print(f"{'fingerprint':<12}{'score':<13}" + "".join(f"{b:>8}" for b in budgets) + f"{'rho':>8}")
    for method in METHODS:
        r = results[method]["budgets"]
        for name in r[str(max(budgets))]:
            cells = "".join(f"{r[str(b)][name]['auc']:>8.3f}" if str(b) in r else f"{'':>8}" for b in budgets)
            print(f"{method:<12}{name:<13}{cells}{r[str(max(budgets))][name]['spearman_vs_ours']:>8.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-src", type=Path, required=True, help="a checkout of QuRD (holds qurd/fingerprint/)")
    ap.add_argument("--sac-src", type=Path, help="a checkout of the SAC paper's repository (holds correlation_wrong.py)")
    ap.add_argument("--zoo", type=Path, required=True, help="a benchmark zoo directory (meta.json, *.onnx, fp-*.json)")
    ap.add_argument("--out", type=Path, required=True, help="results.json is written here")
    ap.add_argument("--bench-results", type=Path, help="a benchmark results.json on the same zoo: check `ours` reproduces it")
    ap.add_argument("--draws", type=int, default=3, help="draws of QuRD's sampler (each seed once)")
    ap.add_argument("--data", default="fashion-mnist", help="the pool the zoo's baselines drew from (its test split)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        ref = import_reference(a.reference_src.resolve(), a.sac_src.resolve() if a.sac_src else None)
        zoo = open_zoo(a.zoo)
    except ReferenceMissing as e:
        print(f"qurd_check: {e}", file=sys.stderr)
        return 2
    print(f"QuRD {ref.qurd['commit']} ({ref.qurd['src']})" + (f"; SAC {ref.sac['commit']}" if ref.sac else ""))
    k = zoo.fingerprints["sac-w"][1].num_classes
    names = ["owner", *zoo.kinds, *zoo.references]
    nets = {n: OnnxNet(zoo.root / f"{n}.onnx", k) for n in names}
    prob_nets = {n: OnnxNet(zoo.root / f"{n}.onnx", k, probs=True) for n in names}
    print(f"zoo {zoo.root}: {sum(v == 'piracy' for v in zoo.kinds.values())} piracy, "
          f"{sum(v == 'homologous' for v in zoo.kinds.values())} homologous, {len(zoo.references)} references")
    results: dict[str, Any] = {}
    scorers: dict[str, Scorer] = {}
    for method in METHODS:
        path, fp = zoo.fingerprints[method]
        order = plan_order(len(fp), 0)
        scorers[method] = Scorer(ref, zoo, nets, prob_nets, fp.points[order], fp.owner_probs[order], fp.owner_labels[order])
        results[method] = {"fingerprint": path.name, "digest": fp.digest,
                           **evaluate(scorers[method], "akh" if method == "akh" else "sac", BUDGETS)}
        print(f"scored {method} ({len(fp)} points)")
    from deepcore_auditor.fingerprints.data import load_data

    pool = load_data(a.data).test
    samplers = sampler_check(ref, zoo, nets, prob_nets, pool.points(), np.asarray(pool.y), len(zoo.fingerprints["akh"][1]),
                             a.draws, BUDGETS)
    out = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference": {"qurd": ref.qurd, "sac": ref.sac},
        "environment": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "zoo": {"dir": str(zoo.root), "owner_test_accuracy": zoo.owner_accuracy,
                "piracy": sorted(m for m, v in zoo.kinds.items() if v == "piracy"),
                "homologous": sorted(m for m, v in zoo.kinds.items() if v == "homologous"), "references": zoo.references},
        "checks": _checks(scorers, results),
        "not_compared": NOT_COMPARED,
        "methods": results,
        "samplers": samplers,
    }
    if a.bench_results:
        out["bench_match"] = _bench_match(a.bench_results, results)
    out["run_s"] = round(time.perf_counter() - t0, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    print_table(results, BUDGETS)
    print("\nchecks:", json.dumps(out["checks"]))
    if "bench_match" in out:
        print("benchmark reproduced:", json.dumps(out["bench_match"]))
    print(f"\nQuRD's sampler on the same pool ({samplers['owner_misclassified_in_pool']} owner mistakes in {samplers['pool']}):")
    for row in samplers["qurd_draws"]:
        b = str(max(int(x) for x in row["akh"]))
        print(f"  {row['sampler']:<17} seed {row['seed']}: {row['pool_points']}/{row['points']} pool points"
              + (f", {row['owner_misclassified']} owner-misclassified" if "owner_misclassified" in row else "")
              + f"; AUC@{b} akh ours {row['akh'][b]['ours']:.3f} qurd {row['akh'][b]['qurd']:.3f}, "
              f"sac ours {row['sac'][b]['ours']:.3f} qurd {row['sac'][b]['qurd']:.3f}")
    print(f"\nwrote {a.out / 'results.json'} in {out['run_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
