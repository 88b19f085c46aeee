"""Core-point construction against the bare autograd loop (not a test of the suite).

`core.optimize_points` does per step what any implementation of the joint objective must: one
forward and one backward pass through the owner, every simulated student and every selection
reference, then a signed step clipped to the L-inf ball. Everything else it does — the owner's
hinge, the refusal loss, the models frozen and restored, the progress calls, the per-batch
seeding — is overhead, measured here against the bare loop: the same models, the same batches
and steps, `cross_entropy` for every model, the signed step and the clip, nothing else. Target
(issue "Catch functional piracy on owners nobody tuned for"): within 1.5x of the bare loop.

    python -m deepcore_auditor.benchmarks.core_speed [--arch cnn] [--students 6] [--references 4] \
        [--candidates 200] [--steps 60] [--repeats 3] [--out FILE.json]

The models are untrained skeletons of the named architectures on Fashion-MNIST's shape (the cost
of a pass does not depend on the weights); the points are uniform noise. Torch threads: the
process's default (all cores).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.files import write_json
from deepcore_auditor.fingerprints.config import CoreConfig
from deepcore_auditor.fingerprints.core import optimize_points
from deepcore_auditor.fingerprints.models import Normalized, build_architecture, channels_last

SHAPE = (1, 28, 28)
CLASSES = 10
_OTHER_ARCHS = ("lenet", "mlp")


def _models(arch: str, n: int, seed: int) -> list[nn.Module]:
    """`n` skeletons: the owner's architecture first, then the others in turn (as the zoo mixes them)."""
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        a = arch if i % 3 == 0 else _OTHER_ARCHS[i % 2]
        out.append(Normalized(build_architecture(a, SHAPE, CLASSES), InputConvention(mean=(0.5,), std=(0.25,))).eval())
    return out


def bare_loop(models: list[nn.Module], seeds: np.ndarray, targets: np.ndarray, epsilon: float, steps: int,
              batch_size: int) -> np.ndarray:
    """The least the joint objective costs: forward + backward through every model, a signed step."""
    for m in models:
        for p in m.parameters():
            p.requires_grad_(False)
    out = np.empty_like(seeds)
    step = 2.5 * epsilon / steps
    for start in range(0, len(seeds), batch_size):
        x0 = torch.from_numpy(seeds[start : start + batch_size])
        t = torch.from_numpy(targets[start : start + batch_size])
        delta = torch.zeros_like(x0)
        for _ in range(steps):
            delta.requires_grad_(True)
            x = (x0 + delta).clamp(0, 1)
            loss = sum(F.cross_entropy(m(x), t) for m in models)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta - step * grad.sign()).clamp(-epsilon, epsilon)
        out[start : start + len(x0)] = (x0 + delta).clamp(0, 1).numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="cnn", help="the owner's architecture (models.build_architecture)")
    ap.add_argument("--students", type=int, default=6)
    ap.add_argument("--references", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--steps", type=int, default=CoreConfig.steps)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    owner, *rest = _models(args.arch, 1 + args.students + args.references, seed=0)
    students, references = rest[: args.students], rest[args.students :]
    rng = np.random.default_rng(0)
    seeds = rng.random((args.candidates, *SHAPE), dtype=np.float32)
    targets = rng.integers(0, CLASSES, args.candidates).astype(np.int64)
    config = CoreConfig(epsilon=0.1, steps=args.steps, reference_weight=4.0)
    models = [owner, *students, *references]
    timings: dict[str, list[float]] = {"optimize_points": [], "bare_loop": [], "bare_loop_channels_last": []}
    for _ in range(args.repeats):  # alternated, so drift in the machine's speed hits all alike
        t0 = time.perf_counter()
        optimize_points(owner, students, references, seeds, targets, config)
        timings["optimize_points"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare_loop(models, seeds, targets, 0.1, args.steps, config.batch_size)
        timings["bare_loop"].append(time.perf_counter() - t0)
        with channels_last(*models):  # the layout optimize_points uses on the CPU: the floor is the faster loop
            t0 = time.perf_counter()
            bare_loop(models, seeds, targets, 0.1, args.steps, config.batch_size)
            timings["bare_loop_channels_last"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in timings.items()}
    floor = min(med["bare_loop"], med["bare_loop_channels_last"])
    result = {
        "models": {"owner": args.arch, "students": args.students, "references": args.references},
        "candidates": args.candidates, "steps": args.steps, "batch_size": config.batch_size, "repeats": args.repeats,
        "seconds": {k: [round(x, 3) for x in v] for k, v in timings.items()},
        "median_s": {k: round(v, 6) for k, v in med.items()},
        "ratio": round(med["optimize_points"] / floor, 3),  # against the faster bare loop
        "environment": {"machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
    }
    print(f"{args.candidates} candidates x {args.steps} steps, owner + {args.students} students + {args.references} references: "
          f"optimize_points {med['optimize_points']:.2f} s, bare loop {med['bare_loop']:.2f} s, the same with channels-last "
          f"kernels {med['bare_loop_channels_last']:.2f} s (median of {args.repeats}), ratio to the faster {result['ratio']:.2f}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
