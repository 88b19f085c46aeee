"""One entry point from a suspect spec (a file, or a Triton or v2 server URL) to an oracle.

Backends are imported only when a spec needs them, so ONNX suspects work without torch
loaded and local suspects without tritonclient installed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.base import InputConvention, Oracle
from deepcore_auditor.adapters.errors import InputError

log = logging.getLogger(__name__)

# A spec with one of these prefixes is a server URL (its parser, adapters.triton.options, names
# the schemes it accepts and refuses a malformed one).
SERVER_PREFIXES = ("triton+", "v2+")
TORCH_SUFFIXES = (".pt", ".ts", ".pt2", ".jit")
ACCEPTED = (
    "a .onnx file, a TorchScript file (.pt, .ts, .jit), a torch.export program (.pt2), "
    "a triton+http(s):// or triton+grpc(s):// URL (Triton), or a v2+http(s):// or v2+grpc(s):// URL "
    "(any Open Inference Protocol server: KServe, MLServer, ...)"
)


def open_suspect(
    spec: str,
    *,
    convention: InputConvention,
    point_shape: tuple[int, int, int],
    num_classes: int | None,
    device: str = "auto",
    ort_providers: Sequence[str] | None = None,
    **triton_options: Any,
) -> Oracle:
    """Open the suspect named by `spec` as an oracle, checked against the fingerprint's points.

    `triton_options` go to `adapters.triton.open_triton` (unchanged, URL included with its
    `triton+` or `v2+` prefix), which serves both kinds of server; a local suspect refuses any
    that are set, but `request_timeout_s`, which bounds each batch of an ONNX suspect as it
    bounds each request to a server. `ort_providers` (ONNX suspects only) names ONNX Runtime's
    execution providers, in order, instead of `device`.
    """
    server = spec.lower().startswith(SERVER_PREFIXES)
    if ort_providers is not None and (server or Path(spec).suffix.lower() != ".onnx"):
        raise InputError(f"ONNX Runtime execution providers apply to .onnx suspects only, not to {spec}")
    if server:  # a server URL, or a malformed one: its parser names the fault
        try:
            from deepcore_auditor.adapters.triton import open_triton
        except ImportError as e:
            log.debug("importing adapters.triton failed: %s", e)
            raise InputError("Triton and v2 server support needs tritonclient: pip install 'deepcore-auditor[triton]'") from e
        return open_triton(
            spec, convention=convention, point_shape=point_shape, num_classes=num_classes, **triton_options
        )

    run_timeout = triton_options.pop("request_timeout_s", None)  # bounds a local model's batches too
    given = sorted(k for k, v in triton_options.items() if v is not None)
    if given:
        raise InputError(f"option(s) {', '.join(given)} apply to Triton and v2 server suspects only, not to {spec}")
    suffix = Path(spec).suffix.lower()
    if suffix == ".onnx" or suffix in TORCH_SUFFIXES:
        if not Path(spec).is_file():
            raise InputError(f"suspect file not found: {spec}")
    if suffix == ".onnx":
        from deepcore_auditor.adapters.onnx import OnnxOracle

        return OnnxOracle(
            spec, convention=convention, point_shape=point_shape, num_classes=num_classes, device=device,
            run_timeout_s=run_timeout, providers=ort_providers,
        )
    if suffix in TORCH_SUFFIXES:
        if run_timeout is not None:
            raise InputError(f"option request_timeout_s applies to server and ONNX suspects, not to {spec}")
        from deepcore_auditor.adapters.torch import TorchOracle, load_torch_model

        model, identity = load_torch_model(spec)
        return TorchOracle(
            model,
            convention=convention,
            point_shape=point_shape,
            num_classes=num_classes,
            device=device,
            identity=identity,
        )
    raise InputError(f"cannot open suspect {spec!r}: give {ACCEPTED}")
