"""tritonclient clients (one per worker thread) and the translation of their failures.

The adapter never retries: failures safe to retry raise `TransientOracleError`, the others
`OracleError`; the auditor's wrapper decides (within the budget).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from deepcore_auditor.adapters.errors import InputError, OracleError, TransientOracleError
from deepcore_auditor.adapters.triton.options import _Transport

log = logging.getLogger(__name__)

_TRANSIENT_STATUSES = {
    "429",
    "502",
    "503",
    "504",
    "StatusCode.UNAVAILABLE",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.DEADLINE_EXCEEDED",
}
INSTALL_HINT = 'pip install "tritonclient[http,grpc]" "protobuf<7" (the project\'s "triton" extra)'


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
