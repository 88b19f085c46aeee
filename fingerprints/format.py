"""The fingerprint file: one self-describing, versioned JSON document, no pickle.

    {"format": "deepcore-fingerprint", "version": 1, "content_sha256": "<hex>", "content": {...}}

`content` holds the points, the owner's answers, the input convention, the owner's digest, the
method with its parameters and seed, and the calibration statistics. Arrays are stored as
{"dtype", "shape", "base64"} (little-endian). The digest is the sha256 of `content` serialized
canonically (sorted keys, no spaces); it is checked on load, so any change is refused. A file
may also carry a `signature` beside the digest (HMAC-SHA256 or Ed25519, see `signing.py`),
checked when the reader is given a key. Audit reports and commitments use the same envelope
(`write_document` / `read_document`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.adapters.files import atomic_write
from deepcore_auditor.fingerprints.errors import FingerprintError
from deepcore_auditor.fingerprints.signing import Key

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
    # How the model did on natural held-out data (fingerprints.quality): {"arch", "accuracy",
    # "agreement", "samples"}; None in fingerprints made before it was measured.
    quality: dict[str, Any] | None = None


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
    # The file's signature block when loaded from a signed file; not part of the content.
    signature: dict[str, Any] | None = field(default=None, compare=False)

    @cached_property
    def derived(self) -> dict[Any, Any]:
        """What is computed from this fingerprint alone and asked again and again, kept with it
        (calibration's rates: a hub audits many suspects with one fingerprint object). Sound
        because a fingerprint is immutable; a changed one is a new object with an empty memo."""
        return {}

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
                    **({"quality": dict(m.quality)} if m.quality is not None else {}),
                }
                for m in self.known_models
            ],
            "extra": self.extra,
        }

    @cached_property
    def digest(self) -> str:
        """The content's sha256, computed once per object: a fingerprint is immutable (a changed
        one is a new object, `dataclasses.replace`), and an audit names it several times (its
        ledger header, its result, its report), which cost a canonical JSON of every array each."""
        return canonical_digest(self.to_content())


def write_document(path: Path, format_name: str, version: int, content: dict[str, Any], key: Key | None = None, kind: str = "") -> str:
    """Write a signed-or-not JSON document atomically (temp file + rename, nothing half-written):

        {"format", "version", "content_sha256", "content", ["signature"]}

    Returns the content digest."""
    digest = canonical_digest(content)
    doc: dict[str, Any] = {"format": format_name, "version": version, "content_sha256": digest, "content": content}
    if key is not None:
        doc["signature"] = key.sign(kind, digest)
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    atomic_write(path, json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())
    return digest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: with duplicates, two readers could see two contents."""
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass(frozen=True)
class Document:
    """A verified document: its content, digest and signature block (None when unsigned)."""

    content: dict[str, Any]
    digest: str
    signature: dict[str, Any] | None


ENVELOPE_KEYS = frozenset({"format", "version", "content_sha256", "content", "signature"})  # what write_document writes

# The largest document read: 400 core points of a 3 x 224 x 224 input in float32, base64, are
# some 320 MiB; anything larger is refused before it is read.
MAX_DOCUMENT_BYTES = 512 * 2**20


