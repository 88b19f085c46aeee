"""Suspects on any Open Inference Protocol (KServe v2) server: `v2+http://` and `v2+grpc://` URLs
audited against a real Seldon MLServer (tests/v2_server.py), and a real Triton asked as a plain
v2 server.

The transport must not change the answer: the same suspect gets the same verdict, queries and
trajectory over MLServer (JSON tensors over HTTP, raw tensors over gRPC) as through local ONNX
Runtime, label-only and with probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import audit_args, one_line_error
from v2_server import V2Server, mlserver

from deepcore_auditor.adapters.base import Access, InputConvention
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.adapters.triton import open_triton
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.fingerprints.models import build_architecture, export_onnx

pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

COMPARED = ("verdict", "queries_used", "trajectory", "agreement", "llr", "p0", "p1", "fingerprint_sha256")


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def server(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[V2Server]:
    root = tmp_path_factory.mktemp("mlserver")
    torch.manual_seed(0)
    cifar = root / "cifar.onnx"
    export_onnx(build_architecture("mlp", (3, 32, 32), 10), cifar, (3, 32, 32))
    with mlserver({"pirate": world.pirate_onnx, "independent": world.independent_onnx, "cifar": cifar}, root / "server") as s:
        yield s


@pytest.fixture(scope="module")
def local(world: Any) -> Callable[..., tuple[int, dict[str, Any]]]:
    cache: dict[tuple[str, ...], tuple[int, dict[str, Any]]] = {}

    def get(name: str, *extra: str) -> tuple[int, dict[str, Any]]:
        if (name, *extra) not in cache:
            r = run(*audit_args(world, getattr(world, f"{name}_onnx"), "--json", "--no-report", *extra))
            assert r.exit_code in (0, 1, 3), r.output
            cache[(name, *extra)] = (r.exit_code, json.loads(r.stdout))
        return cache[(name, *extra)]

    return get


@pytest.mark.parametrize("name", ["pirate", "independent"])
@pytest.mark.parametrize("access", ["labels", "probs"])
def test_v2_audit_equals_local_audit(world: Any, server: V2Server, local: Callable, name: str, access: str) -> None:
    code, expected = local(name, "--access", access)
    assert expected["trajectory"] != local("pirate" if name == "independent" else "independent", "--access", access)[1]["trajectory"]
    identities = []
    for protocol in ("http", "grpc"):
        r = run(*audit_args(world, server.url(name, protocol), "--json", "--no-report", "--access", access))
        assert r.exit_code == code, r.output
        got = json.loads(r.stdout)
        for key in COMPARED:
            assert got[key] == expected[key], (protocol, key, got[key], expected[key])
        suspect = got["suspect"]
        assert suspect["kind"] == "v2" and suspect["identity"]["server_name"] == "mlserver"
        assert suspect["details"]["tensors"] == ("json" if protocol == "http" else "raw")
        assert suspect["details"]["labels_via"] == "argmax" and "config_sha256" not in suspect["identity"]
        identities.append(suspect["identity"]["metadata_sha256"])
    assert identities[0] == identities[1]  # the same model described over either protocol


def test_v2_answers_are_bit_equal_to_onnx_runtime(world: Any, server: V2Server) -> None:
    """JSON carries a float32 as the decimal of its exact value: the probabilities are the local ones."""
    import numpy as np

    conv = InputConvention()
    points = np.random.default_rng(0).random((37, 1, 28, 28), dtype=np.float32)
    with OnnxOracle(str(world.pirate_onnx), convention=conv, point_shape=(1, 28, 28), num_classes=10) as local_oracle:
        expected = local_oracle.query(points, Access.PROBS)
    for protocol in ("http", "grpc"):
        oracle = open_triton(server.url("pirate", protocol), convention=conv, point_shape=(1, 28, 28), num_classes=10,
                             batch_size=8)
        try:
            np.testing.assert_array_equal(oracle.query(points, Access.PROBS), expected)
            assert oracle.info.details["samples_per_request"] == 8 and oracle.info.details["max_batch_size"] == 0
        finally:
            oracle.close()


def test_unusable_v2_suspects_are_one_line_errors(world: Any, server: V2Server) -> None:
    port = server.http_port
    one_line_error(run(*audit_args(world, server.url("no-such-model"), "--no-report")), "does not serve", "no-such-model")
    one_line_error(run(*audit_args(world, server.url("cifar", "grpc"), "--no-report")), "shape", "32")
    one_line_error(run(*audit_args(world, server.url("pirate"), "--no-report", "--labels-via", "classification")),
                   "classification", "triton+")
    closed = _closed_port()
    for scheme in ("v2+http", "v2+grpc"):
        one_line_error(run(*audit_args(world, f"{scheme}://127.0.0.1:{closed}/pirate", "--no-report", "--connect-timeout", "2")),
                       "v2 inference server", "unreachable", str(closed))
    one_line_error(run(*audit_args(world, f"v2+ftp://127.0.0.1:{port}/pirate", "--no-report")), "unsupported server URL scheme")


def test_v2_errors_are_typed(server: V2Server) -> None:
    kw: dict[str, Any] = {"convention": InputConvention(), "point_shape": (1, 28, 28), "num_classes": 10}
    with pytest.raises(IncompatibleSuspect, match="does not serve"):
        open_triton(server.url("nothing-here"), **kw)
    with pytest.raises(IncompatibleSuspect, match="shape"):
        open_triton(server.url("cifar"), **kw)
    with pytest.raises(InputError, match="classification"):
        open_triton(server.url("pirate"), labels_via="classification", **kw)
    with pytest.raises(OracleError, match="unreachable"):
        open_triton(f"v2+http://127.0.0.1:{_closed_port()}/pirate", connect_timeout_s=2, **kw)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
