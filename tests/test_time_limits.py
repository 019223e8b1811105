"""Time limits (server/watchdog.py): a job past ``job_timeout_seconds`` stops at its
next step as an error; a job that reports no step for ``stall_seconds`` ends as an
error at once, and its model is restarted (isolate) or marked error until the hung
call returns (in-process). The stub's prompts ``hang N`` (ends when its job is
cancelled) and ``stuck N`` (blind to cancellation) are the hung calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .servers import RunningServer, stub_settings
from .test_api import wait_done, wait_running

pytestmark = pytest.mark.timeout(120)
MARGIN = 2.5  # seconds past a limit the job may take to end (2 busy cores)


def submit(c: httpx.Client, prompt: str, model: str = "stub", steps: int = 2) -> str:
    r = c.post("/api/generate", json={"prompt": prompt, "model": model, "steps": steps})
    assert r.is_success, r.text
    return str(r.json()["task_id"])


def model_info(c: httpx.Client, name: str) -> dict[str, Any]:
    return next(m for m in c.get("/v1/admin/models").json()["models"] if m["name"] == name)


def run_until_finished(c: httpx.Client, task_id: str) -> tuple[dict[str, Any], float]:
    """The finished status and the seconds it ran."""
    wait_running(c, task_id)
    start = time.monotonic()
    st = wait_done(c, task_id)
    return st, time.monotonic() - start


def test_job_over_its_timeout_ends_as_error_naming_the_limit(server_factory: Callable[..., RunningServer]) -> None:
    settings = stub_settings(simulate_step_seconds=50.0)  # 0.2 s a step at 64x64
    settings["models"]["free"] = {**settings["models"]["stub"], "job_timeout_seconds": 0}  # 0: no limit here
    settings["limits"] = {"job_timeout_seconds": 1}
    c = server_factory(settings).client

    st, took = run_until_finished(c, submit(c, "a slow fox", steps=30))  # 6 s of steps
    assert st["status"] == "error", st
    assert "ran past 1 s" in st["message"] and "limits.job_timeout_seconds" in st["message"], st["message"]
    assert took < 1 + MARGIN

    st = wait_done(c, submit(c, "no limit for me", model="free", steps=8))  # 1.6 s
    assert st["status"] == "done", st


def test_isolated_model_that_hangs_is_killed_restarted_and_serves_the_next_job(
    server_factory: Callable[..., RunningServer],
) -> None:
    srv = server_factory(stub_settings(isolate=True, stall_seconds=1))
    c = srv.client
    st, took = run_until_finished(c, submit(c, "hang"))
    assert st["status"] == "error", st
    assert "stalled" in st["message"] and "models.stub.stall_seconds" in st["message"], st["message"]
    assert took < 1 + MARGIN
    st = wait_done(c, submit(c, "after the hang"), timeout=60)  # the restarted process runs it
    assert st["status"] == "done", st
    assert model_info(c, "stub")["state"] == "loaded"
    assert "killing its process" in srv.log()


def test_in_process_model_that_hangs_is_marked_error_then_reloaded(server_factory: Callable[..., RunningServer]) -> None:
    settings = stub_settings()
    settings["limits"] = {"stall_seconds": 1}
    srv = server_factory(settings)
    c = srv.client
    hung = submit(c, "stuck 5")  # blind to the cancel; returns after 5 s: the hung call "finally returns"
    st, took = run_until_finished(c, hung)
    assert st["status"] == "error" and "limits.stall_seconds" in st["message"], st
    assert took < 1 + MARGIN

    # while the call hangs: the model reads error, with why, and takes no new jobs
    info = model_info(c, "stub")
    assert info["state"] == "error", info
    assert "stalled" in info["load_error"] and "loaded again" in info["load_error"], info
    refused = c.post("/api/generate", json={"prompt": "too soon"})
    assert refused.status_code == 409 and "stalled" in refused.json()["error"]["message"], refused.text
    assert c.post("/api/load", json={"model": "stub"}).status_code == 409  # not while the call hangs

    # the call returns: the model is unloaded, loaded again (it is enabled) and serves
    deadline = time.monotonic() + 30
    while model_info(c, "stub")["state"] != "loaded":
        assert time.monotonic() < deadline, model_info(c, "stub")
        time.sleep(0.2)  # no event to await across processes
    assert wait_done(c, submit(c, "after the hang"))["status"] == "done"
    assert "unloading the model" in srv.log()


def test_in_process_call_that_returns_once_its_stalled_job_is_stopped_comes_back(
    server_factory: Callable[..., RunningServer],
) -> None:
    """``hang`` returns as soon as its job is stopped, which the stall does at once: the
    model must still be unloaded and loaded again, however soon the call comes back."""
    settings = stub_settings()
    settings["limits"] = {"stall_seconds": 1}
    c = server_factory(settings).client
    st, _ = run_until_finished(c, submit(c, "hang"))
    assert st["status"] == "error" and "limits.stall_seconds" in st["message"], st
    deadline = time.monotonic() + 30
    while model_info(c, "stub")["state"] != "loaded":
        assert time.monotonic() < deadline, model_info(c, "stub")
        time.sleep(0.2)  # no event to await across processes
    assert wait_done(c, submit(c, "after the hang"))["status"] == "done"
