"""The Python clients (clients/) against a real server: every Client method, the
same tests for AsyncClient, the seed 003 functions and the CLI."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clients import (
    ApiError,
    AsyncClient,
    Client,
    JobCancelled,
    JobFailed,
    Timeout,
    mflux,
)

from .servers import ROOT, RunningServer

LONG_JOB = {"steps": 200}  # 10 s on the slow server (0.05 s a step)


def png(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


class Blocking:
    """Drives an AsyncClient to completion call by call on one event loop, so
    that every test below runs against both clients with the same code."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._runner = asyncio.Runner()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **k: self._runner.run(attr(*a, **k))
        return attr

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()


ClientFactory = Callable[..., Any]


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[ClientFactory]:
    made: list[Any] = []

    def make(server: RunningServer, **kwargs: Any) -> Any:
        c: Any = Client(server.url, **kwargs) if request.param == "sync" else Blocking(AsyncClient(server.url, **kwargs))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("wait_mode", ["poll", "sse"])
def test_generate_returns_images_with_their_seeds_and_saves_them(make_client: ClientFactory, server: RunningServer, tmp_path: Path, wait_mode: str) -> None:
    c = make_client(server, wait_mode=wait_mode)
    seen: list[dict[str, Any]] = []
    images = c.generate("a red barn", n=2, seed=7, steps=3, output=tmp_path / "barn.png", on_progress=seen.append)
    assert [img.info["seed"] for img in images] == [7, 8]
    assert all(img.size == (64, 64) for img in images)
    assert [Image.open(tmp_path / f"barn-{i}.png").size for i in range(2)] == [(64, 64), (64, 64)]
    assert seen and seen[-1]["status"] == "done"


def test_sse_wait_reports_every_step(make_client: ClientFactory, slow_server: RunningServer) -> None:
    c = make_client(slow_server, wait_mode="sse")
    seen: list[dict[str, Any]] = []
    c.generate("steps", steps=6, on_progress=seen.append)
    assert {s["step"] for s in seen if s["status"] == "running"} >= {1, 2, 3, 4, 5}


def test_edit_accepts_paths_bytes_and_pil_images(make_client: ClientFactory, server: RunningServer, tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    ref.write_bytes(png((0, 0, 255)))
    c = make_client(server)
    [out] = c.edit("make it green", [ref, png(), Image.new("RGB", (32, 32), "white")], width=64, height=64)
    assert out.size == (64, 64) and out.info["prompt"] == "make it green"


def test_status_cancel_models_and_tasks(make_client: ClientFactory, slow_server: RunningServer) -> None:
    c = make_client(slow_server)
    assert [m["id"] for m in c.models()] == ["stub"] and "generate" in c.models()[0]["capabilities"]["tasks"]
    task_id = c.submit("/api/generate", {"prompt": "to cancel", **LONG_JOB})["task_id"]
    assert c.status(task_id)["status"] in ("waiting", "running")
    assert task_id in [t["task_id"] for t in c.tasks()["queue"]]
    assert c.cancel(task_id)["status"] == "cancelled"
    with pytest.raises(JobCancelled) as info:
        c.wait(task_id)
    assert info.value.task_id == task_id


@pytest.mark.parametrize("wait_mode", ["poll", "sse"])
def test_a_failing_job_raises_job_failed_with_the_server_message(make_client: ClientFactory, server: RunningServer, wait_mode: str) -> None:
    c = make_client(server, wait_mode=wait_mode)
    with pytest.raises(JobFailed, match="asked to fail") as info:
        c.generate("fail")
    assert info.value.status["status"] == "error"


def test_bad_input_raises_api_error_naming_the_field(make_client: ClientFactory, server: RunningServer) -> None:
    c = make_client(server)
    with pytest.raises(ApiError) as info:
        c.generate("x", width=1000)
    assert (info.value.status, info.value.param) == (400, "width")
    with pytest.raises(ApiError) as info:
        c.status("no-such-task")
    assert info.value.status == 404


@pytest.mark.parametrize("wait_mode", ["poll", "sse"])
def test_a_slow_job_past_the_timeout_raises_timeout_and_is_cancelled(make_client: ClientFactory, slow_server: RunningServer, wait_mode: str) -> None:
    c = make_client(slow_server, wait_mode=wait_mode)
    with pytest.raises(Timeout) as info:
        c.generate("too slow", timeout=0.5, **LONG_JOB)
    assert info.value.cancelled
    assert c.status(info.value.task_id)["status"] == "cancelled"


def test_train_on_a_model_that_cannot_train_raises_api_error(make_client: ClientFactory, server: RunningServer) -> None:
    c = make_client(server)
    with pytest.raises(ApiError) as info:
        c.train("stub", "/nonexistent", "adapter", steps=1)
    assert 400 <= info.value.status < 500 and info.value.message


@pytest.mark.anyio
async def test_async_client_runs_jobs_concurrently(server: RunningServer) -> None:
    async with AsyncClient(server.url, wait_mode="sse") as c:
        a, b = await asyncio.gather(c.generate("one", seed=1), c.generate("two", seed=2))
    assert (a[0].info["seed"], b[0].info["seed"]) == (1, 2)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_seed_003_functions_module(server: RunningServer) -> None:
    image = mflux.generate_image(server.url, "seed three", width=64, height=64, steps=2)
    assert image.size == (64, 64)
    assert mflux.mflux_status_ready(server.url, "missing") == -1
    task_id = mflux.mflux_generate_client(server.url, "fail", width=64, height=64)
    with Client(server.url) as c, pytest.raises(JobFailed):
        c.wait(task_id)
    assert mflux.mflux_status_ready(server.url, task_id) == -1


def cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients", "--url", server.url, *args],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "EASEL_API_KEY": ""},
    )


