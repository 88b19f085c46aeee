"""PyTorch models: loading owner (and local suspect) models safely, and an oracle around them.

Loading never unpickles arbitrary objects: state dicts go through `torch.load(weights_only=True)`
or safetensors, TorchScript through its own restricted loader, and a torch.export archive is
checked so that every pickled part of it is plain tensors before `torch.export.load` reads it.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepcore_auditor.adapters.base import Access, InputConvention, Oracle, OracleInfo, check_channels, read_outputs
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError, first_line
from deepcore_auditor.adapters.onnx import Dim, check_input_fits, file_sha256, run_in_batches

log = logging.getLogger(__name__)

_DEVICES = ("auto", "cpu", "cuda")
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


def apply_convention_torch(points: torch.Tensor, convention: InputConvention) -> torch.Tensor:
    """Differentiable twin of `InputConvention.apply`: canonical [N, C, H, W] points -> model input.

    Float conventions only (rounding to uint8 has no useful gradient).
    """
    if convention.dtype == "uint8":
        raise InputError("apply_convention_torch handles float conventions only, not uint8")
    if points.ndim != 4:
        raise InputError(f"points must be [N, C, H, W], got shape {tuple(points.shape)}")
    check_channels(convention, points.shape[1])
    work = points.dtype if points.dtype in (torch.float32, torch.float64) else torch.float32
    x = points.to(work) * torch.tensor(convention.scale, dtype=work, device=points.device)
    mean = torch.tensor(convention.mean, dtype=work, device=points.device).reshape(1, -1, 1, 1)
    std = torch.tensor(convention.std, dtype=work, device=points.device).reshape(1, -1, 1, 1)
    x = ((x - mean) / std).to(_TORCH_DTYPES[convention.dtype])
    if convention.layout == "NHWC":
        x = x.permute(0, 2, 3, 1).contiguous()
    return x


def resolve_device(device: str) -> torch.device:
    """`auto` (a CUDA GPU when PyTorch sees a usable one, else the CPU), `cpu` or `cuda`, as a
    torch.device; `cuda` without a usable GPU, or any other name, is refused in one line. Shared
    by the suspects run here and the fingerprint builder (fingerprints.build)."""
    if device not in _DEVICES:
        raise InputError(f"unknown device {device!r}: use one of {', '.join(_DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda requested but PyTorch sees no usable CUDA GPU")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _set_eval(model: torch.nn.Module) -> torch.nn.Module:
    """eval() where the module allows it; a torch.export module is frozen in its export-time mode."""
    try:
        model.eval()
    except NotImplementedError:
        log.debug("module %s does not support eval(); using it as exported", type(model).__name__)
    return model


def _exported_input_shape(model: torch.nn.Module) -> list[Dim] | None:
    """The declared input shape of a torch.export module (symbolic dims as names), else None."""
    graph = getattr(model, "graph", None)
    if graph is None or isinstance(model, torch.jit.ScriptModule):
        return None
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return [int(d) if isinstance(d, int) else str(d) for d in val.shape]
            return None
    return None


def _first_floating_dtype(model: torch.nn.Module) -> torch.dtype | None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    elif isinstance(out, Mapping) and out:
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise OracleError(f"model returned {type(out).__name__}, expected a tensor of logits or probabilities")
    return out


class TorchOracle(Oracle):
    """Answers queries with an in-process PyTorch module (eval mode, no gradients).

    Takes the same keywords as `OnnxOracle`, plus `identity` (from `load_torch_model`). The
    module is moved to the chosen device. One probe point is run at construction so a model
    that cannot take the fingerprint's points fails before any query.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        convention: InputConvention,
        point_shape: tuple[int, int, int],
        num_classes: int | None = None,
        device: str = "auto",
        identity: dict[str, str] | None = None,
        max_batch: int = 256,
    ) -> None:
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        self._point_shape = tuple(int(v) for v in point_shape)
        if len(self._point_shape) != 3:
            raise InputError(f"point_shape must be (C, H, W), got {point_shape}")
        self._device = resolve_device(device)
        self._model: torch.nn.Module | None = _set_eval(model.to(self._device))
        self._identity = dict(identity or {})
        self._max_batch = max_batch
        self._model_dtype = _first_floating_dtype(model)
        self._convention = convention
        if convention.dtype != "uint8" and self._model_dtype == torch.float16:
            self._convention = convention.with_dtype("float16")
        check_channels(convention, self._point_shape[0])

        self._input_shape = _exported_input_shape(model)
        self._fixed_batch: int | None = None
        if self._input_shape is not None:
            check_input_fits(self._input_shape, self._point_shape, convention.layout, who="model")
            b = self._input_shape[0]
            self._fixed_batch = b if isinstance(b, int) and b > 0 else None
        k = self._probe()
        if num_classes is not None and k != num_classes:
            raise IncompatibleSuspect(f"model outputs {k} classes but the fingerprint has {num_classes}")
        self._num_classes = num_classes if num_classes is not None else k
        self._output_reading: str | None = None

    def _probe(self) -> int:
        """Run one mid-grey point; return the class count or raise IncompatibleSuspect."""
        point = np.full((1, *self._point_shape), 0.5, dtype=np.float32)
        try:
            out = run_in_batches(self._convention.apply(point), self._run, self._fixed_batch, 1)
        except OracleError as e:
            c, h, w = self._point_shape
            msg = (
                f"model fails on one fingerprint point [{c}, {h}, {w}] (C, H, W) sent as "
                f"{self._convention.layout}: {e}"
            )
            if self._input_shape is None and c not in (h, w):
                other = "NHWC" if self._convention.layout == "NCHW" else "NCHW"
                try:
                    self._run(InputConvention(other, 1.0, (0.0,), (1.0,), self._convention.dtype).apply(point))
                    msg += f"; declare --suspect-layout {other}"
                except OracleError:
                    pass
            raise IncompatibleSuspect(msg) from e
        return int(out.shape[1])

    @property
    def info(self) -> OracleInfo:
        details: dict[str, Any] = {
            "device": str(self._device),
            "input_dtype": self._convention.dtype,
            "layout": self._convention.layout,
            "batch": self._fixed_batch if self._fixed_batch is not None else "dynamic",
        }
        if self._output_reading is not None:
            details["output_reading"] = self._output_reading
        return OracleInfo(
            kind="torch",
            identity=dict(self._identity),
            access=(Access.LABELS, Access.PROBS),
            num_classes=self._num_classes,
            details=details,
        )

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise OracleError("this torch oracle is closed")
        t = torch.from_numpy(x).to(self._device)
        if t.is_floating_point() and self._model_dtype is not None:
            t = t.to(self._model_dtype)
        try:
            with torch.no_grad():
                out = _first_output(self._model(t))
        except OracleError:
            raise
        except Exception as e:
            raise OracleError(f"model failed on a batch of {len(x)}: {first_line(e)}") from e
        out = out.detach().float().cpu().numpy()
        if out.ndim < 2 or out.shape[0] != len(x) or any(d != 1 for d in out.shape[1:-1]):
            raise OracleError(f"model returned outputs of shape {out.shape} for a batch of {len(x)}")
        return out.reshape(len(x), out.shape[-1])

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        if tuple(points.shape[1:]) != self._point_shape:
            raise InputError(
                f"points are {list(points.shape[1:])} but this model was opened for {list(self._point_shape)}"
            )
        outputs = run_in_batches(self._convention.apply(points), self._run, self._fixed_batch, self._max_batch)
        answer, self._output_reading = read_outputs(outputs, access, self._output_reading)
        return answer

    def close(self) -> None:
        self._model = None


