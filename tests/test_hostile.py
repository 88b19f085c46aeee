"""Hostile and broken suspects: each must end the audit with a one-line error (exit 2) or a
right verdict, never a traceback, a hang or a wrong verdict.

Three kinds of hostile suspect, all real:

* in-process oracles wrapping a real ONNX Runtime session of a world model and corrupting its
  answers (NaN, inf, wrong shapes, class counts, labels and dtypes), audited with `audit()` and
  a ledger on disk: the error is typed and named, and the bad batch never reaches the ledger;
* ONNX graphs that wrap a world model (the world's ONNX file merged with a small exported torch
  head or input stage): NaN/inf outputs, K+1 or 0 classes, [N, K, 1] tensors, INT64 labels out
  of range, short batches, input noise, rounded or one-hot probabilities; audited with the real
  CLI through local ONNX Runtime and, served unchanged by a real local tritonserver, over HTTP
  and gRPC (plus two hand-written python-backend models that answer strings);
* suspects that stay well-formed but degrade their answers (input noise, rounding, one-hot,
  label flipping): an independent model is never called a pirate, and a pirate is called a
  pirate or inconclusive.

Tests named after a bug they found (rounded probabilities read as logits, scaled probabilities
accepted, zero-class and ragged outputs crashing, answers not checked against the fingerprint's
classes, the repeat check skipped on a spent budget) keep it fixed.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import audit_args, one_line_error
from torch import nn

from deepcore_auditor.adapters.base import Access, Oracle, OracleInfo
from deepcore_auditor.adapters.errors import DeepCoreError, OracleError
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.auditor.audit import AuditConfig, audit, ledger_header
from deepcore_auditor.auditor.cli import cli
from deepcore_auditor.auditor.ledger import QueryLedger
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint

K = 10  # the world's classes (Fashion-MNIST)
BATCH = 5
BAD_CALL = 3  # in-process hostile oracles answer two batches well, then corrupt the third
SIGMAS = (0.02, 0.05, 0.1, 0.2)
NOISE_SEED = 7
MODES = (("agreement", Access.LABELS), ("similarity", Access.PROBS), ("clustering", Access.LABELS))


def sequential_test_for(mode: str) -> str:
    """The clustering mode's per-point rates run under Wald's test only; the others under the default."""
    return "sprt" if mode == "clustering" else AuditConfig.test
# Enough budget for all 60 points plus the repeat check, so the budget never cuts an audit short
# here (that case has its own test).
ROOMY = 100

def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_audit(world: Any, suspect: object, *extra: object) -> Any:
    """`deepcore audit --json` (no progress lines: an error is the only line on stderr)."""
    return run(*audit_args(world, suspect, *(str(e) for e in extra), "--json"))


def error_line(result: Any, pattern: str) -> str:
    """`one_line_error`, and the line matches `pattern` (a regex: alternatives allowed)."""
    line = one_line_error(result)
    assert re.search(pattern, line), (pattern, line)
    return line


# ---------------------------------------------------------------------------------------------
# In-process hostile oracles


class Hostile(Oracle):
    """A real suspect whose answers are corrupted by `corrupt` from query number `from_call` on.

    `num_classes` overrides what the oracle says about itself (None: it does not say).
    """

    _SAME = object()

    def __init__(
        self,
        inner: Oracle,
        corrupt: Callable[[np.ndarray, Access], Any],
        *,
        from_call: int = BAD_CALL,
        num_classes: Any = _SAME,
    ) -> None:
        self.inner, self.corrupt, self.from_call, self.calls = inner, corrupt, from_call, 0
        self._num_classes = num_classes

    @property
    def info(self) -> OracleInfo:
        i = self.inner.info
        k = i.num_classes if self._num_classes is Hostile._SAME else self._num_classes
        return OracleInfo("hostile", {**i.identity, "hostile": "yes"}, i.access, k, i.details)

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        self.calls += 1
        answer = self.inner.query(points, access)
        return self.corrupt(answer, access) if self.calls >= self.from_call else answer

    def close(self) -> None:
        self.inner.close()


def _set(index: Any, value: Any, dtype: Any = None) -> Callable[[np.ndarray, Access], np.ndarray]:
    def corrupt(a: np.ndarray, access: Access) -> np.ndarray:
        b = a.astype(dtype if dtype is not None else a.dtype, copy=True)
        b[index] = value
        return b

    return corrupt


@dataclass(frozen=True)
class Case:
    name: str
    access: Access
    corrupt: Callable[[np.ndarray, Access], Any]
    pattern: str  # what the error message must name


CASES = [
    # labels
    Case("label -1", Access.LABELS, _set(2, -1), r"label outside 0\.\.9"),
    Case("label K", Access.LABELS, _set(2, K), r"label outside 0\.\.9"),
    Case("label 2**40", Access.LABELS, _set(2, 2**40), r"label outside 0\.\.9"),
    Case("label 2**63 uint64", Access.LABELS, _set(2, 2**63, np.uint64), r"label outside 0\.\.9"),
    Case("labels float", Access.LABELS, lambda a, _: a.astype(np.float64), r"labels of type float64"),
    Case("labels float NaN", Access.LABELS, _set(2, np.nan, np.float64), r"labels of type float64"),
    Case("labels bool", Access.LABELS, lambda a, _: a > 4, r"labels of type bool"),
    Case("labels str", Access.LABELS, lambda a, _: a.astype(str), r"labels of type <U"),
    Case("labels bytes", Access.LABELS, lambda a, _: a.astype(bytes), r"labels of type \|S"),
    Case("labels object", Access.LABELS, lambda a, _: a.astype(object), r"labels of type object"),
    Case("labels [N, 1]", Access.LABELS, lambda a, _: a[:, None], r"labels of shape \(5, 1\)"),
    Case("labels N-1", Access.LABELS, lambda a, _: a[1:], r"labels of shape \(4,\)"),
    Case("labels N+1", Access.LABELS, lambda a, _: np.concatenate([a, a[:1]]), r"labels of shape \(6,\)"),
    Case("labels scalar", Access.LABELS, lambda a, _: a[0], r"labels of shape \(\)"),
    Case("labels None", Access.LABELS, lambda a, _: None, r"labels of shape \(\)"),
    Case("labels one-hot", Access.LABELS, lambda a, _: np.eye(K, dtype=np.int64)[a], r"labels of shape \(5, 10\)"),
    # probabilities
    Case("probs NaN", Access.PROBS, _set((2, 3), np.nan), r"non-finite|NaN"),
    Case("probs all NaN", Access.PROBS, lambda a, _: a * np.nan, r"non-finite|NaN"),
    Case("probs +inf", Access.PROBS, _set((2, 3), np.inf), r"non-finite|infinite"),
    Case("probs -inf", Access.PROBS, _set((4, 0), -np.inf), r"non-finite|infinite"),
    Case("probs [N, K, 1]", Access.PROBS, lambda a, _: a[:, :, None], r"probabilities of shape \(5, 10, 1\)"),
    Case("probs [N]", Access.PROBS, lambda a, _: a.max(axis=1), r"probabilities of shape \(5,\)"),
    Case("probs N-1 rows", Access.PROBS, lambda a, _: a[1:], r"probabilities of shape \(4, 10\)"),
    Case("probs K+1", Access.PROBS, lambda a, _: np.concatenate([a, a[:, :1]], axis=1), r"11 classes, expected 10"),
    Case("probs K-1", Access.PROBS, lambda a, _: a[:, 1:], r"9 classes, expected 10"),
    Case("probs 0 classes", Access.PROBS, lambda a, _: a[:, :0], r"0 classes, expected 10"),
    Case("probs object", Access.PROBS, lambda a, _: a.astype(object), r"non-numeric"),
    Case("probs str", Access.PROBS, lambda a, _: a.astype(str), r"non-numeric"),
    Case("probs complex", Access.PROBS, lambda a, _: a.astype(np.complex128), r"non-numeric"),
    Case("probs None", Access.PROBS, lambda a, _: None, r"probabilities of shape \(\)"),
]


@pytest.fixture(scope="module")
def fp(world: Any) -> Fingerprint:
    return load_fingerprint(world.fingerprint)


def onnx_oracle(fp: Fingerprint, path: Path) -> OnnxOracle:
    return OnnxOracle(path, convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes, device="cpu")


def ledger_records(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ledger's header and its answer lines (the `charge` lines left out)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0]["ledger"], [rec for rec in lines[1:] if "charge" not in rec]


def assert_valid_answers(records: list[dict[str, Any]], access: Access) -> None:
    for rec in records:
        a = rec["answer"]
        if access is Access.LABELS:
            assert isinstance(a, int) and not isinstance(a, bool) and 0 <= a < K, rec
        else:
            v = np.asarray(a, dtype=np.float64)
            assert v.shape == (K,) and np.all(np.isfinite(v)) and np.all(v >= 0) and abs(v.sum() - 1) < 1e-3, rec


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_answer_is_a_typed_error_and_never_reaches_the_ledger(world: Any, fp: Fingerprint, tmp_path: Path, case: Case) -> None:
    mode = "agreement" if case.access is Access.LABELS else "similarity"
    config = AuditConfig(access=case.access, mode=mode, budget=60, batch_size=BATCH)
    suspect = Hostile(onnx_oracle(fp, world.pirate_onnx), case.corrupt)
    path = tmp_path / "ledger.jsonl"
    ledger = QueryLedger.open(path, ledger_header(fp, suspect, config), resume=False)
    with suspect, pytest.raises(DeepCoreError) as e:
        audit(fp, suspect, config, ledger=ledger)
    assert type(e.value) is OracleError, repr(e.value)  # not transient: never retried
    assert re.search(case.pattern, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    assert suspect.calls == BAD_CALL, "the bad batch was asked again"
    _, records = ledger_records(path)
    assert len(records) == len(ledger) == (BAD_CALL - 1) * BATCH, "the bad batch was recorded"
    assert_valid_answers(records, case.access)


def test_every_mode_refuses_the_bad_batch(world: Any, fp: Fingerprint, tmp_path: Path) -> None:
    # The owner's own answers at alpha = beta = 1e-9: no mode can decide on the two good batches
    # (an exact copy gains at most ln(0.999/0.02) < 4 a point in clustering mode, and Wald's
    # bound is ln(1e9) > 20), so the corrupt third batch is always reached.
    for mode, access in MODES:
        config = AuditConfig(access=access, mode=mode, budget=60, batch_size=BATCH, alpha=1e-9, beta=1e-9, test=sequential_test_for(mode))
        suspect = Hostile(onnx_oracle(fp, world.owner_onnx), (lambda a, acc: a * np.nan if acc is Access.PROBS else a.astype(np.float64)))
        ledger = QueryLedger.open(tmp_path / f"{mode}.jsonl", ledger_header(fp, suspect, config), resume=False)
        with suspect, pytest.raises(OracleError):
            audit(fp, suspect, config, ledger=ledger)
        assert len(ledger_records(tmp_path / f"{mode}.jsonl")[1]) == (BAD_CALL - 1) * BATCH


@pytest.mark.parametrize(
    "corrupt, refused",
    [(lambda a: a * 10, True), (lambda a: a * 3 - 1, True), (lambda a: a / 1.25, False), (lambda a: np.full_like(a, 0.9), True)],
    ids=["x10", "negative", "sum-0.8", "all-0.9"],
)
def test_probabilities_outside_the_simplex_are_refused(world: Any, fp: Fingerprint, corrupt: Callable[[np.ndarray], np.ndarray], refused: bool) -> None:
    """Values outside [0, 1] or rows far from summing to 1 are refused (x10 once accused an
    independent model); rows summing to 0.5..1.5, as rounding leaves them, are renormalized."""
    suspect = Hostile(onnx_oracle(fp, world.independent_onnx), lambda a, acc: corrupt(a), from_call=1)
    with suspect:
        if refused:
            with pytest.raises(OracleError, match="not probabilities"):
                audit(fp, suspect, AuditConfig(access=Access.PROBS, mode="similarity", budget=60, batch_size=BATCH))
            return
        result = audit(fp, suspect, AuditConfig(access=Access.PROBS, mode="similarity", budget=60, batch_size=BATCH))
    assert result.verdict != "piracy", result.to_dict()["trajectory"][-1]


def test_ragged_answer_is_an_oracle_error(world: Any, fp: Fingerprint) -> None:
    ragged = lambda a, acc: [list(row) for row in a[:-1]] + [[0.5, 0.5]]  # noqa: E731
    with Hostile(onnx_oracle(fp, world.pirate_onnx), ragged, from_call=1) as suspect, pytest.raises(OracleError):
        audit(fp, suspect, AuditConfig(access=Access.PROBS, mode="similarity", budget=60, batch_size=BATCH))


def test_a_suspect_that_does_not_say_its_class_count_is_still_checked(world: Any, fp: Fingerprint) -> None:
    three = lambda a, acc: a[:, :3] / a[:, :3].sum(axis=1, keepdims=True)  # noqa: E731
    with Hostile(onnx_oracle(fp, world.pirate_onnx), three, from_call=1, num_classes=None) as suspect, pytest.raises(OracleError):
        audit(fp, suspect, AuditConfig(access=Access.PROBS, mode="similarity", budget=60, batch_size=BATCH))
    with Hostile(onnx_oracle(fp, world.pirate_onnx), lambda a, acc: a + K, from_call=1, num_classes=None) as suspect, pytest.raises(OracleError):
        audit(fp, suspect, AuditConfig(access=Access.LABELS, mode="agreement", budget=60, batch_size=BATCH))


# ---------------------------------------------------------------------------------------------
# Hostile ONNX graphs: a world model with a small exported torch head (or input stage)


class NanHead(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * float("nan")


class InfForClass(nn.Module):
    """+inf in every output of the rows the model classifies as `cls`, the rest unchanged."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hit = (z.argmax(dim=1, keepdim=True) == self.cls).expand_as(z)
        return torch.where(hit, torch.full_like(z, float("inf")), z)