def test_cli_generate_writes_a_valid_image_and_draws_progress(slow_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    res = cli(slow_server, "generate", "from the cli", "-o", str(out), "--steps", "4", "--seed", "42",
              "--sampler", "DPM++ 2M", "--scheduler", "Karras")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size == (64, 64)
    bad = cli(slow_server, "-q", "generate", "x", "-o", str(out), "--sampler", "DPM fast")  # the flag reaches the server
    assert bad.returncode != 0 and "sampler 'DPM fast' is not one this model runs" in bad.stderr and "Euler a" in bad.stderr
    assert json.loads(res.stdout)[0]["seed"] == 42
    assert "step 4/4" in res.stderr and "ETA" in res.stderr


def test_cli_edit_status_cancel_and_models(server: RunningServer, tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    ref.write_bytes(png())
    res = cli(server, "-q", "edit", "cli edit", "-i", str(ref), "-i", str(ref), "-o", str(tmp_path / "e.png"))
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "e.png").size == (64, 64)
    task_id = server.client.post("/api/generate", json={"prompt": "for status"}).json()["task_id"]
    assert json.loads(cli(server, "status", task_id).stdout)["task_id"] == task_id
    assert json.loads(cli(server, "cancel", task_id).stdout)["task_id"] == task_id
    assert json.loads(cli(server, "models").stdout)[0]["id"] == "stub"


def test_cli_reports_errors_on_stderr_with_exit_status_1(server: RunningServer) -> None:
    res = cli(server, "generate", "x", "--width", "1000")
    assert res.returncode == 1 and "param: width" in res.stderr and "Traceback" not in res.stderr
    res = cli(server, "generate", "fail", "-o", os.devnull)
    assert res.returncode == 1 and "asked to fail" in res.stderr


def test_cli_says_when_no_worker_serves_the_model_instead_of_an_eta(server_factory: Callable[..., RunningServer], shared_redis: Any) -> None:
    from .servers import free_port, stub_settings

    settings = {**stub_settings(), "broker": {"prefix": f"t{free_port()}:"}}
    api_only = server_factory(settings, "--broker", shared_redis.url, "--role", "api")  # no worker anywhere
    res = subprocess.run(
        [sys.executable, "-m", "clients", "--url", api_only.url, "--timeout", "2", "generate", "nobody runs this", "-o", os.devnull],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "EASEL_API_KEY": ""},
    )
    assert res.returncode == 1
    assert "ETA    0.0 s" not in res.stderr, res.stderr
    assert "no ETA: no worker is serving model 'stub'" in res.stderr, res.stderr
