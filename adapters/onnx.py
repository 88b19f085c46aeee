"""A suspect given as a local ONNX file, answered by ONNX Runtime in this process.

Everything that can be checked without spending a query is checked when the oracle is built:
one input, its dtype, its shape against the fingerprint's points under the declared layout,
and a static class count against the fingerprint's.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access, InputConvention, Oracle, OracleInfo, check_channels, read_outputs
from deepcore_auditor.adapters.errors import IncompatibleSuspect, InputError, OracleError, first_line

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}
_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)")
_DEVICES = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"

Dim = int | str | None
# The longest one batch may take by default (--request-timeout): generous for a large model on a
# small CPU, finite so that a suspect that never answers ends the audit instead of hanging it.
RUN_TIMEOUT_S = 300.0
_POLL_S = 0.05  # how often the waiting thread looks up (and lets a Ctrl-C in)
_STOP_WAIT_S = 1.0  # how long a terminated run is given to end before the audit goes on without it


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_static(d: Dim) -> bool:
    return isinstance(d, int) and d > 0


def _fmt_shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, (int, str)) and d != "" else "?" for d in shape) + "]"


def _fits(shape: Sequence[Dim], point_shape: tuple[int, int, int], layout: str) -> bool:
    """Whether a rank-4 model input shape can take points of `point_shape` (C, H, W) in `layout`."""
    if len(shape) != 4:
        return False
    c, h, w = point_shape
    want = (c, h, w) if layout == "NCHW" else (h, w, c)
    return all(not _is_static(d) or d == v for d, v in zip(shape[1:], want, strict=False))


def check_input_fits(
    shape: Sequence[Dim], point_shape: tuple[int, int, int], layout: str, who: str = "suspect"
) -> None:
    """Raise IncompatibleSuspect with one line if a model input of `shape` cannot take the points."""
    if _fits(shape, point_shape, layout):
        return
    points = f"[{', '.join(str(v) for v in point_shape)}] (C, H, W)"
    if len(shape) != 4:
        raise IncompatibleSuspect(
            f"{who} expects a rank-{len(shape)} input {_fmt_shape(shape)} but fingerprint points are "
            f"images {points}: only [batch, C, H, W] or [batch, H, W, C] inputs can be audited"
        )
    msg = f"{who} expects input {_fmt_shape(shape)} ({layout}) but fingerprint points are {points}"
    other = "NHWC" if layout == "NCHW" else "NCHW"
    if _fits(shape, point_shape, other):
        msg += f"; declare --suspect-layout {other}"
    raise IncompatibleSuspect(msg)


def run_in_batches(
    x: np.ndarray, run: Callable[[np.ndarray], np.ndarray], fixed_batch: int | None, max_batch: int
) -> np.ndarray:
    """Feed `x` to `run` in chunks: exactly `fixed_batch` rows (the last one padded with copies
    of its last row, whose answers are dropped), or at most `max_batch` rows when the batch is free."""
    outputs = []
    if fixed_batch is not None:
        for i in range(0, len(x), fixed_batch):
            chunk = x[i : i + fixed_batch]
            m = len(chunk)
            if m < fixed_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - m, axis=0)], axis=0)
            outputs.append(run(chunk)[:m])
    else:
        for i in range(0, len(x), max_batch):
            outputs.append(run(x[i : i + max_batch]))
    return np.concatenate(outputs, axis=0)


def _preload_cuda(ort: Any, providers: Sequence[str]) -> None:
    """Before a CUDA session: load the CUDA and cuDNN libraries that onnxruntime-gpu's "cuda" and
    "cudnn" extras install from PyPI (the Docker image's way), which the dynamic loader does not
    find by itself. ONNX Runtime >= 1.21 has `preload_dlls`; libraries already loaded (a system
    CUDA) are left alone. Never fatal: the session then falls back and says so."""
    if _CUDA not in providers or not hasattr(ort, "preload_dlls"):
        return
    try:
        ort.preload_dlls()
    except Exception as e:  # noqa: BLE001 - a missing library shows up as the session's fallback
        log.debug("onnxruntime.preload_dlls() failed: %s", e)


_PROVIDER_ALIASES = {"cpu": _CPU, "cuda": _CUDA, "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider",
                     "rocm": "ROCMExecutionProvider", "dml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def resolve_providers(names: Sequence[str], available: Sequence[str]) -> list[str]:
    """Execution-provider names (full, or cpu/cuda/tensorrt/openvino/rocm/dml/coreml) -> ONNX
    Runtime's names, each one this install offers; InputError naming what it does offer."""
    out = []
    for name in names:
        full = _PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            raise InputError(f"ONNX Runtime here offers no {full} (available: {', '.join(available)})")
        if full in out:
            raise InputError(f"execution provider {full} named twice")
        out.append(full)
    if not out:
        raise InputError("no execution provider named")
    return out


class OnnxOracle(Oracle):
    """Answers queries with an ONNX model run by ONNX Runtime (CPU, or CUDA where available).

    `point_shape` is the fingerprint's (C, H, W); `convention` maps canonical points to the
    model's input (its dtype is taken from the model). Fixed batch sizes are honoured by
    padding; dynamic ones are fed at most `max_batch` points per run.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        convention: InputConvention,
        point_shape: tuple[int, int, int],
        num_classes: int | None = None,
        device: str = "auto",
        max_batch: int = 256,
        run_timeout_s: float | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self._path = Path(path)
        self._run_timeout_s = RUN_TIMEOUT_S if run_timeout_s is None else float(run_timeout_s)
        if not (self._run_timeout_s > 0 and math.isfinite(self._run_timeout_s)):
            raise InputError(f"option request_timeout_s must be a positive number, got {run_timeout_s!r}")
        if device not in _DEVICES:
            raise InputError(f"unknown device {device!r}: use one of {', '.join(_DEVICES)}")
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        if not self._path.is_file():
            raise InputError(f"suspect file not found: {self._path}")
        self._point_shape = tuple(int(v) for v in point_shape)
        if len(self._point_shape) != 3:
            raise InputError(f"point_shape must be (C, H, W), got {point_shape}")
        self._max_batch = max_batch
        self._sha256 = file_sha256(self._path)
        self._session = self._open_session(device, providers)

        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise IncompatibleSuspect(
                f"suspect has {len(inputs)} inputs ({names}); only single-input models can be audited"
            )
        inp = inputs[0]
        if inp.type not in _ORT_DTYPES:
            raise IncompatibleSuspect(
                f"suspect input {inp.name!r} is {inp.type}; supported: {', '.join(_ORT_DTYPES)}"
            )
        self._input_name = inp.name
        self._input_shape: list[Dim] = list(inp.shape)
        self._convention = self._convention_for(convention, _ORT_DTYPES[inp.type])
        check_input_fits(self._input_shape, self._point_shape, self._convention.layout)
        check_channels(convention, self._point_shape[0])
        batch = self._input_shape[0]
        self._fixed_batch: int | None = batch if _is_static(batch) else None

        out = self._session.get_outputs()[0]
        if out.type not in _FLOAT_OUTPUTS:
            raise IncompatibleSuspect(
                f"suspect's first output {out.name!r} is {out.type}; expected float logits or probabilities"
            )
        out_shape: list[Dim] = list(out.shape) if out.shape is not None else []
        if out_shape and (len(out_shape) < 2 or any(_is_static(d) and d != 1 for d in out_shape[1:-1])):
            raise IncompatibleSuspect(
                f"suspect's first output {out.name!r} has shape {_fmt_shape(out_shape)}; expected [batch, classes]"
            )
        k = out_shape[-1] if out_shape else None
        if _is_static(k) and num_classes is not None and k != num_classes:
            raise IncompatibleSuspect(f"suspect outputs {k} classes but the fingerprint has {num_classes}")
        self._output_name = out.name
        self._num_classes = num_classes if num_classes is not None else (k if _is_static(k) else None)
        self._output_reading: str | None = None
        log.debug(
            "opened %s: input %s %s %s, providers %s",
            self._path, self._input_name, _fmt_shape(self._input_shape), inp.type, self._session.get_providers(),
        )

    def _open_session(self, device: str, chosen: Sequence[str] | None) -> Any:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise InputError("ONNX suspects need onnxruntime: pip install 'deepcore-auditor[cpu]'") from e
        available = ort.get_available_providers()
        if chosen is not None:
            return self._open_with(ort, resolve_providers(chosen, available))
        if device == "cuda" and _CUDA not in available:
            raise InputError(
                f"device cuda requested but ONNX Runtime offers no CUDA provider (available: {', '.join(available)})"
            )
        providers = [_CUDA, _CPU] if device != "cpu" and _CUDA in available else [_CPU]
        session = self._session(ort, providers, "is not a readable ONNX model")
        if device == "cuda" and _CUDA not in session.get_providers():
            raise InputError(
                "device cuda requested but ONNX Runtime fell back to CPU (no usable GPU or CUDA libraries)"
            )
        return session

    def _session(self, ort: Any, providers: list[str], failure: str) -> Any:
        """An InferenceSession on `providers` (CUDA libraries preloaded first); InputError
        "<path> <failure>: <cause>" when ONNX Runtime cannot open the file."""
        _preload_cuda(ort, providers)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(str(self._path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise InputError(f"{self._path} {failure}: {first_line(e)}") from e

    def _open_with(self, ort: Any, providers: list[str]) -> Any:
        """A session on exactly the providers asked for, in that order: a deployment's execution
        provider can change its answers, so one that did not load is an error, not a fallback."""
        session = self._session(ort, providers, f"cannot be opened on {', '.join(providers)}")
        missing = [p for p in providers if p not in session.get_providers()]
        if missing:
            raise InputError(f"ONNX Runtime did not load {', '.join(missing)} (it runs on {', '.join(session.get_providers())})")
        return session

    def _convention_for(self, convention: InputConvention, model_dtype: str) -> InputConvention:
        if model_dtype == "uint8" and convention.dtype != "uint8":
            if convention.scale < 2:
                raise IncompatibleSuspect(
                    f"suspect takes uint8 input but the input convention scales points by {convention.scale} "
                    "(values 0..1); a uint8 model needs a scale of 255"
                )
            if any(m != 0 for m in convention.mean) or any(s != 1 for s in convention.std):
                log.warning("suspect takes uint8 input: the convention's mean and std are not applied")
        if convention.dtype != model_dtype:
            log.info("suspect input is %s: sending %s instead of %s", model_dtype, model_dtype, convention.dtype)
            return convention.with_dtype(model_dtype)
        return convention

    @property
    def info(self) -> OracleInfo:
        details: dict[str, Any] = {
            "providers": list(self._session.get_providers()) if self._session is not None else [],
            "input_name": self._input_name,
            "input_shape": _fmt_shape(self._input_shape),
            "input_dtype": self._convention.dtype,
            "layout": self._convention.layout,
            "batch": self._fixed_batch if self._fixed_batch is not None else "dynamic",
            "output_name": self._output_name,
        }
        if self._output_reading is not None:
            details["output_reading"] = self._output_reading
        return OracleInfo(
            kind="onnx",
            identity={"path": str(self._path), "sha256": self._sha256},
            access=(Access.LABELS, Access.PROBS),
            num_classes=self._num_classes,
            details=details,
        )

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise OracleError("this ONNX oracle is closed")
        try:
            out = self._bounded_run(x)[0]
        except (OracleError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise OracleError(f"ONNX Runtime failed on a batch of {len(x)}: {first_line(e)}") from e
        out = np.asarray(out)
        if out.ndim < 2 or out.shape[0] != len(x) or any(d != 1 for d in out.shape[1:-1]):
            raise OracleError(f"suspect returned outputs of shape {out.shape} for a batch of {len(x)}")
        return out.reshape(len(x), out.shape[-1])

    def _bounded_run(self, x: np.ndarray) -> Any:
        """One `session.run`, bounded in time and stoppable by Ctrl-C.

        The run happens on a daemon thread while this one waits in short, interruptible steps:
        a thread blocked inside ONNX Runtime would never see a SIGINT (the Python handler runs
        only between bytecodes), and a hostile graph (a Loop of 2^40 iterations) never returns.
        At the deadline, or on Ctrl-C, `RunOptions.terminate` asks ONNX Runtime to abandon the
        run (it checks the flag between nodes and loop iterations); the thread is daemonic, so
        even a run that ignored it cannot keep the process from exiting."""
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # a terminated run is reported here, in one line, not by ONNX Runtime's log
        box: dict[str, Any] = {}
        done = threading.Event()
        session = self._session

        def work() -> None:
            try:
                box["out"] = session.run([self._output_name], {self._input_name: x}, options)
            except BaseException as e:  # handed to the waiting thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=work, name="onnx-run", daemon=True).start()
        deadline = time.monotonic() + self._run_timeout_s
        try:
            while not done.wait(_POLL_S):
                if time.monotonic() > deadline:
                    options.terminate = True
                    done.wait(_STOP_WAIT_S)
                    raise OracleError(
                        f"the suspect gave no answer to a batch of {len(x)} within {self._run_timeout_s:g} s "
                        "(a model that never returns; raise --request-timeout for a slow one)"
                    )
        except KeyboardInterrupt:
            options.terminate = True
            done.wait(_STOP_WAIT_S)
            raise
        if "error" in box:
            raise box["error"]
        return box["out"]

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        if tuple(points.shape[1:]) != self._point_shape:
            raise InputError(
                f"points are {list(points.shape[1:])} but this suspect was opened for {list(self._point_shape)}"
            )
        outputs = run_in_batches(self._convention.apply(points), self._run, self._fixed_batch, self._max_batch)
        answer, self._output_reading = read_outputs(outputs, access, self._output_reading)
        return answer

    def close(self) -> None:
        self._session = None
