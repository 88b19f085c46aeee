"""Suspects on any Open Inference Protocol (KServe v2) server: `v2+http://` and `v2+grpc://` URLs
audited against a real Seldon MLServer (tests/v2_server.py), and endpoints that take encoded
images (a real decoding step before the model) audited with `--image-format`.

The transport must not change the answer: the same suspect gets the same verdict, queries and
trajectory over MLServer (JSON tensors over HTTP, raw tensors over gRPC) as through local ONNX
Runtime, label-only and with probabilities.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import audit_args, one_line_error
from v2_server import ImageModel, V2Server, mlserver

from deepcore_auditor.adapters.base import Access, InputConvention
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError
from deepcore_auditor.adapters.images import ImageEncoding, decode_image, encode_images, on_uint8_grid, to_uint8_grid
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.adapters.triton import open_triton
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.fingerprints.format import load_fingerprint, save_fingerprint
from deepcore_auditor.fingerprints.models import build_architecture, export_onnx

pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

COMPARED = ("verdict", "queries_used", "trajectory", "agreement", "llr", "p0", "p1", "fingerprint_sha256")


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def server(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[V2Server]:
    """One MLServer: the world's suspects as tensor models and as image endpoints, and a misfit."""
    root = tmp_path_factory.mktemp("mlserver")
    torch.manual_seed(0)
    cifar = root / "cifar.onnx"
    export_onnx(build_architecture("mlp", (3, 32, 32), 10), cifar, (3, 32, 32))
    conv = load_fingerprint(world.fingerprint).convention
    models: dict[str, Path | ImageModel] = {"pirate": world.pirate_onnx, "independent": world.independent_onnx, "cifar": cifar}
    for name in ("pirate", "independent"):
        models[f"{name}-images"] = ImageModel(getattr(world, f"{name}_onnx"), 1, conv.mean, conv.std)
    with mlserver(models, root / "server") as s:
        yield s


@pytest.fixture(scope="module")
def grid_fingerprint(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world's fingerprint with its points moved to the 8-bit grid (at most 0.5/255 each), as
    `--uint8-points` builds them (tests/test_owner_forms.py builds one): its rates are the
    world's, which is all a transport test needs."""
    fp = load_fingerprint(world.fingerprint)
    path = tmp_path_factory.mktemp("grid") / "fp-uint8.json"
    save_fingerprint(dataclasses.replace(fp, points=to_uint8_grid(fp.points)), path)
    return path


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
                       "v2 server at", "unreachable", str(closed))
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


# ---------------------------------------------------------------------------------------------
# Endpoints that take encoded images


def _audit(fp: Path, suspect: str, *extra: str) -> Any:
    return run("audit", "--fingerprint", fp, "--suspect", suspect, "--budget", "60", "--batch-size", "5", "--no-report", *extra)


@pytest.mark.parametrize("access", ["labels", "probs"])
def test_png_points_to_an_image_endpoint_give_the_local_audit(server: V2Server, world: Any, grid_fingerprint: Path,
                                                               access: str) -> None:
    """8-bit points sent as PNG (raw bytes over gRPC, base64 in JSON over HTTP), decoded and
    normalized by the server: the same verdicts, queries and trajectories as the local ONNX model
    given the same points as tensors."""
    for name in ("pirate", "independent"):
        local_run = _audit(grid_fingerprint, str(getattr(world, f"{name}_onnx")), "--json", "--access", access)
        assert local_run.exit_code in (0, 1, 3), local_run.output
        expected = json.loads(local_run.stdout)
        for protocol in ("http", "grpc"):
            r = _audit(grid_fingerprint, server.url(f"{name}-images", protocol), "--json", "--access", access, "--image-format", "png")
            assert r.exit_code == local_run.exit_code, r.output
            got = json.loads(r.stdout)
            for key in COMPARED:
                assert got[key] == expected[key], (name, protocol, key)
            assert got["suspect"]["details"]["image_format"] == "png" and got["suspect"]["details"]["input"]["datatype"] == "BYTES"
            assert not any("altered" in n for n in got["notes"])
        assert expected["verdict"] == ("piracy" if name == "pirate" else "independent")


