"""scripts/wheelhouse.sh: a wheelhouse that installs easel with pip --no-index into a
fresh venv (the core set here; the [diffusers] set adds every wheel but torch and
torchvision, which the host brings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .servers import ROOT

pytestmark = pytest.mark.timeout(600)


def test_the_core_wheelhouse_installs_offline(tmp_path: Path) -> None:
    wheels = tmp_path / "wheelhouse"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), "-o", str(wheels), "-p", py, "-e", ""],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    names = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    assert {"easel", "starlette", "msgspec", "numpy"} <= names and "torch" not in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    installed = subprocess.run([*pip, "install", "--no-index", "--find-links", str(wheels), "easel"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    run = subprocess.run([str(venv / "bin" / "python"), "-c", "import server.app, clients; import importlib.util as u; print(u.find_spec('torch'))"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "None", run.stderr
