"""Fault-injecting loopback proxies between the auditor and a real tritonserver (test infrastructure).

* `HttpFaultProxy`: an HTTP/1.1 relay (one thread per client connection, keep-alive on both
  sides) in front of Triton's HTTP port.
* `GrpcFaultProxy`: a grpc.server whose generic handler relays every unary-unary method as raw
  bytes to Triton's gRPC port.

Both take rules (`Fault`) that apply to inference requests only (HTTP `POST .../infer`, gRPC
`ModelInfer`), in the order given: let `after` requests through, then fault the next `count`
ones. Kinds: "429" (HTTP 429 with Retry-After / gRPC RESOURCE_EXHAUSTED), "503" (HTTP 503 /
gRPC UNAVAILABLE), "stall" (hold the request `stall_s` seconds, then drop it unanswered: it never
reaches the server), "drop" (close the connection without an answer / gRPC UNAVAILABLE).
When the server cannot be reached the proxies answer 502 / UNAVAILABLE, as a load balancer would.
`retarget(port)` points a proxy at another server (a restart on other ports behind a stable URL).

`Counters` says what happened to inference requests: forwarded to the server (and how many
samples they held), answered by it, and faulted by the proxy, with the time of each attempt.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

KINDS = ("429", "503", "stall", "drop", "hold")
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the relay recomputes.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host"}


@dataclass(frozen=True)
class Fault:
    """Fault `count` inference requests, after letting `after` of them through."""

    kind: str
    count: int
    after: int = 0
    retry_after_s: int = 1  # HTTP 429: the Retry-After header's value
    stall_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.count < 0 or self.after < 0:
            raise ValueError(f"bad fault {self}")


@dataclass
class Counters:
    """What the proxy did with inference requests (and the samples they held)."""

    forwarded_requests: int = 0
    forwarded_samples: int = 0
    answered_requests: int = 0  # forwarded and answered with success by the server
    answered_samples: int = 0
    faulted_requests: int = 0
    faulted_samples: int = 0
    attempts: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, "ok" | fault kind | "error")


class _Rules:
    """The fault rules and the counters, shared by the proxy's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[list[Any]] = []  # [fault, let through still, fault still]
        self._counters = Counters()

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._rules.append([fault, fault.after, fault.count])

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def pending(self) -> int:
        """Faults not yet applied."""
        with self._lock:
            return sum(r[2] for r in self._rules)

    def take(self) -> Fault | None:
        """The fault for the next inference request, or None to forward it."""
        with self._lock:
            while self._rules and self._rules[0][2] == 0:
                self._rules.pop(0)
            if not self._rules:
                return None
            rule = self._rules[0]
            if rule[1] > 0:
                rule[1] -= 1
                return None
            rule[2] -= 1
            return rule[0]

    def note(self, what: str, samples: int, *, forwarded: bool, ok: bool = False) -> None:
        with self._lock:
            c = self._counters
            c.attempts.append((time.monotonic(), what))
            if forwarded:
                c.forwarded_requests += 1
                c.forwarded_samples += samples
                if ok:
                    c.answered_requests += 1
                    c.answered_samples += samples
            else:
                c.faulted_requests += 1
                c.faulted_samples += samples

    def snapshot(self) -> Counters:
        with self._lock:
            c = self._counters
            return Counters(c.forwarded_requests, c.forwarded_samples, c.answered_requests, c.answered_samples,
                            c.faulted_requests, c.faulted_samples, list(c.attempts))


