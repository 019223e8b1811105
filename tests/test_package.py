"""easel as an installed package: the wheel built from this checkout, installed into
a fresh venv, serves the stub, the web UI and the client CLI with torch and the
other [diffusers] packages unimportable (the core install has none of them).

The venv sees the system's site-packages (the core dependencies are already there,
so nothing is downloaded) and the wheel goes in with --no-deps; a sitecustomize
makes the [diffusers] extra's packages unimportable, as in a core-only install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .servers import ROOT, free_port

EXTRA = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "gguf", "safetensors", "spandrel", "torchao", "gradio")
BLOCKER = f'''import sys
class _NoExtra:
    """The [diffusers] extra is not installed here."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRA!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NoExtra())
'''


@dataclass
class Installed:
    venv: Path
    env: dict[str, str]
    home: Path  # a folder outside the checkout

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=self.home, env=self.env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"  # a copy: building leaves build/ and *.egg-info beside the sources
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("server", "clients", "static"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True, timeout=300)
    (wheel,) = wheels.glob("easel-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), *pip[1:], "install", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    blocker = tmp / "no-extra"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(blocker), PYTHONUNBUFFERED="1", EASEL_URL="")
    return Installed(venv, env, home)


def serve(installed: Installed, settings: dict[str, Any], *args: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    cfg = installed.home / f"settings-{port}.json"
    cfg.write_text(json.dumps(settings))
    log = installed.home / f"serve-{port}.log"
    proc = subprocess.Popen([installed.bin("easel"), "serve", "--config", str(cfg), "--port", str(port), *args],
                            cwd=installed.home, env=installed.env, stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
    except BaseException:
        proc.kill()
        raise
    return proc, url, log


@dataclass
class Served:
    url: str
    log: Path


@pytest.fixture(scope="module")
def served(installed: Installed) -> Iterator[Served]:
    settings = {
        "models": {"stub": {"backend": "stub", "enabled": True, "default_width": 64, "default_height": 64},
                   "sdxl": {"backend": "sdxl", "model_path": str(installed.home / "no-weights"), "enabled": True}},
        "default_model": "stub",
    }  # fmt: skip
    proc, url, log = serve(installed, settings)
    try:
        yield Served(url, log)
    finally:
        proc.terminate()
        proc.wait(30)


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"easel serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # start-up poll: no event to await across processes
    raise AssertionError(f"easel serve did not start:\n{log.read_text()}")


def py_dirs(root: Path) -> set[str]:
    return {str(p.parent.relative_to(root)) for p in root.rglob("*.py") if "__pycache__" not in p.parts}


def test_the_wheel_is_what_runs(installed: Installed) -> None:
    out = installed.run(installed.bin("python"), "-c", "import server, clients; print(server.__file__); print(clients.__file__)")
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(installed.venv)) for line in out.stdout.split()), out.stdout
    installed_server = Path(out.stdout.split()[0]).parent
    assert py_dirs(installed_server) == py_dirs(ROOT / "server"), "a package missing from pyproject.toml's packages"
    blocked = installed.run(installed.bin("python"), "-c", "import torch")
    assert blocked.returncode != 0 and "No module named 'torch'" in blocked.stderr


def test_easel_serve_runs_a_job_on_the_stub_without_torch(served: Served) -> None:
    c = httpx.Client(base_url=served.url, timeout=60)
    task = c.post("/api/generate", json={"prompt": "a packaged fox", "steps": 2, "seed": 5}).json()["task_id"]
    st = {"status": "waiting"}
    for _ in range(3):  # waiting -> running -> done, each a long-poll
        if st["status"] in ("done", "error", "cancelled"):
            break
        st = c.get("/api/status", params={"task_id": task, "wait": 30, "since": st["status"]}).json()
    assert st["status"] == "done", st
    assert c.get("/api/image", params={"task_id": task}).content[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in c.get("/").text.lower()  # the web UI, from the wheel's server/static
    assert c.get("/app.js").status_code == 200


def test_a_diffusers_model_without_the_extra_says_which_extra(served: Served) -> None:
    models: Any = httpx.get(served.url + "/v1/admin/models").json()
    sdxl = next(m for m in models["models"] if m["name"] == "sdxl")
    assert sdxl["state"] == "error"
    assert sdxl["load_error"] == ("model 'sdxl' (backend sdxl) needs easel's Diffusers extra, which is not installed "
                                  "(no module 'torch'): pip install 'easel[diffusers]' (in a checkout: pip install '.[diffusers]' "
                                  "or -r requirements.txt)")  # fmt: skip
    assert sum("pip install 'easel[diffusers]'" in line for line in served.log.read_text().splitlines()) == 1


def test_the_easel_command_is_the_client_too(installed: Installed, served: Served) -> None:
    out = installed.home / "fox.png"
    r = installed.run(installed.bin("easel"), "--url", served.url, "-q", "generate", "a fox", "--steps", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    models = installed.run(installed.bin("easel"), "--url", served.url, "models")
    assert models.returncode == 0 and "stub" in models.stdout
    assert "easel serve" in installed.run(installed.bin("easel"), "--help").stdout


def test_an_api_node_on_redis_runs_without_torch(installed: Installed, shared_redis: Any) -> None:
    settings = {"models": {"stub": {"backend": "stub"}}, "default_model": "stub", "broker": {"prefix": f"pkg{free_port()}:"}}
    proc, url, _ = serve(installed, settings, "--role", "api", "--broker", shared_redis.url)
    try:
        r = httpx.post(url + "/api/generate", json={"prompt": "queued for a worker", "steps": 1}, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(url + "/api/status", params={"task_id": r.json()["task_id"]}).json()["status"] == "waiting"
    finally:
        proc.terminate()
        proc.wait(30)
