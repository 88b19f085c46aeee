"""Host ONNX models on a local, real Triton Inference Server (for trials, tests and benchmarks).

Two tools:

* `write_model_repository` turns ONNX files into an ordinary Triton model repository: per model a
  `config.pbtxt` (python backend; inputs and outputs read from the ONNX graph) and a
  `<version>/model.py` (this package's `backend.py`) that runs the ONNX file (copied beside it)
  with ONNX Runtime on CPU.
* `TritonServer` runs the `tritonserver` binary bundled in `nvidia-pytriton==0.7.0` on 127.0.0.1
  with free ports, waits until it is ready, and always cleans up after it.

This relies on PyTriton's internal file layout (binary, python backend, python-backend stubs,
`nvidia_pytriton.libs`), so the version is pinned. See shared/notes/triton-on-cpu.md for the
measured facts behind the environment fixes below.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepcore_auditor.adapters.errors import InputError, OracleError

log = logging.getLogger(__name__)

PYTRITON_VERSION = "0.7.0"
INSTALL_HINT = f'pip install "nvidia-pytriton=={PYTRITON_VERSION}" "numpy<2" (or the project\'s "test" extra)'

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# ONNX TensorProto element types -> Triton config data types.
_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
}

# The python-backend model every repository entry runs; its behaviour comes from config parameters.
# It is a real module beside this one (backend.py, linted like the rest), copied as `model.py`.
MODEL_PY = Path(__file__).with_name("backend.py").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ServedModel:
    """One model of a repository written by `write_model_repository`.

    `max_batch_size` None takes the repository default (0: no batching, one sample per request,
    dims without the batch axis). `delay_s` makes every request sleep (timeout tests).
    `labels_output` serves the argmax of the first output as an INT64 label tensor instead of
    the raw output (a label-only endpoint). `versions` lists the version folders to write; the
    config serves all of them. `record_parameters` names a file the model appends every
    request's parameters to (JSON lines; headers forwarded by the server's
    --http/grpc-header-forward-pattern show up there).
    """

    onnx: Path
    max_batch_size: int | None = None
    delay_s: float = 0.0
    labels_output: bool = False
    versions: tuple[int, ...] = (1,)
    instance_count: int = 1
    ort_threads: int = 1
    record_parameters: Path | None = None


@dataclass(frozen=True)
class _Tensor:
    name: str
    data_type: str
    dims: tuple[int, ...]


def _onnx_tensors(path: Path) -> tuple[list[_Tensor], list[_Tensor]]:
    """Inputs and outputs of an ONNX file, as Triton tensors with the (leading) batch axis removed."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is a core dependency
        raise InputError("reading ONNX files needs the onnx package: pip install onnx") from e
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ...
        raise InputError(f"cannot read ONNX model {path}: {e}") from e
    initializers = {t.name for t in model.graph.initializer}

    def convert(values: Sequence[object], what: str) -> list[_Tensor]:
        tensors = []
        for v in values:
            if v.name in initializers:  # type: ignore[attr-defined]
                continue
            ttype = v.type.tensor_type  # type: ignore[attr-defined]
            if ttype.elem_type not in _ONNX_TO_TRITON:
                raise InputError(f"{path}: {what} {v.name!r} has an ONNX element type {ttype.elem_type} Triton cannot serve here")  # type: ignore[attr-defined]
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in ttype.shape.dim]
            if not dims:
                raise InputError(f"{path}: {what} {v.name!r} has no batch axis")  # type: ignore[attr-defined]
            if dims[0] not in (-1, 1):
                raise InputError(f"{path}: {what} {v.name!r} has a fixed batch axis of {dims[0]}; export with a dynamic batch")  # type: ignore[attr-defined]
            tensors.append(_Tensor(v.name, _ONNX_TO_TRITON[ttype.elem_type], tuple(dims[1:])))  # type: ignore[attr-defined]
        return tensors

    inputs, outputs = convert(model.graph.input, "input"), convert(model.graph.output, "output")
    if not inputs or not outputs:
        raise InputError(f"{path}: the ONNX graph needs at least one input and one output")
    return inputs, outputs


