"""The model's metadata and config checked against the audit, and the shape of one request.

Decided once, when the oracle is opened: which input and output, their types, whether requests
carry a batch axis and how many samples each holds, and how labels are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.errors import IncompatibleSuspect
from deepcore_auditor.adapters.images import ImageEncoding
from deepcore_auditor.adapters.triton.options import TritonEndpoint

log = logging.getLogger(__name__)

_INPUT_DTYPES = {"FP32": "float32", "FP16": "float16", "UINT8": "uint8"}
_FLOAT_OUTPUTS = {"FP32", "FP16", "FP64"}
_CLASSIFIABLE = {"FP32", "FP64"}
_INT_OUTPUTS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


def _canonical_config(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a model config: the same for HTTP's JSON and gRPC's protobuf view."""
    try:
        from google.protobuf import json_format
        from tritonclient.grpc import model_config_pb2

        message = json_format.ParseDict(dict(config), model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        normal: Any = json_format.MessageToDict(message, preserving_proto_field_name=True)
    except Exception as e:  # noqa: BLE001 - fall back to the protocol's own JSON
        log.debug("model config not normalised through protobuf (%s); hashing it as received", e)
        normal = config
    return json.dumps(normal, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _canonical_metadata(metadata: Mapping[str, Any]) -> str:
    """Canonical JSON of a model's v2 metadata (name, platform, inputs, outputs): the same for
    HTTP's JSON and gRPC's protobuf view (which spells shapes as strings)."""

    def tensors(key: str) -> list[dict[str, Any]]:
        return [{"name": str(t.get("name")), "datatype": str(t.get("datatype")), "shape": [int(d) for d in t.get("shape", [])]}
                for t in metadata.get(key, [])]

    normal = {"name": str(metadata.get("name", "")), "platform": str(metadata.get("platform", "")),
              "inputs": tensors("inputs"), "outputs": tensors("outputs")}
    return json.dumps(normal, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _shape(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _fits(dims: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(dims) == len(expected) and all(d in (-1, e) for d, e in zip(dims, expected, strict=False))


@dataclass(frozen=True)
class _Plan:
    """What one request looks like, decided once when the oracle is opened."""

    input_name: str
    input_datatype: str
    output_name: str
    output_datatype: str
    output_kind: str  # "class_vector" or "labels"
    batch_dim: bool  # requests carry a leading batch axis
    chunk: int  # samples per request
    labels_via: str  # "classification", "argmax" or "labels" (label output)
    num_classes: int | None
    # Encoded images (a BYTES input): how points are encoded, and each sample's shape, () or (1,).
    image: ImageEncoding | None = None
    sample_dims: tuple[int, ...] = ()



def _plan(
    endpoint: TritonEndpoint,
    version: str,
    metadata: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    convention: InputConvention,
    point_shape: tuple[int, int, int],
    num_classes: int | None,
    labels_via: str,
    batch_size: int | None,
    output_option: str | None,
    classification_available: bool,
    image: ImageEncoding | None = None,
) -> tuple[_Plan, InputConvention, dict[str, Any]]:
    """Check the model's input and output against the audit and decide how to ask it. A BYTES
    input takes encoded images, one file per sample, and needs `image` (the format the
    endpoint decodes: the server does not say); it ignores the input convention."""
    model = f"{endpoint.server} model {endpoint.model!r}" + (f" version {version}" if version else "")
    inputs = list(metadata.get("inputs", []))
    outputs = list(metadata.get("outputs", []))
    if len(inputs) != 1:
        names = ", ".join(str(i.get("name")) for i in inputs)
        raise IncompatibleSuspect(f"{model} takes {len(inputs)} inputs ({names}); an image classifier takes one")
    inp = inputs[0]
    max_batch_size = int(config.get("max_batch_size", 0) or 0)
    in_shape = _shape(inp.get("shape", []))
    in_dtype = str(inp.get("datatype"))

    if in_dtype == "BYTES" or image is not None:
        if in_dtype != "BYTES":
            raise IncompatibleSuspect(f"{model} takes {in_dtype} tensors, not encoded images: drop the image format")
        if image is None:
            raise IncompatibleSuspect(f"{model} takes BYTES input (encoded images?): name the format it decodes "
                                      "(--image-format png, or jpeg:QUALITY)")
        if point_shape[0] not in (1, 3):
            raise IncompatibleSuspect(f"points with {point_shape[0]} channels cannot travel as images (1 or 3)")
        if max_batch_size > 0 or (in_shape and in_shape[0] == -1):
            batch_dim, sample_dims = True, in_shape[1:]
            chunk = min(max_batch_size, batch_size or max_batch_size) if max_batch_size > 0 else batch_size or 64
        else:
            batch_dim, sample_dims, chunk = False, in_shape, 1
        if sample_dims not in ((), (1,)) or (not batch_dim and sample_dims != (1,)):
            raise IncompatibleSuspect(f"{model} takes BYTES input of shape {list(in_shape)}: expected one encoded image "
                                      "per request ([-1], [-1, 1] or [1])")
    # Batch axis: Triton adds it when max_batch_size > 0; a non-batching model may still carry it.
    elif max_batch_size > 0:  # Triton batching: up to max_batch_size samples per request
        batch_dim, sample_dims, chunk = True, in_shape[1:], min(max_batch_size, batch_size or max_batch_size)
    elif len(in_shape) == 4 and in_shape[0] == -1:  # no Triton batching, but the model takes a batch
        batch_dim, sample_dims, chunk = True, in_shape[1:], batch_size or 64
    elif len(in_shape) == 4 and in_shape[0] == 1:  # a fixed batch of one
        batch_dim, sample_dims, chunk = True, in_shape[1:], 1
    else:  # no batching: one sample per request, no batch axis
        batch_dim, sample_dims, chunk = False, in_shape, 1

    if image is None:  # a tensor input (an image input: the server decodes and preprocesses)
        expected = point_shape if convention.layout == "NCHW" else (point_shape[1], point_shape[2], point_shape[0])
        if not _fits(sample_dims, expected):
            raise IncompatibleSuspect(
                f"{model} takes input {inp.get('name')!r} of shape {list(sample_dims)} per sample, but the points are "
                f"{list(point_shape)} (C, H, W), i.e. {list(expected)} in {convention.layout}"
            )
        if in_dtype not in _INPUT_DTYPES:
            raise IncompatibleSuspect(f"{model} takes {in_dtype} input; supported: {', '.join(_INPUT_DTYPES)}")
        dtype = _INPUT_DTYPES[in_dtype]
        if dtype != convention.dtype:
            log.info("%s takes %s input: convention dtype %s -> %s", model, in_dtype, convention.dtype, dtype)
            convention = convention.with_dtype(dtype)
        if dtype == "uint8" and convention.scale <= 1.0:
            log.warning("%s takes UINT8 input but the convention's scale is %s (pixels would be 0 or 1)", model, convention.scale)

    # Output: one class vector (PROBS + LABELS) or one integer label tensor (LABELS).
    if output_option is not None:
        chosen = [o for o in outputs if o.get("name") == output_option]
        if not chosen:
            names = ", ".join(str(o.get("name")) for o in outputs)
            raise IncompatibleSuspect(f"{model} has no output {output_option!r} (outputs: {names})")
    elif len(outputs) == 1:
        chosen = outputs
    else:
        names = ", ".join(str(o.get("name")) for o in outputs)
        raise IncompatibleSuspect(f"{model} has {len(outputs)} outputs ({names}): name the class output with option output")
    out = chosen[0]
    out_dtype = str(out.get("datatype"))
    out_dims = _shape(out.get("shape", []))
    if batch_dim:
        if not out_dims or out_dims[0] not in (-1, 1):
            raise IncompatibleSuspect(f"{model} output {out.get('name')!r} of shape {list(out_dims)} has no batch axis")
        out_dims = out_dims[1:]
    if out_dtype in _FLOAT_OUTPUTS and len(out_dims) == 1:
        kind = "class_vector"
        classes = out_dims[0]
        if classes != -1 and classes < 2:
            raise IncompatibleSuspect(f"{model} output {out.get('name')!r} has {classes} class(es)")
        if num_classes is not None and classes != -1 and classes != num_classes:
            raise IncompatibleSuspect(f"{model} outputs {classes} classes, the fingerprint has {num_classes}")
        resolved_classes = num_classes if num_classes is not None else (classes if classes != -1 else None)
        # Triton's classification extension rejects FP16 outputs ("unsupported type").
        classifiable = classification_available and out_dtype in _CLASSIFIABLE
        if labels_via == "argmax" or (labels_via == "auto" and not classifiable):
            via = "argmax"
        elif not classifiable:
            why = "does not offer the classification extension" if not classification_available else f"cannot classify {out_dtype} outputs"
            raise IncompatibleSuspect(f"{endpoint.server} server at {endpoint.address} {why}: use labels_via='argmax'")
        else:
            via = "classification"
    elif out_dtype in _INT_OUTPUTS and out_dims in ((), (1,)):
        kind, via, resolved_classes = "labels", "labels", num_classes
        if labels_via == "classification":
            raise IncompatibleSuspect(f"{model} already answers labels ({out_dtype}); labels_via='classification' does not apply")
    else:
        raise IncompatibleSuspect(
            f"{model} output {out.get('name')!r} is {out_dtype} {list(out_dims)} per sample: "
            "expected a class vector (FP32/FP16/FP64 [K]) or an integer label ([] or [1])"
        )
    if resolved_classes is not None and resolved_classes < 2:
        raise IncompatibleSuspect(f"{model}: class count {resolved_classes} is not usable")
    plan = _Plan(
        input_name=str(inp.get("name")),
        input_datatype=in_dtype,
        output_name=str(out.get("name")),
        output_datatype=out_dtype,
        output_kind=kind,
        batch_dim=batch_dim,
        chunk=chunk,
        labels_via=via,
        num_classes=resolved_classes,
        image=image,
        sample_dims=tuple(sample_dims) if image is not None else (),
    )
    details: dict[str, Any] = {
        "input": {"name": plan.input_name, "datatype": in_dtype, "shape": list(in_shape)},
        "output": {"name": plan.output_name, "datatype": out_dtype, "shape": list(_shape(out.get("shape", [])))},
        "output_kind": kind,
        "max_batch_size": max_batch_size,
        "samples_per_request": chunk,
        "labels_via": via,
    }
    if image is not None:
        details["image_format"] = str(image)
    return plan, convention, details
