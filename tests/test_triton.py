"""Triton adapter against a real local tritonserver (python backend running ONNX Runtime).

The servers come from tests/triton_fixtures.py; the whole module takes well under a minute.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from triton_fixtures import (
    NUM_CLASSES,
    POINT_SHAPE,
    SLOW_DELAY_S,
    fresh_server,
    https_proxy,
    points,
    tls_trial,
    triton_onnx,
    triton_trial,
)

from deepcore_auditor.adapters.base import Access, InputConvention
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError, TransientOracleError
from deepcore_auditor.adapters.triton import open_triton
from deepcore_auditor.adapters.triton.client import _translate
from deepcore_auditor.adapters.triton.options import parse_triton_url
from deepcore_auditor.adapters.triton.oracle import _parse_classification

__all__ = ["fresh_server", "https_proxy", "tls_trial", "triton_onnx", "triton_trial"]  # fixtures used by name

PROTOCOLS = ("http", "grpc")
NCHW = InputConvention()
U8_NHWC = InputConvention(layout="NHWC", scale=255.0)
CONVENTIONS = {"cnn": NCHW, "nobatch": NCHW, "labels": NCHW, "slow": NCHW, "fp16": NCHW, "u8": U8_NHWC}
MODEL_DTYPES = {"fp16": "float16", "u8": "uint8"}


def _open(url: str, **options):
    model = url.rstrip("/").split("/")[3]
    return open_triton(url, convention=CONVENTIONS.get(model, NCHW), point_shape=POINT_SHAPE, num_classes=NUM_CLASSES, **options)


def _local_outputs(onnx: Path, model: str, pts: np.ndarray) -> np.ndarray:
    """The same ONNX file run in-process with ONNX Runtime on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    convention = CONVENTIONS[model].with_dtype(MODEL_DTYPES.get(model, "float32"))
    (out,) = session.run(None, {"x": convention.apply(pts)})
    return np.asarray(out, dtype=np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _executions(trial, model: str, expect: int | None = None) -> int:
    """The model's execution count once settled; with `expect`, wait (up to 3 s) for it to reach
    that, since the server updates its statistics just after sending a response."""
    deadline = time.monotonic() + 3
    count = _read_executions(trial, model)
    while time.monotonic() < deadline:
        if expect is not None and count >= expect:
            break
        time.sleep(0.1)
        again = _read_executions(trial, model)
        if expect is None and again == count:  # settled
            break
        count = again
    return count


def _read_executions(trial, model: str) -> int:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(trial.server.http_address)
    try:
        stats = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return sum(int(s["execution_count"]) for s in stats)


# ---------------------------------------------------------------------------------------------
# No server needed


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("triton+http://h:9000/m", ("http", False, "h", 9000, "m", "")),
        ("triton+grpcs://h/m/3", ("grpc", True, "h", 443, "m", "3")),
        ("triton+grpc://10.0.0.1/m/", ("grpc", False, "10.0.0.1", 8001, "m", "")),
        ("TRITON+HTTPS://[::1]:8443/my%20model/12", ("http", True, "::1", 8443, "my model", "12")),
        # Open Inference Protocol servers: KServe's and MLServer's ports, versions are strings
        ("v2+http://h/m", ("http", False, "h", 8080, "m", "")),
        ("v2+grpc://h/m", ("grpc", False, "h", 8081, "m", "")),
        ("v2+https://h/m/v1.2", ("http", True, "h", 443, "m", "v1.2")),
        ("V2+GRPCS://h:9443/m/007", ("grpc", True, "h", 9443, "m", "007")),
    ],
)
def test_parse_url(url: str, expected: tuple) -> None:
    e = parse_triton_url(url)
    assert (e.protocol, e.tls, e.host, e.port, e.model, e.version) == expected
    assert e.flavour == url.split("+")[0].lower()


