"""A real easel server (``python server.py``) in a subprocess: what the tests' fixtures
and the benches start (plain functions, no pytest)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningServer:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.client = httpx.Client(base_url=url, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    tmp: Path,
    settings: dict[str, Any],
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    script: Path = ROOT / "server.py",
) -> RunningServer:
    port = free_port()
    cfg = tmp / f"settings-{port}.json"
    cfg.write_text(json.dumps(settings))
    log_path = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--config", str(cfg), "--port", str(port), *extra_args],
        cwd=tmp,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return RunningServer(proc, url, log_path)
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # start-up poll: there is no event to await across processes
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")


def model_processes(server_pid: int) -> set[int]:
    """The server's multiprocessing spawn children: its models' own processes (not the
    resource tracker)."""
    return {p.pid for p in psutil.Process(server_pid).children() if "spawn_main" in " ".join(p.cmdline())}


def stub_settings(**model: Any) -> dict[str, Any]:
    cfg = {
        "backend": "stub",
        "enabled": True,
        "tasks": ["generate", "edit"],
        "max_images": 4,
        "max_output_images": 4,
        "max_pixels": 1048576,
        "default_width": 64,
        "default_height": 64,
        "recommended_steps": 2,
        "simulate_step_seconds": 0.0,
        "simulate_faults": True,
    }
    cfg.update(model)
    return {"models": {"stub": cfg}, "default_model": "stub"}


BROKERS = ["memory", "redis"]  # the brokers the fixtures run every server test on
