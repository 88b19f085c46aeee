"""Suspects served by a Triton Inference Server, over HTTP(S) or gRPC(S) with tritonclient.

URL: ``triton+http://HOST[:PORT]/MODEL[/VERSION]`` (also ``triton+https``, ``triton+grpc``,
``triton+grpcs``). The port defaults to Triton's 8000 (HTTP) / 8001 (gRPC), or 443 with TLS.
Credentials are not accepted in the URL: pass a bearer token through `auth_token_env`.

Everything the audit depends on is checked when the oracle is opened, before any query: the
server is live, the model (version) is ready, it has one input whose shape fits the points under
the convention's layout and whose type (FP32, FP16, UINT8) sets the convention's dtype, and its
output is a class vector of the expected length (PROBS and LABELS) or an integer label tensor
(LABELS only).

LABELS from a class-vector output: with ``labels_via="auto"`` (the default) or
``"classification"`` the oracle asks Triton's classification extension for the top-1 class
(``InferRequestedOutput(name, class_count=1)``), so only the label crosses the wire, as on a
label-only deployment; ``"argmax"`` takes the argmax of the raw output instead. The two agree
except on exact ties (Triton's order between equal values is unspecified; argmax takes the first).
"auto" falls back to argmax when the server does not list the classification extension or the
output is FP16 (which Triton 2.51 cannot classify).

The adapter never retries: failures safe to retry (timeouts, HTTP 429/502/503/504, gRPC
UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, connection refused, reset or closed
without an answer while querying) raise `TransientOracleError`, and the auditor's wrapper
decides (within the budget).

Concurrency: up to `concurrency` requests are in flight at once, each worker thread owning its
own client (tritonclient's HTTP client is not thread-safe); answers are reassembled in order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access, InputConvention, Oracle, OracleInfo, to_probabilities
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError, TransientOracleError

log = logging.getLogger(__name__)

_SCHEMES = {
    "triton+http": ("http", False),
    "triton+https": ("http", True),
    "triton+grpc": ("grpc", False),
    "triton+grpcs": ("grpc", True),
}
_DEFAULT_PORTS = {("http", False): 8000, ("grpc", False): 8001, ("http", True): 443, ("grpc", True): 443}
_INPUT_DTYPES = {"FP32": "float32", "FP16": "float16", "UINT8": "uint8"}
_FLOAT_OUTPUTS = {"FP32", "FP16", "FP64"}
_CLASSIFIABLE = {"FP32", "FP64"}
_INT_OUTPUTS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_TRANSIENT_STATUSES = {
    "429",
    "502",
    "503",
    "504",
    "StatusCode.UNAVAILABLE",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.DEADLINE_EXCEEDED",
}
_LABELS_VIA = ("auto", "classification", "argmax")
_INDEX_RE = re.compile(r"^[0-9]+$")
_OPTIONS = {
    "concurrency",
    "labels_via",
    "output",
    "batch_size",
    "headers",
    "auth_token_env",
    "ssl",
    "ssl_root_certificates",
    "ssl_insecure",
    "connect_timeout_s",
    "request_timeout_s",
}
INSTALL_HINT = 'pip install "tritonclient[http,grpc]" "protobuf<7" (the project\'s "triton" extra)'


# ---------------------------------------------------------------------------------------------
# URL and options


@dataclass(frozen=True)
class TritonEndpoint:
    """A parsed ``triton+...://HOST:PORT/MODEL[/VERSION]`` URL (never holds credentials)."""

    scheme: str
    protocol: str  # "http" or "grpc"
    tls: bool
    host: str
    port: int
    model: str
    version: str  # "" = the server's choice (its latest ready version)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, version: str | None = None) -> str:
        v = self.version if version is None else version
        model = urllib.parse.quote(self.model, safe="")
        return f"{self.scheme}://{self.address}/{model}" + (f"/{v}" if v else "")


