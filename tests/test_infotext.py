"""Generation parameters inside result files (A1111 infotext) and POST /api/png-info."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from server import infotext
from server.items import Item, Lora
from server.jobs import JobRecord

from .servers import stub_settings
from .test_api import wait_done

if TYPE_CHECKING:
    from collections.abc import Callable

    from .servers import RunningServer


def run(srv: RunningServer, **body: Any) -> tuple[dict[str, Any], list[bytes]]:
    r = srv.client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    job = wait_done(srv.client, r.json()["task_id"])
    assert job["status"] == "done", job
    files = [srv.client.get("/api/image", params={"task_id": job["task_id"], "index": i}).content for i in range(len(job["images"]))]
    return job, files


def exif_text(data: bytes) -> str | None:
    raw = Image.open(io.BytesIO(data)).getexif().get_ifd(0x8769).get(0x9286)
    assert isinstance(raw, bytes) and raw[:8] == b"UNICODE\0"
    return raw[8:].decode("utf-16-be")


def test_build_and_parse_round_trip_the_a1111_format() -> None:
    item = Item(prompt="a red fox, snow", width=64, height=128, steps=4, seed=7, guidance=5.5,
                negative_prompt="blurry", loras=[Lora("style", 0.5)])  # fmt: skip
    text = infotext.build(JobRecord(model="sdxl", task="generate", items=[item]), item, 8)
    assert text == "a red fox, snow <lora:style:0.5>\nNegative prompt: blurry\nSteps: 4, CFG scale: 5.5, Seed: 8, Size: 64x128, Model: sdxl"
    assert infotext.parse(text) == {
        "prompt": "a red fox, snow", "negative_prompt": "blurry", "loras": [{"name": "style", "scale": 0.5}],
        "steps": 4, "guidance": 5.5, "seed": 8, "width": 64, "height": 128, "model": "sdxl",
    }  # fmt: skip
    # text written by A1111 itself (quoted values, keys easel does not know)
    a1111 = 'masterpiece, <lora:x:0.7>\nNegative prompt: bad\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 2179987202, Size: 768x512, Model hash: 93b79e09ed, Model: anything-v4.5, Lora hashes: "x: abc", Version: v1.10.1'
    got = infotext.parse(a1111)
    assert got["prompt"] == "masterpiece" and got["loras"] == [{"name": "x", "scale": 0.7}]
    assert (got["steps"], got["seed"], got["width"], got["height"], got["model"]) == (20, 2179987202, 768, 512, "anything-v4.5")
    assert infotext.parse("only a prompt") == {"prompt": "only a prompt"}


def test_png_result_carries_prompt_and_per_image_seed(server: RunningServer) -> None:
    job, files = run(server, prompt="a lighthouse at dusk", negative_prompt="fog", n=2, seed=41, steps=3, guidance=4.5)
    for k, data in enumerate(files):
        text = Image.open(io.BytesIO(data)).info["parameters"]
        assert text.startswith("a lighthouse at dusk\nNegative prompt: fog\n")
        assert f"Seed: {41 + k}," in text and "Steps: 3," in text and "CFG scale: 4.5," in text
        assert "Size: 64x64" in text and "Model: stub" in text
    # reuse these settings: the file back as generate fields
    r = server.client.post("/api/png-info", files={"image": ("x.png", files[1], "image/png")})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["prompt"] == "a lighthouse at dusk" and got["negative_prompt"] == "fog"
    assert (got["seed"], got["steps"], got["guidance"], got["width"], got["height"], got["model"]) == (42, 3, 4.5, 64, 64, "stub")
    assert got["parameters"] == Image.open(io.BytesIO(files[1])).info["parameters"] and got["loras"] is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_carry_the_text_as_exif_user_comment(server: RunningServer, fmt: str) -> None:
    _, (data,) = run(server, prompt="a snowy owl", seed=9, format=fmt)
    text = exif_text(data)
    assert text is not None and text.startswith("a snowy owl\n") and "Seed: 9," in text
    b64 = base64.b64encode(data).decode()
    for image in (f"data:image/{fmt.lower()};base64,{b64}", b64):
        got = server.client.post("/api/png-info", json={"image": image}).json()
        assert got["prompt"] == "a snowy owl" and got["seed"] == 9 and got["parameters"] == text


def test_an_image_without_parameters_answers_null_and_junk_is_a_400(server: RunningServer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    got = server.client.post("/api/png-info", files={"image": ("plain.png", buf.getvalue(), "image/png")})
    assert got.status_code == 200 and got.json()["parameters"] is None and got.json()["prompt"] is None
    bad = server.client.post("/api/png-info", json={"image": base64.b64encode(b"not an image").decode()})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"
    assert server.client.post("/api/png-info", json={}).status_code == 400


def test_embed_metadata_false_leaves_files_bare_on_disk_too(server_factory: Callable[..., RunningServer], tmp_path: Any) -> None:
    settings = {**stub_settings(), "storage": {"embed_metadata": False, "output_dir": str(tmp_path)}}
    srv = server_factory(settings)
    job, (png,) = run(srv, prompt="private", seed=3)
    assert "parameters" not in Image.open(io.BytesIO(png)).info
    on_disk = (tmp_path / f"{job['task_id']}-0.png").read_bytes()
    assert on_disk == png


def test_output_dir_files_are_the_same_bytes_with_parameters(server_factory: Callable[..., RunningServer], tmp_path: Any) -> None:
    srv = server_factory({**stub_settings(), "storage": {"output_dir": str(tmp_path)}})
    job, (png,) = run(srv, prompt="on disk", seed=5)
    on_disk = (tmp_path / f"{job['task_id']}-0.png").read_bytes()
    assert on_disk == png and "Seed: 5," in Image.open(io.BytesIO(on_disk)).info["parameters"]
