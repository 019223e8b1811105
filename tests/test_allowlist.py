"""Per-key allow-lists (models, loras, max_pixels, max_steps, max_images): a job outside
them is a 403 ``not_allowed`` naming the limit and the value asked, on the job API, the
OpenAI shim (the official SDK) and the A1111 API; listings show a key only what it may use."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from .servers import RunningServer, stub_settings
from .test_api import wait_done
from .tiny_upscaler import write_tiny_esrgan

LIMITED = "limited-key"  # its own allow-lists
DEFAULTED = "defaulted-key"  # auth.quota's, with its own max_steps
UPSCALING = "upscaling-key"  # the upscaler only, up to 128x128 delivered
FREE = "free-key"  # an admin key without limits of its own... but auth.quota applies to it too
QUOTA = {"models": ["stub"], "loras": ["style"], "max_pixels": 128 * 128, "max_steps": 8, "max_images": 2}
AUTH = {
    "api_keys": [
        {"key": LIMITED, "name": "limited", **QUOTA},
        {"key": DEFAULTED, "name": "defaulted", "max_steps": 3},
        {"key": UPSCALING, "name": "upscaling", "models": ["esrgan"], "max_pixels": 128 * 128},
    ],
    "admin_keys": [{"key": FREE, "name": "free", "models": ["stub", "other"], "max_steps": 100}],
    "quota": {"models": ["stub"], "max_steps": 20},
}
# (body of /api/generate, the limit, text the message must hold)
OUTSIDE = [
    ({"model": "other"}, "models", "'other'"),
    ({"loras": [{"name": "grain"}]}, "loras", "'grain'"),
    ({"width": 256, "height": 128}, "max_pixels", "256x128"),
    ({"steps": 9}, "max_steps", "asks for 9"),
    ({"n": 3}, "max_images", "asks for 3"),
]


@pytest.fixture(scope="module")
def srv(server_factory: Callable[..., RunningServer], tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    loras = tmp_path_factory.mktemp("loras")
    for name in ("style", "grain"):
        (loras / f"{name}.safetensors").write_bytes(b"")  # resolved by name; the stub never reads it
    settings = stub_settings(lora_dir=str(loras))
    settings["models"]["other"] = stub_settings()["models"]["stub"]
    esrgan = write_tiny_esrgan(tmp_path_factory.mktemp("esrgan") / "x4.pth")
    settings["models"]["esrgan"] = {"backend": "upscale_esrgan", "model_path": str(esrgan), "device": "cpu", "tile_size": 0}
    settings["upscaler"] = "esrgan"
    settings["auth"] = AUTH
    return server_factory(settings)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate(srv: RunningServer, key: str, **body: Any) -> httpx.Response:
    return srv.client.post("/api/generate", json={"prompt": "a red fox", "steps": 2, **body}, headers=bearer(key))


@pytest.mark.parametrize(("body", "limit", "asked"), OUTSIDE, ids=[o[1] for o in OUTSIDE])
def test_a_job_outside_a_keys_allow_list_is_a_403_naming_the_limit_and_the_value(
    srv: RunningServer, body: dict[str, Any], limit: str, asked: str
) -> None:
    r = generate(srv, LIMITED, **body)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "not_allowed" and error["limit"] == limit, error
    assert limit in error["message"] and asked in error["message"] and "'limited'" in error["message"], error


def test_a_job_inside_every_limit_is_queued_and_runs(srv: RunningServer) -> None:
    r = generate(srv, LIMITED, model="stub", loras=[{"name": "style"}], width=128, height=128, steps=8, n=2)
    assert r.status_code == 200, r.text
    with httpx.Client(base_url=srv.url, headers=bearer(LIMITED), timeout=60) as me:
        assert wait_done(me, r.json()["task_id"])["status"] == "done"


def test_an_upscale_counts_the_pixels_it_delivers(srv: RunningServer) -> None:
    r = generate(srv, LIMITED, width=64, height=64, upscale=4)  # 256x256 delivered
    assert r.status_code == 403 and r.json()["error"]["limit"] == "max_pixels", r.text
    assert r.json()["error"]["param"] == "upscale" and "256x256" in r.json()["error"]["message"]


def test_an_upscale_job_is_held_to_the_models_list_and_the_pixels_it_delivers(srv: RunningServer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    r = srv.client.post("/api/upscale", json={"image": image, "model": "esrgan"}, headers=bearer(LIMITED))
    assert r.status_code == 403 and r.json()["error"]["limit"] == "models", r.text
    r = srv.client.post("/api/upscale", json={"image": image, "scale": 4}, headers=bearer(UPSCALING))  # 256x256
    assert r.status_code == 403 and r.json()["error"]["limit"] == "max_pixels" and "256x256" in r.text, r.text
    r = srv.client.post("/api/upscale", json={"image": image, "scale": 2}, headers=bearer(UPSCALING))  # 128x128
    assert r.status_code == 200, r.text


def test_auth_quota_applies_field_by_field_to_keys_without_their_own(srv: RunningServer) -> None:
    r = generate(srv, DEFAULTED, steps=4)  # its own max_steps (3) wins over auth.quota's 20
    assert r.status_code == 403 and "at most 3 steps" in r.json()["error"]["message"], r.text
    r = generate(srv, DEFAULTED, model="other")  # no models of its own: auth.quota's
    assert r.status_code == 403 and r.json()["error"]["limit"] == "models", r.text
    assert generate(srv, FREE, model="other", steps=50).status_code == 200  # its own lists allow both


@pytest.mark.parametrize(
    ("kwargs", "limit"),
    [
        ({"model": "other"}, "models"),
        ({"size": "256x256"}, "max_pixels"),
        ({"n": 3}, "max_images"),
        ({"extra_body": {"steps": 9}}, "max_steps"),
        ({"extra_body": {"loras": [{"name": "grain"}]}}, "loras"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_the_openai_sdk_gets_the_same_403(srv: RunningServer, kwargs: dict[str, Any], limit: str) -> None:
    client = OpenAI(base_url=srv.url + "/v1", api_key=LIMITED, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.images.generate(prompt="a red fox", **kwargs)
    assert info.value.status_code == 403 and info.value.code == "not_allowed"
    body = info.value.body
    assert isinstance(body, dict) and body["limit"] == limit, body


def test_the_a1111_api_gets_the_same_403(srv: RunningServer) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"user:{LIMITED}".encode()).decode()}
    r = srv.client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "steps": 30, "width": 64, "height": 64}, headers=auth)
    assert r.status_code == 403 and r.json()["error"]["limit"] == "max_steps", r.text


def test_listings_show_a_key_only_the_models_and_loras_it_may_use(srv: RunningServer) -> None:
    for key, models in ((LIMITED, ["stub"]), (FREE, ["other", "stub"])):
        listed = srv.client.get("/api/ls", headers=bearer(key)).json()
        assert sorted(m["name"] for m in listed["models"]) == models, listed
        assert sorted(m["name"] for m in srv.client.get("/api/ps", headers=bearer(key)).json()["models"]) == models
        assert sorted(m.id for m in OpenAI(base_url=srv.url + "/v1", api_key=key).models.list()) == models
    loras = srv.client.get("/api/loras", params={"model": "stub"}, headers=bearer(LIMITED)).json()
    assert [lora["name"] for lora in loras["loras"]] == ["style"]
    r = srv.client.get("/api/loras", params={"model": "other"}, headers=bearer(LIMITED))
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_allowed"


def test_a_models_allow_list_naming_an_unknown_model_stops_start_up(tmp_path: Path) -> None:
    from server.config import ConfigError, load_settings

    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({**stub_settings(), "auth": {"api_keys": [{"key": "k", "models": ["nope"]}]}}))
    with pytest.raises(ConfigError, match=r"auth.api_keys\[0\].models names 'nope'"):
        load_settings(cfg)
