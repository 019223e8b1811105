"""What a request is refused for before any work: a body over ``limits.max_body_mib``
(server/bodylimit.py: declared or streamed, JSON or multipart) and LoRA names that
are not an adapter in the model's ``lora_dir`` (server/build.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .servers import RunningServer, stub_settings

pytestmark = pytest.mark.timeout(120)
MIB = 2**20


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    (root / "style.safetensors").write_bytes(b"\0" * 16)  # a weight file directly inside
    (root / "trained").mkdir()  # a folder as training writes it
    (root / "trained" / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 16)
    return root


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer], lora_dir: Path) -> RunningServer:
    settings = stub_settings(lora_dir=str(lora_dir))
    settings["limits"] = {"max_body_mib": 1}
    return server_factory(settings)


def assert_413(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "payload_too_large" and "limits.max_body_mib" in error["message"], error


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body of ``total`` bytes sent chunked (no Content-Length)."""
    yield b'{"prompt": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


@pytest.mark.parametrize("path", ["/api/generate", "/v1/images/generations", "/api/load", "/api/cancel"])
def test_a_declared_length_over_the_limit_is_413_before_reading(server: RunningServer, path: str) -> None:
    r = server.client.post(path, content=b"{" + b" " * (2 * MIB) + b"}", headers={"content-type": "application/json"})
    assert_413(r)


def test_a_streamed_body_that_grows_past_the_limit_is_413(server: RunningServer) -> None:
    r = server.client.post("/api/generate", content=chunks(2 * MIB), headers={"content-type": "application/json"})
    assert_413(r)
    small = server.client.post("/api/generate", content=chunks(1024, 256), headers={"content-type": "application/json"})
    assert small.is_success, small.text  # a chunked body within the limit is fine


def test_multipart_over_the_limit_is_413_declared_and_streamed(server: RunningServer) -> None:
    files = {"image": ("big.png", b"\0" * (2 * MIB), "image/png")}
    assert_413(server.client.post("/api/edit", data={"prompt": "x"}, files=files))
    assert_413(server.client.post("/v1/images/edits", data={"prompt": "x"}, files=files))
    boundary = "easelboundary"

    def form() -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
        for _ in range(40):
            yield b"\0" * (64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = server.client.post("/api/edit", content=form(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_413(r)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("../../etc/passwd", "not a name inside"),
        ("/etc/passwd", "not a name inside"),
        ("sub/style", "not a name inside"),
        ("..\\style", "not a name inside"),
        ("..", "not a name inside"),
        ("", "not a name inside"),
        ("a" * 300, "LoRA"),  # longer than a file name may be
        ("nope", "not found"),
    ],
)
def test_a_lora_that_names_no_adapter_in_lora_dir_is_400(server: RunningServer, name: str, says: str) -> None:
    r = server.client.post("/api/generate", json={"prompt": "x", "loras": [{"name": name}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "loras" and says in error["message"], error


@pytest.mark.parametrize("name", ["style", "style.safetensors", "trained"])
def test_a_lora_in_lora_dir_is_accepted(server: RunningServer, name: str) -> None:
    r = server.client.post("/api/generate", json={"prompt": "x", "loras": [{"name": name, "scale": 0.5}]})
    assert r.is_success, r.text
