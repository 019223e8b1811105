"""Many users on one server: jobs belong to the key that submitted them, submits are
idempotent, quotas count GPU-seconds.  Each test runs on both brokers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from .servers import BROKERS, RunningServer, stub_settings
from .test_api import wait_done, wait_running

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
ROOT = {"Authorization": "Bearer root-key"}
AUTH = {
    "api_keys": [
        {"key": "alice-key", "name": "alice"},
        {"key": "bob-key", "name": "bob"},
        {"key": "capped-key", "name": "capped", "max_queued": 2},
        {"key": "budget-key", "name": "budget", "gpu_seconds_per_hour": 2.0},
    ],
    "admin_keys": [{"key": "root-key", "name": "root"}],
}


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    # 0.05 s a step at 64x64; the prior makes the forecast right from the first job
    settings = {**stub_settings(simulate_step_seconds=12.0, forecast_prior={"step_mp": 12.0}), "auth": AUTH}
    settings, args = broker_args(settings, request.param)
    return server_factory(settings, *args)


def submit(c: httpx.Client, headers: dict[str, str], **body: Any) -> httpx.Response:
    return c.post("/api/generate", json={"prompt": "a red fox", **body}, headers=headers)


def job_of(c: httpx.Client, headers: dict[str, str], **body: Any) -> str:
    r = submit(c, headers, **body)
    assert r.status_code in (200, 202), r.text
    return str(r.json()["task_id"])


def authed(c: httpx.Client, headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=str(c.base_url), headers=headers, timeout=60)


# --- ownership ------------------------------------------------------------------------------


def test_another_keys_job_is_a_404_on_every_route_that_takes_a_task_id(srv: RunningServer) -> None:
    c = srv.client
    task_id = job_of(c, ALICE, steps=200)  # 10 s: still there for every call below
    with authed(c, ALICE) as alice:
        wait_running(alice, task_id)
    for method, path, params in [
        ("GET", "/api/status", {"task_id": task_id}),
        ("GET", "/api/image", {"task_id": task_id}),
        ("GET", "/api/events", {"task_id": task_id}),
        ("GET", "/api/cancel", {"task_id": task_id}),
        ("DELETE", f"/api/tasks/{task_id}", {}),
    ]:
        r = c.request(method, path, params=params, headers=BOB)
        assert r.status_code == 404 and "unknown task_id" in r.json()["error"]["message"], (path, r.text)
    st = c.get("/api/status", params={"task_id": task_id}, headers=ALICE).json()
    assert st["status"] == "running"  # bob's cancel did nothing
    r = c.get("/api/cancel", params={"task_id": task_id}, headers=ROOT)  # an admin may
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_the_listing_shows_a_key_its_own_jobs_and_the_others_count_in_its_position(srv: RunningServer) -> None:
    c = srv.client
    alices = job_of(c, ALICE, steps=100, prompt="alice's secret prompt")
    bobs = job_of(c, BOB)
    assert c.get("/api/status", params={"task_id": bobs}, headers=BOB).json()["pos"] >= 1  # behind alice's
    listed = c.get("/api/tasks", headers=BOB).json()
    ids = [j["task_id"] for j in listed["queue"] + listed["recent"]]
    assert bobs in ids and alices not in ids
    assert "alice's secret prompt" not in c.get("/api/tasks", headers=BOB).text
    everything = c.get("/api/tasks", headers=ROOT).json()
    assert {alices, bobs} <= {j["task_id"] for j in everything["queue"] + everything["recent"]}
    c.get("/api/cancel", params={"task_id": alices}, headers=ALICE)


def test_image_links_are_signed_and_work_without_the_key(srv: RunningServer) -> None:
    c = srv.client
    task_id = job_of(c, ALICE)
    with authed(c, ALICE) as alice:
        st = wait_done(alice, task_id)
    url = st["images"][0]["url"]
    assert "sig=" in url and "expires=" in url
    r = httpx.get(url)  # no Authorization header
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert httpx.get(url.replace("sig=", "sig=0")).status_code == 401
    other = job_of(c, BOB)
    assert httpx.get(url.replace(task_id, other)).status_code == 401  # a signature is for one task


def test_openai_url_responses_are_signed_for_their_owner(srv: RunningServer) -> None:
    client = OpenAI(base_url=srv.url + "/v1", api_key="alice-key")
    r = client.images.generate(prompt="x", response_format="url")
    assert r.data and r.data[0].url
    got = httpx.get(r.data[0].url)
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")


# --- idempotent submits -----------------------------------------------------------------------


def test_the_same_idempotency_key_and_body_make_one_job_and_another_body_is_a_409(srv: RunningServer) -> None:
    c = srv.client
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = submit(c, {**ALICE, **key}, seed=5)
    again = submit(c, {**ALICE, **key}, seed=5)
    assert first.status_code == again.status_code == 200
    assert first.json()["task_id"] == again.json()["task_id"]
    other = submit(c, {**ALICE, **key}, seed=6)
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key", other.text
    assert "Idempotency-Key" in other.json()["error"]["message"]
    bobs = submit(c, {**BOB, **key}, seed=5)  # keys are per owner
    assert bobs.status_code == 200 and bobs.json()["task_id"] != first.json()["task_id"]


def test_an_openai_client_whose_attempts_time_out_makes_one_job_and_gets_its_image(srv: RunningServer) -> None:
    marker = uuid.uuid4().hex
    headers = {"Idempotency-Key": marker}
    body: dict[str, Any] = {"metadata": {"steps": 60, "tag": marker}}  # 3 s
    impatient = OpenAI(base_url=srv.url + "/v1", api_key="alice-key", timeout=0.5, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        impatient.images.generate(prompt="patience", extra_headers=headers, extra_body=body)
    patient = OpenAI(base_url=srv.url + "/v1", api_key="alice-key", timeout=60, max_retries=0)
    r = patient.images.generate(prompt="patience", extra_headers=headers, extra_body=body)
    assert r.data and r.data[0].b64_json
    listed = srv.client.get("/api/tasks", params={"limit": 1000}, headers=ALICE).json()
    mine = [j for j in listed["queue"] + listed["recent"] if (j.get("metadata") or {}).get("tag") == marker]
    assert len(mine) == 1 and mine[0]["status"] == "done", mine  # three attempts, one job


# --- quotas -------------------------------------------------------------------------------------


def test_a_key_over_max_queued_gets_a_429_with_retry_after(srv: RunningServer) -> None:
    c = srv.client
    capped = {"Authorization": "Bearer capped-key"}
    held = [job_of(c, capped, steps=40) for _ in range(2)]  # 2 s each
    r = submit(c, capped)
    assert r.status_code == 429 and "max_queued" in r.json()["error"]["message"], r.text
    retry = int(r.headers["Retry-After"])
    with authed(c, capped) as me:
        first = me.get("/api/status", params={"task_id": held[0]}).json()["wait_remaining"]
        assert abs(retry - first) <= 1.5, (retry, first)  # when the first of them is forecast to be done
        wait_done(me, held[0])
    assert submit(c, capped).status_code == 200  # one finished: room again
    c.get("/api/cancel", params={"task_id": held[1]}, headers=ROOT)


def test_a_key_over_its_gpu_seconds_gets_a_429_saying_when_it_fits_again(srv: RunningServer) -> None:
    c = srv.client
    budget = {"Authorization": "Bearer budget-key"}
    t0 = time.time()
    jobs = [job_of(c, budget, steps=12) for _ in range(3)]  # forecast 0.6 s each, 1.8 of the 2 s budget
    r = submit(c, budget, steps=12)
    assert r.status_code == 429 and "GPU-seconds" in r.json()["error"]["message"], r.text
    retry = int(r.headers["Retry-After"])
    # the oldest bookings age out of the hour first: about an hour from the first submit
    assert 3600 - (time.time() - t0) - 5 <= retry <= 3601, retry
    with authed(c, budget) as me:
        for task_id in jobs:
            st = wait_done(me, task_id)
            assert st["gpu_seconds"] == pytest.approx(0.6, abs=0.3), st  # charged what it measured
    huge = submit(c, budget, steps=200)  # 10 s: more than the whole budget
    assert huge.status_code == 429 and "Retry-After" not in huge.headers
    assert huge.headers["x-should-retry"] == "false"
    metrics = c.get("/metrics", headers=ROOT).text
    assert 'easel_gpu_seconds_total{key="budget",model="stub"}' in metrics


def test_a_masked_edit_is_one_job_per_key_on_the_job_api_and_openai_alike(srv: RunningServer) -> None:
    """Every route family fingerprints the job it builds (one submit sequence): a masked
    edit sent twice with one key is one job, the same request without its mask is a 409,
    on the job API and on the OpenAI shim (multipart, as the SDK sends it)."""
    import base64
    import io

    from PIL import Image

    def png(mode: str, color: Any) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (64, 64), color).save(buf, "PNG")
        return buf.getvalue()

    image, mask = png("RGB", (200, 30, 30)), png("RGBA", (0, 0, 0, 0))
    for route in ("job", "openai"):
        key = {**ALICE, "Idempotency-Key": uuid.uuid4().hex}

        def send(with_mask: bool, route: str = route, key: dict[str, str] = key) -> httpx.Response:
            if route == "job":
                body: dict[str, Any] = {"prompt": "x", "images": ["data:image/png;base64," + base64.b64encode(image).decode()]}
                if with_mask:
                    body["mask"] = "data:image/png;base64," + base64.b64encode(mask).decode()
                return srv.client.post("/api/edit", json=body, headers=key)
            files = {"image": ("i.png", image, "image/png"), **({"mask": ("m.png", mask, "image/png")} if with_mask else {})}
            return srv.client.post("/v1/images/edits", data={"prompt": "x"}, files=files, headers=key)

        first, again, unmasked = send(True), send(True), send(False)
        assert first.status_code == again.status_code == 200, (route, first.text)
        ids = [r.json().get("task_id") or r.headers.get("x-request-id") for r in (first, again)]
        assert ids[0] == ids[1], (route, ids)
        assert unmasked.status_code == 409 and unmasked.json()["error"]["param"] == "Idempotency-Key", (route, unmasked.text)
