"""Masked edits (inpainting) and outpainting through /api/edit and the official openai
SDK, on the stub (it draws its placeholder, and the runner composites it over the
input through the feathered mask exactly as for the Diffusers backends).  The same
on tiny Diffusers pipelines: tests/test_backends_http.py."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from server.masking import feather, normalize_mask

from .servers import RunningServer
from .test_api import wait_done

RED = (200, 30, 30)


def photo(w: int = 72, h: int = 56) -> Image.Image:
    """A noisy picture: any drift (a VAE round trip, a resize) shows in its pixels."""
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int], alpha: bool = False) -> Image.Image:
    """``box`` is the area to edit: transparent in an RGBA (OpenAI) mask, else white."""
    if alpha:
        m = Image.new("RGBA", size, (0, 0, 0, 255))
        m.paste((0, 0, 0, 0), box)
        return m
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def check_masked(result: Image.Image, source: Image.Image, mask: Image.Image, blur: int) -> None:
    """Equal to the source wherever the feathered mask is 0; different where it is 255."""
    assert result.size == source.size
    alpha = np.asarray(feather(normalize_mask(mask), blur))
    diff = np.abs(arr(result) - arr(source)).max(axis=2)
    assert (alpha == 0).any() and (alpha == 255).any()
    assert diff[alpha == 0].max() == 0, "pixels outside the mask changed"
    assert diff[alpha == 255].mean() > 20, "the masked area did not change"
    assert (alpha[np.asarray(normalize_mask(mask)) == 0] == 0).all()  # the feather lies inside the mask


def fetch(c: Any, task_id: str) -> Image.Image:
    st = wait_done(c, task_id)
    assert st["status"] == "done", st
    return Image.open(io.BytesIO(c.get("/api/image", params={"task_id": task_id}).content))


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.url + "/v1", api_key="x") as c:
        yield c


# --- the openai SDK ---------------------------------------------------------------------


def test_sdk_masked_edit_changes_only_the_transparent_area(client: OpenAI) -> None:
    src = photo()  # 72x56: not multiples of 16; the result still has its exact size
    mask = box_mask(src.size, (20, 12, 60, 44), alpha=True)
    image, mask_file = ("a.png", png_bytes(src), "image/png"), ("m.png", png_bytes(mask), "image/png")
    r = client.images.edit(image=image, mask=mask_file, prompt="a cat")
    assert r.data and r.data[0].b64_json
    check_masked(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))), src, mask, blur=4)
    r = client.images.edit(image=image, mask=mask_file, prompt="a cat", extra_body={"mask_blur": 0})
    assert r.data and r.data[0].b64_json
    check_masked(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))), src, mask, blur=0)


def test_sdk_mask_of_another_size_is_a_400_that_says_so(client: OpenAI) -> None:
    mask = box_mask((64, 64), (0, 0, 32, 32), alpha=True)
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(
            image=("a.png", png_bytes(photo()), "image/png"), mask=("m.png", png_bytes(mask), "image/png"), prompt="x"
        )
    assert "64x64" in exc.value.message and "72x56" in exc.value.message and "same size" in exc.value.message


# --- /api/edit ----------------------------------------------------------------------------


def test_api_edit_mask_as_data_url_with_mask_blur(server: RunningServer) -> None:
    c = server.client
    src, mask = photo(), box_mask((72, 56), (8, 8, 56, 48))  # no alpha: white = edit
    r = c.post(
        "/api/edit", json={"prompt": "a cat", "images": [data_url(src)], "mask": data_url(mask), "mask_blur": 8, "steps": 2}
    )
    assert r.status_code == 200, r.text
    check_masked(fetch(c, r.json()["task_id"]), src, mask, blur=8)


def test_api_edit_mask_as_multipart_file_and_bare_base64(server: RunningServer) -> None:
    c = server.client
    src, mask = photo(), box_mask((72, 56), (0, 0, 36, 56), alpha=True)
    files = [("images", ("a.png", png_bytes(src), "image/png")), ("mask", ("m.png", png_bytes(mask), "image/png"))]
    r = c.post("/api/edit", data={"prompt": "left half", "steps": "2", "mask_blur": "0"}, files=files)
    assert r.status_code == 200, r.text
    check_masked(fetch(c, r.json()["task_id"]), src, mask, blur=0)
    bare = base64.b64encode(png_bytes(mask)).decode()
    r = c.post("/api/edit", json={"prompt": "left half", "images": [data_url(src)], "mask": bare, "mask_blur": 0})
    assert r.status_code == 200, r.text
    check_masked(fetch(c, r.json()["task_id"]), src, mask, blur=0)


def test_api_edit_expand_outpaints_and_keeps_the_original_area(server: RunningServer) -> None:
    c = server.client
    src = Image.new("RGB", (64, 48), RED)
    body = {"prompt": "more beach", "images": [data_url(src)], "expand": {"left": 16, "right": 16, "bottom": 16}}
    r = c.post("/api/edit", json=body)
    assert r.status_code == 200, r.text
    out = arr(fetch(c, r.json()["task_id"]))
    assert out.shape == (64, 96, 3)
    assert (out[0:48, 16:80] == RED).all(), "the original area changed"
    new = np.ones(out.shape[:2], bool)
    new[0:48, 16:80] = False
    assert np.abs(out[new] - RED).mean() > 10, "the new area was not filled"


BAD_MASKS = [
    ({"mask": "bm90IGFuIGltYWdl"}, "mask", "decode"),
    ({"mask": data_url(Image.new("L", (72, 56), 0))}, "mask", "keeps every pixel"),
    ({"mask": data_url(Image.new("RGBA", (72, 56), (0, 0, 0, 255)))}, "mask", "keeps every pixel"),
    ({"mask": data_url(Image.new("L", (64, 64), 255))}, "mask", "same size"),
    ({"expand": {"left": 8}}, "expand", "multiples of 16"),
    ({"expand": {}}, "expand", "adds no pixels"),
    ({"expand": {"right": 4096, "bottom": 4096}}, "expand", "max_pixels"),
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD_MASKS, ids=[w for _, _, w in BAD_MASKS])
def test_bad_masks_are_a_400_naming_the_field(server: RunningServer, extra: dict[str, Any], param: str, words: str) -> None:
    r = server.client.post("/api/edit", json={"prompt": "x", "images": [data_url(photo())], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_a_mask_on_generate_is_a_400(server: RunningServer) -> None:
    r = server.client.post("/api/generate", json={"prompt": "x", "mask": data_url(Image.new("L", (64, 64), 255))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask", r.text


def test_models_report_mask_support(server: RunningServer) -> None:
    (stub,) = [m for m in server.client.get("/v1/models").json()["data"] if m["id"] == "stub"]
    assert stub["capabilities"]["supports_mask"] is True