def parse_triton_url(url: str) -> TritonEndpoint:
    """Parse and validate a Triton URL; InputError when it is malformed."""
    if not isinstance(url, str):
        raise InputError(f"a Triton URL must be a string, got {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InputError(f"malformed Triton URL {_redact_url(url)!r}: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InputError(f"unsupported Triton URL scheme {scheme!r}: use one of {', '.join(sorted(_SCHEMES))}")
    if parts.username is not None or parts.password is not None:
        raise InputError("credentials are not accepted in a Triton URL: pass a bearer token with auth_token_env")
    if parts.query or parts.fragment:
        raise InputError(f"a Triton URL takes no query or fragment: {_redact_url(url)!r}")
    if not parts.hostname:
        raise InputError(f"Triton URL {url!r} has no host")
    protocol, tls = _SCHEMES[scheme]
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()
    if not 1 <= len(segments) <= 2 or not segments[0]:
        raise InputError(f"Triton URL {url!r} must name a model: {scheme}://HOST:PORT/MODEL[/VERSION]")
    model = segments[0]
    if any(c in model for c in "/\\") or model in (".", "..") or not model.isprintable():
        raise InputError(f"Triton model name {model!r} is not valid")
    version = segments[1] if len(segments) == 2 else ""
    if version and not (version.isdigit() and int(version) > 0):
        raise InputError(f"Triton model version must be a positive integer, got {version!r}")
    return TritonEndpoint(
        scheme=scheme,
        protocol=protocol,
        tls=tls,
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[(protocol, tls)],
        model=model,
        version=str(int(version)) if version else "",
    )


def _redact_url(url: str) -> str:
    """The URL with any userinfo removed, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True, repr=False)
class _Transport:
    """How to reach the server. Header values (tokens) never appear in repr()."""

    endpoint: TritonEndpoint
    headers: tuple[tuple[str, str], ...]
    root_certificates: str | None
    insecure: bool
    connect_timeout_s: float
    request_timeout_s: float

    def __repr__(self) -> str:
        names = ", ".join(k for k, _ in self.headers)
        return f"_Transport({self.endpoint.url()}, headers=[{names}] (values redacted))"

    def header_dict(self) -> dict[str, str] | None:
        if not self.headers:
            return None
        if self.endpoint.protocol == "grpc":  # gRPC metadata keys must be lower case
            return {k.lower(): v for k, v in self.headers}
        return dict(self.headers)


def _positive(options: Mapping[str, Any], name: str, default: float | None, kind: type = float) -> Any:
    value = options.get(name)
    if value is None:
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"option {name} must be a positive number, got {value!r}") from e
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0 or (kind is int and number != value):
        raise InputError(f"option {name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return number


def _transport(endpoint: TritonEndpoint, options: Mapping[str, Any]) -> _Transport:
    headers: dict[str, str] = {}
    raw_headers = options.get("headers") or {}
    if not isinstance(raw_headers, Mapping):
        raise InputError("option headers must be a mapping of header names to values")
    for k, v in raw_headers.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or any(c in k + v for c in "\r\n"):
            raise InputError(f"option headers: header {k!r} must be a non-empty name with a one-line string value")
        headers[k] = v
    token_env = options.get("auth_token_env")
    if token_env is not None:
        if not isinstance(token_env, str) or not token_env:
            raise InputError("option auth_token_env must name an environment variable")
        if any(k.lower() == "authorization" for k in headers):
            raise InputError("give the Authorization header either in headers or through auth_token_env, not both")
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise InputError(f"environment variable {token_env} (auth_token_env) is not set or empty")
        if any(c in token for c in "\r\n"):
            raise InputError(f"environment variable {token_env} holds a token with a line break")
        headers["Authorization"] = f"Bearer {token}"

    ssl = options.get("ssl")
    if ssl is not None and not isinstance(ssl, bool):
        raise InputError(f"option ssl must be true or false, got {ssl!r}")
    if ssl is False and endpoint.tls:
        raise InputError(f"option ssl=False contradicts the {endpoint.scheme} scheme")
    if ssl and not endpoint.tls:
        endpoint = TritonEndpoint(
            endpoint.scheme + "s", endpoint.protocol, True, endpoint.host, endpoint.port, endpoint.model, endpoint.version
        )
    roots = options.get("ssl_root_certificates")
    insecure = options.get("ssl_insecure", False)
    if not isinstance(insecure, bool):
        raise InputError(f"option ssl_insecure must be true or false, got {insecure!r}")
    if (roots is not None or insecure) and not endpoint.tls:
        raise InputError("ssl_root_certificates / ssl_insecure need TLS: use triton+https or triton+grpcs")
    if roots is not None:
        roots = str(roots)
        if not Path(roots).is_file():
            raise InputError(f"ssl_root_certificates file {roots} not found")
    if insecure and endpoint.protocol == "grpc":
        raise InputError("gRPC cannot skip certificate verification: pass ssl_root_certificates instead of ssl_insecure")
    return _Transport(
        endpoint=endpoint,
        headers=tuple(headers.items()),
        root_certificates=roots,
        insecure=insecure,
        connect_timeout_s=_positive(options, "connect_timeout_s", 10.0),
        request_timeout_s=_positive(options, "request_timeout_s", 60.0),
    )


# ---------------------------------------------------------------------------------------------
# Clients and error translation


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as e:
        raise InputError(f"Triton {protocol} access needs tritonclient: {INSTALL_HINT}") from e
    return module


def _make_client(t: _Transport) -> Any:
    """A new tritonclient client for `t` (one per thread: the HTTP client is not thread-safe)."""
    module = _client_module(t.endpoint.protocol)
    if t.endpoint.protocol == "http":
        kwargs: dict[str, Any] = {
            "connection_timeout": t.connect_timeout_s,
            "network_timeout": t.request_timeout_s,
        }
        if t.endpoint.tls:
            kwargs["ssl"] = True
            kwargs["ssl_options"] = {"ca_certs": t.root_certificates} if t.root_certificates else {}
            if t.insecure:
                import ssl as ssl_module

                kwargs["ssl_context_factory"] = lambda cafile=None: ssl_module._create_unverified_context()
                kwargs["insecure"] = True
        return module.InferenceServerClient(url=t.endpoint.address, **kwargs)
    return module.InferenceServerClient(url=t.endpoint.address, ssl=t.endpoint.tls, root_certificates=t.root_certificates)


def _is_timeout(e: BaseException) -> bool:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return True
    try:
        import gevent
    except ImportError:  # pragma: no cover - gevent comes with tritonclient[http]
        return False
    return isinstance(e, gevent.Timeout)


def _translate(e: BaseException, what: str) -> OracleError:
    """One client-side failure -> TransientOracleError (safe to retry) or OracleError."""
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        status = str(e.status() or "")
        message = f"{what}: {e.message()}" + (f" [{status}]" if status else "")
        if "is restricted" in (e.message() or ""):  # Triton's restricted API (gRPC says UNAVAILABLE)
            return OracleError(message + " (check auth_token_env / headers)")
        if status in _TRANSIENT_STATUSES:
            return TransientOracleError(message)
        return OracleError(message)
    if _is_timeout(e):
        return TransientOracleError(f"{what}: timed out ({type(e).__name__}: {e})")
    if isinstance(e, (ConnectionError, EOFError)) or _closed_without_answer(e):  # refused, reset, closed, broken pipe
        return TransientOracleError(f"{what}: connection failed ({type(e).__name__}: {e})")
    if isinstance(e, OSError):
        return OracleError(f"{what}: {type(e).__name__}: {e}")
    return OracleError(f"{what}: unexpected {type(e).__name__}: {e}")


def _closed_without_answer(e: BaseException) -> bool:
    """The HTTP server (or a proxy before it) closed the connection before answering: what
    geventhttpclient raises when a load balancer drops a request or a server dies mid-request."""
    try:
        from geventhttpclient.response import HTTPConnectionClosed
    except ImportError:  # pragma: no cover - geventhttpclient comes with tritonclient[http]
        return False
    return isinstance(e, HTTPConnectionClosed)


def _call(what: str, fn: Callable[[], Any]) -> Any:
    """Run one client call; translate whatever it raises (gevent's Timeout is a BaseException)."""
    try:
        return fn()
    except (Exception, _gevent_timeout()) as e:
        raise _translate(e, what) from e


def _gevent_timeout() -> type[BaseException]:
    try:
        import gevent
    except ImportError:  # pragma: no cover
        return Exception
    return gevent.Timeout


class _ClientPool:
    """`size` worker threads, each owning one client made (and closed) in that thread."""

    def __init__(self, factory: Callable[[], Any], size: int, name: str) -> None:
        self._factory = factory
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[[Any], Any]] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)
        ]
        self._closed = False
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        client = None
        try:
            while True:
                task = self._tasks.get()
                if task is None:
                    return
                future, fn = task
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    if client is None:
                        client = self._factory()
                    future.set_result(fn(client))
                except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                    future.set_exception(e)
        finally:
            if client is not None:
                try:
                    client.close()
                except Exception as e:  # noqa: BLE001 - closing must not raise
                    log.debug("closing a Triton client failed: %s", e)

    def submit(self, fn: Callable[[Any], Any]) -> Future[Any]:
        if self._closed:
            raise OracleError("this Triton oracle is closed")
        future: Future[Any] = Future()
        self._tasks.put((future, fn))
        return future

    def close(self, timeout_s: float) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                log.warning("Triton worker %s still busy after %.0f s; leaving it to finish", thread.name, timeout_s)