@pytest.mark.parametrize(
    "url",
    [
        "http://h:8000/m",
        "triton+ftp://h/m",
        "triton+http://h:8000",
        "triton+http://h:8000/",
        "triton+http://h:8000/m/0",
        "triton+http://h:8000/m/v1",
        "triton+http://h:8000/m/1/extra",
        "triton+http://h:99999/m",
        "triton+http://user:pw@h:8000/m",
        "triton+http://h:8000/m?x=1",
        "triton+http://:8000/m",
        "v2+http://h/m/..",
        "v2+http://h/m/a%2Fb",
        "v2+udp://h/m",
        "v2+http://u:p@h/m",
    ],
)
def test_bad_url_is_input_error(url: str) -> None:
    with pytest.raises(InputError):
        parse_triton_url(url)


def test_url_credentials_never_echoed() -> None:
    with pytest.raises(InputError) as err:
        parse_triton_url("triton+http://alice:hunter2@h:8000/m")
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "options",
    [
        {"unknown_option": 1},
        {"labels_via": "softmax"},
        {"concurrency": 0},
        {"concurrency": 1.5},
        {"request_timeout_s": -1},
        {"batch_size": 0},
        {"headers": {"X-A": "1\r\nX-B: 2"}},
        {"auth_token_env": "DEEPCORE_TEST_UNSET_TOKEN_VARIABLE"},
        {"ssl_root_certificates": "/nonexistent/ca.pem"},
        {"ssl": False, "_scheme": "triton+https"},
    ],
)
def test_bad_options_are_input_errors_before_connecting(options: dict) -> None:
    options = dict(options)
    scheme = options.pop("_scheme", "triton+http")
    os.environ.pop("DEEPCORE_TEST_UNSET_TOKEN_VARIABLE", None)
    # Port 9 (discard) on loopback: a connection attempt would fail as OracleError, not InputError.
    with pytest.raises(InputError):
        open_triton(f"{scheme}://127.0.0.1:9/m", convention=NCHW, point_shape=POINT_SHAPE, num_classes=10, **options)


def test_grpc_cannot_skip_certificate_checks() -> None:
    with pytest.raises(InputError, match="ssl_root_certificates"):
        open_triton("triton+grpcs://127.0.0.1:9/m", convention=NCHW, point_shape=POINT_SHAPE, num_classes=10, ssl_insecure=True)


def test_parse_classification() -> None:
    values = np.array([[b"3.5:7"], [b"-0.25:0:cat"], [b"1e-3:12:label:with:colons"]], dtype=object)
    assert _parse_classification(values, 3).tolist() == [7, 0, 12]


@pytest.mark.parametrize("bad", [b"3.5", b"x:1", b"1.0:-2", b"1.0:two", b"nan:1", b"", b"1.0: 3"])
def test_malformed_classification_is_oracle_error(bad: bytes) -> None:
    with pytest.raises(OracleError, match="malformed classification"):
        _parse_classification(np.array([[bad]], dtype=object), 1)


def test_classification_count_mismatch_is_oracle_error() -> None:
    with pytest.raises(OracleError):
        _parse_classification(np.array([[b"1:1"], [b"1:2"]], dtype=object), 3)


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        ("429", True),
        ("502", True),
        ("503", True),
        ("504", True),
        ("StatusCode.UNAVAILABLE", True),
        ("StatusCode.RESOURCE_EXHAUSTED", True),
        ("StatusCode.DEADLINE_EXCEEDED", True),
        ("400", False),
        ("404", False),
        ("500", False),
        ("StatusCode.INVALID_ARGUMENT", False),
        ("StatusCode.INTERNAL", False),
        (None, False),
    ],
)
def test_server_errors_translate_by_status(status: str | None, transient: bool) -> None:
    from tritonclient.utils import InferenceServerException

    error = _translate(InferenceServerException("boom", status=status), "inference")
    assert isinstance(error, OracleError) and isinstance(error, TransientOracleError) == transient
    assert "boom" in str(error)


