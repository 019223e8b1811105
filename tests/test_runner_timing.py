"""What the runner counts as a job's worker time (``JobRecord.worker_seconds``, shown
as ``gpu_seconds``): the forecast learns it as the cost of a job in the queue, and
quotas charge it; and how far behind its progress a running job is (``Runner.delayed``).
The app runs in-process here, on the memory broker and the stub backend, so that the
claim between two queued jobs can be made slow the way a slow network to the broker
would make it, and the event loop can be kept busy while a job runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import build_settings

from .servers import stub_settings

HAND_OVER = 0.3  # seconds the claim of a job takes when it comes right after another


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


async def run_two_queued_jobs(tmp: Path) -> list[dict[str, Any]]:
    raw = stub_settings(simulate_step_seconds=12.5)  # 2 steps at 64x64: ~0.1 s a job
    raw["storage"] = {"output_dir": str(tmp / "outputs")}
    app = create_app(build_settings(raw))
    broker = app.state.service.broker
    claim = broker.claim

    async def slow_claim(model: str, worker: str, lease: float, timeout: float) -> Any:
        if timeout == 0:  # the runner's one try the moment a job leaves the model
            await asyncio.sleep(HAND_OVER)
        return await claim(model, worker, lease, timeout)

    broker.claim = slow_claim
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://easel") as c:
            ids = []
            for seed in (1, 2):  # both queued before the first is done
                r = await c.post("/api/generate", json={"prompt": "a lighthouse", "steps": 2, "seed": seed})
                assert r.status_code == 200, r.text
                ids.append(r.json()["task_id"])
            out = []
            for tid in ids:
                while (st := (await c.get("/api/status", params={"task_id": tid, "wait": 10})).json())["status"] not in (
                    "done", "error", "cancelled"):  # fmt: skip
                    pass
                out.append(st)
            return out


def test_a_queued_job_is_timed_from_when_the_job_before_it_left_the_model(tmp_path: Path) -> None:
    first, second = asyncio.run(run_two_queued_jobs(tmp_path))
    assert first["status"] == second["status"] == "done", (first, second)
    assert first["gpu_seconds"] < HAND_OVER, first  # claimed from an idle queue: no hand-over to count
    calls = sum(im["seconds"] for im in second["images"])
    # the hand-over the model sat idle through is part of what the job in the queue cost
    assert second["gpu_seconds"] >= HAND_OVER + calls, second
    assert second["started_at"] - first["started_at"] >= HAND_OVER, (first, second)


BUSY = 0.5  # CPU seconds the event loop's thread runs while a job waits for its first step


async def remaining_before_and_after_a_busy_loop(tmp: Path) -> tuple[float, float, float]:
    """(wait_remaining of a running job, the same after the loop ran ``BUSY`` seconds of
    CPU, the wall-clock seconds between the two readings)."""
    raw = stub_settings(simulate_step_seconds=1000.0)  # 64x64: ~4 s a step
    raw["storage"] = {"output_dir": str(tmp / "outputs")}
    app = create_app(build_settings(raw))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://easel") as c:
            tid = (await c.post("/api/generate", json={"prompt": "a lighthouse", "steps": 2})).json()["task_id"]
            while (st := (await c.get("/api/status", params={"task_id": tid, "wait": 10})).json())["status"] == "waiting":
                pass
            assert st["status"] == "running" and st["step"] == 0, st
            t1, before = time.monotonic(), (await c.get("/api/status", params={"task_id": tid})).json()["wait_remaining"]
            end = time.thread_time() + BUSY
            while time.thread_time() < end:  # the loop's own thread busy (a burst of requests would do this)
                pass
            t2, after = time.monotonic(), (await c.get("/api/status", params={"task_id": tid})).json()
            assert after["step"] == 0, after  # no step meanwhile: its progress says nothing new
            await c.get("/api/cancel", params={"task_id": tid})
            return before, after["wait_remaining"], t2 - t1


def test_a_running_job_is_behind_by_the_time_the_event_loop_held_it_up(tmp_path: Path) -> None:
    before, after, wall = asyncio.run(remaining_before_and_after_a_busy_loop(tmp_path))
    # by its progress alone ``before - wall`` would be left; the loop's CPU time since its
    # last step (a pipeline thread of this process waits for the GIL meanwhile) is on top
    behind = after - (before - wall)
    assert BUSY * 0.8 < behind < wall + 0.1, (before, after, wall)


FIRST_CALL = 0.5  # seconds the first job after a load takes more (the stub's simulated set-up)


async def jobs_around_a_reload(tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Three jobs one after another on a freshly loaded model; its learned terms; the
    model unloaded and loaded again, then two more jobs (each submitted once the one
    before is done)."""
    raw = stub_settings(simulate_step_seconds=12.5, simulate_first_call_seconds=FIRST_CALL)  # ~0.1 s a job after the first
    raw["storage"] = {"output_dir": str(tmp / "outputs")}
    app = create_app(build_settings(raw))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://easel") as c:

            async def one(seed: int) -> dict[str, Any]:
                r = await c.post("/api/generate", json={"prompt": "a lighthouse", "steps": 2, "seed": seed})
                assert r.status_code == 200, r.text
                tid = r.json()["task_id"]
                while (st := (await c.get("/api/status", params={"task_id": tid, "wait": 10})).json())["status"] not in (
                    "done", "error", "cancelled"):  # fmt: skip
                    pass
                return {**st, "expected_at_submit": r.json()["expected_time_seconds"]}

            before = [await one(seed) for seed in (1, 2, 3)]
            learned = next(m for m in (await c.get("/api/ps")).json()["models"] if m["name"] == "stub")["forecast"]["image"]
            assert (await c.post("/v1/admin/models/stub/unload")).status_code == 200
            assert (await c.post("/v1/admin/models/stub/load")).status_code == 200
            after = [await one(seed) for seed in (4, 5)]
            return before, learned, after