class ExtraClass(nn.Module):
    """K+1 outputs, the extra one the largest (so the top-1 label is K)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, z.max(dim=1, keepdim=True).values + 1.0], dim=1)


class NoClasses(nn.Module):
    """[N, 0]: a slice whose length the graph computes (so the class axis is dynamic)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, : z.shape[1] // 100]


class Column(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.unsqueeze(-1)  # [N, K, 1]


class Labels(nn.Module):
    """INT64 labels [N, 1]: argmax + offset (offset K: all out of range), or `fixed` everywhere."""

    def __init__(self, offset: int = 0, fixed: int | None = None) -> None:
        super().__init__()
        self.offset, self.fixed = offset, fixed

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        top = z.argmax(dim=1, keepdim=True)
        return top * 0 + self.fixed if self.fixed is not None else top + self.offset


class FloatLabels(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.argmax(dim=1, keepdim=True).float()


class ShortBatch(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[1:]


class Rounded(nn.Module):
    """Softmax probabilities rounded to `decimals`."""

    def __init__(self, decimals: int) -> None:
        super().__init__()
        self.scale = float(10**decimals)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.round(torch.softmax(z, dim=1) * self.scale) / self.scale


class OneHot(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(z.argmax(dim=1), z.shape[1]).float()


class InputNoise(nn.Module):
    """Gaussian noise of `sigma` in canonical [0, 1] pixel units (clipped), on normalized input."""

    def __init__(self, sigma: float, mean: float, std: float) -> None:
        super().__init__()
        self.sigma, self.mean, self.std = sigma, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.std + self.mean
        pixels = torch.clamp(pixels + self.sigma * torch.randn_like(pixels), 0.0, 1.0)
        return (pixels - self.mean) / self.std


def _export(module: nn.Module, example: torch.Tensor, path: Path, out_axes: dict[int, str]) -> Any:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": out_axes}, opset_version=17, dynamo=False)
    return onnx.load(str(path))


def with_head(world_onnx: Path, head: nn.Module, out: Path, dynamic_classes: bool = False) -> Path:
    """The world model's graph followed by `head` (its logits in), as one ONNX file."""
    import onnx
    import onnx.compose

    body = onnx.load(str(world_onnx))
    tail = _export(head, torch.zeros(2, K), out.with_name(out.stem + ".head.onnx"), {0: "batch", **({1: "classes"} if dynamic_classes else {})})
    merged = onnx.compose.merge_models(body, onnx.compose.add_prefix(tail, "h_"), io_map=[(body.graph.output[0].name, "h_x")])
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out))
    return out


def with_noise(world_onnx: Path, sigma: float, fp: Fingerprint, out: Path, seed: int = NOISE_SEED) -> Path:
    """`InputNoise` in front of the world model; the graph's RandomNormalLike gets a fixed seed
    (fresh noise on every call, the same sequence of calls gives the same noise)."""
    import onnx
    import onnx.compose

    body = onnx.load(str(world_onnx))
    c, h, w = fp.point_shape
    stage = _export(InputNoise(sigma, fp.convention.mean[0], fp.convention.std[0]), torch.zeros(2, c, h, w),
                    out.with_name(out.stem + ".noise.onnx"), {0: "batch"})
    random_nodes = [n for n in stage.graph.node if n.op_type.startswith("RandomNormal")]
    assert random_nodes, "the noise stage has no random node"
    for node in random_nodes:
        node.attribute.append(onnx.helper.make_attribute("seed", float(seed)))
    merged = onnx.compose.merge_models(onnx.compose.add_prefix(stage, "n_"), body, io_map=[("n_y", body.graph.input[0].name)])
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out))
    return out