def test_client_side_failures_translate() -> None:
    import gevent
    from tritonclient.utils import InferenceServerException

    assert isinstance(_translate(TimeoutError("timed out"), "x"), TransientOracleError)
    assert isinstance(_translate(gevent.Timeout(1), "x"), TransientOracleError)
    assert isinstance(_translate(ConnectionRefusedError(111, "refused"), "x"), TransientOracleError)
    assert isinstance(_translate(ConnectionResetError(104, "reset"), "x"), TransientOracleError)
    permanent = (OSError(2, "no such file"), ValueError("odd"), InferenceServerException("This API is restricted", "503"))
    for e in permanent:
        error = _translate(e, "x")
        assert isinstance(error, OracleError) and not isinstance(error, TransientOracleError)


def _meta(inputs, outputs, max_batch_size):
    meta = {
        "versions": ["1"],
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs],
    }
    return meta, {"max_batch_size": max_batch_size}


def _plan_for(meta_config, **kw):
    from deepcore_auditor.adapters.triton.shapes import _plan

    args = dict(convention=NCHW, point_shape=POINT_SHAPE, num_classes=10, labels_via="auto", batch_size=None,
                output_option=None, classification_available=True)
    args.update(kw)
    return _plan(parse_triton_url("triton+http://h/m"), "1", *meta_config, **args)


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "mbs", "batch_size", "batch_dim", "chunk"),
    [
        ([-1, 3, 16, 16], [-1, 10], 32, None, True, 32),
        ([-1, 3, 16, 16], [-1, 10], 32, 8, True, 8),
        ([-1, 3, 16, 16], [-1, 10], 32, 100, True, 32),
        ([3, 16, 16], [10], 0, None, False, 1),
        ([1, 3, 16, 16], [1, 10], 0, None, True, 1),  # a fixed batch of one, no Triton batching
        ([-1, 3, 16, 16], [-1, 10], 0, None, True, 64),  # the model batches by itself
        ([-1, 3, 16, 16], [-1, 10], 0, 16, True, 16),
        ([-1, 3, -1, -1], [-1, -1], 4, None, True, 4),  # dynamic sizes fit anything
    ],
)
def test_plan_batching(in_shape, out_shape, mbs, batch_size, batch_dim, chunk) -> None:
    plan, _, details = _plan_for(_meta([("x", "FP32", in_shape)], [("y", "FP32", out_shape)], mbs), batch_size=batch_size)
    assert (plan.batch_dim, plan.chunk) == (batch_dim, chunk)
    assert details["samples_per_request"] == chunk and plan.output_kind == "class_vector"


def test_plan_outputs_and_inputs() -> None:
    two_outputs = _meta([("x", "FP32", [-1, 3, 16, 16])], [("a", "FP32", [-1, 4]), ("b", "FP32", [-1, 10])], 8)
    with pytest.raises(IncompatibleSuspect, match="option output"):
        _plan_for(two_outputs)
    assert _plan_for(two_outputs, output_option="b")[0].output_name == "b"
    with pytest.raises(IncompatibleSuspect, match="no output 'c'"):
        _plan_for(two_outputs, output_option="c")
    with pytest.raises(IncompatibleSuspect, match="2 inputs"):
        _plan_for(_meta([("x", "FP32", [-1, 3, 16, 16]), ("z", "FP32", [-1, 1])], [("y", "FP32", [-1, 10])], 8))
    with pytest.raises(IncompatibleSuspect, match="FP64 input"):
        _plan_for(_meta([("x", "FP64", [-1, 3, 16, 16])], [("y", "FP32", [-1, 10])], 8))
    with pytest.raises(IncompatibleSuspect, match="class vector"):
        _plan_for(_meta([("x", "FP32", [-1, 3, 16, 16])], [("y", "FP32", [-1, 2, 5])], 8))
    labels = _plan_for(_meta([("x", "UINT8", [-1, 3, 16, 16])], [("y", "INT32", [-1])], 8))
    assert labels[0].output_kind == "labels" and labels[1].dtype == "uint8"
    dynamic = _plan_for(_meta([("x", "FP32", [-1, 3, 16, 16])], [("y", "FP32", [-1, -1])], 8), num_classes=None)
    assert dynamic[0].num_classes is None