class _FaultProxy:
    """What both proxies share: rules, counters, the upstream port, closing."""

    def __init__(self, upstream_port: int) -> None:
        self._rules = _Rules()
        self._upstream_port = upstream_port
        self._closing = threading.Event()  # wakes stalled requests on close
        self._released = threading.Event()
        self.held = threading.Event()  # set once a "hold" request waits for release()
        # Seconds added to every request (metadata ones too) before it is relayed: a distant
        # server's round trip, for benchmarks of many audits (benchmarks/mass_audit.py).
        self.latency_s = 0.0

    @property
    def upstream_port(self) -> int:
        return self._upstream_port

    def add(self, *faults: Fault) -> None:
        for f in faults:
            self._rules.add(f)

    def clear_faults(self) -> None:
        self._rules.clear()

    def pending_faults(self) -> int:
        return self._rules.pending()

    @property
    def counters(self) -> Counters:
        return self._rules.snapshot()

    def retarget(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port

    def release(self) -> None:
        """Let held requests (and any later "hold" ones) go on to the server."""
        self._released.set()

    def _take(self) -> Fault | None:
        """The fault for this inference request; a "hold" waits here and then forwards."""
        fault = self._rules.take()
        if fault is not None and fault.kind == "hold":
            self.held.set()
            while not (self._released.wait(0.1) or self._closing.is_set()):
                pass
            return None
        return fault


# ---------------------------------------------------------------------------------------------
# HTTP


def _http_samples(headers: Any, body: bytes) -> int:
    """Batch size of a Triton HTTP inference request (JSON, or JSON + binary tensors)."""
    size = headers.get("Inference-Header-Content-Length")
    try:
        request = json.loads(body[: int(size)] if size else body)
        return int(request["inputs"][0]["shape"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return 0


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says otherwise
    server: _HttpServer
    _upstream: http.client.HTTPConnection | None = None
    _upstream_port = 0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._relay()

    def do_POST(self) -> None:  # noqa: N802
        self._relay()

    def _relay(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if proxy.latency_s:
            proxy._closing.wait(proxy.latency_s)
        infer = self.command == "POST" and self.path.split("?")[0].rstrip("/").endswith("/infer")
        samples = _http_samples(self.headers, body) if infer else 0
        fault = proxy._take() if infer else None
        if fault is not None:
            proxy._rules.note(fault.kind, samples, forwarded=False)
            if fault.kind == "429":
                self._reply(429, b'{"error":"rate limit exceeded"}', {"Retry-After": str(fault.retry_after_s)})
            elif fault.kind == "503":
                self._reply(503, b'{"error":"service unavailable"}')
            else:
                if fault.kind == "stall":
                    proxy._closing.wait(fault.stall_s)
                self._drop()
            return
        try:
            status, reason, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException) as e:  # the server is gone: a 502, as a balancer says
            self._close_upstream()
            if infer:
                proxy._rules.note("error", samples, forwarded=True)
            self._reply(502, json.dumps({"error": f"upstream: {type(e).__name__}"}).encode())
            return
        if infer:
            proxy._rules.note("ok" if status == 200 else "error", samples, forwarded=True, ok=status == 200)
        self._reply(status, data, headers, reason)

    def _forward(self, body: bytes) -> tuple[int, str, dict[str, str], bytes]:
        port = self.server.proxy.upstream_port
        if self._upstream is None or self._upstream_port != port:
            self._close_upstream()
            self._upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            self._upstream_port = port
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Host"] = f"127.0.0.1:{port}"
        self._upstream.request(self.command, self.path, body=body, headers=headers)
        response = self._upstream.getresponse()
        data = response.read()
        if response.will_close:
            self._close_upstream()
        kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP}
        return response.status, response.reason, kept, data

    def _reply(self, status: int, data: bytes, headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        self.send_response(status, reason)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status >= 400 and not any(k.lower() == "content-type" for k in headers or {}):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _drop(self) -> None:
        """Close the client's connection with no answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def finish(self) -> None:
        self._close_upstream()
        try:
            super().finish()
        except OSError:
            pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: HttpFaultProxy


class HttpFaultProxy(_FaultProxy):
    """An HTTP/1.1 relay on 127.0.0.1 in front of Triton's HTTP port. Use as a context manager."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._server = _HttpServer(("127.0.0.1", 0), _HttpHandler)
        self._server.proxy = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="http-fault-proxy", daemon=True)
        self._thread.start()

    def url(self, model: str) -> str:
        return f"triton+http://127.0.0.1:{self.port}/{model}"

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HttpFaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# gRPC

_INFER = "/inference.GRPCInferenceService/ModelInfer"
_FORWARDED_METADATA_SKIP = {"user-agent", "grpc-timeout", "grpc-accept-encoding", "grpc-encoding"}
_MESSAGE_LIMITS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _grpc_samples(request: bytes) -> int:
    from tritonclient.grpc import service_pb2

    try:
        message = service_pb2.ModelInferRequest.FromString(request)
        return int(message.inputs[0].shape[0])
    except Exception:  # noqa: BLE001 - a malformed request is forwarded as it is
        return 0


class _GrpcRelay(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcFaultProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._relay(method, request, context))

    def _relay(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        proxy = self.proxy
        if proxy.latency_s:
            proxy._closing.wait(proxy.latency_s)
        infer = method == _INFER
        samples = _grpc_samples(request) if infer else 0
        fault = proxy._take() if infer else None
        if fault is not None:
            proxy._rules.note(fault.kind, samples, forwarded=False)
            if fault.kind == "stall":
                proxy._closing.wait(fault.stall_s)
            if fault.kind == "429":
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded")
            context.abort(grpc.StatusCode.UNAVAILABLE, "service unavailable" if fault.kind == "503" else "connection dropped")
        metadata = [(k, v) for k, v in context.invocation_metadata() if k not in _FORWARDED_METADATA_SKIP]
        remaining = context.time_remaining()
        try:
            answer = proxy._channel().unary_unary(method)(request, metadata=metadata, timeout=remaining)
        except grpc.RpcError as e:
            if infer:
                proxy._rules.note("error", samples, forwarded=True)
            code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNAVAILABLE
            context.abort(code, (e.details() if isinstance(e, grpc.Call) else None) or "upstream failed")
        if infer:
            proxy._rules.note("ok", samples, forwarded=True, ok=True)
        return answer


class GrpcFaultProxy(_FaultProxy):
    """A gRPC relay on 127.0.0.1 in front of Triton's gRPC port. Use as a context manager."""

    def __init__(self, upstream_port: int, max_workers: int = 64) -> None:
        super().__init__(upstream_port)
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), handlers=[_GrpcRelay(self)], options=_MESSAGE_LIMITS)
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _channel(self) -> grpc.Channel:
        port = self.upstream_port
        with self._lock:
            if port not in self._channels:
                self._channels[port] = grpc.insecure_channel(f"127.0.0.1:{port}", options=_MESSAGE_LIMITS)
            return self._channels[port]

    def url(self, model: str) -> str:
        return f"triton+grpc://127.0.0.1:{self.port}/{model}"

    def close(self) -> None:
        self._closing.set()
        self._server.stop(grace=None).wait(5)
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def __enter__(self) -> GrpcFaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def proxy_for(protocol: str, server: Any) -> Iterator[HttpFaultProxy | GrpcFaultProxy]:
    """A proxy for `protocol` ("http" or "grpc") in front of a running TritonServer, closed on exit."""
    proxy: HttpFaultProxy | GrpcFaultProxy = HttpFaultProxy(server.http_port) if protocol == "http" else GrpcFaultProxy(server.grpc_port)
    try:
        yield proxy
    finally:
        proxy.close()


def ledger_answers(ledger: Path) -> list[tuple[str, bool]]:
    """(digest, repeat) of every complete answer line of a ledger, in order (other lines skipped)."""
    lines = Path(ledger).read_text().split("\n")[1:-1]
    return [(rec["digest"], bool(rec.get("repeat"))) for rec in map(json.loads, lines) if "digest" in rec]


def served_samples(server: Any, model: str = "") -> int:
    """Samples the server has answered, for `model` or all models (Triton's statistics extension)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_address)
    try:
        stats = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return sum(int(s.get("inference_count", 0)) for s in stats)
