"""Local suspect and owner backends: real small torch models, exported to real ONNX / TorchScript /
torch.export / safetensors files in tmp_path, checked against the torch module's own answers."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import types
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepcore_auditor.adapters.base import Access, InputConvention
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.adapters.open import open_suspect
from deepcore_auditor.adapters.torch import TorchOracle, apply_convention_torch, load_torch_model

POINT = (3, 8, 6)  # C, H, W: H != W != C so a wrong layout cannot fit by accident
NCHW = InputConvention()

NET_SOURCE = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    """A tiny CNN; `nhwc` takes [B, H, W, C] input and permutes inside."""

    def __init__(self, classes: int = 10, softmax: bool = False, nhwc: bool = False) -> None:
        super().__init__()
        self.nhwc, self.softmax = nhwc, softmax
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 6, classes)

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        z = self.fc(torch.relu(self.conv(x)).flatten(1))
        return torch.softmax(z, dim=1) if self.softmax else z


def build() -> nn.Module:
    return SmallNet()


def build_five() -> nn.Module:
    return SmallNet(classes=5)
'''
_ns: dict = {}
exec(compile(NET_SOURCE, "<small-net>", "exec"), _ns)
SmallNet = _ns["SmallNet"]


def make_net(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return SmallNet(**kwargs).eval()


def export_onnx(
    model: nn.Module, path: Path, *, batch: int = 2, dynamic: bool = True, dtype: torch.dtype = torch.float32,
    nhwc: bool = False,
) -> Path:
    shape = (batch, 8, 6, 3) if nhwc else (batch, *POINT)
    x = torch.rand(shape).to(dtype)
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes=axes
        )
    return path


def points(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *POINT), dtype=np.float32)


def torch_outputs(model: nn.Module, pts: np.ndarray, conv: InputConvention = NCHW) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(conv.apply(pts))).float().numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def spy_runs(oracle: OnnxOracle) -> list[tuple[int, ...]]:
    """Record the input shape of every ONNX Runtime run the oracle makes."""
    seen: list[tuple[int, ...]] = []
    session = oracle._session
    real = session.run

    def run(names, feeds, *args):  # type: ignore[no-untyped-def]
        seen.append(next(iter(feeds.values())).shape)
        return real(names, feeds, *args)

    session.run = run
    return seen


# ----------------------------------------------------------------------------- ONNX


def test_onnx_dynamic_batch_matches_torch(tmp_path: Path) -> None:
    model = make_net()
    path = export_onnx(model, tmp_path / "dyn.onnx")
    oracle = OnnxOracle(path, convention=NCHW, point_shape=POINT, num_classes=10, device="cpu", max_batch=4)
    seen = spy_runs(oracle)
    pts = points(11)
    logits = torch_outputs(model, pts)

    probs = oracle.query(pts, Access.PROBS)
    labels = oracle.query(pts, Access.LABELS)

    np.testing.assert_allclose(probs, softmax(logits.astype(np.float64)), atol=1e-5)
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))
    assert [s[0] for s in seen] == [4, 4, 3, 4, 4, 3]
    info = oracle.info
    assert info.kind == "onnx"
    assert info.identity == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert set(info.access) == {Access.LABELS, Access.PROBS}
    assert info.num_classes == 10
    assert info.details["providers"] == ["CPUExecutionProvider"]
    assert info.details["output_reading"] == "logits"
    assert info.details["batch"] == "dynamic"
    oracle.close()
    oracle.close()
    with pytest.raises(OracleError, match="closed"):
        oracle.query(pts, Access.LABELS)


def test_onnx_auto_device_reports_real_providers(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = export_onnx(make_net(), tmp_path / "m.onnx")
    with OnnxOracle(path, convention=NCHW, point_shape=POINT) as oracle:
        providers = oracle.info.details["providers"]
        assert providers == oracle._session.get_providers()
        assert providers[-1] == "CPUExecutionProvider"
        assert oracle.info.num_classes == 10  # read from the model when not given
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("n", [1, 3, 7])
def test_onnx_fixed_batch_pads_and_drops(tmp_path: Path, n: int) -> None:
    model = make_net()
    path = export_onnx(model, tmp_path / "fixed3.onnx", batch=3, dynamic=False)
    oracle = OnnxOracle(path, convention=NCHW, point_shape=POINT, num_classes=10, device="cpu")
    seen = spy_runs(oracle)
    pts = points(n)

    probs = oracle.query(pts, Access.PROBS)

    assert oracle.info.details["batch"] == 3
    assert seen == [(3, *POINT)] * (-(-n // 3))
    np.testing.assert_allclose(probs, softmax(torch_outputs(model, pts).astype(np.float64)), atol=1e-5)
    np.testing.assert_array_equal(oracle.query(pts, Access.LABELS), torch_outputs(model, pts).argmax(axis=1))


def test_onnx_probability_outputs_are_not_softmaxed_again(tmp_path: Path) -> None:
    model = make_net(softmax=True)
    path = export_onnx(model, tmp_path / "probs.onnx")
    oracle = OnnxOracle(path, convention=NCHW, point_shape=POINT, num_classes=10, device="cpu")
    pts = points(6)

    probs = oracle.query(pts, Access.PROBS)

    np.testing.assert_allclose(probs, torch_outputs(model, pts), atol=1e-6)
    assert oracle.info.details["output_reading"] == "probabilities"


def test_onnx_nhwc_input(tmp_path: Path) -> None:
    model = make_net(nhwc=True)
    path = export_onnx(model, tmp_path / "nhwc.onnx", nhwc=True)
    nhwc = InputConvention(layout="NHWC", scale=255.0, mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0))
    oracle = OnnxOracle(path, convention=nhwc, point_shape=POINT, num_classes=10, device="cpu")
    pts = points(5)

    np.testing.assert_allclose(
        oracle.query(pts, Access.PROBS), softmax(torch_outputs(model, pts, nhwc).astype(np.float64)), atol=1e-5
    )
    with pytest.raises(IncompatibleSuspect) as err:
        OnnxOracle(path, convention=NCHW, point_shape=POINT, num_classes=10, device="cpu")
    msg = str(err.value)
    assert "[batch, 8, 6, 3] (NCHW)" in msg and "[3, 8, 6]" in msg
    assert "declare --suspect-layout NHWC" in msg
    assert "\n" not in msg


def test_onnx_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    path = export_onnx(make_net(), tmp_path / "m.onnx", batch=1, dynamic=False)
    with pytest.raises(IncompatibleSuspect) as err:
        OnnxOracle(path, convention=NCHW, point_shape=(1, 28, 28), num_classes=10, device="cpu")
    msg = str(err.value)
    assert msg.startswith("suspect expects input [1, 3, 8, 6] (NCHW) but fingerprint points are [1, 28, 28]")
    assert "declare" not in msg


def test_onnx_float16_input(tmp_path: Path) -> None:
    model = make_net()
    path = export_onnx(make_net().half(), tmp_path / "half.onnx", dtype=torch.float16)
    oracle = OnnxOracle(path, convention=NCHW, point_shape=POINT, num_classes=10, device="cpu")
    pts = points(9)
    spy = spy_runs(oracle)

    probs = oracle.query(pts, Access.PROBS)

    assert oracle.info.details["input_dtype"] == "float16"
    assert oracle.query(pts[:1], Access.LABELS).shape == (1,) and len(spy) == 2
    logits32 = torch_outputs(model, pts).astype(np.float64)
    np.testing.assert_allclose(probs, softmax(logits32), atol=2e-3)
    np.testing.assert_array_equal(probs.argmax(axis=1), logits32.argmax(axis=1))


def test_onnx_uint8_input(tmp_path: Path) -> None:
    class Uint8Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float() / 255.0)

    model = Uint8Net().eval()
    path = export_onnx(model, tmp_path / "u8.onnx", dtype=torch.uint8)
    conv = InputConvention(scale=255.0)
    oracle = OnnxOracle(path, convention=conv, point_shape=POINT, num_classes=10, device="cpu")
    pts = points(4)

    expected = torch_outputs(model, pts, conv.with_dtype("uint8"))
    np.testing.assert_array_equal(oracle.query(pts, Access.LABELS), expected.argmax(axis=1))
    assert oracle.info.details["input_dtype"] == "uint8"
    with pytest.raises(IncompatibleSuspect, match="uint8.*255"):
        OnnxOracle(path, convention=NCHW, point_shape=POINT, device="cpu")


def test_onnx_class_count_mismatch(tmp_path: Path) -> None:
    path = export_onnx(make_net(classes=5), tmp_path / "five.onnx")
    with pytest.raises(IncompatibleSuspect, match=r"suspect outputs 5 classes but the fingerprint has 10"):
        OnnxOracle(path, convention=NCHW, point_shape=POINT, num_classes=10, device="cpu")


def test_onnx_two_inputs_refused(tmp_path: Path) -> None:
    class TwoInputs(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a + b).flatten(1)[:, :10]

    path = tmp_path / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TwoInputs(), (torch.rand(1, *POINT), torch.rand(1, *POINT)), str(path), dynamo=False)
    with pytest.raises(IncompatibleSuspect, match="2 inputs"):
        OnnxOracle(path, convention=NCHW, point_shape=POINT, device="cpu")


def test_onnx_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="suspect file not found: .*nothere.onnx"):
        OnnxOracle(tmp_path / "nothere.onnx", convention=NCHW, point_shape=POINT)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf " * 10)
    with pytest.raises(InputError, match="corrupt.onnx is not a readable ONNX model") as err:
        OnnxOracle(bad, convention=NCHW, point_shape=POINT)
    assert err.value.__cause__ is not None
    assert "\n" not in str(err.value)


def test_onnx_device_options(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = export_onnx(make_net(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="unknown device"):
        OnnxOracle(path, convention=NCHW, point_shape=POINT, device="tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime offers CUDA; the no-GPU refusal is not testable here")
    with pytest.raises(InputError, match="cuda"):
        OnnxOracle(path, convention=NCHW, point_shape=POINT, device="cuda")


def test_onnx_runtime_failure_is_oracle_error(tmp_path: Path) -> None:
    # Height and width left symbolic: the construction check passes, the Linear layer fails at run time.
    path = tmp_path / "anyhw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            make_net(), (torch.rand(2, *POINT),), str(path), dynamo=False, input_names=["x"],
            dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}},
        )
    oracle = OnnxOracle(path, convention=NCHW, point_shape=(3, 8, 7), device="cpu")
    with pytest.raises(OracleError, match="ONNX Runtime failed") as err:
        oracle.query(np.zeros((2, 3, 8, 7), np.float32), Access.LABELS)
    assert err.value.__cause__ is not None


# ----------------------------------------------------------------------------- torch


@pytest.mark.parametrize(
    "conv",
    [
        NCHW,
        InputConvention(scale=255.0, mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4)),
        InputConvention(layout="NHWC", scale=2.0, mean=(1.0,), std=(0.5,)),
        InputConvention(layout="NHWC", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), dtype="float16"),
    ],
    ids=["plain", "imagenet", "nhwc", "nhwc-fp16"],
)
def test_apply_convention_torch_matches_numpy(conv: InputConvention) -> None:
    pts = points(4)
    x = torch.from_numpy(pts).requires_grad_(True)

    out = apply_convention_torch(x, conv)
    expected = conv.apply(pts)

    assert out.dtype == getattr(torch, conv.dtype) and tuple(out.shape) == expected.shape
    np.testing.assert_allclose(out.detach().float().numpy(), expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    out.float().sum().backward()
    std = np.broadcast_to(np.asarray(conv.std, np.float32).reshape(1, -1, 1, 1), pts.shape)
    np.testing.assert_allclose(x.grad.numpy(), conv.scale / std, rtol=1e-5)


def test_apply_convention_torch_refuses_uint8() -> None:
    with pytest.raises(InputError, match="uint8"):
        apply_convention_torch(torch.zeros(1, *POINT), InputConvention(scale=255.0, dtype="uint8"))


def test_torch_oracle_matches_module() -> None:
    model = make_net()
    pts = points(7)
    oracle = TorchOracle(
        model, convention=NCHW, point_shape=POINT, num_classes=10, device="cpu", identity={"path": "x"}, max_batch=3
    )

    probs = oracle.query(pts, Access.PROBS)

    logits = torch_outputs(model, pts).astype(np.float64)
    np.testing.assert_allclose(probs, softmax(logits), atol=1e-6)
    np.testing.assert_array_equal(oracle.query(pts, Access.LABELS), logits.argmax(axis=1))
    assert oracle.info.kind == "torch" and oracle.info.identity == {"path": "x"}
    assert oracle.info.details["output_reading"] == "logits"
    with pytest.raises(IncompatibleSuspect, match="10 classes but the fingerprint has 5"):
        TorchOracle(model, convention=NCHW, point_shape=POINT, num_classes=5, device="cpu")


def test_torch_oracle_wrong_layout_is_caught_before_queries() -> None:
    model = make_net(nhwc=True)
    nhwc = InputConvention(layout="NHWC")
    ok = TorchOracle(model, convention=nhwc, point_shape=POINT, device="cpu")
    pts = points(3)
    np.testing.assert_allclose(
        ok.query(pts, Access.PROBS), softmax(torch_outputs(model, pts, nhwc).astype(np.float64)), atol=1e-6
    )
    with pytest.raises(IncompatibleSuspect, match="declare --suspect-layout NHWC"):
        TorchOracle(model, convention=NCHW, point_shape=POINT, device="cpu")


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """An importable module (unique name) holding SmallNet factories `build` and `build_five`."""
    name = f"deepcore_test_nets_{uuid.uuid4().hex[:8]}"
    pkg_dir = tmp_path / "pkgs"
    pkg_dir.mkdir()
    (pkg_dir / f"{name}.py").write_text(NET_SOURCE)
    monkeypatch.syspath_prepend(str(pkg_dir))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)


def _reference(factory_module: types.ModuleType) -> nn.Module:
    torch.manual_seed(0)
    return factory_module.build().eval()


def _save_torchscript(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(model, torch.rand(2, *POINT)).save(str(path))


def _save_pt2(model: nn.Module, path: Path) -> None:
    program = torch.export.export(model, (torch.rand(2, *POINT),))  # batch fixed at 2
    torch.export.save(program, str(path))


@pytest.mark.parametrize("form", ["torchscript", "pt2", "safetensors", "state_dict", "checkpoint"])
def test_load_torch_model_forms_agree(tmp_path: Path, factory_module: types.ModuleType, form: str) -> None:
    from safetensors.torch import save_file

    ref = _reference(factory_module)
    weights: str | None = None
    if form == "torchscript":
        spec = str(tmp_path / "m.ts")
        _save_torchscript(ref, Path(spec))
    elif form == "pt2":
        spec = str(tmp_path / "m.pt2")
        _save_pt2(ref, Path(spec))
    else:
        spec = f"{factory_module.__name__}:build"
        if form == "safetensors":
            weights = str(tmp_path / "w.safetensors")
            save_file(ref.state_dict(), weights)
        elif form == "state_dict":
            weights = str(tmp_path / "w.pth")
            torch.save(ref.state_dict(), weights)
        else:
            weights = str(tmp_path / "ckpt.pt")
            torch.save({"epoch": 3, "state_dict": ref.state_dict()}, weights)

    model, identity = load_torch_model(spec, factory_weights=weights)

    x = torch.rand(4, *POINT)
    with torch.no_grad():
        expected = ref(x)
        got = torch.cat([model(x[:2]), model(x[2:])])  # the .pt2 was exported with a fixed batch of 2
        fresh = factory_module.build()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fresh, expected)  # the weights, not the factory's init, made the match
    hashed = Path(weights or spec)
    assert identity["path"] == str(hashed)
    assert identity["sha256"] == hashlib.sha256(hashed.read_bytes()).hexdigest()
    if weights is not None:
        assert identity["factory"] == spec


def test_pt2_suspect_with_fixed_batch_via_open_suspect(tmp_path: Path, factory_module: types.ModuleType) -> None:
    ref = _reference(factory_module)
    path = tmp_path / "m.pt2"
    _save_pt2(ref, path)
    oracle = open_suspect(str(path), convention=NCHW, point_shape=POINT, num_classes=10, device="cpu")
    pts = points(5)

    assert isinstance(oracle, TorchOracle) and oracle.info.details["batch"] == 2
    np.testing.assert_allclose(
        oracle.query(pts, Access.PROBS), softmax(torch_outputs(ref, pts).astype(np.float64)), atol=1e-6
    )
    with pytest.raises(IncompatibleSuspect, match=r"model expects input \[2, 3, 8, 6\] \(NCHW\)"):
        open_suspect(str(path), convention=NCHW, point_shape=(3, 8, 8), num_classes=10, device="cpu")


class _Payload:
    """Unpickling this object creates the file it names: proof that arbitrary code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.target), "w"))


