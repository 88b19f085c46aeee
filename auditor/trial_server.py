"""`deepcore serve-triton`: host ONNX files on a local Triton Inference Server for a trial audit.

This is a convenience for trying `deepcore audit --suspect triton+http://...` (and for the demo):
the models are written into an ordinary Triton model repository (python backend running ONNX
Runtime on CPU, see `adapters/triton/serve.py`) and served by the `tritonserver` binary that
nvidia-pytriton bundles, on 127.0.0.1 with free ports. It is not a production deployment.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from deepcore_auditor.adapters.errors import InputError, OracleError, first_line

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class ServeRequest:
    """ONNX files to serve; `names` (optional) names them on the server, one per file, in order.

    `repository` None writes the model repository to a temporary directory removed at the end;
    a given one must be new or empty, and is kept (with the server log) after the server stops.
    """

    models: tuple[Path, ...]
    names: tuple[str, ...] = ()
    repository: Path | None = None
    max_batch_size: int = 64
    startup_timeout_s: float = 120.0


@dataclass(frozen=True)
class Served:
    """A running local server: where it is and the `triton+...` URL of each model."""

    repository: Path
    log_path: Path
    pid: int | None
    urls: dict[str, dict[str, str]]  # model name -> {"http": url, "grpc": url}
    server: Any  # adapters.triton.serve.TritonServer

    def is_running(self) -> bool:
        return bool(self.server.is_running())


def unique_model_names(texts: Iterable[str]) -> list[str]:
    """Names Triton accepts (letters, digits, _ . -), one per text, made unique with -2, -3..."""
    names: list[str] = []
    for text in texts:
        base = _UNSAFE.sub("_", text) or "model"
        if not (base[0].isalnum() or base[0] == "_"):
            base = "_" + base
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def model_names(models: Sequence[Path], names: Sequence[str] = ()) -> list[str]:
    """The server-side names: the given ones (one per model, distinct) or the files' stems."""
    if not models:
        raise InputError("give at least one ONNX file to serve")
    if not names:
        return unique_model_names(Path(m).stem for m in models)
    if len(names) != len(models):
        raise InputError(f"--name given {len(names)} time(s) for {len(models)} model(s): give one per model, in order")
    if len(set(names)) != len(names):
        raise InputError("--name values must be distinct")
    return list(names)


@contextmanager
def serving(req: ServeRequest) -> Iterator[Served]:
    """Write the repository, start the server and yield it; always stop it (and clean up) after."""
    from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository

    names = model_names(req.models, req.names)
    if req.max_batch_size < 0:
        raise InputError(f"--max-batch-size must be 0 (no batching) or more, got {req.max_batch_size}")
    temp: Path | None = None
    if req.repository is None:
        temp = Path(tempfile.mkdtemp(prefix="deepcore-serve-"))
        root = temp / "repository"
    else:
        root = Path(req.repository)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise InputError(f"--repository {root} must be a new or empty directory (Triton serves all it holds)")
    try:
        write_model_repository(dict(zip(names, (Path(m) for m in req.models), strict=False)), root, max_batch_size=req.max_batch_size)
        log_path = (temp or root) / "tritonserver.log"  # Triton ignores plain files in a repository
        server = TritonServer(root, log_path=log_path, startup_timeout_s=req.startup_timeout_s)
        try:
            server.start()
        except OracleError as e:
            first = first_line(e)
            last = [ln for ln in server.log_tail(20).splitlines() if ln.strip()][-1:]
            raise OracleError(f"{first}; last server log line: {last[0] if last else '(none)'}") from e
        try:
            urls = {n: {"http": server.url(n, "http"), "grpc": server.url(n, "grpc")} for n in names}
            logger.info("serving %s from %s (pid %s)", ", ".join(names), root, server.pid)
            yield Served(repository=root, log_path=log_path, pid=server.pid, urls=urls, server=server)
        finally:
            server.stop()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


class _StopSignal(BaseException):
    """Raised by the signal handler to leave the serving loop (like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.name = signal.Signals(signum).name


def serve_until_stopped(
    req: ServeRequest,
    on_ready: Callable[[Served], None],
    stop: threading.Event | None = None,
    poll_s: float = 0.2,
) -> str:
    """Serve `req` until SIGINT/SIGTERM (in the main thread) or `stop` is set; returns why it stopped.

    The server is stopped in every case; a second signal while it stops is ignored so the
    cleanup is not cut short. Raises OracleError if the server exits on its own.
    """
    stop = stop or threading.Event()
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            raise _StopSignal(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        with serving(req) as served:
            try:
                on_ready(served)
                while not stop.wait(poll_s):
                    if not served.is_running():
                        last = [ln for ln in served.server.log_tail(20).splitlines() if ln.strip()][-1:]
                        raise OracleError(f"tritonserver exited on its own; last log line: {last[0] if last else '(none)'}")
                return "stop requested"
            finally:
                stopping.set()  # from here on, signals no longer interrupt the cleanup
    except _StopSignal as e:
        return e.name
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
