"""Byte-level fuzzing beside the schema fuzzing (test_fuzz.py), on both brokers:
real request bodies and query strings of every route, mutated byte by byte
(bytes that are not UTF-8, NUL, lone surrogate escapes, long digit runs, deep
brackets, cut and doubled spans), sent for a few seconds.  No answer may be a
5xx, no request may hang, and a job that was accepted never shows text garbled
into U+FFFD that the request did not hold."""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
from PIL import Image

from .servers import BROKERS, RunningServer, stub_settings
from .test_api import wait_done

SECONDS = 3.0  # per broker
SEED = 28
REPLACEMENT = ("\ufffd".encode(), b"\\ufffd", b"\\uFFFD")
SPICE = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b"\\u0000", b"\\ud800", b"\\udc00", b"9" * 40, b"[" * 64,
         b"{", b'"', b"\\", b"%", b"%FF", b"%00", b"\xe9", b"1e999", b"-", b"\n"]  # fmt: skip


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module", params=BROKERS)
def fuzz_server(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    settings = stub_settings(max_pixels=65536)
    settings["limits"] = {"max_body_mib": 4, "max_steps": 8, "max_prompts": 4}
    settings, args = broker_args(settings, request.param)
    return server_factory(settings, *args)


def corpus(task_id: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path with query, body, headers): a real request for every route."""
    image = png_data_url()
    js = {"Content-Type": "application/json"}
    gen = json.dumps({"prompt": "a fox in snow ☃", "negative_prompt": "blur", "steps": 2, "seed": 7, "n": 1,
                      "priority": 1, "metadata": {"k": "v", "n": [1, 2]}, "format": "PNG"}).encode()  # fmt: skip
    edit = json.dumps({"prompt": "make it blue", "images": [image], "steps": 2}).encode()
    boundary = "fuzzboundary"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nan otter é\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="n"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{{"steps": 2}}\r\n--{boundary}--\r\n').encode()  # fmt: skip
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    q = f"task_id={task_id}"
    train = json.dumps({"model": "stub", "dataset_dir": "/nonexistent", "adapter_name": "a", "steps": 1}).encode()
    seed_train = json.dumps({"dataset_dir": "/nonexistent", "output_dir": "x", "max_train_steps": 1}).encode()
    return [
        ("POST", "/api/generate", gen, js),
        ("POST", "/api/generate", form, multipart),
        ("POST", "/api/edit", edit, js),
        ("POST", "/api/upscale", json.dumps({"image": image, "scale": 2}).encode(), js),
        ("GET", f"/api/status?{q}&wait=0&since=done", b"", {}),
        ("GET", f"/api/events?{q}&previews=false&heartbeat=1", b"", {}),
        ("GET", f"/api/image?{q}&index=0&base64=true&wait=0", b"", {}),
        ("GET", "/api/tasks?limit=5", b"", {}),
        ("GET", f"/api/cancel?{q}", b"", {}),
        ("POST", f"/api/cancel?{q}", b"", {}),
        ("DELETE", f"/api/tasks/{task_id}", b"", {}),
        ("GET", "/api/ls", b"", {}),
        ("GET", "/api/ps", b"", {}),
        ("POST", "/api/load", b'{"model": "stub"}', js),
        ("POST", "/api/png-info", json.dumps({"image": image}).encode(), js),
        ("GET", "/v1/models", b"", {}),
        ("GET", "/v1/admin/models", b"", {}),
        ("POST", "/v1/admin/models/stub/load?wait=true", b"", {}),
        ("POST", "/v1/admin/models/nosuch/unload", b"", {}),
        ("GET", "/v1/admin/gpu-memory", b"", {}),
        ("POST", "/v1/images/generations", json.dumps({"prompt": "a heron", "size": "64x64", "steps": 2, "user": "u"}).encode(), js),
        ("POST", "/v1/images/edits", json.dumps({"prompt": "a heron", "images": [{"image_url": image}], "steps": 2}).encode(), js),
        ("POST", "/v1/images/edits", form, multipart),
        ("GET", "/healthz", b"", {}),
        ("GET", "/health", b"", {}),
        ("GET", "/metrics", b"", {}),
        ("POST", "/api/train", train, js),
        ("GET", "/api/loras?model=stub", b"", {}),
        ("GET", "/v1/training/flux-lora", b"", {}),
        ("POST", "/v1/training/flux-lora", seed_train, js),
        ("POST", "/v1/training/z-image-lora/stop", b'{"task_id": "nope"}', js),
    ]  # fmt: skip


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(5)
        if kind == 0 and out:  # one byte replaced
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:  # something nasty inserted
            out[at:at] = rng.choice(SPICE)
        elif kind == 2 and out:  # a span cut
            del out[at : at + rng.randint(1, 8)]
        elif kind == 3 and out:  # a span doubled
            out[at:at] = out[at : at + rng.randint(1, 16)]
        else:  # a span's bytes with the high bit set
            for i in range(at, min(len(out), at + rng.randint(1, 4))):
                out[i] |= 0x80
    return bytes(out)


def test_mutated_bytes_on_every_route_never_get_a_server_error(fuzz_server: RunningServer) -> None:
    c = fuzz_server.client
    first = c.post("/api/generate", json={"prompt": "seed job", "steps": 2})
    assert first.status_code == 200, first.text
    task_id = first.json()["task_id"]
    wait_done(c, task_id)
    requests = corpus(task_id)
    for method, target, body, headers in requests:  # the corpus itself is sound
        r = c.request(method, target, content=body, headers=headers, timeout=15)
        assert r.status_code < 500, (method, target, r.text)
    rng = random.Random(SEED)
    failures: list[str] = []
    accepted: list[tuple[str, bytes]] = []
    sent = 0
    previous = ""
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        method, target, body, headers = rng.choice(requests)
        path, _, query = target.partition("?")
        if body and rng.random() < 0.8:
            body = mutate(body, rng)
        else:
            # bytes outside printable ASCII go %-encoded (as a browser sends them); a % stays as it is
            query = quote_from_bytes(mutate(query.encode(), rng), safe="&=%+;,/:?@!$'()*[]{}") if query else query
        url = httpx.URL(fuzz_server.url + path).copy_with(query=query.encode())
        try:
            r = c.request(method, url, content=body, headers=headers, timeout=15)
        except httpx.TimeoutException:
            failures.append(f"{method} {target}: no answer in 15 s for {body[:200]!r}")
            continue
        except httpx.TransportError as exc:
            failures.append(f"{method} {path}?{query[:200]}: {exc!r} for {body[:300]!r}, after {previous}")
            continue
        sent += 1
        previous = f"{method} {path}?{query[:200]} -> {r.status_code} for {body[:300]!r}"
        if r.status_code >= 500:
            failures.append(f"{method} {path}?{query[:200]} -> {r.status_code} {r.text[:300]} for {body[:300]!r}")
        elif r.status_code == 200 and path in ("/api/generate", "/api/edit") and "task_id" in r.text:
            accepted.append((r.json()["task_id"], body))
    assert failures == [], "\n".join(failures[:10])
    assert sent > 50, f"only {sent} requests in {SECONDS} s"
    assert "unhandled error" not in fuzz_server.log(), fuzz_server.log()[-4000:]
    for task, body in accepted:  # never stored garbled
        text = c.get("/api/status", params={"task_id": task}).text
        if "\ufffd" in json.loads(text).__repr__() and not any(r in body for r in REPLACEMENT):
            pytest.fail(f"task {task} shows U+FFFD its request did not hold: {text[:500]} <- {body[:500]!r}")
