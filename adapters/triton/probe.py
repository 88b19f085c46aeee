"""`open_triton`: everything the audit depends on, checked when the oracle is opened, before any query.

The server is live, the model (version) is ready, and its input and output fit the audit
(`shapes._plan`); the audit is pinned to the version the server answers with. A ``v2+`` URL
asks only what the Open Inference Protocol defines: no model-config call (Triton's own), so the
batching is read from the metadata's input shape and the suspect is identified by its metadata.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from deepcore_auditor.adapters.base import InputConvention, Oracle
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError, TransientOracleError
from deepcore_auditor.adapters.images import ImageEncoding
from deepcore_auditor.adapters.triton.client import _call, _gevent_timeout, _make_client, _translate
from deepcore_auditor.adapters.triton.options import _LABELS_VIA, _OPTIONS, _positive, _Transport, _transport, parse_triton_url
from deepcore_auditor.adapters.triton.oracle import TritonOracle
from deepcore_auditor.adapters.triton.shapes import _canonical_config, _canonical_metadata, _plan

log = logging.getLogger(__name__)


def open_triton(
    url: str,
    *,
    convention: InputConvention,
    point_shape: tuple[int, int, int],
    num_classes: int | None,
    **options: Any,
) -> Oracle:
    """Open a suspect served by Triton (``triton+`` URL) or by any Open Inference Protocol
    server (``v2+`` URL) and check it can answer points of `point_shape`.

    Options: concurrency (4), labels_via ("auto" | "classification" | "argmax"), output (name of
    the output tensor when the model has several), batch_size (samples per request; default the
    model's max_batch_size), headers (dict), auth_token_env (env var holding a bearer token),
    ssl (bool), ssl_root_certificates (PEM path), ssl_insecure (HTTPS only: skip verification),
    connect_timeout_s (10), request_timeout_s (60), image_format (an `ImageEncoding` or its text,
    "png" or "jpeg:Q": send each point as an encoded image to a model whose input is BYTES; the
    caller checks the points survive it, see adapters.images).
    Raises InputError (URL/options), OracleError (server unreachable or failing),
    IncompatibleSuspect (model missing, or its input/output does not fit).
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise InputError(f"unknown Triton option(s) {', '.join(sorted(unknown))}: use {', '.join(sorted(_OPTIONS))}")
    options = {k: v for k, v in options.items() if v is not None}  # None = the default
    endpoint = parse_triton_url(url)
    if len(point_shape) != 3 or any(int(d) <= 0 for d in point_shape):
        raise InputError(f"point_shape must be (C, H, W) with positive sizes, got {point_shape}")
    point_shape = (int(point_shape[0]), int(point_shape[1]), int(point_shape[2]))
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 2):
        raise InputError(f"num_classes must be at least 2, got {num_classes}")
    concurrency = _positive(options, "concurrency", 4, int)
    labels_via = options.get("labels_via", "auto")
    if labels_via not in _LABELS_VIA:
        raise InputError(f"option labels_via must be one of {', '.join(_LABELS_VIA)}, got {labels_via!r}")
    batch_size = _positive(options, "batch_size", None, int)
    output_option = options.get("output")
    if output_option is not None and not isinstance(output_option, str):
        raise InputError(f"option output must name an output tensor, got {output_option!r}")
    image = options.get("image_format")
    if image is not None and not isinstance(image, ImageEncoding):
        image = ImageEncoding.parse(image)
    transport = _transport(endpoint, options)
    endpoint = transport.endpoint
    if endpoint.flavour == "v2" and labels_via == "classification":
        raise InputError("labels_via='classification' is Triton's extension: use a triton+ URL, or argmax with v2+")

    client = _make_client(transport)
    try:
        probe = _Probe(client, transport)
        server_name, server_version, extensions = probe.server()
        version, metadata, config = probe.model()
    finally:
        try:
            client.close()
        except Exception as e:  # noqa: BLE001
            log.debug("closing the probe client failed: %s", e)

    plan, convention, details = _plan(
        endpoint,
        version,
        metadata,
        config,
        convention=convention,
        point_shape=point_shape,
        num_classes=num_classes,
        labels_via=labels_via,
        batch_size=batch_size,
        output_option=output_option,
        classification_available=endpoint.flavour == "triton" and "classification" in extensions,
        image=image,
    )
    identity = {
        "url": endpoint.url(),
        "server_version": server_version,
        "model": endpoint.model,
        "version": version,
    }
    if image is not None:  # the suspect as reached: a resumed audit must send the same files
        identity["image_format"] = str(image)
    if endpoint.flavour == "triton":
        identity["config_sha256"] = hashlib.sha256(_canonical_config(config).encode()).hexdigest()
    else:  # the protocol's own description of the model: its name, platform, inputs and outputs
        identity["server_name"] = server_name
        identity["metadata_sha256"] = hashlib.sha256(_canonical_metadata(metadata).encode()).hexdigest()
    details.update(
        flavour=endpoint.flavour,
        tensors="json" if endpoint.flavour == "v2" and endpoint.protocol == "http" else
        "binary" if endpoint.protocol == "http" else "raw",
        protocol=endpoint.protocol,
        tls=endpoint.tls,
        version_requested=endpoint.version or None,
        concurrency=concurrency,
        connect_timeout_s=transport.connect_timeout_s,
        request_timeout_s=transport.request_timeout_s,
        authenticated=any(k.lower() == "authorization" for k, _ in transport.headers),
        convention=convention.to_dict(),
    )
    log.info(
        "opened %s model %s version %s at %s (server %s): %s, %d per request",
        endpoint.server, endpoint.model, version or "(the server's)", endpoint.address, server_version, plan.output_kind, plan.chunk,
    )
    return TritonOracle(
        transport,
        convention=convention,
        point_shape=point_shape,
        plan=plan,
        identity=identity,
        details=details,
        concurrency=concurrency,
    )


