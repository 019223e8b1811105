"""The A1111 request sequences of two clients people run, replayed against easel as
their source sends them (headers included), on both brokers:

- Open WebUI (backend/open_webui/routers/images.py): GET options (``authorization:
  ''`` without auth, ``Basic base64(user:pass)`` with it), GET sd-models, set the model
  by POSTing the whole options object back, POST txt2img ``{prompt, batch_size, width,
  height, steps, negative_prompt}``; images are read as bare base64.
- SillyTavern (src/endpoints/stable-diffusion.js): every call with ``Authorization:
  Basic `` + base64 of the user's auth string (``Basic`` alone when none is set); ping (options),
  upscalers + latent-upscale-modes (both must answer), sd-vae, samplers, schedulers,
  sd-models, get/set model (then progress until idle), generate (options, then txt2img
  with the extension's body, url and auth included), and interrupt when the user
  closes the request."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from .servers import BROKERS, RunningServer, stub_settings


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Any, broker_args: Any) -> RunningServer:
    settings = stub_settings()
    settings["models"]["other"] = stub_settings()["models"]["stub"]
    settings, args = broker_args(settings, request.param)
    return server_factory(settings, *args)


def png_of(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def test_open_webui_sequence(srv: RunningServer) -> None:
    api = httpx.Client(base_url=srv.url, headers={"authorization": ""}, timeout=60)  # get_automatic1111_api_auth: no auth
    options = api.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "stub"
    models = [{"id": m["title"], "name": m["model_name"]} for m in api.get("/sdapi/v1/sd-models").json()]
    assert {"id": "other", "name": "other"} in models
    options["sd_model_checkpoint"] = "other"  # set_image_model: the whole options object goes back
    api.post("/sdapi/v1/options", json=options).raise_for_status()
    try:
        data = {"prompt": "a lighthouse", "batch_size": 2, "width": 64, "height": 64, "steps": 2, "negative_prompt": "fog"}
        res = api.post("/sdapi/v1/txt2img", json=data).json()
        assert [png_of(i).size for i in res["images"]] == [(64, 64)] * 2  # no comma: read as bare base64
        assert json.loads(res["info"])["sd_model_name"] == "other"
    finally:
        api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "stub"}).raise_for_status()


def test_sillytavern_sequence(srv: RunningServer) -> None:
    auth = ""  # the user set no auth: getBasicAuthHeader('') is 'Basic ', which fetch's header
    header = ("Basic " + base64.b64encode(auth.encode()).decode()).strip()  # normalisation sends as 'Basic'
    api = httpx.Client(base_url=srv.url, headers={"Authorization": header}, timeout=60)
    assert api.get("/sdapi/v1/options").is_success  # ping
    upscalers = [x["name"] for x in api.get("/sdapi/v1/upscalers").raise_for_status().json()]
    latent = [x["name"] for x in api.get("/sdapi/v1/latent-upscale-modes").raise_for_status().json()]
    assert upscalers[0] == "None" and latent == []
    assert isinstance(api.get("/sdapi/v1/sd-vae").raise_for_status().json(), list)
    assert "Euler a" in [x["name"] for x in api.get("/sdapi/v1/samplers").json()]
    assert "karras" in [x["name"] for x in api.get("/sdapi/v1/schedulers").json()]
    titles = [x["title"] for x in api.get("/sdapi/v1/sd-models").json()]
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] in titles  # get-model
    api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "stub"}).raise_for_status()  # set-model
    progress = api.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0  # "model loaded"
    assert "forge_preset" not in api.get("/sdapi/v1/options").json()  # generate: not Forge
    body = {
        "url": srv.url, "auth": auth, "prompt": "a knight", "negative_prompt": "blurry",
        "sampler_name": "DPM++ 2M", "scheduler": "Karras", "steps": 3, "cfg_scale": 7, "width": 64, "height": 64,
        "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "hr_additional_modules": [],
        "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": -1,
        "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
        "override_settings_restore_afterwards": True, "save_images": True, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False,
    }  # fmt: skip
    res = api.post("/sdapi/v1/txt2img", json=body)
    assert res.status_code == 200, res.text
    data = res.json()
    assert png_of(data["images"][0]).size == (64, 64)
    info = json.loads(data["info"])
    assert {"url", "hr_scale", "denoising_strength", "override_settings.sd_vae"} <= set(info["ignored"])
    assert info["sampler_honoured"] and (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "sampler_name" not in info["ignored"] and "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    assert api.post("/sdapi/v1/interrupt").is_success  # sent when the user closes the request
