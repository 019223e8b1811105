"""Deadlines: refused up front when the forecast misses them; a queued job that can
no longer make it ends as error before it runs.  On both brokers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from openai import OpenAI

from .servers import BROKERS, RunningServer, stub_settings
from .test_api import wait_done, wait_running


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    # 0.05 s a step at 64x64; the prior makes forecasts right from the first job
    settings = stub_settings(simulate_step_seconds=12.0, forecast_prior={"step_mp": 12.0})
    settings, args = broker_args(settings, request.param)
    return server_factory(settings, *args)


def tagged(srv: RunningServer, tag: str) -> list[dict[str, Any]]:
    listed = srv.client.get("/api/tasks", params={"limit": 1000}).json()
    return [j for j in listed["queue"] + listed["recent"] if (j.get("metadata") or {}).get("tag") == tag]


def test_a_deadline_too_tight_is_a_422_at_once_and_no_job_is_made(srv: RunningServer) -> None:
    c = srv.client
    t0 = time.monotonic()
    r = c.post("/api/generate", json={"prompt": "x", "steps": 100, "deadline_seconds": 1, "metadata": {"tag": "tight"}})
    assert time.monotonic() - t0 < 2
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "deadline_unreachable" and error["param"] == "deadline_seconds"
    assert 4.5 <= error["earliest_deadline_seconds"] <= 8  # 100 steps x 0.05 s, and a little room
    assert error["forecast_finish_at"] > time.time() + 4
    assert tagged(srv, "tight") == []
    ok = c.post("/api/generate", json={"prompt": "x", "steps": 100, "deadline_seconds": error["earliest_deadline_seconds"]})
    assert ok.status_code == 200, ok.text  # the deadline it named is reachable
    st = wait_done(c, ok.json()["task_id"])
    assert st["status"] == "done" and st["finished_at"] <= st["deadline_at"] + 0.5


def test_a_reachable_deadline_runs_and_the_status_shows_it(srv: RunningServer) -> None:
    c = srv.client
    r = c.post("/api/generate", json={"prompt": "x", "deadline_seconds": 30})
    assert r.status_code == 200, r.text
    st = wait_done(c, r.json()["task_id"])
    assert st["status"] == "done" and st["deadline_at"] is not None and st["code"] is None


def test_a_queued_job_whose_deadline_slips_away_ends_as_error_before_it_runs(srv: RunningServer) -> None:
    c = srv.client
    blocker = c.post("/api/generate", json={"prompt": "x", "steps": 40}).json()["task_id"]  # 2 s
    wait_running(c, blocker)
    hopeful = c.post("/api/generate", json={"prompt": "x", "steps": 2, "deadline_seconds": 3}).json()
    assert "task_id" in hopeful, hopeful
    # the queue gets slower: a priority job goes ahead of it
    c.post("/api/generate", json={"prompt": "x", "steps": 100, "priority": True})
    st = c.get("/api/status", params={"task_id": hopeful["task_id"]}).json()
    assert st["status"] == "error" and st["code"] == "deadline_missed", st
    assert "deadline missed" in st["message"] and st["started_at"] is None  # never on the GPU
    c.get("/api/clear")


def test_the_openai_routes_take_deadline_seconds(srv: RunningServer) -> None:
    client = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.images.generate(prompt="x", extra_body={"deadline_seconds": 0.5, "steps": 100})
    assert "deadline" in str(exc.value)
    assert client.images.generate(prompt="x", extra_body={"deadline_seconds": 30}).data
