"""Fixtures for the Triton transport tests: small real models on a real local tritonserver.

Import the fixtures into a test module (`from triton_fixtures import ...`); they skip when
nvidia-pytriton or tritonclient is not installed. The models are random (seeded) but shaped so
that their top-1 labels vary across inputs: these tests check transport, not accuracy.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

SEED = 1234
POINT_SHAPE = (3, 16, 16)
NUM_CLASSES = 10
SLOW_DELAY_S = 3.0
# Headers the main test server forwards to the models as request parameters (recorded to a file).
FORWARDED_HEADERS = r"(?i)^(authorization|x-deepcore-trial)$"


@dataclass(frozen=True)
class TritonTrial:
    """A running test server and what it serves."""

    server: object  # adapters.triton.serve.TritonServer
    onnx: dict[str, Path]  # served model name -> the ONNX file it runs
    record: Path  # request parameters recorded by model "cnn" (forwarded headers)


@dataclass(frozen=True)
class TlsTrial:
    """A server whose gRPC endpoint needs TLS and whose HTTP inference API needs a token."""

    server: object
    cert: Path
    token: str


def _export_models(out: Path) -> dict[str, Path]:
    import torch
    from torch import nn

    class Net(nn.Module):
        """Zero biases + centred input + tanh: logits vary with the input, labels spread out."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 16 * 16, NUM_CLASSES)
            with torch.no_grad():
                self.conv.bias.zero_()
                self.fc.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.conv(x - 0.5)).flatten(1))

    class Fp16Io(nn.Module):
        """FP16 in, FP16 logits out (computes in FP32: ONNX Runtime's CPU FP16 kernels are few)."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float()).half()

    class Uint8Nhwc(nn.Module):
        """UINT8 NHWC pixels in, probabilities out (a softmax head)."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(x.permute(0, 3, 1, 2).float() / 255.0), dim=1)

    torch.manual_seed(SEED)
    net = Net().eval()
    c, h, w = POINT_SHAPE
    specs = {
        "cnn": (net, torch.zeros(1, c, h, w)),
        "fp16": (Fp16Io(net), torch.zeros(1, c, h, w, dtype=torch.float16)),
        "u8": (Uint8Nhwc(net), torch.zeros(1, h, w, c, dtype=torch.uint8)),
    }
    files = {}
    for name, (module, example) in specs.items():
        path = out / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                (example,),
                str(path),
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        files[name] = path
    return files


def _need_triton() -> None:
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the test extra) is not installed")
    pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")


@pytest.fixture(scope="session")
def triton_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The ONNX files: cnn (FP32 NCHW logits), fp16 (FP16 in/out), u8 (UINT8 NHWC -> probs)."""
    pytest.importorskip("torch")
    return _export_models(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def triton_trial(tmp_path_factory: pytest.TempPathFactory, triton_onnx: dict[str, Path]) -> Iterator[TritonTrial]:
    """One real tritonserver serving every test model; always stopped at the end."""
    _need_triton()
    from deepcore_auditor.adapters.triton.serve import ServedModel, TritonServer, write_model_repository

    root = tmp_path_factory.mktemp("triton")
    record = root / "cnn-parameters.jsonl"
    models = {
        "cnn": ServedModel(triton_onnx["cnn"], record_parameters=record),
        "nobatch": ServedModel(triton_onnx["cnn"], max_batch_size=0),
        "labels": ServedModel(triton_onnx["cnn"], labels_output=True),
        "slow": ServedModel(triton_onnx["cnn"], delay_s=SLOW_DELAY_S),
        "fp16": ServedModel(triton_onnx["fp16"]),
        "u8": ServedModel(triton_onnx["u8"]),
    }
    repo = write_model_repository(models, root / "repository", max_batch_size=64)
    server = TritonServer(
        repo,
        log_path=root / "tritonserver.log",
        extra_args=[f"--http-header-forward-pattern={FORWARDED_HEADERS}", f"--grpc-header-forward-pattern={FORWARDED_HEADERS}"],
    )
    with server:
        onnx = {name: Path(spec.onnx) for name, spec in models.items()}
        yield TritonTrial(server=server, onnx=onnx, record=record)


@pytest.fixture(scope="session")
def tls_trial(tmp_path_factory: pytest.TempPathFactory, triton_onnx: dict[str, Path]) -> Iterator[TlsTrial]:
    """A second server: gRPC over TLS (self-signed certificate), HTTP inference needs a bearer token."""
    _need_triton()
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository

    root = tmp_path_factory.mktemp("triton-tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    token = "tls-trial-" + np.random.default_rng(SEED).bytes(8).hex()
    repo = write_model_repository({"cnn": triton_onnx["cnn"]}, root / "repository")
    server = TritonServer(
        repo,
        log_path=root / "tritonserver.log",
        extra_args=[
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={cert}",
            f"--grpc-server-key={key}",
            f"--grpc-root-cert={cert}",
            f"--http-restricted-api=inference:authorization=Bearer {token}",
        ],
    )
    with server:
        yield TlsTrial(server=server, cert=cert, token=token)


class TlsProxy:
    """A TLS-terminating relay on 127.0.0.1 in front of a plaintext port (Triton's HTTP has no TLS)."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert), str(key))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tls-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            client = self._context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):  # e.g. the client rejected our certificate
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        try:
            while not self._stop.is_set():
                ready = [client] if client.pending() else select.select([client, upstream], [], [], 0.5)[0]
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=2)


@pytest.fixture(scope="session")
def https_proxy(tls_trial: TlsTrial) -> Iterator[TlsProxy]:
    """HTTPS (self-signed certificate) in front of the TLS trial server's HTTP port."""
    proxy = TlsProxy(tls_trial.server.http_port, tls_trial.cert, tls_trial.cert.with_name("key.pem"))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def fresh_server(tmp_path: Path, triton_onnx: dict[str, Path]) -> Iterator[object]:
    """A server of its own (one model, "cnn"), for tests that kill it."""
    _need_triton()
    from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository

    repo = write_model_repository({"cnn": triton_onnx["cnn"]}, tmp_path / "repository")
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log")
    with server:
        yield server


def points(n: int, seed: int = SEED) -> np.ndarray:
    """n canonical points [n, C, H, W] in [0, 1]."""
    return np.random.default_rng(seed).random((n, *POINT_SHAPE), dtype=np.float32)