def test_plan_labels_via() -> None:
    meta = _meta([("x", "FP32", [-1, 3, 16, 16])], [("y", "FP32", [-1, 10])], 8)
    assert _plan_for(meta)[0].labels_via == "classification"
    assert _plan_for(meta, classification_available=False)[0].labels_via == "argmax"
    assert _plan_for(meta, labels_via="argmax")[0].labels_via == "argmax"
    with pytest.raises(IncompatibleSuspect, match="classification extension"):
        _plan_for(meta, labels_via="classification", classification_available=False)


def test_unreachable_server_is_oracle_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for scheme in ("triton+http", "triton+grpc"):
        start = time.monotonic()
        with pytest.raises(OracleError, match=f"127.0.0.1:{port} unreachable") as err:
            open_triton(f"{scheme}://127.0.0.1:{port}/cnn", convention=NCHW, point_shape=POINT_SHAPE, num_classes=10, connect_timeout_s=2)
        assert not isinstance(err.value, IncompatibleSuspect)
        assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------
# Against the real server


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ["cnn", "nobatch", "fp16", "u8"])
def test_answers_equal_local_onnxruntime(triton_trial, protocol: str, model: str) -> None:
    pts = points(37, seed=7)
    local = _local_outputs(triton_trial.onnx[model], model, pts)
    assert len(set(local.argmax(axis=1).tolist())) >= 3, "test models must spread their labels"
    with _open(triton_trial.server.url(model, protocol), batch_size=8) as oracle:
        probs = oracle.query(pts, Access.PROBS)
        labels = oracle.query(pts, Access.LABELS)
        info = oracle.info
    expected = local if model == "u8" else _softmax(local)  # the u8 model ends with a softmax
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels, local.argmax(axis=1))
    assert info.details["output_reading"] == ("probabilities" if model == "u8" else "logits")
    assert info.details["input"]["datatype"] == {"fp16": "FP16", "u8": "UINT8"}.get(model, "FP32")
    assert info.details["convention"]["dtype"] == MODEL_DTYPES.get(model, "float32")
    assert info.num_classes == NUM_CLASSES and info.kind == "triton"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classification_extension_labels_equal_argmax(triton_trial, protocol: str) -> None:
    pts = points(50, seed=11)
    url = triton_trial.server.url("cnn", protocol)
    with _open(url) as auto, _open(url, labels_via="argmax") as argmax:
        assert auto.info.details["labels_via"] == "classification"
        assert argmax.info.details["labels_via"] == "argmax"
        via_classification = auto.query(pts, Access.LABELS)
        np.testing.assert_array_equal(via_classification, auto.query(pts, Access.PROBS).argmax(axis=1))
        np.testing.assert_array_equal(via_classification, argmax.query(pts, Access.LABELS))
    assert len(set(via_classification.tolist())) >= 3


