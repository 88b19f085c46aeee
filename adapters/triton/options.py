"""The server URL and the options of `open_triton`.

Two flavours of URL name a model on an inference server:
- ``triton+http://HOST[:PORT]/MODEL[/VERSION]`` (and ``+https``, ``+grpc``, ``+grpcs``): a Triton
  Inference Server, with everything Triton adds to the protocol (the model-config call, binary
  tensors over HTTP, the classification extension). Default ports 8000 (HTTP) and 8001 (gRPC).
- ``v2+http://HOST[:PORT]/MODEL[/VERSION]`` (and ``+https``, ``+grpc``, ``+grpcs``): any server
  of the Open Inference Protocol (KServe v2: KServe, Seldon MLServer, Triton, ...), asked with
  the protocol's core alone: shapes and types from the model metadata, JSON tensors over HTTP
  (raw tensor contents over gRPC, which the protocol defines), labels as the argmax of the class
  vector. Default ports 8080 (HTTP) and 8081 (gRPC), the ones KServe and MLServer listen on.
With TLS the port defaults to 443.

Credentials are not accepted in the URL: a bearer token comes through `auth_token_env`, and
header values never appear in a repr().
"""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.errors import InputError

FLAVOURS = ("triton", "v2")
_SCHEMES = {  # scheme -> (flavour, protocol, TLS)
    f"{flavour}+{protocol}{'s' if tls else ''}": (flavour, protocol, tls)
    for flavour in FLAVOURS
    for protocol in ("http", "grpc")
    for tls in (False, True)
}
_DEFAULT_PORTS = {
    ("triton", "http"): 8000,
    ("triton", "grpc"): 8001,
    ("v2", "http"): 8080,  # KServe's and MLServer's
    ("v2", "grpc"): 8081,
}
_LABELS_VIA = ("auto", "classification", "argmax")
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
    "image_format",
}


@dataclass(frozen=True)
class TritonEndpoint:
    """A parsed ``triton+...://`` or ``v2+...://HOST:PORT/MODEL[/VERSION]`` URL (never holds
    credentials)."""

    scheme: str
    protocol: str  # "http" or "grpc"
    tls: bool
    host: str
    port: int
    model: str
    version: str  # "" = the server's choice (its latest ready version)
    flavour: str = "triton"  # "triton" or "v2" (the Open Inference Protocol's core only)

    @property
    def server(self) -> str:
        """What the server is called in messages."""
        return "Triton" if self.flavour == "triton" else "v2"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, version: str | None = None) -> str:
        v = self.version if version is None else version
        model = urllib.parse.quote(self.model, safe="")
        return f"{self.scheme}://{self.address}/{model}" + (f"/{v}" if v else "")


def parse_triton_url(url: str) -> TritonEndpoint:
    """Parse and validate a Triton or v2 server URL; InputError when it is malformed."""
    if not isinstance(url, str):
        raise InputError(f"a server URL must be a string, got {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InputError(f"malformed server URL {_redact_url(url)!r}: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InputError(f"unsupported server URL scheme {scheme!r}: use one of {', '.join(sorted(_SCHEMES))}")
    if parts.username is not None or parts.password is not None:
        raise InputError("credentials are not accepted in a server URL: pass a bearer token with auth_token_env")
    if parts.query or parts.fragment:
        raise InputError(f"a server URL takes no query or fragment: {_redact_url(url)!r}")
    if not parts.hostname:
        raise InputError(f"server URL {url!r} has no host")
    flavour, protocol, tls = _SCHEMES[scheme]
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()
    if not 1 <= len(segments) <= 2 or not segments[0]:
        raise InputError(f"server URL {url!r} must name a model: {scheme}://HOST:PORT/MODEL[/VERSION]")
    model = segments[0]
    if any(c in model for c in "/\\") or model in (".", "..") or not model.isprintable():
        raise InputError(f"model name {model!r} is not valid")
    version = segments[1] if len(segments) == 2 else ""
    if flavour == "triton" and version and not (version.isdigit() and int(version) > 0):
        raise InputError(f"Triton model version must be a positive integer, got {version!r}")
    if version and (version in (".", "..") or not version.isprintable() or any(c in version for c in "/\\")):
        raise InputError(f"model version {version!r} is not valid")  # the protocol's versions are strings
    return TritonEndpoint(
        scheme=scheme,
        protocol=protocol,
        tls=tls,
        host=parts.hostname,
        port=port if port is not None else 443 if tls else _DEFAULT_PORTS[(flavour, protocol)],
        model=model,
        version=str(int(version)) if version and flavour == "triton" else version,
        flavour=flavour,
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
        endpoint = dataclasses.replace(endpoint, scheme=endpoint.scheme + "s", tls=True)
    roots = options.get("ssl_root_certificates")
    insecure = options.get("ssl_insecure", False)
    if not isinstance(insecure, bool):
        raise InputError(f"option ssl_insecure must be true or false, got {insecure!r}")
    if (roots is not None or insecure) and not endpoint.tls:
        raise InputError(f"ssl_root_certificates / ssl_insecure need TLS: use {endpoint.flavour}+https or {endpoint.flavour}+grpcs")
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
