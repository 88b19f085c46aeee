"""Trained known models kept on disk, so a build that stops (a crash, Ctrl-C, a session that
ends, a flag changed after the zoo) does not train them again.

A known model is a function of what it was trained from: the owner (its weights, its input
convention, and its answers on the held-out points, which also catch a graph or forward code that
computes something else from the same weights), the training and held-out data, the number of
classes, the spec (family, architecture, recipe) and its index (its seed is derived from it),
whether it is the corrected retry, and the parameters of the `BuildConfig` that its recipe reads
(`build.training_inputs`: a radius for the adversarially fine-tuned copy only, epochs for models
trained from scratch only, and so on). The key is the sha256 of all of that plus
`CACHE_VERSION`, which is bumped whenever a recipe or the training loop changes. Never the
device a model trained on (`BuildConfig.device`): an entry trained on a GPU serves a CPU build and
the other way round, so tensors are stored from the CPU and loaded onto it, then copied into the
skeleton wherever it lies. Models are
stored as safetensors state dicts (no pickle), written atomically; an unusable entry is a warning
and the model is trained again, never an error. On a CIFAR-10 owner of 289 k parameters the
default zoo trains for over an hour on 2 cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from deepcore_auditor.adapters.errors import first_line
from deepcore_auditor.adapters.files import atomic_write
from deepcore_auditor.fingerprints.config import KnownModelSpec

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when a recipe, the zoo's seeds or the training loop change


def _digest_arrays(h: "hashlib._Hash", *arrays: np.ndarray) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))


def state_bytes(model: nn.Module) -> bytes:
    """A model's state dict from the CPU, as safetensors (no pickle): how a trained known model is
    kept on disk and how a task on a cluster hands it back."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def load_state(skeleton: nn.Module, blob: bytes) -> nn.Module:
    """`blob` (from `state_bytes`) loaded into `skeleton`, a model of the same architecture lying
    wherever it will run; a tensor missing or extra is refused (ValueError)."""
    from safetensors.torch import load

    state = load(blob)
    mismatched = set(skeleton.state_dict()) ^ set(state)
    if mismatched:
        raise ValueError(f"tensors that do not match the architecture: {sorted(mismatched)[:3]}")
    skeleton.load_state_dict(state)
    return skeleton


class KnownModelCache:
    """`cache_dir/known-models/<key>.safetensors`, for one build (one owner, data and config)."""

    def __init__(self, root: Path, owner: nn.Module, owner_held: np.ndarray, points: np.ndarray, labels: np.ndarray,
                 held_points: np.ndarray, held_labels: np.ndarray, num_classes: int, factory_args: str = "") -> None:
        """`owner_held`: the owner's probabilities on `held_points`, as the build computed them;
        `factory_args`: a factory owner's keyword arguments (canonical JSON), which may change how
        its copies train (a dropout rate) without changing its weights or its answers."""
        self.dir = Path(root) / "known-models"
        h = hashlib.sha256(f"deepcore-known-model:v{CACHE_VERSION}:classes={num_classes}".encode())
        for name, value in sorted(owner.state_dict().items()):
            h.update(name.encode())
            _digest_arrays(h, value.detach().cpu().contiguous().numpy())
        convention = getattr(owner, "convention", None)  # what every model here sees: not in the state dict
        h.update(json.dumps(dataclasses.asdict(convention) if dataclasses.is_dataclass(convention) else None).encode())
        # The owner's answers, rounded past float noise: a graph that computes otherwise from the same tensors.
        _digest_arrays(h, np.round(owner_held.astype(np.float64), 4))
        _digest_arrays(h, points, labels, held_points, held_labels)
        if factory_args:  # only when given: entries of owners without arguments keep their keys
            h.update(f"factory_args={factory_args}".encode())
        self._base = h.hexdigest()

    def _path(self, spec: KnownModelSpec, index: int, retry: bool, inputs: dict[str, object]) -> Path:
        what = json.dumps({"spec": dataclasses.asdict(spec), "index": index, "retry": retry, "inputs": inputs}, sort_keys=True)
        key = hashlib.sha256(f"{self._base}:{what}".encode()).hexdigest()[:32]
        return self.dir / f"{spec.name}-{key}.safetensors"

    def has(self, spec: KnownModelSpec, index: int, retry: bool, inputs: dict[str, object]) -> bool:
        """Whether an entry is there (it may still prove unusable to `get`)."""
        return self._path(spec, index, retry, inputs).is_file()

    def get(self, spec: KnownModelSpec, index: int, retry: bool, inputs: dict[str, object],
            skeleton: Callable[[], nn.Module]) -> nn.Module | None:
        """The cached model, loaded into `skeleton()` (the same architecture, on the device it
        will run on), or None."""
        path = self._path(spec, index, retry, inputs)
        try:
            if not path.is_file():
                return None
            model = load_state(skeleton(), path.read_bytes())
        except Exception as e:  # any unreadable or mismatched entry: train again
            logger.warning("ignoring unusable cached model %s (%s): training it again", path, first_line(e, whole=True))
            return None
        logger.info("%s: reusing the model trained before (%s)", spec.name, path.name)
        return model

    def put(self, spec: KnownModelSpec, index: int, retry: bool, inputs: dict[str, object], model: nn.Module) -> None:
        """Store a trained model; a failure to write costs only a warning."""
        path = self._path(spec, index, retry, inputs)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, state_bytes(model))
        except (OSError, RuntimeError, ValueError) as e:
            logger.warning("could not cache %s in %s: %s", spec.name, self.dir, first_line(e, whole=True))


__all__ = ["CACHE_VERSION", "KnownModelCache", "load_state", "state_bytes"]
