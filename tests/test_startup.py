"""Start-up order: the HTTP port is bound before any model loads or any job is
claimed, so a busy port is one clean line and touches no job; a worker takes jobs
only once every enabled model has loaded (``Worker.start``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from .redis_fixtures import RedisServer, redis_server_fresh  # noqa: F401 - a fixture
from .servers import ROOT, start_server, stub_settings
from .test_api import wait_done


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def run_server(tmp: Path, settings: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp / "settings.json"
    cfg.write_text(json.dumps(settings))
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--config", str(cfg), *args],
        cwd=tmp, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_busy_port_is_one_line_before_any_model_loads(tmp_path: Path) -> None:
    with busy_port() as taken:
        port = taken.getsockname()[1]
        # a load of 30 s would show: the port is refused before it
        done = run_server(tmp_path, stub_settings(simulate_load_seconds=30), "--port", str(port))
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "loading" not in done.stderr + done.stdout


def test_a_worker_on_a_busy_port_claims_nothing(tmp_path: Path, redis_server_fresh: RedisServer) -> None:  # noqa: F811
    """A job waits on Redis; a worker started on a busy port exits at once, and the job
    is still waiting with its attempt untouched; a worker that does start runs it."""
    settings = stub_settings()
    api = start_server(tmp_path, settings, ("--broker", redis_server_fresh.url, "--role", "api"))
    try:
        tid = api.client.post("/api/generate", json={"prompt": "a lighthouse", "steps": 2}).json()["task_id"]
        with busy_port() as taken:
            done = run_server(tmp_path, settings, "--port", str(taken.getsockname()[1]), "--broker", redis_server_fresh.url, "--role", "worker")
        assert done.returncode == 2 and "cannot listen" in done.stderr, done
        st = api.client.get("/api/status", params={"task_id": tid}).json()
        assert st["status"] == "waiting" and st["attempt"] == 0, st
        worker = start_server(tmp_path, settings, ("--broker", redis_server_fresh.url, "--role", "worker"))
        try:
            st = wait_done(api.client, tid, timeout=60)
            assert st["status"] == "done" and st["attempt"] == 1, st
        finally:
            worker.stop()
    finally:
        api.stop()


def test_the_listening_socket_says_tcp_so_answers_go_out_without_nagle() -> None:
    """asyncio sets TCP_NODELAY only on connections of a socket whose protocol is
    IPPROTO_TCP; a socket made with protocol 0 held every small answer ~40 ms for the
    client's delayed ACK (status calls went from 0.5 to 44 ms)."""
    from server.cli import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        sock.listen()
        with socket.create_connection(sock.getsockname()):
            conn, _ = sock.accept()
            with conn:
                assert conn.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
