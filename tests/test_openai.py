"""The OpenAI-compatible shim, driven by the official ``openai`` SDK against a real
easel server."""

from __future__ import annotations

import base64
import io
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from .servers import RunningServer, stub_settings


def png(w: int = 64, h: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def tag() -> dict[str, Any]:
    """A metadata tag that lets a test find its own jobs in /api/tasks."""
    return {"metadata": {"test": secrets.token_hex(6)}}


def jobs_tagged(srv: RunningServer, meta: dict[str, Any]) -> list[dict[str, Any]]:
    tasks = srv.client.get("/api/tasks", params={"limit": 1000}).json()
    return [j for j in tasks["queue"] + tasks["recent"] if j["metadata"] == meta["metadata"]]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.url + "/v1", api_key="x") as c:
        yield c


@pytest.fixture(scope="module")
def slow_client(slow_server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=slow_server.url + "/v1", api_key="x") as c:
        yield c


# --- generations ----------------------------------------------------------------------

def test_generate_n2_b64_json_returns_decodable_images_of_the_size(client: OpenAI) -> None:
    r = client.images.generate(prompt="a red fox", n=2, size="128x64")
    assert r.data is not None and len(r.data) == 2
    for d in r.data:
        img = decode(d.b64_json)
        assert img.size == (128, 64) and img.format == "PNG"
        assert d.revised_prompt == "a red fox"
    assert r.size == "128x64" and r.output_format == "png" and r.created > 0
    # the stub has no tokenizer: words; an image is 85 + 170 per started 512x512 tile
    assert r.usage is not None and r.usage.output_tokens == 2 * 255 and r.usage.input_tokens_details.text_tokens == 3


def test_generate_url_points_at_the_image(client: OpenAI, server: RunningServer) -> None:
    r = client.images.generate(prompt="a lighthouse", response_format="url")
    assert r.data is not None and r.data[0].url is not None and r.data[0].b64_json is None
    assert r.data[0].url.startswith(server.url + "/api/image?")
    got = httpx.get(r.data[0].url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)  # the model's default size


def test_output_format_jpeg_gives_jpeg_bytes(client: OpenAI) -> None:
    r = client.images.generate(prompt="jpeg please", output_format="jpeg", output_compression=50)
    assert r.data is not None and r.output_format == "jpeg"
    assert base64.b64decode(r.data[0].b64_json or "")[:3] == b"\xff\xd8\xff"


def test_easel_knobs_in_metadata_and_at_top_level(client: OpenAI, server: RunningServer) -> None:
    meta = {"metadata": {"steps": 3, "seed": 1234, "note": "kept"}}
    client.images.generate(prompt="knobs", extra_body=meta)
    (job,) = jobs_tagged(server, meta)
    assert job["total_steps"] == 3 and job["seed"] == 1234
    meta2 = {"metadata": {"steps": 3, "note": "top-level wins"}, "steps": 5}
    client.images.generate(prompt="knobs", extra_body=meta2)
    assert jobs_tagged(server, meta2)[0]["total_steps"] == 5


def test_quality_is_a_fraction_of_recommended_steps(client: OpenAI, server: RunningServer) -> None:
    meta = tag()
    client.images.generate(prompt="fast", quality="low", extra_body=meta)  # recommended_steps 2 -> 1
    assert jobs_tagged(server, meta)[0]["total_steps"] == 1


