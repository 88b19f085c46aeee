"""The oracle interface: what every suspect (and the owner, seen as a black box) answers.

A query is a batch of points in the *canonical space*: float32 arrays shaped [N, C, H, W] with
values in [0, 1]. Each backend converts them with its `InputConvention` into what its model
expects (layout, scaling, normalisation, dtype), so that a suspect is asked exactly what the
owner saw. An answer is either top-1 labels ([N] int64) or probability vectors ([N, K] float64).
"""

from __future__ import annotations

import enum
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError, first_line


class Access(str, enum.Enum):
    """What a suspect reveals per query: its top-1 label only, or a probability vector."""

    LABELS = "labels"
    PROBS = "probs"


LAYOUTS = ("NCHW", "NHWC")
_DTYPES = ("float32", "float16", "uint8")


@dataclass(frozen=True)
class InputConvention:
    """How canonical points x in [0, 1] become a model's input: ((x * scale) - mean) / std.

    `mean` and `std` are per channel (or one value for all), in the scaled units; `layout`
    is the model's axis order; `dtype` the tensor type it takes (uint8 skips mean/std and
    rounds x * scale).
    """

    layout: str = "NCHW"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # Numbers as floats, whatever was passed: the convention is serialized into fingerprints
        # and must re-encode to the same bytes.
        try:
            object.__setattr__(self, "scale", float(self.scale))
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        except (TypeError, ValueError) as e:
            raise InputError(f"input convention needs numbers for scale, mean and std: {e}") from None
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.dtype not in _DTYPES:
            raise InputError(f"unknown input dtype {self.dtype!r}: use one of {', '.join(_DTYPES)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"input scale must be a positive number, got {self.scale}")
        if not self.mean or not self.std:
            raise InputError("mean and std need at least one value each")
        if any(not math.isfinite(s) or s <= 0 for s in self.std):
            raise InputError(f"std values must be positive, got {list(self.std)}")
        if any(not math.isfinite(m) for m in self.mean):
            raise InputError(f"mean values must be finite, got {list(self.mean)}")

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Canonical [N, C, H, W] points -> the model's input tensor."""
        check_channels(self, points.shape[1])
        # One fresh float32 copy, then in-place steps (no temporaries). Steps that are exact
        # identities in IEEE arithmetic (x * 1, x - (+0.0), x / 1) are skipped: same bits.
        x = points.astype(np.float32)
        if self.scale != 1.0:
            np.multiply(x, np.float32(self.scale), out=x)
        if self.dtype == "uint8":
            np.rint(x, out=x)
            np.clip(x, 0, 255, out=x)
            x = x.astype(np.uint8)
        else:
            if any(m != 0.0 or math.copysign(1.0, m) < 0 for m in self.mean):
                np.subtract(x, np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1), out=x)
            if any(s != 1.0 for s in self.std):
                np.divide(x, np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1), out=x)
            x = x.astype(self.dtype, copy=False)
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return x

    def with_dtype(self, dtype: str) -> InputConvention:
        return InputConvention(self.layout, self.scale, self.mean, self.std, dtype)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputConvention:
        try:
            return cls(
                layout=str(d["layout"]),
                scale=float(d["scale"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                dtype=str(d.get("dtype", "float32")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed input convention {d!r}: {e}") from e


def check_channels(convention: InputConvention, channels: int) -> None:
    """Refuse a convention whose mean or std has neither one value nor one per channel of the points."""
    for name, values in (("mean", convention.mean), ("std", convention.std)):
        if len(values) not in (1, channels):
            raise IncompatibleSuspect(
                f"input convention has {len(values)} {name} values but the points have {channels} channels"
            )


@dataclass(frozen=True)
class OracleInfo:
    """What an oracle is and what it can answer; `identity` names the model (path, sha256, URL)."""

    kind: str
    identity: dict[str, str]
    access: tuple[Access, ...]
    num_classes: int | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "identity": dict(self.identity),
            "access": [a.value for a in self.access],
            "num_classes": self.num_classes,
            "details": dict(self.details),
        }


class Oracle(ABC):
    """A black-box classifier. Backends implement `_answer`; `query` checks both sides of it.

    Wrappers (budget, ledger, label-only) are oracles holding an oracle, so they compose.
    """

    @property
    @abstractmethod
    def info(self) -> OracleInfo: ...

    @abstractmethod
    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray: ...

    def query(self, points: np.ndarray, access: Access) -> np.ndarray:
        """Ask about `points` ([N, C, H, W] float32 in [0, 1]); labels [N] or probs [N, K]."""
        empty = self._check_request(points, access)
        if empty is not None:
            return empty
        return check_answer(self._answer(points, access), len(points), access, self.info.num_classes)

    def _check_request(self, points: np.ndarray, access: Access) -> np.ndarray | None:
        """Refuse an access this oracle does not offer, or points of the wrong rank; for no points,
        the empty answer (nothing is sent)."""
        info = self.info
        if access not in info.access:
            raise IncompatibleSuspect(
                f"this suspect answers {'/'.join(a.value for a in info.access)} only, not {access.value}"
            )
        if points.ndim != 4:
            raise InputError(f"points must be [N, C, H, W], got shape {points.shape}")
        if len(points) == 0:
            return np.zeros((0,), np.int64) if access is Access.LABELS else np.zeros((0, info.num_classes or 0))
        return None

    def close(self) -> None:  # noqa: B027 -- a no-op by default: an oracle without resources needs no close
        """Release sessions and connections; idempotent."""

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A probability vector may be rounded by the suspect (to 1 or 2 decimals), so its sum may drift
# from 1; a vector that sums to less than half or more than one and a half is not probabilities.
_PROB_SUM_RANGE = (0.5, 1.5)
_PROB_SLACK = 1e-6


def _looks_like_probabilities(out: np.ndarray) -> bool:
    sums = out.sum(axis=1)
    return bool(
        np.all(out >= -_PROB_SLACK) and np.all(out <= 1 + _PROB_SLACK)
        and np.all(sums >= _PROB_SUM_RANGE[0]) and np.all(sums <= _PROB_SUM_RANGE[1])
    )


def check_answer(answer: np.ndarray, n: int, access: Access, num_classes: int | None) -> np.ndarray:
    """Validate a backend's answer once, at the boundary, so nothing malformed reaches a verdict.

    Labels must be n integers in 0..K-1; probabilities n rows of K finite values in [0, 1] whose
    sums lie in [0.5, 1.5] (rounded answers), returned renormalized to sum 1.
    """
    try:
        a = np.asarray(answer)
    except (ValueError, TypeError) as e:  # ragged or otherwise not an array
        raise OracleError(f"suspect returned an answer that is not an array ({first_line(e)})") from None
    if access is Access.LABELS:
        if a.shape != (n,):
            raise OracleError(f"suspect returned labels of shape {a.shape}, expected ({n},)")
        if not np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
            raise OracleError(f"suspect returned labels of type {a.dtype}, expected integers")
        if num_classes is not None and (int(a.min()) < 0 or int(a.max()) >= num_classes):
            raise OracleError(f"suspect returned a label outside 0..{num_classes - 1}")
        if a.dtype == np.uint64 and int(a.max()) > np.iinfo(np.int64).max:
            raise OracleError("suspect returned a label too large for int64")
        return a.astype(np.int64)
    if a.ndim != 2 or a.shape[0] != n:
        raise OracleError(f"suspect returned probabilities of shape {a.shape}, expected ({n}, K)")
    if a.shape[1] == 0 or (num_classes is not None and a.shape[1] != num_classes):
        raise OracleError(f"suspect returned {a.shape[1]} classes, expected {num_classes if num_classes is not None else 'at least one'}")
    if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
        raise OracleError("suspect returned non-finite or non-numeric probabilities")
    p = a.astype(np.float64)
    if not _looks_like_probabilities(p):
        raise OracleError("suspect returned vectors that are not probabilities (values outside [0, 1] or rows not summing to about 1)")
    p = np.clip(p, 0.0, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def read_outputs(outputs: np.ndarray, access: Access, previous_reading: str | None) -> tuple[np.ndarray, str]:
    """A local model's raw outputs -> the answer for `access`, and how they were read.

    Once a batch has shown logits the model's outputs are read as logits from then on (a batch
    of logits can happen to look like probabilities; probabilities never look like logits).
    """
    probs, reading = to_probabilities(outputs, force_logits=previous_reading == "logits")
    if previous_reading is not None and reading != previous_reading:
        logging.getLogger(__name__).warning("model outputs read as %s now, as %s before", reading, previous_reading)
    return (probs.argmax(axis=1).astype(np.int64) if access is Access.LABELS else probs), reading


def to_probabilities(outputs: np.ndarray, force_logits: bool = False) -> tuple[np.ndarray, str]:
    """Model outputs -> probabilities; softmax only when they are not already a distribution.

    Rows of values in [0, 1] summing to about 1 (within [0.5, 1.5]: a model may round its
    probabilities) are read as probabilities and renormalized; anything else as logits.
    Returns the probabilities and which reading was taken ("probabilities" or "logits").
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] == 0:
        raise OracleError(f"suspect returned outputs of shape {out.shape}, expected one class vector per point")
    if not np.all(np.isfinite(out)):
        raise OracleError("suspect returned NaN or infinite outputs")
    if not force_logits and _looks_like_probabilities(out):
        p = np.clip(out, 0.0, 1.0)
        return p / p.sum(axis=1, keepdims=True), "probabilities"
    z = out - out.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True), "logits"


class OracleWrapper(Oracle):
    """An oracle around another: `info` and `close` delegate to the inner oracle.

    Answers are checked once, where they enter: the backend's own `query` checks its output
    (`check_answer`), so a wrapper checks only what it changes — the access it offers (its
    `info` may narrow it), the points' rank — and passes the inner oracle's answer on unchecked.
    A wrapper that adds knowledge the backend lacks (`WithClassCount`) checks that knowledge.
    """

    def __init__(self, inner: Oracle) -> None:
        self.inner = inner

    @property
    def info(self) -> OracleInfo:
        return self.inner.info

    def query(self, points: np.ndarray, access: Access) -> np.ndarray:
        empty = self._check_request(points, access)
        return empty if empty is not None else self._answer(points, access)

    def close(self) -> None:
        self.inner.close()


class LabelsOnly(OracleWrapper):
    """Shows only top-1 labels of any oracle: a local stand-in for a label-only public API."""

    @property
    def info(self) -> OracleInfo:
        i = self.inner.info
        return OracleInfo(i.kind, i.identity, (Access.LABELS,), i.num_classes, {**i.details, "labels_only": True})

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        return self.inner.query(points, Access.LABELS)


class WithClassCount(OracleWrapper):
    """Any oracle, its answers checked against a known class count (the fingerprint's) even when
    the backend cannot say how many classes its model has."""

    def __init__(self, inner: Oracle, num_classes: int) -> None:
        super().__init__(inner)
        self.num_classes = num_classes

    @property
    def info(self) -> OracleInfo:
        i = self.inner.info
        return OracleInfo(i.kind, i.identity, i.access, self.num_classes if i.num_classes is None else i.num_classes, i.details)

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        answer = self.inner.query(points, access)
        if self.inner.info.num_classes is None:  # the backend checked without a class count: check with ours
            answer = check_answer(answer, len(points), access, self.num_classes)
        return answer