class _Probe:
    """The checks made when opening, with one client in the calling thread."""

    def __init__(self, client: Any, transport: _Transport) -> None:
        self.client = client
        self.t = transport
        self.grpc = transport.endpoint.protocol == "grpc"
        self.where = f"{transport.endpoint.server} server at {transport.endpoint.address}"

    def _kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"headers": self.t.header_dict()}
        if self.grpc:
            kw["client_timeout"] = self.t.connect_timeout_s
        return kw

    def server(self) -> tuple[str, str, list[str]]:
        """The server's name, version and protocol extensions."""
        try:
            live = self.client.is_server_live(**self._kw())
        except (Exception, _gevent_timeout()) as e:
            cause = _translate(e, "is_server_live")
            raise OracleError(f"{self.where} unreachable: {cause}") from e
        if not live:
            raise OracleError(f"{self.where} is not live")
        kw = self._kw()
        if self.grpc:
            kw["as_json"] = True
        meta = _call(f"{self.where}: server metadata", lambda: self.client.get_server_metadata(**kw))
        return str(meta.get("name", "unknown")), str(meta.get("version", "unknown")), [str(e) for e in meta.get("extensions", [])]

    def model(self) -> tuple[str, dict[str, Any], dict[str, Any]]:
        ep = self.t.endpoint
        name = f"model {ep.model!r}" + (f" version {ep.version}" if ep.version else "")
        try:
            ready = self.client.is_model_ready(ep.model, ep.version, **self._kw())
            problem = "" if ready else "not ready"
        except (Exception, _gevent_timeout()) as e:
            cause = _translate(e, "is_model_ready")
            if isinstance(cause, TransientOracleError):
                raise OracleError(f"{self.where} failed while checking {name}: {cause}") from e
            ready, problem = False, str(cause)
        kw = self._kw()
        if self.grpc:
            kw["as_json"] = True
        try:
            metadata = self.client.get_model_metadata(ep.model, ep.version, **kw)
            # Triton's own call; other v2 servers answer 404 / UNIMPLEMENTED.
            config = self.client.get_model_config(ep.model, ep.version, **kw) if ep.flavour == "triton" else {}
        except (Exception, _gevent_timeout()) as e:
            cause = _translate(e, "model metadata")
            if ready or isinstance(cause, TransientOracleError):
                raise OracleError(f"{self.where} failed to describe {name}: {cause}") from e
            raise IncompatibleSuspect(f"{self.where} does not serve {name}: {cause}") from e
        if not ready:
            raise IncompatibleSuspect(f"{self.where} does not serve {name}: {problem}")
        if self.grpc:
            config = config.get("config", config)
        version = ep.version
        if not version:  # pin the audit to the version the server answers with now (its latest)
            versions = [int(v) for v in metadata.get("versions", []) if str(v).isdigit()]
            version = str(max(versions)) if versions else ""  # "": the server's only (or default) version
        return version, metadata, config