def read_document(
    path: Path, format_name: str, version: int, error: type[InputError], what: str, key: Key | None = None, kind: str = ""
) -> Document:
    """Read a document written by `write_document`; check its digest, and its signature with `key`.

    Any corruption or change raises `error` (one line, naming the file); a key that does not
    verify the signature raises SignatureError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:  # refused before it is read: a hostile file must not take the memory first
        raise error(f"{path} is {size / 2**20:.0f} MiB, more than the {MAX_DOCUMENT_BYTES // 2**20} MiB a {what} file may have")
    try:
        doc = json.loads(path.read_bytes(), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise error(f"{path} is not a {what} file (not valid JSON)") from e
    if not isinstance(doc, dict) or doc.get("format") != format_name:
        raise error(f"{path} is not a DeepCore {what} file")
    if type(doc.get("version")) is not int or doc.get("version") != version:
        raise error(f"{path} has {what} format version {doc.get('version')!r}; this tool reads version {version}")
    # Nothing outside the digest but the envelope itself: a key the writer never writes (or a
    # signature block of null) would be a second, unprotected content two readers could see differently.
    unknown = sorted(set(doc) - ENVELOPE_KEYS)
    if unknown or ("signature" in doc and doc["signature"] is None):
        raise error(f"{path} has an envelope field no {what} file carries ({', '.join(unknown) or 'signature: null'})")
    content = doc.get("content")
    if not isinstance(content, dict):
        raise error(f"{path} has no {what} content")
    try:
        digest = canonical_digest(content)
    except (TypeError, ValueError, RecursionError) as e:
        raise error(f"{path}: {what} content cannot be serialized ({type(e).__name__})") from e
    if digest != doc.get("content_sha256"):
        raise error(f"{path}: content does not match its sha256 digest (modified or corrupt)")
    signature = doc.get("signature")
    if signature is not None and not isinstance(signature, dict):
        raise error(f"{path} has a malformed signature block")
    if key is not None:
        key.verify(signature, kind, digest, str(path))
    return Document(content, digest, signature)


def save_fingerprint(fp: Fingerprint, path: Path, key: Key | None = None) -> str:
    """Write the fingerprint atomically, signed with `key` if given; returns the content digest."""
    return write_document(path, FORMAT_NAME, FORMAT_VERSION, fp.to_content(), key, "fingerprint")


def load_fingerprint(path: Path, key: Key | None = None) -> Fingerprint:
    """Read and verify a fingerprint file; any corruption or change raises FingerprintError, and a
    `key` that does not verify its signature raises SignatureError."""
    doc = read_document(path, FORMAT_NAME, FORMAT_VERSION, FingerprintError, "fingerprint", key, "fingerprint")
    return dataclasses.replace(_from_content(doc.content, Path(path)), signature=doc.signature)


def sign_fingerprint(path: Path, key: Key, out: Path | None = None) -> str:
    """Sign an existing fingerprint (its digest checked first), in place or into `out`."""
    fp = load_fingerprint(path)
    return save_fingerprint(fp, out or path, key)


def _quality(q: Any, name: str) -> dict[str, Any] | None:
    if q is None:
        return None
    ok = (isinstance(q, dict) and set(q) == {"arch", "accuracy", "agreement", "samples"} and isinstance(q["arch"], str)
          and all(isinstance(q[k], (int, float)) and not isinstance(q[k], bool) and 0 <= q[k] <= 1 for k in ("accuracy", "agreement"))
          and isinstance(q["samples"], int) and not isinstance(q["samples"], bool) and q["samples"] > 0)
    if not ok:
        raise FingerprintError(f"known model {name!r}: malformed quality record")
    return dict(q)


def _from_content(c: dict[str, Any], path: Path) -> Fingerprint:
    try:
        points = decode_array(c["points"], "points")
        labels = decode_array(c["owner_labels"], "owner_labels")
        probs = decode_array(c["owner_probs"], "owner_probs")
        known = tuple(
            ModelAnswers(
                name=str(m["name"]), kind=str(m["kind"]), family=str(m["family"]), role=str(m["role"]),
                labels=decode_array(m["labels"], "labels"), owner_prob=decode_array(m["owner_prob"], "owner_prob"),
                quality=_quality(m.get("quality"), str(m["name"])),
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
    # Points are canonical inputs in [0, 1]: a NaN or an out-of-range value would be sent to the
    # suspect and its failure blamed on it; the probabilities and rates are in [0, 1] too.
    for name, values in (("points", fp.points), ("owner probabilities", probs),
                         *((f"known model {m.name!r}'s owner probabilities", m.owner_prob) for m in known)):
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise FingerprintError(f"{path}: {name} must be finite and lie in [0, 1]")
    if len(np.unique(fp.points.reshape(n, -1), axis=0)) != n:
        raise FingerprintError(f"{path}: the fingerprint lists a point twice")
    # The identity of a fingerprint is the digest of its file's content; content that does not
    # re-encode to itself (labels stored as floats, an unexpected dtype or field) would let two
    # different files share one identity, so it is refused.
    if fp.digest != canonical_digest(c):
        raise FingerprintError(f"{path}: fingerprint content is not in canonical form (unexpected dtypes or fields)")
    return fp


COMMITMENT_FORMAT = "deepcore-commitment"
COMMITMENT_VERSION = 1


def write_commitment(fp: Fingerprint, path: Path, created_utc: str, key: Key | None = None) -> str:
    """A commitment the owner publishes before auditing: the fingerprint's digest and size.

    Publishing it (or just its `fingerprint_sha256`) somewhere dated and public fixes the core
    points before any suspect is seen; an audit given `--commitment` refuses any other
    fingerprint, and its report carries the commitment. Returns the commitment's own digest.
    """
    content = {
        "fingerprint_sha256": fp.digest,
        "points": len(fp),
        "classes": len(fp.classes),
        "owner_sha256": fp.owner_identity.get("sha256", ""),
        "created_utc": created_utc,
    }
    return write_document(path, COMMITMENT_FORMAT, COMMITMENT_VERSION, content, key, "commitment")


def load_commitment(path: Path, key: Key | None = None) -> Document:
    doc = read_document(path, COMMITMENT_FORMAT, COMMITMENT_VERSION, FingerprintError, "commitment", key, "commitment")
    if not isinstance(doc.content.get("fingerprint_sha256"), str):
        raise FingerprintError(f"{path}: commitment names no fingerprint digest")
    return doc