def test_fp16_output_falls_back_to_argmax(triton_trial) -> None:
    url = triton_trial.server.url("fp16", "http")
    with _open(url) as oracle:
        assert oracle.info.details["labels_via"] == "argmax"  # Triton cannot classify FP16 outputs
    with pytest.raises(IncompatibleSuspect, match="FP16"):
        _open(url, labels_via="classification")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_label_only_endpoint(triton_trial, protocol: str) -> None:
    pts = points(20, seed=3)
    local = _local_outputs(triton_trial.onnx["labels"], "labels", pts)
    with _open(triton_trial.server.url("labels", protocol)) as oracle:
        assert oracle.info.access == (Access.LABELS,)
        np.testing.assert_array_equal(oracle.query(pts, Access.LABELS), local.argmax(axis=1))
        with pytest.raises(IncompatibleSuspect):
            oracle.query(pts, Access.PROBS)
    with pytest.raises(IncompatibleSuspect):
        _open(triton_trial.server.url("labels", protocol), labels_via="classification")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_requests_per_query_follow_batching(triton_trial, protocol: str) -> None:
    pts = points(13, seed=5)
    before = _executions(triton_trial, "nobatch")
    with _open(triton_trial.server.url("nobatch", protocol), concurrency=3) as oracle:
        assert oracle.info.details["samples_per_request"] == 1
        oracle.query(pts, Access.PROBS)
    assert _executions(triton_trial, "nobatch", before + 13) - before == 13  # one sample per request

    before = _executions(triton_trial, "cnn")
    with _open(triton_trial.server.url("cnn", protocol), batch_size=5) as oracle:
        oracle.query(pts, Access.PROBS)
    assert _executions(triton_trial, "cnn", before + 3) - before == 3  # 5 + 5 + 3
    with _open(triton_trial.server.url("cnn", protocol)) as oracle:
        assert oracle.info.details["samples_per_request"] == 64  # the model's max_batch_size


def test_concurrent_answers_come_back_in_order(triton_trial) -> None:
    pts = points(200, seed=9)
    local = _local_outputs(triton_trial.onnx["cnn"], "cnn", pts)
    with _open(triton_trial.server.url("cnn", "http"), batch_size=3, concurrency=8) as oracle:
        np.testing.assert_allclose(oracle.query(pts, Access.PROBS), _softmax(local), atol=1e-6)


def test_identity(triton_trial) -> None:
    server = triton_trial.server
    with _open(server.url("cnn", "http")) as h, _open(server.url("cnn", "grpc", version=1)) as g, _open(server.url("u8", "http")) as u:
        hi, gi = h.info.identity, g.info.identity
        assert hi["url"] == f"triton+http://{server.http_address}/cnn"
        assert gi["url"] == f"triton+grpc://{server.grpc_address}/cnn/1"
        assert hi["server_version"] == gi["server_version"] == "2.51.0"
        assert hi["model"] == "cnn" and hi["version"] == gi["version"] == "1"
        assert h.info.details["version_requested"] is None
        # The same model config hashes the same over both protocols, and differently from another model.
        assert len(hi["config_sha256"]) == 64 and hi["config_sha256"] == gi["config_sha256"]
        assert u.info.identity["config_sha256"] != hi["config_sha256"]
        json.dumps(h.info.to_dict())  # serialisable for reports


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_model_raises_transient_error_in_time(triton_trial, protocol: str) -> None:
    timeout_s = 1.0
    assert SLOW_DELAY_S > timeout_s + 1
    with _open(triton_trial.server.url("slow", protocol), request_timeout_s=timeout_s) as oracle:
        start = time.monotonic()
        with pytest.raises(TransientOracleError):
            oracle.query(points(2), Access.PROBS)
        assert time.monotonic() - start < timeout_s + 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_or_version_is_incompatible(triton_trial, protocol: str) -> None:
    server = triton_trial.server
    with pytest.raises(IncompatibleSuspect, match="'no_such_model'"):
        _open(server.url("no_such_model", protocol))
    with pytest.raises(IncompatibleSuspect, match="'cnn' version 2"):
        _open(server.url("cnn", protocol, version=2))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_input_that_does_not_fit_is_incompatible(triton_trial, protocol: str) -> None:
    url = triton_trial.server.url("cnn", protocol)
    with pytest.raises(IncompatibleSuspect, match="shape"):
        open_triton(url, convention=NCHW, point_shape=(3, 20, 20), num_classes=NUM_CLASSES)
    with pytest.raises(IncompatibleSuspect, match="NHWC"):  # an NCHW model asked in NHWC
        open_triton(url, convention=InputConvention(layout="NHWC"), point_shape=POINT_SHAPE, num_classes=NUM_CLASSES)
    with pytest.raises(IncompatibleSuspect, match="7"):
        open_triton(url, convention=NCHW, point_shape=POINT_SHAPE, num_classes=7)