# ----------------------------------------------------------------------------- loading


def load_torch_model(spec: str, *, factory_weights: str | None = None,
                     factory_args: Mapping[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, str]]:
    """Load a model: a TorchScript file, a torch.export `.pt2`, or `package.module:factory` + weights.

    Weights are `.safetensors` or a state dict saved with `torch.save` (read with weights_only).
    `factory_args` are the factory's keyword arguments (`torchvision.models:resnet18` with
    num_classes=10). Returns the module in eval mode and its identity (path, sha256, factory and
    its arguments). Failures: InputError.
    """
    path = Path(spec)
    if not path.is_file() and _FACTORY.fullmatch(spec):
        if factory_weights is None:
            raise InputError(
                f"factory {spec} needs a weights file (.safetensors, or a state dict saved with torch.save)"
            )
        return _load_factory(spec, Path(factory_weights), dict(factory_args or {}))
    if factory_weights is not None:
        raise InputError(f"a weights file is only used with a package.module:factory spec, not with {spec}")
    if factory_args:
        raise InputError(f"factory arguments ({', '.join(sorted(factory_args))}) are only used with a package.module:factory spec, not with {spec}")
    if not path.is_file():
        raise InputError(f"model file not found: {spec}")
    identity = {"path": str(path), "sha256": file_sha256(path)}
    if path.suffix.lower() == ".pt2":
        _check_pt2_archive(path)
        try:
            model = torch.export.load(str(path)).module()
        except Exception as e:
            raise InputError(f"{path} is not a readable torch.export program: {first_line(e)}") from e
        return _set_eval(model), identity
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise InputError(
            f"{path} is not a TorchScript model ({first_line(e)}); for a state dict give "
            "package.module:factory with this file as its weights"
        ) from e
    return _set_eval(model), identity


