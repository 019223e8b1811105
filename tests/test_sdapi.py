"""A1111's /sdapi/v1, driven by webuiapi (a client from PyPI that nobody here wrote),
against a real server on both brokers."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image, ImageDraw

from tests.tiny_upscaler import write_tiny_esrgan

from .servers import BROKERS, RunningServer, stub_settings

KEYS = ["alice-key", "bob-key"]
STEP_SECONDS = 12.0  # stub: seconds per step per megapixel -> 0.05 s a step at 64x64
RED = (200, 30, 30)


@dataclass
class World:
    srv: RunningServer
    port: int


@pytest.fixture(scope="module", params=BROKERS)
def world(request: pytest.FixtureRequest, server_factory: Any, broker_args: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("sdapi")
    (tmp / "loras").mkdir()
    (tmp / "loras" / "style.safetensors").write_bytes(b"")  # resolved by name; the stub never reads it
    settings = stub_settings(lora_dir=str(tmp / "loras"), simulate_step_seconds=STEP_SECONDS)
    settings["models"]["other"] = stub_settings(simulate_step_seconds=STEP_SECONDS)["models"]["stub"]
    settings["models"]["esrgan"] = {"backend": "upscale_esrgan", "model_path": str(write_tiny_esrgan(tmp / "x4.pth")),
                                    "device": "cpu", "tile_size": 0}  # fmt: skip
    settings["upscaler"] = "esrgan"
    settings["auth"] = {"api_keys": KEYS}
    settings, args = broker_args(settings, request.param)
    srv = server_factory(settings, *args)
    return World(srv, int(srv.url.rsplit(":", 1)[1]))


def client(world: World, key: str = KEYS[0]) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=world.port, username="user", password=key)


def png(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = RED) -> Image.Image:
    return Image.new("RGB", size, color)


def test_txt2img_answers_a1111s_shape_with_seeds_s_s_plus_1(world: World) -> None:
    r = client(world).txt2img(prompt="a red fox", width=64, height=64, steps=2, batch_size=2, n_iter=2, seed=7, cfg_scale=3)
    assert [im.size for im in r.images] == [(64, 64)] * 4
    assert r.info["all_seeds"] == [7, 8, 9, 10] and r.info["seed"] == 7
    assert r.info["sd_model_name"] == "stub" and r.info["cfg_scale"] == 3
    assert "Seed: 9" in r.info["infotexts"][2] and r.images[2].info["parameters"] == r.info["infotexts"][2]
    # what webuiapi sends and easel does not do is listed, never refused
    assert {"hr_scale", "denoising_strength"} <= set(r.info["ignored"])
    # webuiapi's default sampler, Euler a, is one the model (the stub: an SDXL-like family) runs
    assert r.info["sampler_name"] == "Euler a" and r.info["sampler_honoured"] is True and "sampler_name" not in r.info["ignored"]
    assert r.parameters["prompt"] == "a red fox"


def test_seed_minus_one_is_random_and_reported(world: World) -> None:
    api = client(world)
    a = api.txt2img(prompt="x", width=64, height=64, steps=1, batch_size=2, seed=-1).info["all_seeds"]
    b = api.txt2img(prompt="x", width=64, height=64, steps=1, batch_size=2, seed=-1).info["all_seeds"]
    assert a[1] == a[0] + 1 and a != b


def test_unknown_fields_are_accepted_and_listed(world: World) -> None:
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "alwayson_scripts": {"ControlNet": {"args": []}},
            "some_future_field": [1, 2], "override_settings": {"CLIP_stop_at_last_layers": 2}}  # fmt: skip
    r = httpx.post(f"{world.srv.url}/sdapi/v1/txt2img", json=body, auth=("u", KEYS[0]), timeout=60)
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert all(f in info for f in ("alwayson_scripts", "some_future_field", "override_settings.CLIP_stop_at_last_layers"))


@pytest.mark.parametrize(("fields", "ignored", "ran"), [
    ({"sampler_name": "No Such Sampler"}, ["sampler_name"], None),
    ({"sampler_index": "Restart"}, ["sampler_index"], None),  # A1111 has it; Diffusers has no counterpart
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, ["scheduler"], "DDIM"),  # DDIM takes no Karras sigmas
    ({"sampler_name": "DPM++ 2M SDE Karras"}, [], "DPM++ 2M SDE"),  # A1111's older name: sampler + schedule
])  # fmt: skip
def test_samplers_the_model_does_not_run_are_listed_as_ignored_never_refused(
    world: World, fields: dict[str, str], ignored: list[str], ran: str | None
) -> None:
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, **fields}
    r = httpx.post(f"{world.srv.url}/sdapi/v1/txt2img", json=body, auth=("u", KEYS[0]), timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert [f for f in info["ignored"] if f in ("sampler_name", "sampler_index", "scheduler")] == ignored
    assert info["sampler_honoured"] is (ran is not None)
    assert (f"Sampler: {ran}," in info["infotexts"][0]) if ran else "Sampler:" not in info["infotexts"][0]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("txt2img", [], None),
    ("txt2img", {"prompt": "x", "batch_size": 8}, "batch_size"),  # over the stub's max_output_images
    ("txt2img", {"prompt": "x", "seed": "abc"}, "seed"),
    ("txt2img", {"prompt": "x", "width": 100}, "width"),
    ("img2img", {"prompt": "x"}, "init_images"),
    ("img2img", {"prompt": "x", "init_images": ["aGVsbG8="]}, "init_images[0]"),
    ("img2img", {"prompt": "x", "init_images": [5]}, "init_images[0]"),
])  # fmt: skip
def test_bad_input_is_a_400_naming_the_a1111_field(world: World, path: str, body: Any, param: str | None) -> None:
    r = httpx.post(f"{world.srv.url}/sdapi/v1/{path}", json=body, auth=("u", KEYS[0]), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"].get("param") == param


def test_a_lora_tag_in_the_prompt_is_a_lora(world: World) -> None:
    api = client(world)
    r = api.txt2img(prompt="a fox <lora:style:0.8>", width=64, height=64, steps=1)
    assert r.info["prompt"] == "a fox" and "<lora:style:0.8>" in r.info["infotexts"][0]
    with pytest.raises(RuntimeError, match="400.*nothere"):
        api.txt2img(prompt="a fox <lora:nothere:1>", width=64, height=64, steps=1)


def test_img2img_with_a_mask_repaints_only_the_white_area(world: World) -> None:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)  # repaint the left half
    r = client(world).img2img(images=[png()], mask_image=mask, mask_blur=0, prompt="a cat", steps=2, denoising_strength=1.0, seed=3)
    out = r.images[0].convert("RGB")
    assert out.size == (64, 64)
    assert out.getpixel((60, 32)) == RED and out.getpixel((4, 32)) != RED
    inverted = client(world).img2img(images=[png()], mask_image=mask, mask_blur=0, prompt="a cat", steps=2, inpainting_mask_invert=1)
    flipped = inverted.images[0].convert("RGB")
    assert flipped.getpixel((4, 32)) == RED and flipped.getpixel((60, 32)) != RED


def test_img2img_without_a_mask_uses_the_image(world: World) -> None:
    r = client(world).img2img(images=[png()], prompt="a cat", width=64, height=64, steps=2, denoising_strength=0.5)
    assert r.images[0].size == (64, 64) and r.info["denoising_strength"] == 0.5


def test_progress_while_a_job_runs_then_interrupt(world: World) -> None:
    api, other = client(world), client(world, KEYS[1])
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(r=api.txt2img(prompt="slow", width=64, height=64, steps=200)))
    t.start()
    try:
        p = poll(api, lambda p: p["state"]["sampling_step"] > 1 and p["current_image"])
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["sampling_steps"] == 200
        assert Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).format == "PNG"
        assert other.get_progress()["state"]["job_count"] == 0  # bob does not see alice's job
        other.interrupt()  # ... nor stop it
        assert api.get_progress()["state"]["job"] == p["state"]["job"]
        api.interrupt()
    finally:
        t.join(60)
    r = done["r"]
    assert r.images == [] and r.info["interrupted"] is True
    assert api.get_progress()["state"]["job_count"] == 0


def poll(api: webuiapi.WebUIApi, ready: Any, timeout: float = 30) -> dict[str, Any]:
    """/progress has no event to wait on: ask until ``ready`` (what A1111 clients do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p: dict[str, Any] = api.get_progress()
        if ready(p):
            return p
        time.sleep(0.05)
    raise AssertionError(f"progress never got there: {p}")


def test_a_caller_that_hangs_up_cancels_its_job(world: World) -> None:
    api = client(world)
    hung_up: list[Exception] = []

    def post() -> None:
        body = {"prompt": "abandoned", "width": 64, "height": 64, "steps": 200}
        try:
            httpx.post(f"{world.srv.url}/sdapi/v1/txt2img", json=body, auth=("u", KEYS[0]), timeout=httpx.Timeout(60, read=2))
        except httpx.ReadTimeout as exc:
            hung_up.append(exc)

    t = threading.Thread(target=post)
    t.start()
    job_id = poll(api, lambda p: p["state"]["sampling_step"] > 0)["state"]["job"]
    t.join(30)
    assert hung_up
    c = httpx.Client(base_url=world.srv.url, headers={"authorization": f"Bearer {KEYS[0]}"}, timeout=60)
    st = c.get("/api/status", params={"task_id": job_id, "wait": 30, "since": "running"}).json()
    assert st["status"] == "cancelled" and st["step"] < 200


def test_model_switch_is_per_caller(world: World) -> None:
    alice, bob = client(world), client(world, KEYS[1])
    assert {m["title"] for m in alice.get_sd_models()} == {"stub", "other"}  # not the upscaler
    alice.util_set_model("other")
    assert alice.util_get_current_model() == "other" and bob.util_get_current_model() == "stub"
    assert alice.txt2img(prompt="x", width=64, height=64, steps=1).info["sd_model_name"] == "other"
    assert bob.txt2img(prompt="x", width=64, height=64, steps=1).info["sd_model_name"] == "stub"
    r = bob.txt2img(prompt="x", width=64, height=64, steps=1, override_settings={"sd_model_checkpoint": "other"})
    assert r.info["sd_model_name"] == "other"
    assert "not a model here" in alice.set_options({"sd_model_checkpoint": "nope"})["error"]["message"]
    alice.util_set_model("stub")


def test_png_info_reads_the_parameters_back(world: World) -> None:
    api = client(world)
    img = api.txt2img(prompt="a lighthouse", negative_prompt="fog", width=64, height=64, steps=2, seed=42).image
    r = api.png_info(img)
    assert "Seed: 42" in r.info
    assert r.parameters["Prompt"] == "a lighthouse" and r.parameters["Negative prompt"] == "fog"
    assert r.parameters["Seed"] == "42" and r.parameters["Size-1"] == "64"
    assert api.png_info(png()).info == ""  # no parameters: not an error


def test_extra_single_image_upscales(world: World) -> None:
    r = client(world).extra_single_image(png((32, 32)), upscaler_1="esrgan", upscaling_resize=4)
    assert r.image.size == (128, 128)
    assert any(u["name"] == "esrgan" for u in client(world).get_upscalers())


def test_listings_clients_read_first(world: World) -> None:
    api = client(world)
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert "Restart" not in api.util_get_sampler_names()  # listed: only what the model runs
    assert [lr["name"] for lr in api.get_loras()] == ["style"]
    assert api.get_sd_vae() == [] and api.get_cmd_flags()["api"] is True
    assert api.get_memory()["ram"]["total"] > 0


def test_basic_auth_needs_a_key(world: World) -> None:
    url = f"{world.srv.url}/sdapi/v1/sd-models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, auth=("user", "wrong")).status_code == 401
    assert httpx.get(url, headers={"authorization": "Basic Og=="}).status_code == 401  # empty: no key
    assert httpx.get(url, auth=("", KEYS[1])).status_code == 200
    assert httpx.get(url, headers={"authorization": f"Bearer {KEYS[1]}"}).status_code == 200


def test_empty_basic_credentials_are_anonymous_without_keys(server_factory: Any) -> None:
    srv = server_factory(stub_settings())
    r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, headers={"authorization": "Basic Og=="}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.url}/sdapi/v1/nothing").json()["error"]["message"].startswith("no route")