# ---------------------------------------------------------------------------------------------
# Model description


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


# ---------------------------------------------------------------------------------------------
# The oracle


class TritonOracle(Oracle):
    """A model served by Triton, asked over HTTP(S) or gRPC(S). Open it with `open_triton`."""

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
        self._what = f"Triton inference on {transport.endpoint.url(identity['version'])}"
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
        return OracleInfo(kind="triton", identity=dict(self._identity), access=access, num_classes=self._plan.num_classes, details=details)

    def __repr__(self) -> str:
        return f"TritonOracle({self._identity['url']}, server {self._identity['server_version']})"

    # -- querying --------------------------------------------------------------------------
    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        if self._closed:
            raise OracleError("this Triton oracle is closed")
        if tuple(points.shape[1:]) != self._point_shape:
            raise InputError(f"points of shape {tuple(points.shape[1:])} do not match this oracle's {self._point_shape}")
        convention, plan = self._convention, self._plan
        convention.apply(points[:0])  # the convention's checks, here rather than in a worker
        mode = "labels" if plan.output_kind == "labels" else (plan.labels_via if access is Access.LABELS else "raw")
        if mode == "argmax":
            mode = "raw"
        chunk, infer = plan.chunk, self._infer
        # The identity convention on float32 points: apply() would return an equal copy, and the
        # client copies the data into the request anyway, so send slices of the points as they are.
        as_is = self._passthrough and points.dtype == np.float32
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
                    parts[i] = infer(client, x if as_is else convention.apply(x), mode)
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
                                f"Triton at {self._transport.endpoint.address} gave no answer within {wait_s:.0f} s"
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

    def _infer(self, client: Any, x: np.ndarray, mode: str) -> np.ndarray:
        """One request (runs in a worker thread): x is [n, ...] in the model's layout and dtype."""
        plan, module, what = self._plan, self._module, self._what
        n = len(x)
        data = np.ascontiguousarray(x if plan.batch_dim else x[0])

        def request() -> Any:
            inp = module.InferInput(plan.input_name, list(data.shape), plan.input_datatype)
            inp.set_data_from_numpy(data)
            out = module.InferRequestedOutput(plan.output_name, class_count=1 if mode == "classification" else 0)
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


