"""Delivery end to end against a real server: batches, upscaling, presigned uploads
to S3 (moto), webhooks, and the SSRF guard at submission."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from clients import Client
from tests.loopback_http import LoopbackServer, Reply
from tests.moto_s3 import BUCKET, moto_s3, presigned_put
from tests.servers import BROKERS, ROOT, RunningServer, stub_settings
from tests.tiny_upscaler import write_tiny_esrgan

FINAL = ("done", "error", "cancelled")


def png(width: int, height: int, color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class World:
    srv: RunningServer
    s3: Any  # boto3 client of the moto server
    hooks: LoopbackServer  # webhook receiver (200)
    refusing: LoopbackServer  # answers every upload with 400
    images: LoopbackServer  # serves a PNG for {url} references


@pytest.fixture(scope="module", params=BROKERS)
def world(request: pytest.FixtureRequest, server_factory: Any, broker_args: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    checkpoint = write_tiny_esrgan(tmp_path_factory.mktemp("esrgan") / "RealESRGAN_x4_tiny.pth")
    error_body = b"<Error><Code>InvalidRequest</Code><Message>no uploads here</Message></Error>"
    with (
        moto_s3() as (s3, s3_host),
        LoopbackServer([Reply(200)]) as hooks,
        LoopbackServer([Reply(400, error_body)]) as refusing,
        LoopbackServer([Reply(200, png(32, 32), {"Content-Type": "image/png"})]) as images,
    ):
        settings = stub_settings()
        settings["models"]["esrgan"] = {
            "backend": "upscale_esrgan", "model_path": str(checkpoint), "device": "cpu",
            "keep_loaded": False, "tile_size": 0,
        }
        settings["upscaler"] = "esrgan"
        settings["delivery"] = {
            "allowed_hosts": [s3_host, hooks.host_port, refusing.host_port, images.host_port],
            "retries": 1, "backoff_seconds": 0.05, "timeout_seconds": 10,
        }
        settings, args = broker_args(settings, request.param)
        yield World(server_factory(settings, *args), s3, hooks, refusing, images)


def settled(srv: RunningServer, task_id: str) -> dict[str, Any]:
    """Long-poll until the job is final and its uploads and webhook are no longer pending."""
    for _ in range(20):
        r = srv.client.get("/api/status", params={"task_id": task_id, "wait": 30})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        pending = body["webhook"] == "pending" or any(i["upload"] == "pending" for i in body["images"])
        if body["status"] in FINAL and not pending:
            return body
    raise AssertionError(f"job {task_id} did not settle: {body}")


def submit(srv: RunningServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = srv.client.post(path, json=body)
    assert r.status_code == 200, r.text
    return settled(srv, r.json()["task_id"])


def fetch(srv: RunningServer, task_id: str, index: int = 0) -> bytes:
    r = srv.client.get("/api/image", params={"task_id": task_id, "index": index})
    assert r.status_code == 200, r.text
    return r.content


def model_state(srv: RunningServer, name: str) -> str:
    models = srv.client.get("/api/ls").json()["models"]
    return str(next(m["state"] for m in models if m["name"] == name))


def job_exists_with(srv: RunningServer, marker: str) -> bool:
    tasks = srv.client.get("/api/tasks", params={"limit": 1000}).json()
    return any((j.get("metadata") or {}).get("marker") == marker for j in tasks["queue"] + tasks["recent"])


# ----- batches --------------------------------------------------------------------------


def test_batch_of_three_prompts_gives_consecutive_seeds_and_per_image_timings(world: World) -> None:
    status = submit(world.srv, "/api/generate", {"prompts": ["one", "two", "three"], "seed": 100})
    assert status["status"] == "done"
    assert [(i["prompt"], i["seed"]) for i in status["images"]] == [("one", 100), ("two", 101), ("three", 102)]
    assert all(i["seconds"] is not None and i["seconds"] >= 0 for i in status["images"])
    for i in range(3):
        assert Image.open(io.BytesIO(fetch(world.srv, status["task_id"], i))).size == (64, 64)


def test_url_reference_is_fetched_once_and_shared_across_the_batch(world: World) -> None:
    path = f"/ref-{uuid.uuid4().hex}.png"
    body = {"prompts": ["a", "b"], "images": [{"url": world.images.url(path)}], "seed": 5}
    status = submit(world.srv, "/api/edit", body)
    assert status["status"] == "done" and len(status["images"]) == 2
    assert [r.path for r in world.images.requests].count(path) == 1


# ----- upscaling ------------------------------------------------------------------------


def test_upscale_4_enlarges_a_generated_image_and_releases_the_upscaler(world: World) -> None:
    status = submit(world.srv, "/api/generate", {"prompt": "x", "width": 64, "height": 48, "upscale": 4})
    assert status["status"] == "done", status
    assert (status["images"][0]["width"], status["images"][0]["height"]) == (256, 192)
    assert Image.open(io.BytesIO(fetch(world.srv, status["task_id"]))).size == (256, 192)
    assert model_state(world.srv, "esrgan") == "unloaded"  # keep_loaded: false


def test_api_upscale_queues_a_job_on_the_upscaler(world: World) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png(32, 24)).decode()
    r = world.srv.client.post("/api/upscale", json={"image": data_url, "scale": 2, "format": "JPEG"})
    assert r.status_code == 200, r.text
    assert r.json()["task_length"] == 1
    status = settled(world.srv, r.json()["task_id"])
    assert status["status"] == "done" and status["model"] == "esrgan" and status["task"] == "upscale"
    image = Image.open(io.BytesIO(fetch(world.srv, status["task_id"])))
    assert (image.format, image.size) == ("JPEG", (64, 48))
    assert model_state(world.srv, "esrgan") == "unloaded"


def test_python_client_upscale_round_trips(world: World) -> None:
    with Client(world.srv.url) as client:
        result = client.upscale(Image.open(io.BytesIO(png(16, 12))), 4, timeout=60)
    assert result.size == (64, 48)


def test_upscale_without_an_upscaler_is_refused_naming_the_setting(server: RunningServer) -> None:
    r = server.client.post("/api/generate", json={"prompt": "x", "upscale": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "upscale"
    assert "upscaler" in r.json()["error"]["message"]
    r = server.client.post("/api/upscale", json={"image": base64.b64encode(png(16, 16)).decode()})
    assert r.status_code == 400 and "upscaler" in r.json()["error"]["message"]


# ----- uploads and webhooks --------------------------------------------------------------


def test_uploads_land_in_the_bucket_and_status_shows_ok(world: World) -> None:
    prefix = uuid.uuid4().hex
    keys = [f"{prefix}/{i}.png" for i in range(2)]
    urls = [presigned_put(world.s3, key, "image/png") for key in keys]
    status = submit(world.srv, "/api/generate", {"prompts": ["left", "right"], "upload_urls": urls})
    assert [i["upload"] for i in status["images"]] == ["ok", "ok"]
    for i, key in enumerate(keys):
        stored = world.s3.get_object(Bucket=BUCKET, Key=key)
        assert stored["ContentType"] == "image/png"
        assert stored["Body"].read() == fetch(world.srv, status["task_id"], i)


def test_a_failed_upload_is_reported_and_the_image_stays_fetchable(world: World) -> None:
    status = submit(world.srv, "/api/generate", {"prompt": "x", "upload_urls": [world.refusing.url("/put")]})
    assert status["status"] == "done"
    upload = status["images"][0]["upload"]
    assert upload.startswith("failed: ") and "HTTP 400" in upload and "no uploads here" in upload
    assert Image.open(io.BytesIO(fetch(world.srv, status["task_id"]))).size == (64, 64)


def test_webhook_gets_the_final_status_after_the_uploads(world: World) -> None:
    key = f"{uuid.uuid4().hex}/0.jpg"
    path = f"/hook/{uuid.uuid4().hex}"
    body = {
        "prompt": "x", "format": "JPEG", "metadata": {"order": 7},
        "upload_urls": [presigned_put(world.s3, key, "image/jpeg")], "webhook_url": world.hooks.url(path),
    }
    r = world.srv.client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    call = world.hooks.wait_for(path)  # the receiver's handler notifies; no sleeping
    assert call.method == "POST" and call.headers["content-type"] == "application/json"
    payload = json.loads(call.body)
    assert payload["task_id"] == r.json()["task_id"] and payload["status"] == "done"
    assert payload["metadata"] == {"order": 7} and payload["images"][0]["upload"] == "ok"
    assert payload["images"][0]["url"].startswith(world.srv.url + "/api/image?task_id=")
    assert settled(world.srv, payload["task_id"])["webhook"] == "ok"


def test_webhooks_are_signed_by_the_standard_webhooks_scheme_and_retries_keep_their_id(server_factory: Any) -> None:
    """A server given a secret in EASEL_WEBHOOK_SECRET signs each attempt; the
    standardwebhooks library (what a receiver would use) accepts the signature, and
    refuses it once the body is changed."""
    secret = "whsec_" + base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode()
    with LoopbackServer([Reply(503), Reply(200)]) as hooks:  # the first attempt fails: a retry
        settings = stub_settings()
        settings["delivery"] = {"allowed_hosts": [hooks.host_port], "retries": 2, "backoff_seconds": 0.05}
        srv = server_factory(settings, env={"EASEL_WEBHOOK_SECRET": secret})
        path = f"/hook/{uuid.uuid4().hex}"
        r = srv.client.post("/api/generate", json={"prompt": "signed", "webhook_url": hooks.url(path)})
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        assert settled(srv, task_id)["webhook"] == "ok"
        calls = [c for c in hooks.requests if c.path == path]
        assert len(calls) == 2
        assert calls[0].headers["webhook-id"] == calls[1].headers["webhook-id"] == f"msg_{task_id}"
        payload = Webhook(secret).verify(calls[1].body, calls[1].headers)
        assert payload["task_id"] == task_id and payload["status"] == "done"
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(calls[1].body.replace(b'"done"', b'"error"'), calls[1].headers)
        other = "whsec_" + base64.b64encode(uuid.uuid4().bytes * 2).decode()
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(calls[1].body, calls[1].headers)


def test_a_bad_webhook_secret_stops_start_up_with_a_message(tmp_path: Any) -> None:
    cfg = tmp_path / "local.json"
    cfg.write_text(json.dumps({"delivery": {"webhook_secret": "hunter2"}}))
    env = {k: v for k, v in os.environ.items() if k != "EASEL_WEBHOOK_SECRET"}
    out = subprocess.run([sys.executable, str(ROOT / "server.py"), "--config", str(cfg)], capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert out.returncode == 2
    assert "delivery.webhook_secret must start with 'whsec_'" in out.stderr and "hunter2" not in out.stderr


# ----- refusals before the job runs --------------------------------------------------------


@pytest.mark.parametrize("field", ["upload_urls", "webhook_url"])
@pytest.mark.parametrize("host", ["169.254.169.254", "10.0.0.1", "localhost:9"])
def test_unsafe_delivery_urls_are_refused_before_a_job_exists(world: World, field: str, host: str) -> None:
    marker = uuid.uuid4().hex
    url = f"http://{host}/target?X-Amz-Signature=secret"
    body: dict[str, Any] = {"prompt": "x", "metadata": {"marker": marker}, field: [url] if field == "upload_urls" else url}
    r = world.srv.client.post("/api/generate", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == ("upload_urls[0]" if field == "upload_urls" else field)
    assert "allowed_hosts" in error["message"] and "secret" not in error["message"]
    assert not job_exists_with(world.srv, marker)


def test_upload_urls_must_match_the_number_of_images(world: World) -> None:
    marker = uuid.uuid4().hex
    urls = [world.refusing.url("/a")]
    r = world.srv.client.post("/api/generate", json={"prompt": "x", "n": 2, "upload_urls": urls, "metadata": {"marker": marker}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "upload_urls"
    assert not job_exists_with(world.srv, marker)


def test_reference_url_to_a_private_address_is_refused(world: World) -> None:
    r = world.srv.client.post("/api/edit", json={"prompt": "x", "images": [{"url": "http://10.0.0.1/cat.png"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "images[0]"
    assert "private" in r.json()["error"]["message"]



def test_concurrent_upscales_share_the_upscaler_without_unloading_it_under_each_other(world: World) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png(16, 16)).decode()
    submitted = [world.srv.client.post("/api/generate", json={"prompt": f"p{i}", "width": 32, "height": 32, "upscale": 2}) for i in range(4)]
    submitted.append(world.srv.client.post("/api/upscale", json={"image": data_url, "scale": 4}))
    assert all(r.status_code == 200 for r in submitted), [r.text for r in submitted]
    sizes = []
    for r in submitted:
        status = settled(world.srv, r.json()["task_id"])
        assert status["status"] == "done", status
        sizes.append((status["images"][0]["width"], status["images"][0]["height"]))
    assert sizes == [(64, 64)] * 5
    assert model_state(world.srv, "esrgan") == "unloaded"