def test_the_first_job_after_a_load_is_learned_apart_and_forecast_for_a_cold_model(tmp_path: Path) -> None:
    before, learned, after = asyncio.run(jobs_around_a_reload(tmp_path))
    assert all(st["status"] == "done" for st in before + after), before + after
    assert before[0]["gpu_seconds"] > FIRST_CALL > 3 * before[1]["gpu_seconds"], before
    # its set-up went into first_call, not into what every other job costs
    assert learned["seconds"]["first_call"] == pytest.approx(FIRST_CALL, rel=0.2), learned
    assert after[1]["expected_at_submit"] < 2 * after[1]["gpu_seconds"] < FIRST_CALL, after
    # loaded again, the model's next job is forecast with the set-up, and takes it
    cold = after[0]
    assert cold["gpu_seconds"] > FIRST_CALL, cold
    assert abs(cold["expected_at_submit"] - cold["gpu_seconds"]) < 0.25 * cold["gpu_seconds"], cold


async def claims_and_outcomes(tmp: Path, jobs: int) -> list[tuple[str, int | None]]:
    """What the worker did while ``jobs`` jobs, queued while the queue was paused, ran
    once it resumed, in order: ("claim", the index of the job taken, or None) for each
    claim that took a job or was the one try made the moment a job left the model,
    ("done", its index) for each outcome stored."""
    raw = stub_settings(simulate_step_seconds=12.5)  # 2 steps at 64x64: ~0.1 s a job
    raw["storage"] = {"output_dir": str(tmp / "outputs")}
    app = create_app(build_settings(raw))
    broker = app.state.service.broker
    claim, finish = broker.claim, broker.finish
    seen: list[tuple[str, str | None]] = []

    async def spy_claim(model: str, worker: str, lease: float, timeout: float) -> Any:
        got = await claim(model, worker, lease, timeout)
        if got is not None or timeout == 0:
            seen.append(("claim", got.id if got is not None else None))
        return got

    async def spy_finish(job: Any, status: Any, fields: Any, **kw: Any) -> bool:
        ok = await finish(job, status, fields, **kw)
        seen.append(("done", job.id))
        return bool(ok)

    broker.claim, broker.finish = spy_claim, spy_finish
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://easel") as c:
            assert (await c.post("/v1/admin/models/stub/pause")).status_code == 200
            ids = [(await c.post("/api/generate", json={"prompt": "a lighthouse", "steps": 2, "seed": s})).json()["task_id"] for s in range(jobs)]
            assert (await c.post("/v1/admin/models/stub/resume")).status_code == 200
            for tid in ids:
                st = (await c.get("/api/image", params={"task_id": tid, "wait": 10}))
                assert st.status_code == 200, st.text
            return [(what, ids.index(i) if i is not None else None) for what, i in seen]


def test_a_lone_job_is_stored_without_a_claim_first_and_queued_jobs_run_back_to_back(tmp_path: Path) -> None:
    # one job: nothing waits behind it, so its results are stored at once (no claim in between)
    assert asyncio.run(claims_and_outcomes(tmp_path / "one", 1)) == [("claim", 0), ("done", 0)]
    # three: each next job is claimed the moment the one before leaves the model, before its results are stored
    assert asyncio.run(claims_and_outcomes(tmp_path / "three", 3)) == [
        ("claim", 0), ("claim", 1), ("done", 0), ("claim", 2), ("done", 1), ("done", 2)]  # fmt: skip
