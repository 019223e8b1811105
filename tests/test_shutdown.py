"""SIGTERM: stop accepting, let running jobs finish within the grace period, exit cleanly."""

from __future__ import annotations

import signal
from typing import Any

from .servers import stub_settings
from .test_api import wait_running


def test_sigterm_lets_the_running_job_finish_and_cancels_queued_ones(server_factory: Any) -> None:
    srv = server_factory({**stub_settings(simulate_step_seconds=12.0), "queue": {"shutdown_grace_seconds": 30}})
    c = srv.client
    running = c.post("/api/generate", json={"prompt": "finish me", "steps": 20}).json()["task_id"]
    queued = c.post("/api/generate", json={"prompt": "never runs"}).json()["task_id"]
    wait_running(c, running)
    assert srv.stop(signal.SIGTERM) == 0
    log = srv.log()
    assert f"job {running} on stub: done" in log
    assert f"job {queued} on stub: cancelled" in log and "shut down before the job ran" in log


def test_grace_period_over_cancels_the_running_job(server_factory: Any) -> None:
    srv = server_factory({**stub_settings(simulate_step_seconds=12.0), "queue": {"shutdown_grace_seconds": 0.2}})
    c = srv.client
    running = c.post("/api/generate", json={"prompt": "too long", "steps": 200}).json()["task_id"]
    wait_running(c, running)
    assert srv.stop(signal.SIGINT) == 0
    log = srv.log()
    assert f"job {running} on stub: cancelled" in log and "grace period over" in log