def test_size_not_a_multiple_of_16_is_a_400_that_suggests_one(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", size="500x500")
    assert "multiple of 16" in exc.value.message and "496x496" in exc.value.message


def test_unknown_fields_from_the_sdk_are_ignored(client: OpenAI) -> None:
    r = client.images.generate(prompt="x", moderation="low", background="opaque", user="u", extra_body={"style": "vivid"})
    assert r.data is not None and r.background == "opaque"


# --- edits --------------------------------------------------------------------------------

def test_edit_with_two_images_multipart_as_the_sdk_sends_it(client: OpenAI, server: RunningServer) -> None:
    meta = tag()
    files = [("a.png", png(), "image/png"), ("b.png", png(color=(0, 0, 255)), "image/png")]
    r = client.images.edit(image=files, prompt="merge them", size="64x128", extra_body=meta)
    assert r.data is not None and decode(r.data[0].b64_json).size == (64, 128)
    assert r.usage is not None and r.usage.input_tokens_details.image_tokens == 2 * 255
    (job,) = jobs_tagged(server, meta)
    assert job["task"] == "edit" and job["status"] == "done"


def test_edit_with_a_single_file(client: OpenAI) -> None:
    r = client.images.edit(image=("a.png", png(), "image/png"), prompt="bluer", n=2)
    assert r.data is not None and len(r.data) == 2


DATA_URL = "data:image/png;base64," + base64.b64encode(png()).decode()


@pytest.mark.parametrize("ref", [{"name": "input.png", "data_url": DATA_URL}, {"image_url": DATA_URL}, DATA_URL],
                         ids=["seed-000", "openai-image_url", "bare-data-url"])
def test_edit_as_json_with_images(server: RunningServer, ref: Any) -> None:
    body = {"prompt": "remove the text", "size": "64x64", "n": 1, "metadata": {"steps": 2, "guidance": 1.0},
            "images": [ref]}
    r = server.client.post("/v1/images/edits", json=body)
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).size == (64, 64)


def test_edit_without_images_says_how_to_send_them(server: RunningServer) -> None:
    r = server.client.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_json_file_ids_are_refused_with_what_to_send(server: RunningServer) -> None:
    r = server.client.post("/v1/images/edits", json={"prompt": "x", "images": [{"file_id": "file-123"}]})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_a_mask_that_keeps_every_pixel_is_a_400(client: OpenAI) -> None:
    # an opaque mask without transparent pixels marks nothing to edit (masked edits: tests/test_masks.py)
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(image=("a.png", png(), "image/png"), mask=("m.png", png(color=(0, 0, 0)), "image/png"), prompt="x")
    assert "keeps every pixel" in exc.value.message


# --- streaming ---------------------------------------------------------------------------

def test_stream_yields_partial_images_then_completed(slow_client: OpenAI) -> None:
    stream = slow_client.images.generate(prompt="a slow fox", stream=True, partial_images=2, extra_body={"steps": 6})
    events = list(stream)
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(decode(e.b64_json).size == (64, 64) for e in events)
    assert events[-1].usage.output_tokens == 255


