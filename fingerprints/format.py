"""The fingerprint file: one self-describing, versioned JSON document, no pickle.

    {"format": "deepcore-fingerprint", "version": 1, "content_sha256": "<hex>", "content": {...}}

`content` holds the points, the owner's answers, the input convention, the owner's digest, the
method with its parameters and seed, and the calibration statistics. Arrays are stored as
{"dtype", "shape", "base64"} (little-endian). The digest is the sha256 of `content` serialized
canonically (sorted keys, no spaces); it is checked on load, so any change is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import InputConvention
from adapters.errors import FingerprintError, InputError

FORMAT_NAME = "deepcore-fingerprint"
FORMAT_VERSION = 1
_DTYPES = {"float32", "float64", "int64", "uint8"}


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _DTYPES:
        raise ValueError(f"cannot store arrays of dtype {a.dtype}")
    return {"dtype": a.dtype.name, "shape": list(a.shape), "base64": base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode()}


def decode_array(d: Any, what: str) -> np.ndarray:
    try:
        dtype, shape, raw = d["dtype"], [int(s) for s in d["shape"]], base64.b64decode(d["base64"], validate=True)
    except (KeyError, TypeError, ValueError) as e:
        raise FingerprintError(f"fingerprint field {what!r} is not an encoded array") from e
    if dtype not in _DTYPES or any(s < 0 for s in shape):
        raise FingerprintError(f"fingerprint field {what!r} has an unsupported dtype or shape")
    dt = np.dtype(dtype).newbyteorder("<")
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
        raise FingerprintError(f"fingerprint field {what!r} has {len(raw)} bytes, not what its shape says")
    return np.frombuffer(raw, dtype=dt).reshape(shape).astype(dtype)


def canonical_digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class ModelAnswers:
    """One known model's answers on the fingerprint points, used for calibration and clustering."""

    name: str
    kind: str  # "piracy" or "independent"
    family: str  # e.g. "fine-tune", "distill", "same-arch", "other-arch"
    role: str  # "selection" (used to choose points) or "calibration" (held out)
    labels: np.ndarray  # int64 [n]
    owner_prob: np.ndarray  # float64 [n]: probability the model gives the owner's label


@dataclass(frozen=True)
class Fingerprint:
    """A DeepCore fingerprint: core points, the owner's answers, and how to judge a suspect's."""

    points: np.ndarray  # float32 [n, C, H, W] canonical
    owner_labels: np.ndarray  # int64 [n]
    owner_probs: np.ndarray  # float32 [n, K]
    convention: InputConvention
    classes: tuple[str, ...]
    owner_identity: dict[str, str]
    method: dict[str, Any]
    known_models: tuple[ModelAnswers, ...] = ()
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.owner_probs.shape[1])

    @property
    def point_shape(self) -> tuple[int, int, int]:
        c, h, w = self.points.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return len(self.points)

    def to_content(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "classes": list(self.classes),
            "convention": self.convention.to_dict(),
            "owner_identity": dict(self.owner_identity),
            "method": self.method,
            "points": encode_array(self.points.astype(np.float32)),
            "owner_labels": encode_array(self.owner_labels.astype(np.int64)),
            "owner_probs": encode_array(self.owner_probs.astype(np.float32)),
            "known_models": [
                {
                    "name": m.name, "kind": m.kind, "family": m.family, "role": m.role,
                    "labels": encode_array(m.labels.astype(np.int64)),
                    "owner_prob": encode_array(m.owner_prob.astype(np.float64)),
                }
                for m in self.known_models
            ],
            "extra": self.extra,
        }

    @property
    def digest(self) -> str:
        return canonical_digest(self.to_content())


def save_fingerprint(fp: Fingerprint, path: Path) -> str:
    """Write atomically (temp file + rename, nothing half-written); returns the content digest."""
    content = fp.to_content()
    digest = canonical_digest(content)
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "content_sha256": digest, "content": content}
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise InputError(f"cannot write fingerprint: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".fingerprint-", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def load_fingerprint(path: Path) -> Fingerprint:
    """Read and verify a fingerprint file; any corruption or change raises FingerprintError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"fingerprint file not found: {path}")
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FingerprintError(f"{path} is not a fingerprint file (not valid JSON)") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise FingerprintError(f"{path} is not a DeepCore fingerprint file")
    if doc.get("version") != FORMAT_VERSION:
        raise FingerprintError(f"{path} has fingerprint format version {doc.get('version')!r}; this tool reads version {FORMAT_VERSION}")
    content = doc.get("content")
    if not isinstance(content, dict):
        raise FingerprintError(f"{path} has no fingerprint content")
    if canonical_digest(content) != doc.get("content_sha256"):
        raise FingerprintError(f"{path}: content does not match its sha256 digest (modified or corrupt)")
    return _from_content(content, path)


def _from_content(c: dict[str, Any], path: Path) -> Fingerprint:
    try:
        points = decode_array(c["points"], "points")
        labels = decode_array(c["owner_labels"], "owner_labels")
        probs = decode_array(c["owner_probs"], "owner_probs")
        known = tuple(
            ModelAnswers(
                name=str(m["name"]), kind=str(m["kind"]), family=str(m["family"]), role=str(m["role"]),
                labels=decode_array(m["labels"], "labels"), owner_prob=decode_array(m["owner_prob"], "owner_prob"),
            )
            for m in c["known_models"]
        )
        fp = Fingerprint(
            points=points, owner_labels=labels, owner_probs=probs,
            convention=InputConvention.from_dict(c["convention"]),
            classes=tuple(str(x) for x in c["classes"]),
            owner_identity={str(k): str(v) for k, v in dict(c["owner_identity"]).items()},
            method=dict(c["method"]), known_models=known, created=str(c["created"]), extra=dict(c["extra"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FingerprintError(f"{path}: malformed fingerprint content ({type(e).__name__}: {e})") from e
    n = len(fp.points)
    if fp.points.ndim != 4 or labels.shape != (n,) or probs.ndim != 2 or len(probs) != n or n == 0:
        raise FingerprintError(f"{path}: fingerprint arrays have inconsistent shapes")
    if any(m.labels.shape != (n,) or m.owner_prob.shape != (n,) for m in known):
        raise FingerprintError(f"{path}: a known model's answers do not cover the fingerprint points")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise FingerprintError(f"{path}: owner labels outside the class range")
    return fp