def _load_factory(spec: str, weights: Path, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, str]]:
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise InputError(f"cannot import {module_name} for factory {spec}: {first_line(e)}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise InputError(f"factory {spec}: {module_name} has no attribute {attr_path}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise InputError(f"factory {spec} is not callable")
    try:
        model = obj(**kwargs)
    except Exception as e:
        given = f" with {', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))}" if kwargs else ""
        raise InputError(f"factory {spec}{given} failed: {first_line(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if not weights.is_file():
        raise InputError(f"weights file not found: {weights}")
    state = _read_state_dict(weights)
    _check_state_dict(model, state, spec, weights)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise InputError(f"weights {weights} do not fit factory {spec}: {first_line(e)}") from e
    identity = {"factory": spec, "path": str(weights), "sha256": file_sha256(weights)}
    if kwargs:
        identity["factory_args"] = json.dumps(kwargs, sort_keys=True)
    return _set_eval(model), identity


def parse_factory_args(items: Sequence[str]) -> dict[str, Any]:
    """`NAME=VALUE` items -> keyword arguments: VALUE read as JSON when it is JSON (10, 0.5, true,
    null, [32, 64], "text"), else as the text itself; never evaluated as code."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise InputError(f"--owner-arg {item!r} must look like NAME=VALUE with NAME a Python identifier")
        if name in out:
            raise InputError(f"--owner-arg {name} given twice")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


def _read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(weights), device="cpu")
        except Exception as e:
            raise InputError(f"{weights} is not a readable safetensors file: {first_line(e)}") from e
    else:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise InputError(
                f"refused {weights}: not a plain state dict of tensors ({_unpickler_reason(e)}); it is read "
                "with weights_only=True and never unpickled: save a plain state dict or use .safetensors"
            ) from e
        except Exception as e:
            raise InputError(f"{weights} is not a readable state dict: {first_line(e)}") from e
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(f"{weights} is not a state dict (a mapping of names to tensors)")
    return dict(state)


def _unpickler_reason(e: BaseException) -> str:
    """The useful line of torch's weights_only refusal (its message runs to a page)."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
    if found:
        return found.group(1).strip().split(". ")[0].rstrip(".")
    return first_line(e)


def _check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], spec: str, weights: Path) -> None:
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    mismatched = [
        f"{k} {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        problems.append(f"shape mismatch {_some(mismatched)}")
    if problems:
        raise InputError(f"weights {weights} do not fit factory {spec}: {'; '.join(problems)}")


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _check_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 that `torch.export.load` would unpickle unsafely or run native code from.

    `torch.export.load` reads some parts with `torch.load(weights_only=False)` or `pickle.loads`;
    here every such part must load with weights_only=True (plain tensors), opaque/custom
    objects and AOTInductor code are refused, and archive formats we do not know are refused.
    """
    from torch.export.pt2_archive import constants as C

    def refuse(why: str) -> InputError:
        return InputError(f"refused {path}: {why}")

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path} is not a torch.export (.pt2) archive: {first_line(e)}") from e
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise refuse("not a torch.export archive of a known layout")
        files = {n.split("/", 1)[1]: n for n in names}

        def read(rel: str) -> bytes:
            if rel not in files:
                raise refuse(f"part {rel} is missing")
            return zf.read(files[rel])

        def require_plain_tensors(rel: str) -> None:
            try:
                torch.load(io.BytesIO(read(rel)), map_location="cpu", weights_only=True)
            except Exception as e:
                raise refuse(f"part {rel} holds more than plain tensors ({_unpickler_reason(e)})") from e

        def config(rel: str) -> dict[str, Any]:
            if rel not in files:
                return {}
            try:
                entries = json.loads(read(rel))["config"]
                return {str(k): dict(v) for k, v in entries.items()}
            except Exception as e:
                raise refuse(f"unreadable part {rel} ({first_line(e)})") from e

        version = None
        if C.ARCHIVE_VERSION_PATH in files:
            version = read(C.ARCHIVE_VERSION_PATH).decode(errors="replace").strip()
        if version != C.ARCHIVE_VERSION_VALUE:
            raise refuse(f"archive version {version} is not one this torch reads (re-save it with torch.export.save)")
        if any(rel.startswith(C.AOTINDUCTOR_DIR) for rel in files):
            raise refuse("it contains AOTInductor compiled code; give a plain torch.export program")
        models = [rel for rel in files if rel.startswith(C.MODELS_DIR) and rel.endswith(".json")]
        if not models:
            raise refuse("it holds no exported program")
        for rel in models:
            name = rel[len(C.MODELS_DIR) : -len(".json")]
            sample_inputs = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(name)
            for part in (f"{C.WEIGHTS_DIR}{name}.pt", f"{C.CONSTANTS_DIR}{name}.pt", sample_inputs):
                if part in files:
                    require_plain_tensors(part)
            for entry in config(C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(name)).values():
                if entry.get("use_pickle"):
                    require_plain_tensors(C.WEIGHTS_DIR + str(entry.get("path_name")))
            for entry in config(C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(name)).values():
                part = str(entry.get("path_name"))
                if part.startswith(C.TENSOR_CONSTANT_FILENAME_PREFIX):
                    if entry.get("use_pickle"):
                        require_plain_tensors(C.CONSTANTS_DIR + part)
                else:
                    raise refuse(f"it holds a non-tensor constant {part}, which would be unpickled")
