"""What a training step of the zoo's models costs, in the two memory layouts (not a test).

A fingerprint's build is mostly training: its simulated pirates and references are small CNNs,
LeNets and MLPs trained on the owner's data (fingerprints.build). `models.train` (through
`models.trainable`) trains convolution kernels in channels-last memory on the CPU; this script
shows what that buys, per architecture and input shape, against the same loop in the usual
(contiguous) layout, and times `models.train` itself on the same batches:

- `contiguous`: the bare loop (forward, cross-entropy, backward, Adam step), weights as built;
- `channels_last`: the same loop with the kernels in channels-last memory;
- `train`: `models.train` for the same number of steps (its shuffling and progress included).

    python -m deepcore_auditor.benchmarks.train_speed [--steps 40] [--repeats 3] [--out FILE.json]

The models are fresh skeletons and the batches uniform noise (the cost of a step does not depend
on the values); the figures are the median over `--repeats` of the milliseconds per step of 128,
the layouts taken in turn so that a noisy neighbour hits both. Torch threads: the process's default.
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

from deepcore_auditor.adapters.files import write_json
from deepcore_auditor.fingerprints.models import ARCHITECTURES, TrainConfig, build_architecture, train

SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
BATCH = 128


def bare_steps(arch: str, shape: tuple[int, int, int], steps: int, channels_last: bool, seed: int = 0) -> float:
    """Milliseconds per step of the bare training loop (after 3 warm-up steps)."""
    torch.manual_seed(seed)
    net = build_architecture(arch, shape, 10)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.rand(BATCH, *shape), torch.randint(0, 10, (BATCH,))

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1000


def train_steps(arch: str, shape: tuple[int, int, int], steps: int, seed: int = 0) -> float:
    """Milliseconds per step of `models.train`, one epoch of `steps` batches (after a warm-up epoch of 3)."""
    torch.manual_seed(seed)
    net = build_architecture(arch, shape, 10)
    rng = np.random.default_rng(seed)
    warm = rng.random((3 * BATCH, *shape), dtype=np.float32), rng.integers(0, 10, 3 * BATCH)
    x, y = rng.random((steps * BATCH, *shape), dtype=np.float32), rng.integers(0, 10, steps * BATCH)
    train(net, *warm, TrainConfig(epochs=1, seed=seed))
    t0 = time.perf_counter()
    train(net, x, y, TrainConfig(epochs=1, seed=seed))
    return (time.perf_counter() - t0) / steps * 1000


def measure(steps: int, repeats: int) -> list[dict[str, object]]:
    rows = []
    for data, shape in SHAPES.items():
        for arch in ARCHITECTURES:
            runs: dict[str, list[float]] = {"contiguous": [], "channels_last": [], "train": []}
            for _ in range(repeats):
                runs["contiguous"].append(bare_steps(arch, shape, steps, False))
                runs["channels_last"].append(bare_steps(arch, shape, steps, True))
                runs["train"].append(train_steps(arch, shape, steps))
            med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
            rows.append({"data": data, "arch": arch, "ms_per_step": med,
                         "train_vs_contiguous": round(med["train"] / med["contiguous"], 3), "runs": runs})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.steps < 1 or a.repeats < 1:
        print("train_speed: --steps and --repeats must be at least 1", file=sys.stderr)
        return 2
    rows = measure(a.steps, a.repeats)
    print(f"{'data':<14} {'arch':<9} {'contiguous':>11} {'channels_last':>14} {'train':>8}  train/contiguous (ms per step of {BATCH})")
    for r in rows:
        ms = r["ms_per_step"]
        print(f"{r['data']:<14} {r['arch']:<9} {ms['contiguous']:>11.2f} {ms['channels_last']:>14.2f} {ms['train']:>8.2f}  "  # type: ignore[index]
              f"{r['train_vs_contiguous']:.3f}")
    if a.out:
        write_json(a.out, {"rows": rows, "steps": a.steps, "repeats": a.repeats, "batch": BATCH,
                           "environment": {"machine": platform.machine(), "torch": torch.__version__,
                                           "torch_threads": torch.get_num_threads()},
                           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
