"""The install's shape: one import package, every source folder mapped into it, no bare old
names, and an audit of an ONNX file that never imports torch (the core install has none)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("adapters", "fingerprints", "auditor", "benchmarks")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_mapped_under_deepcore_auditor() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    mapped = {Path(v) for v in setuptools["package-dir"].values()}
    packages = set(setuptools["packages"])
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            name = "deepcore_auditor." + ".".join(rel.parts)
            assert name in packages, f"{rel} is a package the wheel would leave out: add {name} to packages"
            assert any(rel == m or m in rel.parents for m in mapped), rel
    assert all(p == "deepcore_auditor" or p.startswith("deepcore_auditor.") for p in packages)


def test_no_module_imports_the_bare_folder_names() -> None:
    """From a checkout the folders are importable by their bare names (the working directory is on
    sys.path), which would hide a missed rename until the wheel is installed."""
    found = []
    for folder in (*FOLDERS, "tests", "deepcore_auditor"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not found, found


def test_core_dependencies_audit_onnx_without_torch() -> None:
    deps = [d.split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in _pyproject()["project"]["dependencies"]]
    assert "onnxruntime" in deps
    assert not {"torch", "onnx", "pillow", "safetensors", "nvidia-pytriton"} & set(deps), deps
    assert not any("numpy<" in d.replace(" ", "") for d in _pyproject()["project"]["dependencies"])


def test_an_onnx_audit_never_imports_torch(world) -> None:
    """The audit path of the core install: torch made unimportable, a real audit of a real ONNX file."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from deepcore_auditor.auditor.cli import main\n"
        f"sys.argv = ['deepcore', 'audit', '--fingerprint', {str(world.fingerprint)!r}, '--suspect', "
        f"{str(world.pirate_onnx)!r}, '--budget', '60', '--json', '--no-report']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    assert json.loads(done.stdout)["verdict"] == "piracy"


def test_nothing_imports_ray_without_the_ray_flag(world, tmp_path) -> None:
    """Ray made unimportable: every module of the package still imports, and `audit-many`
    without `--ray` scans (only `--ray` reaches for Ray, in auditor.cluster)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"fingerprint": str(world.fingerprint), "suspect": str(world.pirate_onnx), "budget": 60}) + "\n")
    modules = sorted(
        "deepcore_auditor." + ".".join(py.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for folder in ("adapters", "fingerprints", "auditor", "benchmarks") for py in (ROOT / folder).rglob("*.py")
        if py.name != "backend.py")  # adapters/triton/backend.py runs inside tritonserver only
    assert "deepcore_auditor.auditor.cluster" in modules and len(modules) > 50, modules
    code = (
        "import sys, importlib; sys.modules['ray'] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from deepcore_auditor.auditor.cli import main\n"
        f"sys.argv = ['deepcore', 'audit-many', {str(manifest)!r}, '--out', {str(tmp_path / 'out')!r}, '--json']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["pairs"][0]["status"] == "piracy"