def test_pickled_object_as_state_dict_is_refused(tmp_path: Path, factory_module: types.ModuleType) -> None:
    sentinel = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"conv.weight": _Payload(sentinel)}, str(weights))

    refusal = r"refused .*evil.pth: not a plain state dict of tensors \(Unsupported global: GLOBAL .*open.*\)"
    with pytest.raises(InputError, match=refusal + ".*weights_only=True"):
        load_torch_model(f"{factory_module.__name__}:build", factory_weights=str(weights))
    assert not sentinel.exists()


def test_pt2_with_pickled_object_is_refused(tmp_path: Path, factory_module: types.ModuleType) -> None:
    good = tmp_path / "good.pt2"
    _save_pt2(_reference(factory_module), good)
    sentinel = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save((_Payload(sentinel),), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data/sample_inputs/model.pt"):
                data = payload.getvalue()
            dst.writestr(item, data)

    with pytest.raises(InputError, match="refused .*evil.pt2.*sample_inputs"):
        load_torch_model(str(evil))
    assert not sentinel.exists()


def test_load_torch_model_failures(tmp_path: Path, factory_module: types.ModuleType) -> None:
    name = factory_module.__name__
    ref = _reference(factory_module)
    sd_path = tmp_path / "sd.pt"
    torch.save(ref.state_dict(), str(sd_path))
    five = tmp_path / "five.pth"
    torch.save(factory_module.build_five().state_dict(), str(five))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    junk_pt2 = tmp_path / "junk.pt2"
    junk_pt2.write_bytes(b"junk")
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}, str(partial))

    cases = [
        (dict(spec=str(tmp_path / "missing.pt")), "model file not found"),
        (dict(spec=str(sd_path)), "is not a TorchScript model"),
        (dict(spec=str(garbage)), "garbage.pt is not a TorchScript model"),
        (dict(spec=str(junk_pt2)), "junk.pt2 is not a torch.export"),
        (dict(spec="no_such_package_xyz.nets:build", factory_weights=str(five)), "cannot import no_such_package_xyz"),
        (dict(spec=f"{name}:nope", factory_weights=str(five)), "has no attribute nope"),
        (dict(spec=f"{name}:build"), "needs a weights file"),
        (dict(spec=f"{name}:build", factory_weights=str(tmp_path / "none.pth")), "weights file not found"),
        (
            dict(spec=f"{name}:build", factory_weights=str(five)),
            r"shape mismatch fc.weight \[5, 192\] vs model \[10, 192\]",
        ),
        (dict(spec=f"{name}:build", factory_weights=str(partial)), "missing fc.bias, fc.weight"),
        (dict(spec=f"{name}:build", factory_weights=str(garbage)), "refused .*garbage.pt: not a plain state dict"),
        (dict(spec=str(sd_path), factory_weights=str(five)), "only used with a package.module:factory"),
    ]
    for kwargs, pattern in cases:
        spec = kwargs.pop("spec")
        with pytest.raises(InputError, match=pattern) as err:
            load_torch_model(spec, **kwargs)
        assert "\n" not in str(err.value), spec