def test_points_of_another_shape_are_input_error(triton_trial) -> None:
    with _open(triton_trial.server.url("cnn", "http")) as oracle:
        with pytest.raises(InputError):
            oracle.query(np.zeros((2, 3, 8, 8), np.float32), Access.LABELS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_token_reaches_the_server_and_never_leaks(triton_trial, protocol: str, monkeypatch, caplog) -> None:
    token = f"tok-{protocol}-{np.random.default_rng(21).bytes(6).hex()}"
    monkeypatch.setenv("DEEPCORE_TEST_TRITON_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    oracle = _open(
        triton_trial.server.url("cnn", protocol),
        auth_token_env="DEEPCORE_TEST_TRITON_TOKEN",
        headers={"X-DeepCore-Trial": protocol},
    )
    with oracle:
        oracle.query(points(3), Access.LABELS)
        seen = [json.loads(line) for line in triton_trial.record.read_text().splitlines()]
        forwarded = [{k.lower(): v for k, v in p.items()} for p in seen]
        assert {"authorization": f"Bearer {token}", "x-deepcore-trial": protocol} in forwarded
        for text in (repr(oracle), str(oracle), json.dumps(oracle.info.to_dict()), repr(oracle._transport), caplog.text):
            assert token not in text
        assert oracle.info.details["authenticated"] is True


def test_grpc_tls_with_root_certificates(tls_trial) -> None:
    url = tls_trial.server.url("cnn", "grpc").replace("triton+grpc://", "triton+grpcs://")
    with _open(url, ssl_root_certificates=str(tls_trial.cert)) as oracle:
        assert oracle.info.details["tls"] is True
        assert oracle.query(points(4), Access.LABELS).shape == (4,)
    with pytest.raises(OracleError, match="unreachable"):  # self-signed: not trusted by default
        _open(url, connect_timeout_s=3)
    with pytest.raises(OracleError, match="unreachable"):  # plain gRPC to a TLS port
        _open(tls_trial.server.url("cnn", "grpc"), connect_timeout_s=3)


def test_https_with_root_certificates_or_insecure(tls_trial, https_proxy, monkeypatch) -> None:
    monkeypatch.setenv("DEEPCORE_TEST_TRITON_TOKEN", tls_trial.token)
    url = f"triton+https://127.0.0.1:{https_proxy.port}/cnn"
    token = {"auth_token_env": "DEEPCORE_TEST_TRITON_TOKEN"}
    with _open(url, ssl_root_certificates=str(tls_trial.cert), **token) as verified, _open(url, ssl_insecure=True, **token) as insecure:
        assert verified.info.details["tls"] is True
        np.testing.assert_array_equal(verified.query(points(6), Access.LABELS), insecure.query(points(6), Access.LABELS))
    with pytest.raises(OracleError, match="unreachable"):  # self-signed: not trusted by default
        _open(url, connect_timeout_s=3, **token)
    with pytest.raises(OracleError, match="unreachable"):  # TLS is not optional on that port
        _open(url.replace("https", "http"), connect_timeout_s=3, request_timeout_s=3, **token)


def test_options_given_as_none_take_their_defaults(triton_trial) -> None:
    with _open(triton_trial.server.url("cnn", "http"), concurrency=None, labels_via=None, headers=None, ssl=None) as oracle:
        assert oracle.info.details["concurrency"] == 4 and oracle.info.details["labels_via"] == "classification"


def test_rejected_token_is_a_permanent_error(tls_trial, monkeypatch) -> None:
    url = tls_trial.server.url("cnn", "http")
    monkeypatch.setenv("DEEPCORE_TEST_TRITON_TOKEN", tls_trial.token)
    with _open(url, auth_token_env="DEEPCORE_TEST_TRITON_TOKEN") as oracle:
        assert oracle.query(points(4), Access.LABELS).shape == (4,)
    monkeypatch.setenv("DEEPCORE_TEST_TRITON_TOKEN", "wrong")
    for options in ({"auth_token_env": "DEEPCORE_TEST_TRITON_TOKEN"}, {}):
        with _open(url, **options) as oracle:
            with pytest.raises(OracleError, match="restricted") as err:
                oracle.query(points(4), Access.LABELS)
            assert not isinstance(err.value, TransientOracleError)


def test_query_after_kill_raises_without_hanging(fresh_server) -> None:
    from pathlib import Path as _Path

    http = _open(fresh_server.url("cnn", "http"), request_timeout_s=5)
    grpc = _open(fresh_server.url("cnn", "grpc"), request_timeout_s=5)
    for oracle in (http, grpc):
        oracle.query(points(4), Access.PROBS)
    assert any(_Path("/dev/shm").glob(fresh_server.shm_prefix + "*"))
    fresh_server.kill()
    assert not fresh_server.is_running()
    assert not any(_Path("/dev/shm").glob(fresh_server.shm_prefix + "*")), "shared memory left behind"
    for oracle in (http, grpc):
        start = time.monotonic()
        with pytest.raises(TransientOracleError):  # refused / UNAVAILABLE: the server may come back
            oracle.query(points(4), Access.PROBS)
        assert time.monotonic() - start < 6
        oracle.close()
        oracle.close()  # idempotent
        with pytest.raises(OracleError, match="closed"):
            oracle.query(points(1), Access.LABELS)


# ---------------------------------------------------------------------------------------------
# The hosting tools


def test_missing_pytriton_is_input_error_with_install_hint(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from deepcore_auditor.adapters.triton import serve as triton_serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    (tmp_path / "repo").mkdir()
    with pytest.raises(InputError, match="pip install"):
        triton_serve.TritonServer(tmp_path / "repo").start()


def test_repository_layout(tmp_path: Path, triton_onnx) -> None:
    from deepcore_auditor.adapters.triton.serve import ServedModel, write_model_repository

    root = write_model_repository(
        {"a": triton_onnx["u8"], "b": ServedModel(triton_onnx["cnn"], max_batch_size=0, versions=(1, 3), delay_s=0.5)},
        tmp_path / "repo",
        max_batch_size=16,
    )
    a, b = (root / "a" / "config.pbtxt").read_text(), (root / "b" / "config.pbtxt").read_text()
    assert 'backend: "python"' in a and "max_batch_size: 16" in a
    assert "TYPE_UINT8" in a and "dims: [ 16, 16, 3 ]" in a and "dims: [ 10 ]" in a
    assert "max_batch_size: 0" in b and "dims: [ 3, 16, 16 ]" in b and '"delay_s"' in b
    assert (root / "b" / "3" / "model.onnx").is_file() and (root / "b" / "1" / "model.py").is_file()
    compile((root / "a" / "1" / "model.py").read_text(), "model.py", "exec")
    with pytest.raises(InputError):
        write_model_repository({"bad/name": triton_onnx["cnn"]}, tmp_path / "repo2")
    with pytest.raises(InputError):
        write_model_repository({"m": tmp_path / "missing.onnx"}, tmp_path / "repo3")


def test_server_that_cannot_load_a_model_fails_fast_with_its_log(tmp_path: Path, triton_onnx) -> None:
    pytest.importorskip("pytriton")
    from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository

    root = write_model_repository({"broken": triton_onnx["cnn"]}, tmp_path / "repo")
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    server = TritonServer(root, startup_timeout_s=30)
    start = time.monotonic()
    with pytest.raises(OracleError, match="broken"):
        server.start()
    assert time.monotonic() - start < 20
    assert not server.is_running()
    assert not any(Path("/dev/shm").glob(server.shm_prefix + "*"))