# ---------------------------------------------------------------------------------------------
# Opening


def open_triton(
    url: str,
    *,
    convention: InputConvention,
    point_shape: tuple[int, int, int],
    num_classes: int | None,
    **options: Any,
) -> Oracle:
    """Open a Triton-served suspect and check it can answer points of `point_shape`.

    Options: concurrency (4), labels_via ("auto" | "classification" | "argmax"), output (name of
    the output tensor when the model has several), batch_size (samples per request; default the
    model's max_batch_size), headers (dict), auth_token_env (env var holding a bearer token),
    ssl (bool), ssl_root_certificates (PEM path), ssl_insecure (HTTPS only: skip verification),
    connect_timeout_s (10), request_timeout_s (60).
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
    transport = _transport(endpoint, options)
    endpoint = transport.endpoint

    client = _make_client(transport)
    try:
        probe = _Probe(client, transport)
        server_version, extensions = probe.server()
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
        classification_available="classification" in extensions,
    )
    identity = {
        "url": endpoint.url(),
        "server_version": server_version,
        "model": endpoint.model,
        "version": version,
        "config_sha256": hashlib.sha256(_canonical_config(config).encode()).hexdigest(),
    }
    details.update(
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
        "opened Triton model %s version %s at %s (server %s): %s, %d per request",
        endpoint.model, version, endpoint.address, server_version, plan.output_kind, plan.chunk,
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
        self.where = f"Triton server at {transport.endpoint.address}"

    def _kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"headers": self.t.header_dict()}
        if self.grpc:
            kw["client_timeout"] = self.t.connect_timeout_s
        return kw

    def server(self) -> tuple[str, list[str]]:
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
        return str(meta.get("version", "unknown")), [str(e) for e in meta.get("extensions", [])]

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
            config = self.client.get_model_config(ep.model, ep.version, **kw)
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
            version = str(max(versions)) if versions else ""
        return version, metadata, config


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
) -> tuple[_Plan, InputConvention, dict[str, Any]]:
    """Check the model's input and output against the audit and decide how to ask it."""
    model = f"Triton model {endpoint.model!r} version {version or '?'}"
    inputs = list(metadata.get("inputs", []))
    outputs = list(metadata.get("outputs", []))
    if len(inputs) != 1:
        names = ", ".join(str(i.get("name")) for i in inputs)
        raise IncompatibleSuspect(f"{model} takes {len(inputs)} inputs ({names}); an image classifier takes one")
    inp = inputs[0]
    max_batch_size = int(config.get("max_batch_size", 0) or 0)
    in_shape = _shape(inp.get("shape", []))
    in_dtype = str(inp.get("datatype"))

    # Batch axis: Triton adds it when max_batch_size > 0; a non-batching model may still carry it.
    if max_batch_size > 0:  # Triton batching: up to max_batch_size samples per request
        batch_dim, sample_dims, chunk = True, in_shape[1:], min(max_batch_size, batch_size or max_batch_size)
    elif len(in_shape) == 4 and in_shape[0] == -1:  # no Triton batching, but the model takes a batch
        batch_dim, sample_dims, chunk = True, in_shape[1:], batch_size or 64
    elif len(in_shape) == 4 and in_shape[0] == 1:  # a fixed batch of one
        batch_dim, sample_dims, chunk = True, in_shape[1:], 1
    else:  # no batching: one sample per request, no batch axis
        batch_dim, sample_dims, chunk = False, in_shape, 1

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
            raise IncompatibleSuspect(f"Triton at {endpoint.address} {why}: use labels_via='argmax'")
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
    )
    details: dict[str, Any] = {
        "input": {"name": plan.input_name, "datatype": in_dtype, "shape": list(in_shape)},
        "output": {"name": plan.output_name, "datatype": out_dtype, "shape": list(_shape(out.get("shape", [])))},
        "output_kind": kind,
        "max_batch_size": max_batch_size,
        "samples_per_request": chunk,
        "labels_via": via,
    }
    return plan, convention, details