# ----------------------------------------------------------------------------- open_suspect


def test_open_suspect_dispatches_local_files(tmp_path: Path) -> None:
    model = make_net()
    onnx_path = export_onnx(model, tmp_path / "s.onnx")
    ts_path = tmp_path / "s.pt"
    _save_torchscript(model, ts_path)
    pts = points(4)
    kw = dict(convention=NCHW, point_shape=POINT, num_classes=10, device="cpu")

    onnx_oracle = open_suspect(str(onnx_path), **kw)
    torch_oracle = open_suspect(str(ts_path), **kw, triton_model=None)

    assert isinstance(onnx_oracle, OnnxOracle) and isinstance(torch_oracle, TorchOracle)
    assert torch_oracle.info.identity["sha256"] == hashlib.sha256(ts_path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(onnx_oracle.query(pts, Access.LABELS), torch_oracle.query(pts, Access.LABELS))
    with pytest.raises(InputError, match="suspect file not found"):
        open_suspect(str(tmp_path / "gone.onnx"), **kw)
    with pytest.raises(InputError, match=r"give a \.onnx file.*triton\+grpc\(s\)://.*v2\+http"):
        open_suspect(str(tmp_path / "model.h5"), **kw)
    with pytest.raises(InputError, match="timeout_s apply to Triton and v2 server suspects only"):
        open_suspect(str(onnx_path), **kw, timeout_s=3.0)


def test_open_suspect_triton_without_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepcore_auditor.adapters.triton", None)  # makes the import fail
    with pytest.raises(InputError, match=r"tritonclient: pip install 'deepcore-auditor\[triton\]'"):
        open_suspect("triton+http://127.0.0.1:8000/net", convention=NCHW, point_shape=POINT, num_classes=10)


@pytest.mark.parametrize("scheme", ["triton+http", "triton+https", "triton+grpc", "triton+grpcs"])
def test_open_suspect_hands_triton_urls_over(monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    calls = []
    sentinel = object()

    def open_triton(url: str, **kwargs: object) -> object:
        calls.append((url, kwargs))
        return sentinel

    fake = types.ModuleType("deepcore_auditor.adapters.triton")
    fake.open_triton = open_triton  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepcore_auditor.adapters.triton", fake)
    url = f"{scheme}://127.0.0.1:8001/net"

    got = open_suspect(url, convention=NCHW, point_shape=POINT, num_classes=10, timeout_s=2.0)

    assert got is sentinel
    assert calls == [(url, dict(convention=NCHW, point_shape=POINT, num_classes=10, timeout_s=2.0))]


def test_a_factory_takes_keyword_arguments(tmp_path: Path) -> None:
    """`--owner-arg NAME=VALUE`: the factory is called with them (VALUE read as JSON, else text)
    and the identity records them; they are refused for any other owner form."""
    from safetensors.torch import save_file

    from deepcore_auditor.adapters.torch import parse_factory_args
    from deepcore_auditor.benchmarks.owners import vgg_bn

    args = parse_factory_args(["in_channels=1", "num_classes=5", "widths=[4, 8, 16]"])
    assert args == {"in_channels": 1, "num_classes": 5, "widths": [4, 8, 16]}
    torch.manual_seed(0)
    ref = vgg_bn(1, 5, (4, 8, 16)).eval()
    weights = tmp_path / "w.safetensors"
    save_file(ref.state_dict(), str(weights))
    model, identity = load_torch_model("deepcore_auditor.benchmarks.owners:vgg_bn", factory_weights=str(weights), factory_args=args)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert json.loads(identity["factory_args"]) == args
    with pytest.raises(InputError, match="num_classes=5"):  # the default widths do not fit these weights
        load_torch_model("deepcore_auditor.benchmarks.owners:vgg_bn", factory_weights=str(weights),
                         factory_args={"in_channels": 1, "num_classes": 5, "depth": 3})
    ts = tmp_path / "m.ts"
    torch.jit.trace(ref, x).save(str(ts))
    with pytest.raises(InputError, match="only used with a package.module:factory"):
        load_torch_model(str(ts), factory_args=args)
    assert parse_factory_args(["name=resnet", 'tag="x=y"']) == {"name": "resnet", "tag": "x=y"}
    for bad in (["num_classes"], ["=3"], ["2x=1"], ["a=1", "a=2"]):
        with pytest.raises(InputError, match="--owner-arg"):
            parse_factory_args(bad)