def late_class(fp: Fingerprint, world: Any) -> tuple[int, int]:
    """A class the pirate answers in the audit (seed 0, batches of 5) but not in its first batch,
    and how many points are answered before the first batch holding it."""
    ledger = QueryLedger({"for": "late_class"})
    with onnx_oracle(fp, world.pirate_onnx) as pirate:
        audit(fp, pirate, AuditConfig(budget=60, batch_size=BATCH), ledger=ledger)
    labels = [ledger.entries[d] for d in ledger.order]
    first = set(labels[:BATCH])
    position = next(i for i, label in enumerate(labels) if label not in first)
    return labels[position], BATCH * (position // BATCH)


@dataclass(frozen=True)
class HostileModels:
    files: dict[str, Path]
    inf_class: int
    inf_answered: int  # answers before the first batch the inf model spoils


@pytest.fixture(scope="module")
def hostile(world: Any, fp: Fingerprint, tmp_path_factory: pytest.TempPathFactory) -> HostileModels:
    root = tmp_path_factory.mktemp("hostile-onnx")
    cls, answered = late_class(fp, world)
    heads: dict[str, tuple[nn.Module, bool]] = {
        "nan": (NanHead(), False),
        "inf": (InfForClass(cls), False),
        "extra-class": (ExtraClass(), True),
        "no-classes": (NoClasses(), True),
        "column": (Column(), False),
        "labels-oob": (Labels(offset=K), False),
        "labels-neg": (Labels(fixed=-1), False),
        "labels-float": (FloatLabels(), False),
        "short-batch": (ShortBatch(), False),
    }
    files = {name: with_head(world.pirate_onnx, head, root / f"{name}.onnx", dyn) for name, (head, dyn) in heads.items()}
    for who in ("pirate", "independent"):
        model = getattr(world, f"{who}_onnx")
        for sigma in SIGMAS:
            files[f"{who}-noise-{sigma}"] = with_noise(model, sigma, fp, root / f"{who}-noise-{sigma}.onnx")
        for decimals in (2, 1):
            files[f"{who}-round-{decimals}"] = with_head(model, Rounded(decimals), root / f"{who}-round-{decimals}.onnx")
        files[f"{who}-onehot"] = with_head(model, OneHot(), root / f"{who}-onehot.onnx")
    return HostileModels(files, cls, answered)


# The graphs spoil a class the owner first gives at a known batch (`late_class`): Wald's test asks
# fixed batches of BATCH, and a copy's audit reaches that batch before it decides. (The betting
# test sizes its batches by what could still decide, and stops a copy sooner.)
FIXED_BATCHES = ("--test", "sprt")
# What the CLI must say for each hostile graph, per way of asking.
LABELS, ARGMAX, PROBS = (), ("--labels-via", "argmax"), ("--access", "probs", "--mode", "similarity")
LOCAL_EXPECTED: dict[str, dict[tuple[str, ...], str]] = {
    "nan": {LABELS: r"NaN or infinite", PROBS: r"NaN or infinite"},
    "inf": {LABELS: r"NaN or infinite", PROBS: r"NaN or infinite"},
    "extra-class": {LABELS: r"outputs 11 classes but the fingerprint has 10", PROBS: r"outputs 11 classes but the fingerprint has 10"},
    "column": {LABELS: r"shape \[batch, 10, 1\]; expected \[batch, classes\]", PROBS: r"shape \[batch, 10, 1\]; expected \[batch, classes\]"},
    "labels-oob": {LABELS: r"is tensor\(int64\); expected float logits or probabilities"},
    "labels-float": {LABELS: r"outputs 1 classes but the fingerprint has 10"},
    "short-batch": {LABELS: r"outputs of shape \(4, 10\) for a batch of 5", PROBS: r"outputs of shape \(4, 10\) for a batch of 5"},
}


@pytest.mark.parametrize("name", sorted(LOCAL_EXPECTED))
def test_hostile_onnx_graph_is_a_one_line_error_locally(world: Any, hostile: HostileModels, name: str) -> None:
    for extra, pattern in LOCAL_EXPECTED[name].items():
        error_line(run_audit(world, hostile.files[name], *extra, *FIXED_BATCHES), pattern)


@pytest.mark.parametrize("extra", [LABELS, PROBS], ids=["labels", "probs"])
def test_zero_class_output_is_a_one_line_error_locally(world: Any, hostile: HostileModels, extra: tuple[str, ...]) -> None:
    error_line(run_audit(world, hostile.files["no-classes"], *extra), r"class")


def test_inf_for_one_class_stops_at_that_batch_and_keeps_the_earlier_ones(world: Any, hostile: HostileModels, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    r = run_audit(world, hostile.files["inf"], "--ledger", ledger, *FIXED_BATCHES)
    error_line(r, r"NaN or infinite")
    _, records = ledger_records(ledger)
    assert len(records) == hostile.inf_answered >= BATCH
    assert_valid_answers(records, Access.LABELS)
    assert hostile.inf_class not in {rec["answer"] for rec in records}


# ---------------------------------------------------------------------------------------------
# Noise, rounding, one-hot answers and label flipping: degraded but well-formed suspects


def _verdicts(fp: Fingerprint, path: Path, mode: str, access: Access, seeds: range = range(2)) -> list[str]:
    verdicts = []
    for seed in seeds:
        with onnx_oracle(fp, path) as suspect:
            verdicts.append(audit(fp, suspect, AuditConfig(access=access, mode=mode, budget=ROOMY, batch_size=BATCH, seed=seed,
                                                           test=sequential_test_for(mode))).verdict)
    return verdicts


def _mode_params() -> list[Any]:
    """The three modes."""
    return [pytest.param(m, a, id=m) for m, a in MODES]


@pytest.mark.parametrize("mode,access", [pytest.param(m, a, id=m) for m, a in MODES])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_input_noise_never_accuses_and_never_clears_a_pirate(fp: Fingerprint, hostile: HostileModels, sigma: float, mode: str, access: Access) -> None:
    independent = _verdicts(fp, hostile.files[f"independent-noise-{sigma}"], mode, access)
    assert "piracy" not in independent, independent
    pirate = _verdicts(fp, hostile.files[f"pirate-noise-{sigma}"], mode, access)
    if sigma <= 0.1:
        assert set(pirate) <= {"piracy", "inconclusive"}, pirate
    # At sigma 0.2 the pirate's answers are mostly noise: since the fingerprint also simulates an
    # adversarially fine-tuned pirate, p0 is higher and such a pirate may be cleared (measured:
    # once in 2 orders, agreement mode). Noise never turns an independent model into a pirate.
    if sigma <= 0.02:
        assert pirate == ["piracy"] * len(pirate), pirate


@pytest.mark.parametrize("mode,access", _mode_params())
@pytest.mark.parametrize("answers", ["round-2", "round-1", "onehot"])
def test_rounded_or_one_hot_answers_never_accuse_an_independent_model(fp: Fingerprint, hostile: HostileModels, answers: str, mode: str, access: Access) -> None:
    verdicts = _verdicts(fp, hostile.files[f"independent-{answers}"], mode, access)
    assert "piracy" not in verdicts, verdicts


@pytest.mark.parametrize("mode,access", _mode_params())
@pytest.mark.parametrize("decimals", [1])
def test_a_pirate_that_rounds_its_probabilities_is_not_cleared(fp: Fingerprint, hostile: HostileModels, decimals: int, mode: str, access: Access) -> None:
    verdicts = _verdicts(fp, hostile.files[f"pirate-round-{decimals}"], mode, access)
    assert set(verdicts) <= {"piracy", "inconclusive"}, verdicts


def test_a_points_answer_does_not_depend_on_its_batch(fp: Fingerprint, hostile: HostileModels) -> None:
    with onnx_oracle(fp, hostile.files["pirate-round-1"]) as suspect:
        alone = np.concatenate([suspect.query(fp.points[i : i + 1], Access.PROBS) for i in range(len(fp))])
        together = suspect.query(fp.points, Access.PROBS)
    assert np.allclose(alone, together, atol=1e-6), np.abs(alone - together).max()


@pytest.mark.parametrize("mode,access", _mode_params())
def test_a_pirate_that_answers_rounded_to_2_decimals_or_one_hot(fp: Fingerprint, hostile: HostileModels, mode: str, access: Access) -> None:
    """One-hot vectors and vectors rounded to 2 decimals are read as probabilities
    (renormalized): the pirate is caught in every mode."""
    assert set(_verdicts(fp, hostile.files["pirate-onehot"], mode, access)) == {"piracy"}
    verdicts = _verdicts(fp, hostile.files["pirate-round-2"], mode, access)
    assert set(verdicts) == {"piracy"}, verdicts


class FlippedLabels(Oracle):
    """A randomized defence: each label is replaced, with probability `rate`, by another class."""

    def __init__(self, inner: Oracle, rate: float, seed: int) -> None:
        self.inner, self.rate, self.rng = inner, rate, np.random.default_rng(seed)

    @property
    def info(self) -> OracleInfo:
        i = self.inner.info
        return OracleInfo("flipping", i.identity, (Access.LABELS,), i.num_classes, i.details)

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        labels = self.inner.query(points, Access.LABELS)
        flip = self.rng.random(len(labels)) < self.rate
        return np.where(flip, (labels + self.rng.integers(1, K, len(labels))) % K, labels)

    def close(self) -> None:
        self.inner.close()


def test_a_pirate_that_flips_half_its_labels_is_not_cleared(world: Any, fp: Fingerprint) -> None:
    for seed in range(3):
        with FlippedLabels(onnx_oracle(fp, world.pirate_onnx), 0.5, seed) as suspect:
            result = audit(fp, suspect, AuditConfig(budget=ROOMY, batch_size=BATCH, seed=seed))
        assert result.verdict in ("piracy", "inconclusive"), (seed, result.to_dict()["notes"])


def test_a_randomizing_pirate_is_not_cleared_when_the_budget_ends_with_the_test(world: Any, fp: Fingerprint) -> None:
    with FlippedLabels(onnx_oracle(fp, world.pirate_onnx), 0.5, 0) as suspect:
        roomy = audit(fp, suspect, AuditConfig(budget=ROOMY, batch_size=BATCH))
    answered = roomy.trajectory[-1].queries
    assert roomy.verdict == "inconclusive" and answered < len(fp), roomy.to_dict()["notes"]
    with FlippedLabels(onnx_oracle(fp, world.pirate_onnx), 0.5, 0) as suspect:  # same answers, budget ends with the test
        tight = audit(fp, suspect, AuditConfig(budget=answered, batch_size=BATCH))
    assert tight.verdict != "independent", tight.to_dict()["notes"]


# ---------------------------------------------------------------------------------------------
# The same hostile models served by a real tritonserver, audited with the CLI over HTTP and gRPC

STRING_MODEL_PY = '''\
"""Hand-written hostile model: answers class names as strings instead of numbers."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            y = np.array([[f"class-{j}" for j in range(10)] for _ in range(len(x))], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", y)]))
        return responses
'''


def write_string_model(repo: Path, name: str, declared: str, point_shape: tuple[int, int, int]) -> None:
    """A python-backend model answering strings; its config declares the output as `declared`
    (TYPE_STRING: honest; TYPE_FP32: it lies, and Triton forwards the strings as BYTES anyway)."""
    (repo / name / "1").mkdir(parents=True)
    dims = ", ".join(str(d) for d in point_shape)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 64\n'
        f'input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "y" data_type: {declared} dims: [ {K} ] }} ]\n'
        'instance_group [ { kind: KIND_CPU count: 1 } ]\n'
    )
    (repo / name / "1" / "model.py").write_text(STRING_MODEL_PY)


def _need_triton() -> None:
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the test extra) is not installed")
    pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] is not installed")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")


