"""`TritonOracle`: a model served by Triton or by any Open Inference Protocol (KServe v2) server,
asked over HTTP(S) or gRPC(S).

Over HTTP, a Triton model gets binary tensors (Triton's extension) and a v2 model JSON tensors
(the protocol's core, which MLServer and KServe read): a float32 point is written as the decimal
of its exact value and read back to the same bits, so the answers do not depend on the encoding.

Up to `concurrency` requests are in flight at once, each worker thread owning its own client
(tritonclient's HTTP client is not thread-safe); answers are reassembled in order.
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
import re
import threading
import weakref
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access, InputConvention, Oracle, OracleInfo, to_probabilities
from deepcore_auditor.adapters.errors import InputError, OracleError, TransientOracleError
from deepcore_auditor.adapters.images import encode_images
from deepcore_auditor.adapters.triton.client import _call, _client_module, _ClientPool, _make_client
from deepcore_auditor.adapters.triton.options import _Transport
from deepcore_auditor.adapters.triton.shapes import _Plan

log = logging.getLogger(__name__)

_INDEX_RE = re.compile(r"^[0-9]+$")


def _parse_classification(values: np.ndarray, n: int) -> np.ndarray:
    """Classification-extension strings ("value:index[:label]", top-1) -> [n] int64 labels."""
    flat = np.asarray(values, dtype=object).reshape(-1)
    if flat.size != n:
        raise OracleError(f"classification output has {flat.size} entries for {n} samples")
    labels = np.empty(n, dtype=np.int64)
    for i, item in enumerate(flat):
        text = item.decode("utf-8", "replace") if isinstance(item, (bytes, bytearray)) else str(item)
        parts = text.split(":", 2)
        try:
            if len(parts) < 2:
                raise ValueError("no index")
            value = float(parts[0])
            if not math.isfinite(value) or not _INDEX_RE.match(parts[1]):
                raise ValueError("bad value or index")
            index = int(parts[1])
        except ValueError as e:
            raise OracleError(f"malformed classification result {text[:80]!r} (expected 'value:index[:label]')") from e
        labels[i] = index
    return labels


class TritonOracle(Oracle):
    """A model served by Triton or a v2 server, asked over HTTP(S) or gRPC(S). Open it with
    `open_triton`."""

    def __init__(
        self,
        transport: _Transport,
        *,
        convention: InputConvention,
        point_shape: tuple[int, int, int],
        plan: _Plan,
        identity: dict[str, str],
        details: dict[str, Any],
        concurrency: int,
    ) -> None:
        self._transport = transport
        self._convention = convention
        self._point_shape = tuple(point_shape)
        self._plan = plan
        self._identity = identity
        self._details = details
        self._readings: set[str] = set()
        self._lock = threading.Lock()
        self._concurrency = concurrency
        self._passthrough = (  # the convention leaves float32 points unchanged (same bits)
            convention.layout == "NCHW"
            and convention.dtype == "float32"
            and convention.scale == 1.0
            and all(m == 0.0 and math.copysign(1.0, m) > 0 for m in convention.mean)
            and all(v == 1.0 for v in convention.std)
        )
        self._pool = _ClientPool(lambda: _make_client(transport), concurrency, f"triton-{transport.endpoint.model}")
        # An oracle dropped without close() still stops its worker threads.
        self._release = weakref.finalize(self, self._pool.close, transport.request_timeout_s + 1.0)
        self._closed = False
        # Per-request constants, worked out once.
        self._module = _client_module(transport.endpoint.protocol)
        self._what = f"{transport.endpoint.server} inference on {transport.endpoint.url(identity['version'])}"
        # Binary tensors are Triton's HTTP extension; a v2 server is sent JSON (gRPC is binary in both).
        self._binary = transport.endpoint.flavour == "triton" or transport.endpoint.protocol == "grpc"
        self._headers = transport.header_dict()  # copied per request: tritonclient's HTTP infer adds to it
        self._infer_kwargs: dict[str, Any] = {"model_version": identity["version"]}
        if transport.endpoint.protocol == "grpc":
            self._infer_kwargs["client_timeout"] = transport.request_timeout_s

    @property
    def info(self) -> OracleInfo:
        access = (Access.LABELS,) if self._plan.output_kind == "labels" else (Access.LABELS, Access.PROBS)
        details = dict(self._details)
        with self._lock:
            readings = sorted(self._readings)
        details["output_reading"] = None if not readings else readings[0] if len(readings) == 1 else "mixed"
        kind = self._transport.endpoint.flavour  # "triton" or "v2"
        return OracleInfo(kind=kind, identity=dict(self._identity), access=access, num_classes=self._plan.num_classes, details=details)

    def __repr__(self) -> str:
        return f"TritonOracle({self._identity['url']}, server {self._identity['server_version']})"

    # -- querying --------------------------------------------------------------------------
    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        if self._closed:
            raise OracleError("this Triton oracle is closed")
        if tuple(points.shape[1:]) != self._point_shape:
            raise InputError(f"points of shape {tuple(points.shape[1:])} do not match this oracle's {self._point_shape}")
        convention, plan = self._convention, self._plan
        if plan.image is None:
            convention.apply(points[:0])  # the convention's checks, here rather than in a worker
        mode = "labels" if plan.output_kind == "labels" else (plan.labels_via if access is Access.LABELS else "raw")
        if mode == "argmax":
            mode = "raw"
        chunk, infer = plan.chunk, self._infer
        # The identity convention on float32 points: apply() would return an equal copy, and the
        # client copies the data into the request anyway, so send slices of the points as they are.
        as_is = self._passthrough and points.dtype == np.float32 and plan.image is None
        prepare = self._images if plan.image is not None else convention.apply
        n_chunks = -(-len(points) // chunk)
        parts: list[Any] = [None] * n_chunks
        errors: dict[int, BaseException] = {}
        taken = itertools.count()  # next chunk to send (next() is atomic under the GIL)
        workers = min(self._concurrency, n_chunks)
        answered = [0] * workers  # requests answered, one counter per worker (progress for the timeout)
        stop = [False]

        # One task per worker, each sending chunks back to back in the order they are taken:
        # no hand-off through the pool between requests. Each worker converts its own chunk
        # (elementwise, so the same bits as converting all at once).
        def work(client: Any, k: int) -> None:
            while not stop[0]:
                i = next(taken)
                if i >= n_chunks:
                    return
                s = i * chunk
                try:
                    x = points[s : s + chunk]
                    parts[i] = infer(client, x if as_is else prepare(x), mode)
                except BaseException as e:  # noqa: BLE001 - raised by the caller, lowest chunk first
                    errors[i] = e
                    stop[0] = True
                    return
                answered[k] += 1

        futures = [self._pool.submit(lambda c, k=k: work(c, k)) for k in range(workers)]
        wait_s = self._transport.request_timeout_s + self._transport.connect_timeout_s + 5.0
        try:
            for k, future in enumerate(futures):
                while True:
                    before = sum(answered)
                    try:
                        future.result(timeout=wait_s)
                        break
                    except FutureTimeout as e:
                        if sum(answered) == before:  # no request answered for wait_s
                            raise TransientOracleError(
                                f"{self._transport.endpoint.server} server at {self._transport.endpoint.address} gave no answer within {wait_s:.0f} s"
                            ) from e
                    except BaseException as e:  # noqa: BLE001 - the worker's client could not be made
                        errors.setdefault(-1 - k, e)
                        stop[0] = True
                        break
        finally:
            stop[0] = True
            for future in futures:
                future.cancel()
        if errors:
            raise errors[min(errors, key=lambda i: (i < 0, abs(i)))]
        answer = np.concatenate(parts, axis=0)
        if mode in ("labels", "classification"):
            return answer.astype(np.int64)
        if access is Access.LABELS:  # argmax of the raw class vector
            if answer.ndim != 2 or answer.shape[1] == 0:
                raise OracleError(f"suspect returned outputs of shape {answer.shape}, expected one class vector per point")
            if not np.all(np.isfinite(answer)):
                raise OracleError("suspect returned NaN or infinite outputs")
            return np.argmax(answer, axis=1).astype(np.int64)
        with self._lock:
            logits_seen = "logits" in self._readings
        probs, reading = to_probabilities(answer, force_logits=logits_seen)
        with self._lock:
            if self._readings and reading not in self._readings:
                log.warning("Triton model %s: outputs read as %s after %s", self._identity["model"], reading, self._readings)
            self._readings.add(reading)
        return probs

    def _images(self, points: np.ndarray) -> np.ndarray:
        """Points -> one encoded image file each, as the BYTES elements of a request: raw bytes
        where the transport carries them (Triton's binary tensors, gRPC), base64 text in a v2 JSON
        body, tagged with the parameter content_type "base64" (JSON holds no raw bytes and the
        protocol defines no encoding for them; the tag is MLServer's, and KServe's image examples
        send base64 too). A Triton server is asked with a triton+ URL, which sends raw bytes."""
        assert self._plan.image is not None
        files = encode_images(points, self._plan.image)
        elements = files if self._binary else [base64.b64encode(f).decode("ascii") for f in files]
        array = np.empty(len(elements), dtype=object)
        array[:] = elements
        return array.reshape(len(elements), *self._plan.sample_dims)

    def _infer(self, client: Any, x: np.ndarray, mode: str) -> np.ndarray:
        """One request (runs in a worker thread): x is [n, ...] in the model's layout and dtype."""
        plan, module, what = self._plan, self._module, self._what
        n = len(x)
        data = np.ascontiguousarray(x if plan.batch_dim else x[0])

        def request() -> Any:
            inp = module.InferInput(plan.input_name, list(data.shape), plan.input_datatype)
            if self._binary:
                inp.set_data_from_numpy(data)
                out = module.InferRequestedOutput(plan.output_name, class_count=1 if mode == "classification" else 0)
            else:  # HTTP, JSON tensors (gRPC's clients take no binary_data)
                inp.set_data_from_numpy(data, binary_data=False)
                if plan.image is not None:  # base64 text, tagged as MLServer's codecs read it
                    inp._parameters["content_type"] = "base64"  # tritonclient has no public setter
                out = module.InferRequestedOutput(plan.output_name, binary_data=False)
            headers = None if self._headers is None else dict(self._headers)
            result = client.infer(self._transport.endpoint.model, [inp], outputs=[out], headers=headers, **self._infer_kwargs)
            return result.as_numpy(plan.output_name)

        raw = _call(what, request)
        if raw is None:
            raise OracleError(f"{what}: the response has no output {plan.output_name!r}")
        if mode == "classification":
            return _parse_classification(raw, n)
        array = np.asarray(raw)
        if mode == "labels":
            if array.size != n or not np.issubdtype(array.dtype, np.integer):
                raise OracleError(f"{what}: label output of shape {array.shape} and type {array.dtype} for {n} samples")
            return array.reshape(n).astype(np.int64)
        if plan.batch_dim and (array.ndim == 0 or array.shape[0] != n):
            raise OracleError(f"{what}: output of shape {array.shape} for a batch of {n}")
        if not np.issubdtype(array.dtype, np.floating):
            raise OracleError(f"{what}: output of type {array.dtype}, expected floating point")
        return array.reshape(n, -1).astype(np.float64 if array.dtype == np.float64 else np.float32)

    def close(self) -> None:
        """Stop the worker threads and close their clients; idempotent."""
        self._closed = True
        self._release()
