"""A real Open Inference Protocol (KServe v2) server for the tests: Seldon MLServer on 127.0.0.1.

MLServer runs from its own virtual environment, made by `setup` in `.mlserver/` at the top of
the checkout (or wherever `DEEPCORE_MLSERVER` names its `mlserver` executable): it needs numpy 2,
which the project's serve extra (nvidia-pytriton) forbids in the test environment. The tests
skip when neither is there; `.ci/run` sets `DEEPCORE_MLSERVER`, so CI fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = Path(__file__).with_name("mlserver")
_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(uint8)": "UINT8", "tensor(int64)": "INT64"}


def mlserver_executable() -> Path:
    """The `mlserver` command; skips the test when it was never installed (see module doc)."""
    named = os.environ.get("DEEPCORE_MLSERVER")
    path = Path(named) if named else REPO / ".mlserver" / "bin" / "mlserver"
    if not path.is_file():
        if named:
            raise AssertionError(f"DEEPCORE_MLSERVER={named} does not exist: run ./setup")
        pytest.skip("Seldon MLServer is not installed (./setup makes .mlserver/)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tensors(args: list[object]) -> list[dict[str, object]]:
    return [{"name": a.name, "datatype": _DATATYPES[a.type],  # type: ignore[attr-defined]
             "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class V2Server:
    """A running MLServer and its ports."""

    http_port: int
    grpc_port: int
    log: Path

    def url(self, model: str, protocol: str = "http") -> str:
        return f"v2+{protocol}://127.0.0.1:{self.http_port if protocol == 'http' else self.grpc_port}/{model}"


@dataclass(frozen=True)
class ImageModel:
    """An ONNX classifier behind an image-decoding step: it takes one PNG/JPEG file per sample
    (a BYTES input), decodes it and normalizes with `mean`/`std` before the model."""

    onnx: Path
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@contextmanager
def mlserver(models: Mapping[str, Path | ImageModel], root: Path, *, timeout_s: float = 90.0) -> Iterator[V2Server]:
    """Serve each ONNX file (or image endpoint) under its name on a fresh MLServer; stopped (and
    waited for) on exit."""
    import onnxruntime as ort

    executable = mlserver_executable()
    root.mkdir(parents=True, exist_ok=True)
    for runtime in RUNTIMES.glob("*.py"):
        shutil.copy(runtime, root / runtime.name)
    for name, model in models.items():
        folder = root / "models" / name
        folder.mkdir(parents=True)
        onnx = model.onnx if isinstance(model, ImageModel) else model
        shutil.copy(onnx, folder / "model.onnx")
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        settings: dict[str, object] = {"name": name, "implementation": "onnx_runtime.OnnxRuntime",
                                       "parameters": {"uri": "./model.onnx"}, "inputs": _tensors(session.get_inputs()),
                                       "outputs": _tensors(session.get_outputs())}
        if isinstance(model, ImageModel):
            settings.update(implementation="image_runtime.ImageOnnxRuntime",
                            inputs=[{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                            parameters={"uri": "./model.onnx", "extra": {"channels": model.channels, "mean": list(model.mean),
                                                                         "std": list(model.std)}})
        (folder / "model-settings.json").write_text(json.dumps(settings))
    http_port = grpc_port = _free_port()
    while grpc_port == http_port:
        grpc_port = _free_port()
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "metrics_endpoint": None, "parallel_workers": 0, "debug": False,
    }))
    log = root / "mlserver.log"
    env = {**os.environ, "PYTHONPATH": str(root)}
    with log.open("w") as sink:
        proc = subprocess.Popen([str(executable), "start", str(root)], cwd=root, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlserver exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlserver not ready in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield V2Server(http_port, grpc_port, log)
    finally:  # the whole process group: MLServer may have started workers of its own
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