SERVED = ("nan", "inf", "extra-class", "no-classes", "column", "labels-oob", "labels-neg", "labels-float", "short-batch",
          "pirate-noise-0.1", "independent-noise-0.1", "pirate-round-1", "independent-round-1")

# What the CLI must say, per served model and way of asking (labels via Triton's classification
# extension, labels via argmax of the output, probabilities).
TRITON_EXPECTED: dict[str, dict[tuple[str, ...], str]] = {
    "nan": {LABELS: r"malformed classification result 'nan:", ARGMAX: r"NaN or infinite", PROBS: r"NaN or infinite"},
    "inf": {LABELS: r"malformed classification result 'inf:", ARGMAX: r"NaN or infinite", PROBS: r"NaN or infinite"},
    "extra-class": {LABELS: r"label outside 0\.\.9", ARGMAX: r"label outside 0\.\.9", PROBS: r"11 classes, expected 10"},
    "column": {LABELS: r"FP32 \[10, 1\] per sample", ARGMAX: r"FP32 \[10, 1\] per sample", PROBS: r"FP32 \[10, 1\] per sample"},
    "labels-oob": {LABELS: r"label outside 0\.\.9", ARGMAX: r"label outside 0\.\.9", PROBS: r"only answers labels"},
    "labels-neg": {LABELS: r"label outside 0\.\.9", ARGMAX: r"label outside 0\.\.9", PROBS: r"only answers labels"},
    "labels-float": {LABELS: r"has 1 class", ARGMAX: r"has 1 class", PROBS: r"has 1 class"},
    "short-batch": {LABELS: r"4 entries for 5 samples", ARGMAX: r"shape \(4, 10\) for a batch of 5", PROBS: r"shape \(4, 10\) for a batch of 5"},
    "strings": {LABELS: r"BYTES \[10\] per sample", ARGMAX: r"BYTES \[10\] per sample", PROBS: r"BYTES \[10\] per sample"},
    # Triton forwards the strings although the config says FP32. (Asking its classification
    # extension for them crashes tritonserver 2.51: see test_a_suspect_that_crashes_its_server.)
    "strings-as-fp32": {ARGMAX: r"output of type object, expected floating point", PROBS: r"output of type object, expected floating point"},
}


