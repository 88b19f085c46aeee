"""The owner-forms regression world: owners handed over as users hand them, suspects made by a
recipe the builder never uses, and the verdicts of `deepcore` with its default flags.

    python -m deepcore_auditor.benchmarks.owner_forms world --data cifar10.tar.gz --dir WORLD
    python -m deepcore_auditor.benchmarks.owner_forms run --dir WORLD --form traced --out results.json

`world` trains (or reloads) an owner on half A of the data with SGD, momentum, weight decay and
crop/flip augmentation — the usual recipe, not the builder's Adam — and writes it in every form a
user hands over: TorchScript traced in eval mode, TorchScript scripted, a torch.export `.pt2`, and
`deepcore_auditor.benchmarks.owners:<factory>` + safetensors weights; the owner's data as an `.npz` with its
mean/std; and the suspects as ONNX files:

- independent, the owner's architecture: other seeds on A, the other half B, a random half C,
  the union A+B (a superset of the owner's data);
- independent, another architecture (a narrower network of the same family);
- piracy: fine-tuned on A, pruned by magnitude then fine-tuned, int8-quantized (ONNX).

`run` builds a fingerprint from one owner form through the real CLI with default flags (only the
owner's mean/std given, as a user would) and audits every suspect label-only with `--budget 400`,
printing a table and writing JSON. Models are cached in the world directory, keyed by file name.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.benchmarks import owners
from deepcore_auditor.fingerprints.data import channel_stats, load_data
from deepcore_auditor.fingerprints.models import Normalized, accuracy, clone, export_onnx, prune_by_magnitude, translate

logger = logging.getLogger(__name__)

FACTORIES = {"cifar10": ("cifar_vgg_bn", "cifar_vgg_bn_small"), "fashion-mnist": ("fmnist_cnn_bn", "fmnist_cnn_plain")}


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random translation (crop after zero padding) and a random horizontal flip, per sample."""
    out = translate(x, pad, gen)
    flip = torch.rand(len(x), generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def sgd_train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, lr: float = 0.05,
              batch_size: int = 128, flip: bool = True, say=print) -> nn.Module:
    """The world's recipe: SGD (Nesterov, wd 5e-4), one-cycle learning rate, crop (and flip) augmentation."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    pad = max(1, x.shape[2] // 8)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        t0, total = time.time(), 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb = xs[idx].float() / 255.0
            xb = _augment(xb, gen, pad) if flip else xb
            loss = F.cross_entropy(model(xb), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        say(f"  epoch {epoch + 1}/{epochs} loss {total / len(x):.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    return model


def _save_net(net: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def _load_net(factory: str, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    net = getattr(owners, factory)()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def build_world(data_spec: str, out: Path, *, epochs: int, dataset: str, seed: int = 0,
                skip: tuple[str, ...] = ()) -> None:
    """Train (or reload) the owner and every suspect; write every owner form and the suspects."""
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(data_spec)
    train_x, train_y = data.train.x, data.train.y
    perm = np.random.default_rng(seed).permutation(len(train_x))
    a, b = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
    c = np.sort(np.random.default_rng(seed + 99).permutation(len(train_x))[: len(perm) // 2])
    mean, std = channel_stats(data.train.subset(a))
    conv = InputConvention("NCHW", 1.0, mean, std)
    np.savez(out / "owner_half.npz", x=train_x[a], y=train_y[a], classes=np.array(data.train.classes))
    (out / "convention.json").write_text(json.dumps({"mean": list(mean), "std": list(std), "dataset": dataset}))
    test_pts, test_y = data.test.points(), data.test.y
    owner_f, small_f = FACTORIES[dataset]
    flip = dataset == "cifar10"
    accs: dict[str, float] = json.loads((out / "accuracy.json").read_text()) if (out / "accuracy.json").exists() else {}

    def trained(name: str, factory: str, idx: np.ndarray, s: int, ep: int, init: nn.Module | None = None,
                lr: float = 0.05) -> nn.Module:
        path = out / f"{name}.safetensors"
        if path.exists():
            return _load_net(factory, path)
        print(f"training {name} ({len(idx)} samples, {ep} epochs)", flush=True)
        torch.manual_seed(s)
        net = init if init is not None else getattr(owners, factory)()
        model = sgd_train(Normalized(net, conv), train_x[idx], train_y[idx], epochs=ep, seed=s, lr=lr, flip=flip)
        _save_net(model.net, path)
        accs[name] = round(accuracy(model, test_pts, test_y), 4)
        print(f"  {name}: test accuracy {accs[name]}", flush=True)
        (out / "accuracy.json").write_text(json.dumps(accs, indent=1, sort_keys=True))
        return model.net

    owner = trained("owner", owner_f, a, seed, epochs)
    example = torch.zeros(2, *data.train.shape)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(clone(owner).eval(), example), str(out / "owner.traced.pt"))
        torch.jit.save(torch.jit.script(clone(owner).eval()), str(out / "owner.scripted.pt"))
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(clone(owner).eval(), (example,), dynamic_shapes=({0: batch},)),
                      str(out / "owner.pt2"))
    suspects = out / "suspects"
    suspects.mkdir(exist_ok=True)
    union = np.sort(np.concatenate([a, b]))
    plan = [  # name, factory, indices, seed, epochs
        ("indep-seed-1", owner_f, a, seed + 1, epochs),
        ("indep-seed-2", owner_f, a, seed + 2, epochs),
        ("indep-half-b", owner_f, b, seed + 3, epochs),
        ("indep-half-c", owner_f, c, seed + 4, epochs),
        ("indep-union", owner_f, union, seed + 5, max(1, epochs // 2)),  # same steps, twice the data
        ("indep-other-arch", small_f, a, seed + 6, epochs),
    ]
    for name, factory, idx, s, ep in plan:
        if name in skip:
            continue
        net = trained(name, factory, idx, s, ep)
        if not (suspects / f"{name}.onnx").exists():
            export_onnx(net, suspects / f"{name}.onnx", data.train.shape)
    ft = trained("pirate-fine-tune", owner_f, a, seed + 7, 1, init=clone(owner), lr=0.01)
    pr = trained("pirate-prune", owner_f, a, seed + 8, 1, init=prune_by_magnitude(owner, 0.5), lr=0.01)
    for name, net in (("pirate-fine-tune", ft), ("pirate-prune", pr), ("pirate-copy", owner)):
        if not (suspects / f"{name}.onnx").exists():
            export_onnx(net, suspects / f"{name}.onnx", data.train.shape)
    if not (suspects / "pirate-int8.onnx").exists():
        from deepcore_auditor.fingerprints.recipes import quantize_int8

        quantize_int8(suspects / "pirate-copy.onnx", suspects / "pirate-int8.onnx")
    print(json.dumps(accs, indent=1, sort_keys=True))


OWNER_FORMS = ("traced", "scripted", "pt2", "factory")


def _owner_args(world: Path, form: str) -> list[str]:
    factory = FACTORIES[json.loads((world / "convention.json").read_text())["dataset"]][0]
    return {
        "traced": ["--owner", str(world / "owner.traced.pt")],
        "scripted": ["--owner", str(world / "owner.scripted.pt")],
        "pt2": ["--owner", str(world / "owner.pt2")],
        "factory": ["--owner", f"deepcore_auditor.benchmarks.owners:{factory}", "--owner-weights", str(world / "owner.safetensors")],
    }[form]


def run_form(world: Path, form: str, out: Path, extra: list[str], seeds: int = 1) -> dict[str, object]:
    """Fingerprint one owner form with default flags, then audit every suspect label-only, once
    per point order (`--seed` 0 .. seeds-1: a verdict that depends on the order is not a verdict
    to rely on)."""
    conv = json.loads((world / "convention.json").read_text())
    fp = out.with_suffix(".fp.json")
    cmd = [sys.executable, "-m", "deepcore_auditor", "fingerprint", *_owner_args(world, form),
           "--data", str(world / "owner_half.npz"), "--out", str(fp),
           "--mean", ",".join(f"{v:.4f}" for v in conv["mean"]), "--std", ",".join(f"{v:.4f}" for v in conv["std"]), *extra]
    t0 = time.time()
    result: dict[str, object] = {"form": form}
    if not fp.exists():
        log = out.with_suffix(".build.log")
        with log.open("w") as sink:  # written as the build goes: it takes an hour on 2 cores
            built = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
        text = log.read_text()
        result.update({"build_s": round(time.time() - t0), "build_rc": built.returncode,
                       "build_tail": text.strip().splitlines()[-3:]})
        print(f"[{form}] fingerprint exit {built.returncode} in {result['build_s']} s", flush=True)
        if built.returncode != 0:
            print(text[-2000:])
            return result
    insp = subprocess.run([sys.executable, "-m", "deepcore_auditor", "inspect", str(fp), "--json"], capture_output=True, text=True)
    result["inspect"] = json.loads(insp.stdout) if insp.returncode == 0 else insp.stderr.strip()
    verdicts: dict[str, object] = {}
    for onnx in sorted((world / "suspects").glob("*.onnx")):
        runs = []
        for seed in range(seeds):
            r = subprocess.run([sys.executable, "-m", "deepcore_auditor", "audit", "--fingerprint", str(fp), "--suspect", str(onnx),
                                "--access", "labels", "--budget", "400", "--json", "--no-report", "--seed", str(seed)],
                               capture_output=True, text=True)
            try:
                j = json.loads(r.stdout)
                runs.append({"seed": seed, "verdict": j["verdict"], "queries": j["queries_used"],
                             "agreement": j.get("trajectory", [{}])[-1].get("agreement") if j.get("trajectory") else None})
            except (json.JSONDecodeError, KeyError):
                runs.append({"seed": seed, "verdict": f"error {r.returncode}: {r.stderr.strip()[-200:]}"})
        verdicts[onnx.stem] = runs[0] if seeds == 1 else runs
        counts = {v: sum(x["verdict"] == v for x in runs) for v in ("piracy", "independent", "inconclusive")}
        print(f"  {onnx.stem:20s} {runs[0] if seeds == 1 else counts}", flush=True)
    result["verdicts"] = verdicts
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("world")
    w.add_argument("--data", required=True)
    w.add_argument("--dataset", choices=sorted(FACTORIES), default="cifar10")
    w.add_argument("--dir", type=Path, required=True)
    w.add_argument("--epochs", type=int, default=10)
    w.add_argument("--skip", action="append", default=[], help="a suspect not to train (repeatable)")
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--form", choices=OWNER_FORMS, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seeds", type=int, default=1, help="audit each suspect with point orders --seed 0 .. N-1")
    r.add_argument("extra", nargs="*", help="further fingerprint flags (after --)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "world":
        build_world(args.data, args.dir, epochs=args.epochs, dataset=args.dataset, skip=tuple(args.skip))
        return 0
    res = run_form(args.dir, args.form, args.out, args.extra, seeds=args.seeds)
    args.out.write_text(json.dumps(res, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
