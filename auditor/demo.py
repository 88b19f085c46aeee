"""`deepcore demo`: the whole product on Fashion-MNIST in a few minutes of CPU.

An owner CNN is trained on half of the training set. The attacker holds the other half.
Piracy suspects are derived from the owner (fine-tuned, pruned + fine-tuned, int8-quantized,
distilled from its probabilities); homologous
suspects are trained independently (same architecture with other seeds or the other half of
the data, other architectures). Every suspect is exported to ONNX and audited label-only
through ONNX Runtime against a fingerprint built from the owner and its half alone; with
`--triton` they are served by a local Triton server instead and audited over HTTP and gRPC.
Models and the fingerprint are cached, so a second run only audits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepcore_auditor.adapters.base import Access, InputConvention
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.adapters.open import open_suspect
from deepcore_auditor.auditor.audit import AuditConfig, audit
from deepcore_auditor.fingerprints import recipes
from deepcore_auditor.fingerprints.build import BuildConfig, build_fingerprint
from deepcore_auditor.fingerprints.data import channel_stats, default_cache_dir, load_data
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint, save_fingerprint
from deepcore_auditor.fingerprints.models import Normalized, TrainConfig, accuracy, build_architecture, clone, export_onnx, train
from deepcore_auditor.fingerprints.recipes import quantize_int8

logger = logging.getLogger(__name__)

RECIPE = "demo-v12"  # bump when the recipe below, in fingerprints.recipes or the default zoo changes: the cache is keyed by it
OWNER_ARCH = "cnn"


@dataclass(frozen=True)
class SuspectRecipe:
    name: str
    truth: str  # piracy | independent
    how: str  # fine-tune | prune | int8 | distill | extract | independent
    arch: str = OWNER_ARCH
    data: str = "B"  # A: the owner's half, B: the other half
    seed: int = 0


SUSPECTS: tuple[SuspectRecipe, ...] = (
    SuspectRecipe("fine-tuned", "piracy", "fine-tune", seed=101),
    SuspectRecipe("pruned-60%+fine-tuned", "piracy", "prune", seed=102),
    SuspectRecipe("int8-quantized", "piracy", "int8"),
    SuspectRecipe("distilled", "piracy", "distill", seed=104),
    SuspectRecipe("same-arch-seed-1", "independent", "independent", data="A", seed=201),
    SuspectRecipe("same-arch-seed-2", "independent", "independent", data="A", seed=202),
    SuspectRecipe("same-arch-other-half", "independent", "independent", data="B", seed=203),
    SuspectRecipe("other-arch-mlp", "independent", "independent", arch="mlp", data="A", seed=204),
    SuspectRecipe("other-arch-wide-cnn", "independent", "independent", arch="cnn-wide", data="B", seed=205),
)


def _make_suspect(r: SuspectRecipe, owner: Normalized, halves: dict[str, tuple[np.ndarray, np.ndarray]], shape: tuple[int, int, int], k: int) -> nn.Module:
    x, y = halves[r.data]
    torch.manual_seed(r.seed)
    if r.how == "fine-tune":
        return recipes.fine_tune(owner, x, y, TrainConfig(epochs=1, lr=3e-4, seed=r.seed))
    if r.how == "prune":
        return recipes.prune(owner, x, y, 0.6, TrainConfig(epochs=1, lr=3e-4, seed=r.seed))
    fresh = Normalized(build_architecture(r.arch, shape, k), owner.convention)
    if r.how == "distill":
        return recipes.distill(owner, x, fresh, TrainConfig(epochs=3, seed=r.seed))
    if r.how == "extract":
        return recipes.extract(owner, x, fresh, TrainConfig(epochs=3, seed=r.seed))
    return train(fresh, x, y, TrainConfig(epochs=3, seed=r.seed))


def prepare(cache: Path, say: Callable[[str], None]) -> tuple[Fingerprint, dict[str, Path], dict[str, Any]]:
    """Train (or reuse from `cache`) the owner, the suspects and the fingerprint."""
    cache.mkdir(parents=True, exist_ok=True)
    fp_path, meta_path = cache / "fingerprint.json", cache / "meta.json"
    paths = {r.name: cache / f"{r.name}.onnx" for r in SUSPECTS}
    if fp_path.is_file() and meta_path.is_file() and all(p.is_file() for p in paths.values()):
        say(f"using cached models and fingerprint in {cache}")
        return load_fingerprint(fp_path), paths, json.loads(meta_path.read_text())
    t0 = time.perf_counter()
    data = load_data("fashion-mnist")
    shape, k = data.train.shape, data.train.num_classes
    mean, std = channel_stats(data.train)
    convention = InputConvention(mean=mean, std=std)
    perm = np.random.default_rng(0).permutation(len(data.train))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    points = data.train.points()
    halves = {"A": (points[a], data.train.y[a]), "B": (points[b], data.train.y[b])}
    test_x, test_y = data.test.points(), data.test.y
    say("training the owner (CNN, half A of Fashion-MNIST's training set)")
    torch.manual_seed(1)
    owner = train(Normalized(build_architecture(OWNER_ARCH, shape, k), convention), *halves["A"], TrainConfig(epochs=3, seed=1))
    meta: dict[str, Any] = {"owner_test_accuracy": round(accuracy(owner, test_x, test_y), 4), "suspects": {}}
    say(f"owner test accuracy {meta['owner_test_accuracy']:.3f}")
    owner_ts = cache / "owner.pt"
    torch.jit.save(torch.jit.trace(clone(owner.net).eval(), torch.zeros(1, *shape)), str(owner_ts))
    owner_onnx = cache / "owner.onnx"
    export_onnx(owner.net, owner_onnx, shape)
    for r in SUSPECTS:
        say(f"making suspect {r.name} ({r.truth})")
        if r.how == "int8":
            quantize_int8(owner_onnx, paths[r.name])
            continue
        model = _make_suspect(r, owner, halves, shape, k)
        meta["suspects"][r.name] = {"test_accuracy": round(accuracy(model, test_x, test_y), 4)}
        assert isinstance(model, Normalized)
        export_onnx(model.net, paths[r.name], shape)
    say("building the DeepCore fingerprint from the owner and half A only")
    from deepcore_auditor.adapters.onnx import file_sha256

    fp = build_fingerprint(owner, *halves["A"], data.train.classes, {"path": str(owner_ts), "sha256": file_sha256(owner_ts)},
                           BuildConfig(), holdout=(test_x, test_y), progress=say)
    save_fingerprint(fp, fp_path)
    meta["build_s"] = round(time.perf_counter() - t0, 1)
    meta_path.write_text(json.dumps(meta))
    return fp, paths, meta


TRANSPORTS = ("onnx", "http", "grpc")  # local ONNX Runtime, or a local Triton server over HTTP / gRPC


def run_demo(
    *,
    cache_dir: Path | None = None,
    budget: int = 200,
    alpha: float = 0.01,
    transports: Sequence[str] = ("onnx",),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo; returns {"suspects": [{name, transport, truth, verdict, queries_used, ...}], ...}.

    `transports` says how each suspect is asked: "onnx" (its file, in-process), "http" / "grpc"
    (served by a local Triton server started for the demo and always stopped): one row per
    suspect and transport, suspects in SUSPECTS order.
    """
    if not transports or any(t not in TRANSPORTS for t in transports) or len(set(transports)) != len(transports):
        raise InputError(f"transports must be distinct values among {', '.join(TRANSPORTS)}, got {list(transports)}")
    say = progress or logger.info
    cache = Path(cache_dir or default_cache_dir()) / RECIPE
    fp, paths, meta = prepare(cache, say)
    config = AuditConfig(access=Access.LABELS, budget=budget, alpha=alpha)
    rows = []
    with ExitStack() as stack:
        specs: dict[tuple[str, str], str] = {(r.name, "onnx"): str(paths[r.name]) for r in SUSPECTS}
        if any(t != "onnx" for t in transports):
            from deepcore_auditor.auditor.trial_server import ServeRequest, serving, unique_model_names

            names = unique_model_names(r.name for r in SUSPECTS)
            say(f"serving the {len(SUSPECTS)} suspects from a local Triton server")
            served = stack.enter_context(serving(ServeRequest(models=tuple(paths[r.name] for r in SUSPECTS), names=tuple(names))))
            for r, name in zip(SUSPECTS, names, strict=False):
                specs.update({(r.name, t): url for t, url in served.urls[name].items()})
        for r in SUSPECTS:
            for transport in transports:
                spec = specs[(r.name, transport)]
                say(f"auditing {r.name} ({spec if transport != 'onnx' else 'onnx'})")
                with open_suspect(spec, convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes) as s:
                    res = audit(fp, s, config)
                rows.append({"name": r.name, "transport": transport, "truth": r.truth, "verdict": res.verdict,
                             "queries_used": res.queries_used, "agreement": res.agreement, "time_s": res.elapsed_s,
                             "test_accuracy": meta["suspects"].get(r.name, {}).get("test_accuracy")})
    return {"suspects": rows, "transports": list(transports), "fingerprint_sha256": fp.digest,
            "owner_test_accuracy": meta["owner_test_accuracy"], "budget": budget, "alpha": alpha, "cache": str(cache)}