class TestServedByTriton:
    """One real tritonserver (class scope: stopped before the crash test starts its own)."""

    @pytest.fixture(scope="class")
    def server(self, world: Any, fp: Fingerprint, hostile: HostileModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
        _need_triton()
        from deepcore_auditor.adapters.triton.serve import TritonServer, write_model_repository

        root = tmp_path_factory.mktemp("hostile-triton")
        repo = write_model_repository({name: hostile.files[name] for name in SERVED}, root / "repository", max_batch_size=64)
        write_string_model(repo, "strings", "TYPE_STRING", fp.point_shape)
        write_string_model(repo, "strings-as-fp32", "TYPE_FP32", fp.point_shape)
        with TritonServer(repo, log_path=root / "tritonserver.log") as server:
            yield server

    @pytest.mark.parametrize("name", sorted(TRITON_EXPECTED))
    def test_hostile_model_is_a_one_line_error_over_http_and_grpc(self, world: Any, server: Any, name: str) -> None:
        for protocol in ("http", "grpc"):
            for extra, pattern in TRITON_EXPECTED[name].items():
                line = error_line(run_audit(world, server.url(name, protocol), *extra, *FIXED_BATCHES), pattern)
                assert "Traceback" not in line
        assert server.is_running(), server.log_tail()

    @pytest.mark.parametrize("extra", [ARGMAX, PROBS], ids=["argmax", "probs"])
    def test_zero_class_output_is_a_one_line_error(self, world: Any, server: Any, extra: tuple[str, ...]) -> None:
        # (labels via the classification extension are not asked: that crashes tritonserver 2.51)
        for protocol in ("http", "grpc"):
            error_line(run_audit(world, server.url("no-classes", protocol), *extra), r"class")

    def test_inf_for_one_class_stops_at_that_batch_over_both_protocols(self, world: Any, server: Any, hostile: HostileModels, tmp_path: Path) -> None:
        for protocol in ("http", "grpc"):
            for extra in (LABELS, ARGMAX, PROBS):
                ledger = tmp_path / f"{protocol}-{len(extra)}.jsonl"
                error_line(run_audit(world, server.url("inf", protocol), *extra, "--ledger", ledger, *FIXED_BATCHES),
                           r"inf|NaN or infinite")
                _, records = ledger_records(ledger)
                access = Access.PROBS if extra == PROBS else Access.LABELS
                assert len(records) == hostile.inf_answered, (protocol, extra)
                assert_valid_answers(records, access)
                labels = {rec["answer"] if access is Access.LABELS else int(np.argmax(rec["answer"])) for rec in records}
                assert hostile.inf_class not in labels

    @pytest.mark.parametrize("mode", ["agreement", "similarity", "clustering"])
    @pytest.mark.parametrize("transformation", ["noise-0.1", "round-1"])
    def test_noisy_or_rounding_suspects_over_triton(self, world: Any, server: Any, transformation: str, mode: str) -> None:
        access = ("--access", "probs") if mode == "similarity" else ()
        for protocol in ("http", "grpc"):
            for who in ("independent", "pirate"):
                url = server.url(f"{who}-{transformation}", protocol)
                r = run_audit(world, url, "--mode", mode, *access, "--budget", ROOMY, "--concurrency", 1, "--test", sequential_test_for(mode))
                assert r.exit_code in (0, 1, 3), r.output
                verdict = json.loads(r.stdout)["verdict"]
                if who == "independent":
                    assert verdict != "piracy", (protocol, who, mode)
                else:
                    assert verdict in ("piracy", "inconclusive"), (protocol, who, mode)

    def test_a_rounding_pirate_is_not_cleared_over_triton(self, world: Any, server: Any) -> None:
        for protocol in ("http", "grpc"):
            r = run_audit(world, server.url("pirate-round-1", protocol), "--access", "probs", "--mode", "similarity")
            assert r.exit_code in (1, 3), json.loads(r.stdout)["verdict"]


class TestCrashingServer:
    def test_a_suspect_that_crashes_its_server_is_a_one_line_error(self, world: Any, fp: Fingerprint, tmp_path: Path) -> None:
        """Triton's classification extension asked for the top-1 of a model that answers strings
        under an FP32 config: tritonserver 2.51 dies of SIGSEGV (a server bug). The audit must
        still end in one line, not hang or crash, and keep what it had in the ledger."""
        _need_triton()
        from deepcore_auditor.adapters.triton.serve import TritonServer

        repo = tmp_path / "repository"
        write_string_model(repo, "strings-as-fp32", "TYPE_FP32", fp.point_shape)
        ledger = tmp_path / "ledger.jsonl"
        with TritonServer(repo, log_path=tmp_path / "tritonserver.log") as server:
            r = run_audit(world, server.url("strings-as-fp32", "http"), "--ledger", ledger, "--retries", 2, "--connect-timeout", 3)
            error_line(r, r"connection|unreachable|classification|object|Triton")
            assert ledger_records(ledger)[1] == []


def test_a_pirate_lying_on_what_its_detector_flags(world: Any, tmp_path: Path) -> None:
    """benchmarks/stealth.py on the world's fine-tuned copy: the honest copy is a pirate; lying on
    every query (a perfect detector) makes it look independent, so the harness can tell; the
    detectors' thresholds flag their share of natural images."""
    from deepcore_auditor.benchmarks.stealth import main

    out = tmp_path / "stealth.json"
    assert main(["--fingerprint", str(world.fingerprint), "--pirate", str(world.pirate_onnx), "--data", "fashion-mnist",
                 "--natural", "500", "--orders", "2", "--budget", "60", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["honest"]["verdicts"] == {"piracy": 2}
    assert r["every_point_flagged"]["verdicts"] == {"independent": 2}
    assert set(r["detectors"]) == {"energy", "msp"}
    for d in r["detectors"].values():
        assert 0.0 <= d["core_points_flagged"] <= 1.0 and 0.0 <= d["auroc_core_vs_natural"] <= 1.0
        assert sum(d["evasive"]["verdicts"].values()) == 2
