"""The built wheel holds every module: an installed (not editable) mpqc imports in full."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The source folders and the packages they become (pyproject's package-dir).
SOURCES = {"mpqc": "mpqc", "passes": "mpqc.passes", "search": "mpqc.search", "export": "mpqc.export"}


def source_modules() -> set[str]:
    names = set()
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            names.add(".".join([package, *rel.parts]).removesuffix(".__init__"))
    return names


def test_wheel_holds_and_imports_every_module(tmp_path):
    # From a copy: setuptools reuses a build/ folder, which would hide a package left out.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", "__pycache__", "runs", ".whl", "gpu-out", "tests", "docs", "examples"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mpqc-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        packaged = {
            n.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for n in z.namelist() if n.endswith(".py")
        }
    assert source_modules() - packaged == set(), "modules missing from the wheel: add their package to pyproject"
    # -P: not the checkout (cwd) first; only the unpacked wheel provides mpqc.
    code = (
        "import importlib, sys; mods = sys.argv[1:]; [importlib.import_module(m) for m in mods]; "
        "import mpqc, os; assert mpqc.__file__.startswith(os.environ['PYTHONPATH']), mpqc.__file__"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    modules = sorted(m for m in source_modules() if not m.endswith(("triton_quantize", "lm_eval_adapter")))
    done = subprocess.run(
        [sys.executable, "-P", "-c", code, *modules], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