def _tensor_block(tensors: Sequence[_Tensor]) -> str:
    items = [
        f"  {{\n    name: {json.dumps(t.name)}\n    data_type: {t.data_type}\n    dims: [ {', '.join(str(d) for d in t.dims)} ]\n  }}"
        for t in tensors
    ]
    return "[\n" + ",\n".join(items) + "\n]"


def _config_pbtxt(name: str, spec: ServedModel, max_batch_size: int) -> str:
    inputs, outputs = _onnx_tensors(spec.onnx)
    if spec.labels_output:
        outputs = [_Tensor(outputs[0].name, "TYPE_INT64", (1,))]
    dims_ok = all(len(t.dims) > 0 or max_batch_size > 0 for t in (*inputs, *outputs))
    if not dims_ok:
        raise InputError(f"model {name!r}: a scalar per-sample tensor needs max_batch_size > 0")
    params = {
        "delay_s": repr(float(spec.delay_s)),
        "labels_output": "true" if spec.labels_output else "false",
        "ort_threads": str(int(spec.ort_threads)),
        "record_parameters": str(Path(spec.record_parameters).resolve()) if spec.record_parameters else "",
    }
    param_text = "\n".join(
        f"parameters: {{\n  key: {json.dumps(k)}\n  value: {{ string_value: {json.dumps(v)} }}\n}}" for k, v in params.items()
    )
    return (
        f"name: {json.dumps(name)}\n"
        'backend: "python"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input {_tensor_block(inputs)}\n"
        f"output {_tensor_block(outputs)}\n"
        f"instance_group [\n  {{\n    kind: KIND_CPU\n    count: {int(spec.instance_count)}\n  }}\n]\n"
        "version_policy: { all { } }\n"
        f"{param_text}\n"
    )


def write_model_repository(
    models: Mapping[str, Path | ServedModel],
    root: Path,
    *,
    max_batch_size: int = 64,
) -> Path:
    """Write a Triton model repository serving `models` (name -> ONNX file or `ServedModel`).

    Each model gets `config.pbtxt` (python backend, inputs/outputs from the ONNX file) and, per
    version, `model.py` + a copy of the ONNX file. `max_batch_size` is the default for models
    that do not set one (0 = no batching). Returns `root`.
    """
    if max_batch_size < 0:
        raise InputError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if not models:
        raise InputError("a model repository needs at least one model")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in models.items():
        spec = entry if isinstance(entry, ServedModel) else ServedModel(onnx=Path(entry))
        if not _NAME_RE.match(name):
            raise InputError(f"model name {name!r} is not usable in a Triton repository (letters, digits, _ . -)")
        if not Path(spec.onnx).is_file():
            raise InputError(f"model {name!r}: ONNX file {spec.onnx} not found")
        if not spec.versions or any(v < 1 for v in spec.versions):
            raise InputError(f"model {name!r}: versions must be positive integers, got {spec.versions}")
        if spec.delay_s < 0 or spec.instance_count < 1 or spec.ort_threads < 1:
            raise InputError(f"model {name!r}: delay_s must be >= 0, instance_count and ort_threads >= 1")
        mbs = max_batch_size if spec.max_batch_size is None else spec.max_batch_size
        if mbs < 0:
            raise InputError(f"model {name!r}: max_batch_size must be >= 0, got {mbs}")
        model_dir = root / name
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.pbtxt").write_text(_config_pbtxt(name, spec, mbs))
        for version in spec.versions:
            vdir = model_dir / str(version)
            vdir.mkdir(exist_ok=True)
            (vdir / "model.py").write_text(MODEL_PY)
            shutil.copyfile(spec.onnx, vdir / "model.onnx")
        log.debug("wrote Triton model %s (max_batch_size=%d, versions=%s) under %s", name, mbs, spec.versions, root)
    return root


