"""Suspects that never answer, answer slowly, or answer at random — real ONNX graphs built at test
time — each get the verdict or the one-line error they must, and Ctrl-C always stops an audit."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from conftest import audit_args, sigint_as_in_a_terminal
from conftest import process_error_line as error_line
from conftest import run_deepcore as deepcore
from onnx import TensorProto, helper, numpy_helper

NEVER = 2**40  # Loop iterations: a model that never returns


def suspect_graph(path: Path, *, loop: int = 0, noise: bool = False, shape: tuple[int, ...] = (1, 28, 28),
                  classes: int = 10, seed: int = 0) -> Path:
    """A linear classifier on the flattened input, then optionally `loop` iterations of a Loop that
    carries the logits through unchanged (a model that computes for as long as it likes), and
    optionally unseeded uniform noise of amplitude 100 on the logits (answers drawn afresh at
    every call)."""
    w = np.random.default_rng(seed).standard_normal((math.prod(shape), classes)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    inits = [numpy_helper.from_array(w, "w")]
    last = "logits"
    if noise:
        nodes += [helper.make_node("RandomUniformLike", [last], ["noise"], high=100.0),
                  helper.make_node("Add", [last, "noise"], ["noisy"])]
        last = "noisy"
    if loop:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["y_in"], ["y_out"])],
            "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("y_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("y_out", TensorProto.FLOAT, None)],
        )
        inits += [numpy_helper.from_array(np.array(loop, dtype=np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")]
        nodes.append(helper.make_node("Loop", ["trips", "go", last], ["looped"], body=body))
        last = "looped"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "suspect", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_model_that_never_returns_ends_with_one_line_at_the_deadline(world: Any, tmp_path: Path) -> None:
    bomb = suspect_graph(tmp_path / "bomb.onnx", loop=NEVER)
    t0 = time.monotonic()
    r = deepcore(*audit_args(world, bomb, "--request-timeout", "1", "--no-report", "--json"), timeout=120)
    took = time.monotonic() - t0
    error_line(r, "no answer to a batch of 5 within 1 s", "--request-timeout")
    assert r.stdout == "" and took < 30, took  # the deadline, not the Loop, ended it (interpreter start included)


def test_ctrl_c_stops_an_audit_of_a_hanging_model_within_a_second_and_keeps_the_ledger(world: Any, tmp_path: Path) -> None:
    """SIGINT while ONNX Runtime runs a never-ending graph: the audit ends within a second, exit 2,
    one line that says so and how to resume; the ledger file (its header) is kept."""
    bomb, ledger = suspect_graph(tmp_path / "bomb.onnx", loop=NEVER), tmp_path / "l.jsonl"
    cmd = [sys.executable, "-m", "deepcore_auditor", *audit_args(world, bomb, "--ledger", str(ledger), "--no-report", "--json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while not (ledger.exists() and ledger.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.exists(), "the audit never opened its ledger"
        time.sleep(1.0)  # the first batch is now inside ONNX Runtime's Loop
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 2 and stopped < 1.0, (proc.returncode, stopped, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepcore: error: interrupted") and "--resume" in lines[0], err
    assert json.loads(ledger.read_text().splitlines()[0])["ledger"]["fingerprint_sha256"]


def test_a_slow_model_is_answered_within_its_deadline_and_refused_past_it(world: Any, tmp_path: Path) -> None:
    slow = suspect_graph(tmp_path / "slow.onnx", loop=4_000_000)  # well over 0.2 s a batch, loaded or idle
    args = audit_args(world, slow, "--no-report", "--json", "--repeat-checks", "0")
    args[args.index("--budget") + 1] = "10"
    r = deepcore(*args, timeout=300)
    assert r.returncode in (0, 1, 3), r.stderr
    assert json.loads(r.stdout)["queries_used"] <= 10
    error_line(deepcore(*args, "--request-timeout", "0.2", timeout=120), "no answer to a batch of 5 within 0.2 s")


def test_a_model_that_answers_at_random_is_never_accused(world: Any, tmp_path: Path) -> None:
    """Fresh noise at every call: the repeat check sees answers change and the verdict is
    inconclusive, never piracy, and never a clean independent."""
    noisy = suspect_graph(tmp_path / "noisy.onnx", noise=True)
    args = audit_args(world, noisy, "--no-report", "--json")
    args[args.index("--budget") + 1] = "200"
    r = deepcore(*args, timeout=300)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    d = json.loads(r.stdout)
    assert d["verdict"] == "inconclusive" and d["repeat_check"]["differing"] > 0, d


def test_the_models_built_here_are_what_they_claim(tmp_path: Path) -> None:
    """The corpus itself: the plain graph answers [N, 10] and the same twice; the noisy one differs
    between calls (so the tests above test what they say)."""
    import onnxruntime as ort

    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    plain = ort.InferenceSession(str(suspect_graph(tmp_path / "p.onnx", loop=3)), providers=["CPUExecutionProvider"])
    a, b = (plain.run(["y"], {"x": x})[0] for _ in range(2))
    assert a.shape == (3, 10) and np.array_equal(a, b)
    noisy = ort.InferenceSession(str(suspect_graph(tmp_path / "n.onnx", noise=True)), providers=["CPUExecutionProvider"])
    assert not np.array_equal(*(noisy.run(["y"], {"x": x})[0] for _ in range(2)))