def test_jpeg_is_refused_unless_accepted_and_then_reported(server: V2Server, grid_fingerprint: Path) -> None:
    url = server.url("pirate-images")
    one_line_error(_audit(grid_fingerprint, url, "--image-format", "jpeg:90"), "jpeg:90 changes every point", "--lossy-images")
    r = _audit(grid_fingerprint, url, "--image-format", "jpeg:90", "--lossy-images", "--json")
    assert r.exit_code in (0, 1, 3), r.output
    got = json.loads(r.stdout)
    assert got["suspect"]["details"]["image_format"] == "jpeg:90"
    assert any("jpeg:90 images" in n and "altered points" in n for n in got["notes"])


def test_a_resumed_audit_must_send_the_same_image_files(server: V2Server, grid_fingerprint: Path, tmp_path: Path) -> None:
    """The image format is part of the suspect as reached: a ledger of JPEG answers cannot be
    resumed with PNG (the verdict would rest on answers to two sets of points)."""
    ledger = tmp_path / "ledger.jsonl"
    url = server.url("independent-images")
    r = run("audit", "--fingerprint", grid_fingerprint, "--suspect", url, "--budget", "5", "--batch-size", "5", "--no-report",
            "--ledger", ledger, "--image-format", "jpeg:75", "--lossy-images")
    assert r.exit_code == 3, r.output  # inconclusive after the budget of 5
    one_line_error(run("audit", "--fingerprint", grid_fingerprint, "--suspect", url, "--budget", "60", "--batch-size", "5",
                       "--no-report", "--ledger", ledger, "--resume", "--image-format", "png"), "cannot resume", "suspect")


def test_image_transport_errors_are_one_line(server: V2Server, world: Any, grid_fingerprint: Path) -> None:
    # points off the 8-bit grid would be rounded by PNG: refused before any query
    one_line_error(_audit(world.fingerprint, server.url("pirate-images"), "--image-format", "png"), "not 8-bit images", "--uint8-points")
    one_line_error(_audit(grid_fingerprint, server.url("pirate-images")), "BYTES", "--image-format")
    one_line_error(_audit(grid_fingerprint, server.url("pirate"), "--image-format", "png"), "not encoded images")
    one_line_error(_audit(grid_fingerprint, server.url("pirate-images"), "--image-format", "gif"), "gif", "png, jpeg")
    one_line_error(_audit(grid_fingerprint, server.url("pirate-images"), "--image-format", "jpeg:0", "--lossy-images"), "1 to 100")
    one_line_error(_audit(grid_fingerprint, server.url("pirate-images"), "--lossy-images"), "--lossy-images", "--image-format")
    one_line_error(_audit(grid_fingerprint, str(world.pirate_onnx), "--image-format", "png"),
                   "--image-format", "Triton and v2 server suspects only")


def test_image_encodings_round_trip_as_declared() -> None:
    rng = np.random.default_rng(3)
    for channels in (1, 3):
        points = to_uint8_grid(rng.random((4, channels, 9, 7), dtype=np.float32))
        assert on_uint8_grid(points) and not on_uint8_grid(points + np.float32(0.3 / 255))
        png = encode_images(points, ImageEncoding.parse("png"))
        assert all(f.startswith(b"\x89PNG") for f in png)
        assert np.array_equal(np.stack([decode_image(f, channels) for f in png]), points)  # bit for bit
        jpeg = encode_images(points, ImageEncoding.parse("jpeg:75"))
        back = np.stack([decode_image(f, channels) for f in jpeg])
        assert back.shape == points.shape and not np.array_equal(back, points)
    assert ImageEncoding.parse("JPG") == ImageEncoding("jpeg", 95) and str(ImageEncoding.parse("jpeg:75")) == "jpeg:75"
    for bad in ("gif", "png:3", "jpeg:101", "jpeg:x", "jpeg:\u00b2", ""):
        with pytest.raises(InputError):
            ImageEncoding.parse(bad)