@dataclass(frozen=True)
class _PyTritonLayout:
    binary: Path
    backend_files: Path
    stub: Path
    libs: Path


def _pytriton_layout() -> _PyTritonLayout:
    """Locate the files of nvidia-pytriton this module relies on; InputError if missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"a local Triton server needs nvidia-pytriton: {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    layout = _PyTritonLayout(
        binary=package / "tritonserver" / "bin" / "tritonserver",
        backend_files=package / "tritonserver" / "backends" / "python",
        stub=package / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=package.parent / "nvidia_pytriton.libs",
    )
    for what, path in (("tritonserver binary", layout.binary), ("python backend", layout.backend_files), ("python backend stub", layout.stub)):
        if not path.exists():
            raise InputError(f"nvidia-pytriton has no {what} at {path} (Python {version}); reinstall it: {INSTALL_HINT}")
    return layout


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (the server may still lose a race; start() retries)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def _shutdown(proc: subprocess.Popen[bytes] | None, workdir: str | None, shm_prefix: str, hard: bool, exit_timeout_s: float) -> None:
    """Stop the server's process group and remove what it left behind. Safe to call twice."""
    if proc is not None:
        if proc.poll() is None and not hard:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=exit_timeout_s + 5)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver (pid %d) ignored SIGTERM; killing it", proc.pid)
        # The group also holds the python-backend stubs; make sure none outlives the server.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail like this
            log.error("tritonserver (pid %d) did not die after SIGKILL", proc.pid)
    # Give stubs killed with the group a moment to go before sweeping their shared memory.
    deadline = time.monotonic() + 2.0
    shm = Path("/dev/shm")
    while True:
        leftovers = list(shm.glob(shm_prefix + "*")) if shm.is_dir() else []
        for region in leftovers:
            try:
                region.unlink()
                log.debug("removed leftover shared memory region %s", region)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not remove shared memory region %s: %s", region, e)
        if not leftovers or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class TritonServer:
    """A local `tritonserver` (from nvidia-pytriton) on 127.0.0.1 with free ports.

    Use as a context manager (or `start()` / `stop()`); `kill()` SIGKILLs it for fault tests.
    The server log goes to `log_path` (default `<repository>/tritonserver.log`; Triton ignores
    plain files in a repository). Only the shared-memory regions named with this server's own
    prefix are swept after an unclean stop.
    """

    def __init__(
        self,
        repository: Path,
        *,
        log_path: Path | None = None,
        startup_timeout_s: float = 60.0,
        exit_timeout_s: int = 5,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise InputError(f"Triton model repository {self.repository} is not a directory")
        self.log_path = Path(log_path) if log_path is not None else self.repository / "tritonserver.log"
        self.startup_timeout_s = float(startup_timeout_s)
        self.exit_timeout_s = int(exit_timeout_s)
        self.extra_args = tuple(extra_args)
        self.host = "127.0.0.1"
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._shm_prefix = f"deepcore_{os.getpid()}_{secrets.token_hex(4)}_"
        self._finalizer: weakref.finalize | None = None
        self._finished = False

    # -- addresses -------------------------------------------------------------------------
    @property
    def http_address(self) -> str:
        """`host:port` of the HTTP endpoint (what raw tritonclient takes)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        """`host:port` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """`triton+http://host:port`; append `/MODEL[/VERSION]` for `open_triton`."""
        return f"triton+http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        """`triton+grpc://host:port`; append `/MODEL[/VERSION]` for `open_triton`."""
        return f"triton+grpc://{self.grpc_address}"

    def url(self, model: str, protocol: str = "http", version: int | None = None) -> str:
        """The `open_triton` URL of one model over `protocol` ("http" or "grpc")."""
        base = {"http": self.http_url, "grpc": self.grpc_url}.get(protocol)
        if base is None:
            raise InputError(f"protocol must be http or grpc, got {protocol!r}")
        return f"{base}/{model}" + (f"/{version}" if version is not None else "")

    @property
    def shm_prefix(self) -> str:
        """Name prefix of this server's python-backend shared-memory regions in /dev/shm."""
        return self._shm_prefix

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> TritonServer:
        """Start the server and wait until it (and every model) is ready; raise if it is not."""
        if self._proc is not None:
            raise InputError("this TritonServer was already started")
        layout = _pytriton_layout()
        try:
            self._launch(layout)
        except BaseException:  # not ready, interrupted, or failed to launch: leave nothing behind
            self.kill()
            raise
        return self

    def _backend_dir(self, layout: _PyTritonLayout) -> Path:
        """A private backend directory: PyTriton's python backend + the stub for this Python."""
        self._workdir = tempfile.mkdtemp(prefix="deepcore-triton-")
        python_dir = Path(self._workdir) / "backends" / "python"
        python_dir.mkdir(parents=True)
        for f in layout.backend_files.iterdir():
            if f.is_file():
                shutil.copy2(f, python_dir / f.name)
        shutil.copy2(layout.stub, python_dir / layout.stub.name)
        return python_dir.parent

    def _launch(self, layout: _PyTritonLayout) -> None:
        backends = self._backend_dir(layout)
        env = dict(os.environ)
        # Gotchas 1 + 2 of the notes: the interpreter's libpython first, then PyTriton's libs;
        # the interpreter's bin dir first on PATH so the stub sees its packages.
        lib_paths = [sysconfig.get_config_var("LIBDIR") or "", str(layout.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in lib_paths if p)
        env["PATH"] = ":".join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        last_error = ""
        for attempt in range(3):
            self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
            cmd = [
                str(layout.binary),
                f"--model-repository={self.repository}",
                f"--backend-directory={backends}",
                f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
                f"--http-address={self.host}",
                f"--http-port={self.http_port}",
                f"--grpc-address={self.host}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}",
                f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false",
                "--allow-cpu-metrics=false",
                f"--exit-timeout-secs={self.exit_timeout_s}",
                "--log-verbose=0",
                "--disable-auto-complete-config",
                *self.extra_args,
            ]
            with open(self.log_path, "ab") as log_file:
                log_file.write(f"\n=== deepcore: starting tritonserver (attempt {attempt + 1}) ===\n".encode())
                log_file.flush()
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            # Whatever happens to this object, the server and its stubs do not outlive it.
            self._finalizer = weakref.finalize(
                self, _shutdown, self._proc, self._workdir, self._shm_prefix, True, self.exit_timeout_s
            )
            log.info("started tritonserver pid %d (http %d, grpc %d), log %s", self._proc.pid, self.http_port, self.grpc_port, self.log_path)
            ready, last_error = self._wait_ready()
            if ready:
                return
            tail = self.log_tail()
            self._finalizer.detach()
            _shutdown(self._proc, None, self._shm_prefix, True, self.exit_timeout_s)
            if "address already in use" not in tail.lower():
                break
            log.warning("tritonserver lost a port race; retrying with other ports")
        raise OracleError(
            f"tritonserver did not become ready ({last_error}); log {self.log_path}, last lines:\n{self.log_tail()}"
        )

    def _wait_ready(self) -> tuple[bool, str]:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_address}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                return False, f"it exited with code {code}"
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return True, ""
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False, f"not ready after {self.startup_timeout_s:.0f} s"

    def stop(self) -> None:
        """SIGTERM (the server drains for --exit-timeout-secs), then SIGKILL; clean up. Idempotent."""
        self._finish(hard=False)

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (fault tests), then clean up. Idempotent."""
        self._finish(hard=True)

    def _finish(self, hard: bool) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._finished or (self._proc is None and self._workdir is None):
            return
        self._finished = True
        _shutdown(self._proc, self._workdir, self._shm_prefix, hard, self.exit_timeout_s)
        log.info("tritonserver pid %s %s", self.pid, "killed" if hard else "stopped")
        self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({self.repository}, http={self.http_address}, grpc={self.grpc_address}, {state})"
