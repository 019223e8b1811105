"""The mflux-compatible job API, over HTTP against a real uvicorn server."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.features import FEATURES

from .servers import RunningServer, stub_settings


def png(w: int = 64, h: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def wait_done(c: httpx.Client, task_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = c.get("/api/status", params={"task_id": task_id, "wait": 5}).json()
        if st["status"] in ("done", "error", "cancelled"):
            return st
    raise AssertionError(f"job {task_id} did not finish")


def wait_running(c: httpx.Client, task_id: str) -> dict[str, Any]:
    """Long-poll until the job has left 'waiting'."""
    st = c.get("/api/status", params={"task_id": task_id, "wait": 10, "since": "waiting"}).json()
    assert st["status"] != "waiting"
    return st


# --- seed 003's client functions, verbatim ------------------------------------------

def mflux_generate_client(mfluxendpoint, prompt, width=1280, height=720, steps=4, seed=None, format="JPEG", quality=85, priority=False):  # type: ignore[no-untyped-def]
    data = {
        "prompt": prompt,
        "height": height,
        "width": width,
        "steps": steps,
        "format": format,
        "quality": quality,
        "priority": priority
    }
    if seed is not None:
        data["seed"] = seed
    response = requests.post(mfluxendpoint + "/api/generate", json=data)
    # parse the response and get the task_id
    json = response.json()
    task_id = json["task_id"]
    return task_id


def mflux_status_ready(mfluxendpoint, task_id):  # type: ignore[no-untyped-def]
    response = requests.get(mfluxendpoint + "/api/status?task_id=" + task_id)
    if response.status_code == 200:
        status = response.json()["status"]
        if status == "done":
            return 0
        else:
            # read the waiting time
            waiting_time = response.json().get("wait_remaining", 1)
            if waiting_time < 1: waiting_time = 1
            return waiting_time
    else:
        return -1


def mflux_get_image(mfluxendpoint, task_id):  # type: ignore[no-untyped-def]
    response = requests.get(mfluxendpoint + "/api/image?task_id=" + task_id + "&base64=false&delete=true")
    if response.status_code == 200:
        return response.content
    else:
        return None


def generate_image(mfluxendpoint, prompt, width=1280, height=720, steps=4):  # type: ignore[no-untyped-def]
    startt = time.time()
    task_id = mflux_generate_client(mfluxendpoint, prompt, width=width, height=height, steps=steps)
    for i in range(10000):
        waiting_time = mflux_status_ready(mfluxendpoint, task_id)
        print("Waiting time: ", waiting_time, " seconds")
        if waiting_time == 0: break
        nextsleep = max(min(waiting_time / 4, 10), 1)
        time.sleep(nextsleep)
    imageb = mflux_get_image(mfluxendpoint, task_id)
    stopt = time.time()
    print("Time taken: ", stopt - startt, " seconds")
    image = Image.open(io.BytesIO(imageb))
    return image


def test_seed_003_client_functions_work_unchanged(server_factory: Any) -> None:
    srv = server_factory(stub_settings(max_pixels=1280 * 720, default_width=1280, default_height=720))
    image = generate_image(srv.url, "a beautiful landscape", width=1280, height=720, steps=4)
    assert image.size == (1280, 720)
    assert image.format == "JPEG"
    task_id = mflux_generate_client(srv.url, "again", width=256, height=256, seed="1725311496")
    assert wait_done(srv.client, task_id)["seed"] == 1725311496
    assert mflux_status_ready(srv.url, task_id) == 0
    assert mflux_get_image(srv.url, task_id)[:3] == b"\xff\xd8\xff"
    assert mflux_get_image(srv.url, task_id) is None  # delete=true removed it
    assert mflux_status_ready(srv.url, "nope") == -1


# --- submit, status, image -------------------------------------------------------------

def test_generate_returns_200_with_forecast_and_the_image_is_fetchable(server: RunningServer) -> None:
    c = server.client
    r = c.post("/api/generate", json={"prompt": "a red fox", "width": 128, "height": 64, "steps": 3, "seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["task_length"] == 1 and body["expected_time_seconds"] >= 0 and body["seed"] == 7
    st = wait_done(c, body["task_id"])
    assert st["status"] == "done" and st["progress"] == 1.0 and st["step"] == st["total_steps"] == 3
    img = c.get("/api/image", params={"task_id": body["task_id"]})
    assert img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).size == (128, 64)


def test_same_seed_gives_identical_pixels(server: RunningServer) -> None:
    c = server.client
    ids = [c.post("/api/generate", json={"prompt": "same", "seed": s}).json()["task_id"] for s in (5, 5, 6)]
    data = [c.get("/api/image", params={"task_id": wait_done(c, i)["task_id"]}).content for i in ids]
    assert data[0] == data[1] != data[2]


def test_image_with_wait_answers_once_the_job_is_done(slow_server: RunningServer) -> None:
    c = slow_server.client
    tid = c.post("/api/generate", json={"prompt": "wait for me", "steps": 6}).json()["task_id"]
    assert c.get("/api/image", params={"task_id": tid}).status_code == 404  # not ready yet
    r = c.get("/api/image", params={"task_id": tid, "wait": 30})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    failed = c.post("/api/generate", json={"prompt": "fail"}).json()["task_id"]
    assert c.get("/api/image", params={"task_id": failed, "wait": 30}).status_code == 410


def test_base64_and_delete(server: RunningServer) -> None:
    c = server.client
    tid = c.post("/api/generate", json={"prompt": "b64", "format": "webp"}).json()["task_id"]
    wait_done(c, tid)
    r = c.get("/api/image", params={"task_id": tid, "base64": "true", "delete": "true"}).json()
    assert r["format"] == "WEBP"
    assert Image.open(io.BytesIO(base64.b64decode(r["image"]))).format == "WEBP"
    again = c.get("/api/image", params={"task_id": tid})
    assert again.status_code == 410 and "delete=true" in again.json()["error"]["message"]
    assert c.get("/api/status", params={"task_id": tid}).json()["images"][0]["bytes"] == 0  # the record says it is gone


def test_n_images_have_consecutive_seeds(server: RunningServer) -> None:
    c = server.client
    tid = c.post("/api/generate", json={"prompt": "many", "n": 3, "seed": 100}).json()["task_id"]
    st = wait_done(c, tid)
    assert [im["seed"] for im in st["images"]] == [100, 101, 102]
    assert c.get("/api/image", params={"task_id": tid, "index": 2}).status_code == 200
    assert c.get("/api/image", params={"task_id": tid, "index": 3}).status_code == 404


def test_prompts_batch_seeds_increment_per_image(server: RunningServer) -> None:
    c = server.client
    r = c.post("/api/generate", json={"prompts": ["one", "two", "three"], "seed": 40})
    assert r.json()["task_length"] == 3
    st = wait_done(c, r.json()["task_id"])
    assert [(im["prompt"], im["seed"]) for im in st["images"]] == [("one", 40), ("two", 41), ("three", 42)]


def test_edit_accepts_data_urls_bare_base64_and_objects(server: RunningServer) -> None:
    c = server.client
    b64 = base64.b64encode(png()).decode()
    images = [f"data:image/png;base64,{b64}", b64, {"data_url": f"data:image/png;base64,{b64}"}]
    r = c.post("/api/edit", json={"prompt": "make it blue", "images": images})
    assert r.status_code == 200, r.text
    assert wait_done(c, r.json()["task_id"])["status"] == "done"


def test_edit_accepts_multipart_files(server: RunningServer) -> None:
    c = server.client
    files = [("images", ("a.png", png(), "image/png")), ("images", ("b.png", png(color=(0, 0, 255)), "image/png"))]
    r = c.post("/api/edit", data={"prompt": "merge", "steps": "2", "seed": "9"}, files=files)
    assert r.status_code == 200, r.text
    assert wait_done(c, r.json()["task_id"])["seed"] == 9


# --- bad input -----------------------------------------------------------------------------

BAD = [
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x", "model": "nope"}, "model"),
    ({"prompt": "x", "width": 100}, "width"),
    ({"prompt": "x", "width": -16}, "width"),
    ({"prompt": "x", "width": 2048, "height": 2048}, "width"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 100000}, "steps"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "format": "BMP"}, "format"),
    ({"prompt": "x", "quality": 0}, "quality"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": "x", "images": ["aGVsbG8="]}, "images"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_generate_input_is_a_4xx_naming_the_field(server: RunningServer, body: dict[str, Any], param: str) -> None:
    r = server.client.post("/api/generate", json=body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert param in err["message"] or err["param"] == param, err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "images"),
        ({"prompt": "x", "images": ["bm90IGFuIGltYWdl"]}, "images[0]"),
        ({"prompt": "x", "images": ["data:image/png,xyz"]}, "images[0]"),
        ({"prompt": "x", "images": [base64.b64encode(png()).decode()] * 5}, "images"),
    ],
)
def test_bad_edit_input_is_a_4xx_naming_the_field(server: RunningServer, body: dict[str, Any], param: str) -> None:
    r = server.client.post("/api/edit", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_and_oversized_bodies_are_refused(server_factory: Any) -> None:
    srv = server_factory({**stub_settings(), "limits": {"max_body_mib": 1}})
    r = srv.client.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = srv.client.post("/api/generate", content=b"x" * (2 * 2**20), headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert srv.client.get("/healthz").status_code == 200


def test_unknown_task_is_404(server: RunningServer) -> None:
    r = server.client.get("/api/status", params={"task_id": "doesnotexist"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "task_id"


def test_failing_job_ends_as_error_and_the_worker_goes_on(server: RunningServer) -> None:
    c = server.client
    bad = c.post("/api/generate", json={"prompt": "fail"}).json()["task_id"]
    good = c.post("/api/generate", json={"prompt": "fine"}).json()["task_id"]
    st = wait_done(c, bad)
    assert st["status"] == "error" and "asked to fail" in st["message"] and "Traceback" not in st["message"]
    assert wait_done(c, good)["status"] == "done"
    assert c.get("/api/image", params={"task_id": bad}).status_code == 410


# --- queue: priority, positions, cancel, clear, long-poll, SSE ----------------------------

def test_priority_jobs_run_first_and_positions_are_reported(slow_server: RunningServer) -> None:
    c = slow_server.client
    blocker = c.post("/api/generate", json={"prompt": "blocker", "steps": 20}).json()["task_id"]
    assert wait_running(c, blocker)["status"] == "running"
    normal = [c.post("/api/generate", json={"prompt": f"n{i}", "steps": 1}).json() for i in range(3)]
    urgent = c.post("/api/generate", json={"prompt": "urgent", "steps": 1, "priority": True}).json()
    assert [j["pos"] for j in normal] == [1, 2, 3]
    assert urgent["pos"] == 1
    st = c.get("/api/status", params={"task_id": normal[2]["task_id"]}).json()
    assert st["pos"] == 4 and st["status"] == "waiting"
    assert st["wait_remaining"] > c.get("/api/status", params={"task_id": normal[0]["task_id"]}).json()["wait_remaining"]
    c.get("/api/cancel", params={"task_id": blocker})
    finished = {}
    for j in [urgent, *normal]:
        finished[j["task_id"]] = wait_done(c, j["task_id"])["started_at"]
    order = sorted(finished, key=finished.__getitem__)
    assert order == [urgent["task_id"]] + [j["task_id"] for j in normal]


def test_cancel_queued_and_running_jobs(slow_server: RunningServer) -> None:
    c = slow_server.client
    running = c.post("/api/generate", json={"prompt": "long", "steps": 200}).json()["task_id"]
    queued = c.post("/api/generate", json={"prompt": "queued"}).json()["task_id"]
    assert wait_running(c, running)["status"] == "running"
    r = c.delete(f"/api/tasks/{queued}")
    assert r.json()["status"] == "cancelled"
    r = c.get("/api/cancel", params={"task_id": running}).json()
    assert r["status"] == "cancelled"
    st = c.get("/api/status", params={"task_id": running}).json()
    assert st["step"] < 200
    after = c.post("/api/generate", json={"prompt": "after"}).json()["task_id"]
    assert wait_done(c, after)["status"] == "done"


def test_clear_cancels_everything_queued(slow_server: RunningServer) -> None:
    c = slow_server.client
    first = c.post("/api/generate", json={"prompt": "run", "steps": 40}).json()["task_id"]
    wait_running(c, first)
    ids = [c.post("/api/generate", json={"prompt": f"q{i}"}).json()["task_id"] for i in range(4)]
    assert c.get("/api/clear").json()["cancelled"] == 4
    assert {c.get("/api/status", params={"task_id": i}).json()["status"] for i in ids} == {"cancelled"}
    c.get("/api/cancel", params={"task_id": first})


def test_long_poll_returns_when_the_status_changes(slow_server: RunningServer) -> None:
    c = slow_server.client
    tid = c.post("/api/generate", json={"prompt": "lp", "steps": 4}).json()["task_id"]
    seen = []
    while not seen or seen[-1] not in ("done", "error", "cancelled"):
        seen.append(c.get("/api/status", params={"task_id": tid, "wait": 20}).json()["status"])
    assert seen[-1] == "done"
    assert len(seen) <= 3  # waiting -> running -> done, no busy polling


def test_events_stream_reports_progress_until_done(slow_server: RunningServer) -> None:
    c = slow_server.client
    tid = c.post("/api/generate", json={"prompt": "sse", "steps": 5}).json()["task_id"]
    statuses: list[dict[str, Any]] = []
    with c.stream("GET", "/api/events", params={"task_id": tid}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "status":
                statuses.append(json.loads(line[6:]))
            elif line.startswith("data: ") and event == "end":
                break
    steps = [s["step"] for s in statuses if s["status"] == "running"]
    assert statuses[-1]["status"] == "done"
    assert steps == sorted(steps) and len(set(steps)) >= 4
    eta = [s["wait_remaining"] for s in statuses if s["status"] == "running" and s["step"] > 0]
    assert eta[-1] < eta[0]


def sse_events(c: httpx.Client, params: dict[str, Any]) -> list[tuple[str, dict[str, Any], float]]:
    """(event, data, seconds since the stream opened) of every event until ``end``."""
    out: list[tuple[str, dict[str, Any], float]] = []
    start = time.monotonic()
    with c.stream("GET", "/api/events", params=params) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event is not None:
                out.append((event, json.loads(line[6:]), time.monotonic() - start))
                if event == "end":
                    break
    return out


def test_events_with_previews_send_rate_limited_preview_images(slow_server: RunningServer) -> None:
    c = slow_server.client
    tid = c.post("/api/generate", json={"prompt": "live", "steps": 40}).json()["task_id"]  # 0.05 s a step: 2 s
    events = sse_events(c, {"task_id": tid, "previews": "true"})
    previews = [(d, t) for e, d, t in events if e == "preview"]
    assert events[-1][1] == {"status": "done"}
    assert 2 <= len(previews) <= 12  # at most 4 a second over ~2 s of steps
    steps = [d["step"] for d, _ in previews]
    assert steps == sorted(set(steps)) and 0 < steps[0] and steps[-1] < 40
    assert min(b - a for a, b in zip(steps, steps[1:], strict=False)) >= 2  # a few steps apart at 0.05 s a step
    for d, _ in previews:
        assert set(d) == {"task_id", "step", "image"} and d["task_id"] == tid
        head, b64 = d["image"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "JPEG" and img.size == (64, 64)
    # without previews=true: no preview events, and the worker makes none
    tid = c.post("/api/generate", json={"prompt": "quiet", "steps": 10}).json()["task_id"]
    assert [e for e, _, _ in sse_events(c, {"task_id": tid})].count("preview") == 0


def test_full_queue_answers_429_with_retry_after(server_factory: Any) -> None:
    srv = server_factory({**stub_settings(simulate_step_seconds=12.0), "queue": {"capacity": 2}})
    c = srv.client
    ids = [c.post("/api/generate", json={"prompt": "x", "steps": 50}).json()["task_id"]]
    wait_running(c, ids[0])
    ids += [c.post("/api/generate", json={"prompt": "x"}).json()["task_id"] for _ in range(2)]
    r = c.post("/api/generate", json={"prompt": "x"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "full" in r.json()["error"]["message"]
    c.get("/api/clear")
    c.get("/api/cancel", params={"task_id": ids[0]})


def test_500_concurrent_submissions_all_complete_once(server: RunningServer) -> None:
    def submit(i: int) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/api/generate", json={"prompt": f"job {i}", "width": 16, "height": 16, "steps": 1, "seed": i})
            assert r.status_code == 200, r.text
            return str(r.json()["task_id"])

    c = server.client
    before = metric_values(c.get("/metrics").text)
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(500)))
    assert len(set(ids)) == 500
    seeds = [wait_done(c, tid, timeout=120)["seed"] for tid in ids]
    assert sorted(seeds) == list(range(500))
    after = metric_values(c.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("easel_jobs_submitted_total", model="stub", task="generate") == 500
    assert grew("easel_jobs_total", model="stub", task="generate", status="done") == 500
    assert grew("easel_job_run_seconds_count", model="stub", task="generate") == 500
    assert grew("easel_job_wait_seconds_bucket", model="stub", le="+Inf") == 500
    assert after[("easel_queue_depth", (("model", "stub"),))] == 0


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- models, docs, health ------------------------------------------------------------------

def test_models_listing_and_forecast_coefficients(server: RunningServer) -> None:
    c = server.client
    ls = c.get("/api/ls").json()
    assert ls["default_model"] == "stub" and ls["models"][0]["state"] == "loaded"
    ps = c.get("/api/ps").json()
    image = ps["models"][0]["forecast"]["image"]
    assert image["tasks"] == ["generate", "edit"] and set(image["seconds"]) == set(FEATURES)
    assert image["example"]["job"] == "64x64, 2 steps, 1 image" and image["example"]["seconds"] > 0
    assert c.get("/v1/models").json()["data"][0]["id"] == "stub"
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["devices"][0]["device"] == "cpu"


def test_openapi_covers_every_route_and_swagger_is_served_offline(server: RunningServer) -> None:
    c = server.client
    doc = c.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for path in ["/api/generate", "/api/edit", "/api/status", "/api/events", "/api/image", "/api/tasks", "/api/cancel",
                 "/api/tasks/{task_id}", "/api/clear", "/api/ls", "/api/ps", "/api/load", "/healthz", "/health", "/metrics",
                 "/v1/models", "/v1/admin/models", "/v1/admin/models/{name}/load", "/v1/admin/gpu-memory"]:
        assert path in doc["paths"], path
    gen = doc["components"]["schemas"]["GenerateRequest"]
    width = gen["properties"]["width"]
    assert 16 in [alt.get("multipleOf") for alt in width.get("anyOf", [width])]
    page = c.get("/swagger").text
    assert "/swagger-static/swagger-ui-bundle.js" in page and "http" not in page.split("<body>")[1].replace("/openapi.json", "")
    assert c.get("/swagger-static/swagger-ui-bundle.js").status_code == 200
    assert c.get("/docs", follow_redirects=True).status_code == 200


def test_api_keys_guard_the_api_and_admin_routes(server_factory: Any) -> None:
    srv = server_factory({**stub_settings(), "auth": {"api_keys": ["user-key"], "admin_keys": ["admin-key"]}})
    c = srv.client
    assert c.get("/healthz").status_code == 200
    assert c.post("/api/generate", json={"prompt": "x"}).status_code == 401
    user = {"Authorization": "Bearer user-key"}
    admin = {"Authorization": "Bearer admin-key"}
    assert c.post("/api/generate", json={"prompt": "x"}, headers=user).status_code == 200
    assert c.get("/v1/admin/models", headers=user).status_code == 403
    assert c.get("/v1/admin/models", headers=admin).status_code == 200
    assert c.get("/api/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_storage_output_dir_keeps_a_copy_of_every_result(server_factory: Any, tmp_path: Any) -> None:
    out = tmp_path / "results"
    srv = server_factory({**stub_settings(), "storage": {"output_dir": str(out)}})
    c = srv.client
    tid = c.post("/api/generate", json={"prompt": "keep", "n": 2, "format": "JPEG"}).json()["task_id"]
    assert wait_done(c, tid)["status"] == "done"
    for i in range(2):
        assert (out / f"{tid}-{i}.jpg").read_bytes() == c.get("/api/image", params={"task_id": tid, "index": i}).content