def test_edit_stream_uses_image_edit_events(slow_client: OpenAI) -> None:
    events = list(slow_client.images.edit(image=("a.png", png(), "image/png"), prompt="x", stream=True,
                                             partial_images=1, extra_body={"steps": 4}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_stream_of_a_failing_job_raises(client: OpenAI) -> None:
    with pytest.raises(openai.APIError, match="asked to fail"):
        list(client.images.generate(prompt="fail", stream=True, partial_images=1))


# --- models and errors ---------------------------------------------------------------------

def test_models_list_shows_loaded_models(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["stub"]
    assert models.data[0].owned_by == "easel"


def test_unknown_model_raises_not_found_naming_the_models(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.images.generate(prompt="x", model="dall-e-9")
    assert "unknown model 'dall-e-9'" in exc.value.message and "stub" in exc.value.message


def test_failing_job_is_a_500_and_the_sdk_does_not_retry(client: OpenAI, server: RunningServer) -> None:
    meta = tag()
    with pytest.raises(openai.InternalServerError) as exc:
        client.images.generate(prompt="fail", extra_body=meta)
    assert "asked to fail" in exc.value.message
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert [j["status"] for j in jobs_tagged(server, meta)] == ["error"]  # exactly one job: no retries


def test_bad_api_key_is_a_401(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory({**stub_settings(), "auth": {"api_keys": ["secret"], "admin_keys": []}})
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=srv.url + "/v1", api_key="wrong").images.generate(prompt="x")
    r = OpenAI(base_url=srv.url + "/v1", api_key="secret").images.generate(prompt="x")
    assert r.data is not None


def test_oversized_body_is_a_413(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory({**stub_settings(), "limits": {"max_body_mib": 1}})
    client = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        client.images.edit(image=("big.png", b"x" * (2 * 2**20), "image/png"), prompt="x")
    assert exc.value.status_code == 413


def test_a_caller_that_disconnects_cancels_its_job(slow_server: RunningServer) -> None:
    meta = tag()
    body = {"prompt": "nobody waits for this", "size": "256x256", "steps": 50, **meta}  # ~40 s of stub time
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/images/generations", json=body, timeout=1.0)
    (job,) = jobs_tagged(slow_server, meta)
    st = slow_server.client.get("/api/status", params={"task_id": job["task_id"], "wait": 20, "since": "running"}).json()
    assert st["status"] == "cancelled", st


def test_a_stream_reader_that_hangs_up_cancels_its_job(slow_server: RunningServer) -> None:
    meta = tag()
    body = {"prompt": "read one partial, then leave", "size": "128x128", "steps": 20, "stream": True, "partial_images": 3, **meta}
    with httpx.stream("POST", slow_server.url + "/v1/images/generations", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "event: image_generation.partial_image":
                break
    (job,) = jobs_tagged(slow_server, meta)
    st = slow_server.client.get("/api/status", params={"task_id": job["task_id"], "wait": 20, "since": "running"}).json()
    assert st["status"] == "cancelled", st


# --- honest answers: background, input_fidelity, usage, x-request-id -------------------------

def test_transparent_background_is_refused_and_opaque_or_auto_accepted(client: OpenAI) -> None:
    for call in (lambda: client.images.generate(prompt="x", background="transparent"),
                 lambda: client.images.edit(image=("a.png", png(), "image/png"), prompt="x", background="transparent")):
        with pytest.raises(openai.BadRequestError) as exc:
            call()
        assert exc.value.param == "background" and "does not matte" in exc.value.message  # type: ignore[attr-defined]
    for background in ("opaque", "auto"):
        r = client.images.generate(prompt="x", background=background)  # type: ignore[arg-type]
        assert r.background == "opaque"


def test_input_fidelity_is_accepted_and_checked(client: OpenAI) -> None:
    r = client.images.edit(image=("a.png", png(), "image/png"), prompt="x", input_fidelity="high")
    assert r.data is not None
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(image=("a.png", png(), "image/png"), prompt="x", extra_body={"input_fidelity": "max"})
    assert "input_fidelity" in exc.value.message


def test_usage_counts_reference_images_by_their_tiles(client: OpenAI) -> None:
    r = client.images.edit(image=("wide.png", png(600, 100), "image/png"), prompt="two words", size="64x64")
    assert r.usage is not None
    details = r.usage.input_tokens_details
    assert (details.text_tokens, details.image_tokens, r.usage.output_tokens) == (2, 85 + 2 * 170, 255)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_every_openai_response_carries_x_request_id(client: OpenAI, server: RunningServer) -> None:
    meta = tag()
    raw = client.images.with_raw_response.generate(prompt="with an id", extra_body=meta)
    (job,) = jobs_tagged(server, meta)
    assert raw.headers["x-request-id"] == job["task_id"] == raw.parse()._request_id  # type: ignore[attr-defined]
    # a job that failed: the error names its job
    meta = tag()
    with pytest.raises(openai.InternalServerError) as failed:
        client.images.generate(prompt="fail", extra_body=meta)
    assert failed.value.request_id == jobs_tagged(server, meta)[0]["task_id"]
    # refused before any job exists: a fresh id each time
    ids = set()
    for _ in range(2):
        with pytest.raises(openai.NotFoundError) as missing:
            client.images.generate(prompt="x", model="nope")
        assert missing.value.request_id and missing.value.request_id.startswith("req_")
        ids.add(missing.value.request_id)
    assert len(ids) == 2
    # the stream
    meta = tag()
    body = {"prompt": "streamed", "stream": True, **meta}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=30) as r:
        rid = r.headers["x-request-id"]
        r.read()
    assert rid == jobs_tagged(server, meta)[0]["task_id"]


def test_a_401_carries_x_request_id_too(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory({**stub_settings(), "auth": {"api_keys": ["secret"], "admin_keys": []}})
    with pytest.raises(openai.AuthenticationError) as exc:
        OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    assert exc.value.request_id and exc.value.request_id.startswith("req_")


def test_openapi_documents_the_shim(server: RunningServer) -> None:
    doc = server.client.get("/openapi.json").json()
    assert "/v1/images/generations" in doc["paths"] and "/v1/images/edits" in doc["paths"]
    assert "OpenAIImageRequest" in doc["components"]["schemas"]
    assert "OpenAIImagesResponse" in doc["components"]["schemas"]
