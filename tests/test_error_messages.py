"""Every 400 says the right thing, on both brokers: each carries a stable code and
names the field; a suggestion is itself a valid value (sent back, it is accepted);
and the README's sample error is what the server really answers."""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import pytest
from PIL import Image

from .servers import ROOT, RunningServer


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_readmes_sample_400_is_a_real_answer(server: RunningServer) -> None:
    readme = (ROOT / "README.md").read_text()
    sample = re.search(r"Bad input gets a 4xx whose JSON body says what to fix:\n`(\{.*?\})`", readme)
    assert sample is not None, "the README's sample 400 is gone"
    r = server.client.post("/api/generate", json={"prompt": "a fox", "width": 100})
    assert r.status_code == 400
    assert r.json() == json.loads(sample[1])


BAD = [
    ("POST", "/api/generate", {"prompt": "x", "width": 100}, "width"),
    ("POST", "/api/generate", {"prompt": "x", "steps": 0}, "steps"),
    ("POST", "/api/generate", {"prompt": "x", "bogus": 1}, "bogus"),
    ("POST", "/api/generate", {"prompt": "x", "seed": "abc"}, "seed"),
    ("POST", "/api/generate", {"prompt": "x", "format": "GIF"}, "format"),
    ("POST", "/api/generate", {"prompt": "x", "model": "nope"}, "model"),
    ("POST", "/api/edit", {"prompt": "x", "images": ["bm90IGFuIGltYWdl"]}, "images[0]"),
    ("POST", "/api/load", {}, "model"),
    ("POST", "/v1/images/generations", {"prompt": "x", "size": "100x100"}, "size"),
    ("POST", "/v1/images/generations", {"prompt": "x", "quality": "ultra"}, "quality"),
    ("GET", "/api/tasks?limit=abc", None, "limit"),
    ("GET", "/api/status", None, "task_id"),
    ("GET", "/api/image?task_id=x&index=one", None, "index"),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), BAD, ids=[f"{p}:{f}" for _, p, _, f in BAD])
def test_every_error_carries_a_code_and_names_the_field(server: RunningServer, method: str, path: str, body: Any, param: str) -> None:
    r = server.client.request(method, path, json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error.get("code"), error
    assert error.get("param") == param, error


def test_a_limit_that_is_no_number_says_so_not_seconds(server: RunningServer) -> None:
    message = server.client.get("/api/tasks", params={"limit": "abc"}).json()["error"]["message"]
    assert "seconds" not in message and "whole number" in message and "1000" in message


@pytest.mark.parametrize("size", ["100x100", "8200x100", "4096x4096", "2048x1024"])
def test_an_openai_size_hint_is_a_size_the_model_takes(server: RunningServer, size: str) -> None:
    r = server.client.post("/v1/images/generations", json={"prompt": "x", "size": size})
    assert r.status_code == 400, r.text
    hint = re.search(r"try (\d+x\d+)", r.json()["error"]["message"])
    assert hint is not None, r.text
    again = server.client.post("/v1/images/generations", json={"prompt": "x", "size": hint[1]})
    assert again.status_code == 200, (hint[1], again.text)


def test_a_width_over_max_pixels_suggests_a_size_within_it(server: RunningServer) -> None:
    r = server.client.post("/api/generate", json={"prompt": "x", "width": 4096, "height": 2048})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_pixels"
    w, h = re.search(r"e\.g\. (\d+)x(\d+)", r.json()["error"]["message"]).groups()  # type: ignore[union-attr]
    assert server.client.post("/api/generate", json={"prompt": "x", "width": int(w), "height": int(h)}).status_code == 200


@pytest.mark.parametrize(("size", "expand"), [((100, 100), {"right": 10}), ((64, 48), {"left": 8}), ((96, 96), {"top": 5, "bottom": 2})])
def test_the_outpaint_hint_makes_the_expanded_size_multiples_of_16(server: RunningServer, size: tuple[int, int], expand: dict[str, int]) -> None:
    image = data_url(Image.new("RGB", size, "teal"))
    r = server.client.post("/api/edit", json={"prompt": "x", "images": [image], "expand": expand})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    fixed = dict(expand)
    for side, value in re.findall(r"(right|bottom) (\d+)", message.split("e.g.")[1]):
        fixed[side] = int(value)
    again = server.client.post("/api/edit", json={"prompt": "x", "images": [image], "expand": fixed})
    assert again.status_code == 200, (message, fixed, again.text)


@pytest.mark.parametrize("value", ["nan", "abc"])
def test_a_wait_that_is_not_a_number_is_a_400(server: RunningServer, value: str) -> None:
    task_id = server.client.post("/api/generate", json={"prompt": "x"}).json()["task_id"]
    for path in ("/api/status", "/api/image"):
        r = server.client.get(path, params={"task_id": task_id, "wait": value}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "wait", r.text
