"""Text a request carries, on both brokers: every text field has a length limit
(``limits``) and a 400 names the field and the limit; bytes that are not UTF-8,
NUL characters, lone surrogates, overlong numbers and deep nesting are a 400
naming the field, in JSON, form and query alike, never a 500 and never stored
garbled."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .servers import RunningServer
from .test_api import wait_done

MAX_PROMPT = 32_000
JSON_ROUTES = ["/api/generate", "/api/edit", "/v1/images/generations", "/v1/images/edits"]


def refused(r: Any, param: str | None, code: str) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error.get("param") == param, error
    assert error.get("code") == code, error
    return error


def raw_json(srv: RunningServer, path: str, body: bytes) -> Any:
    return srv.client.post(path, content=body, headers={"Content-Type": "application/json"})


# ----- limits on text ------------------------------------------------------------


def test_a_prompt_at_the_limit_runs_and_one_over_it_is_refused_naming_the_limit(server: RunningServer) -> None:
    r = server.client.post("/api/generate", json={"prompt": "x" * (MAX_PROMPT + 1)})
    error = refused(r, "prompt", "text_too_long")
    assert "32000" in error["message"] and "limits.max_prompt_chars" in error["message"]
    r = server.client.post("/api/generate", json={"prompt": "y" * MAX_PROMPT, "negative_prompt": "n" * MAX_PROMPT})
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    status = wait_done(server.client, task)
    assert status["images"][0]["prompt"] == "y" * MAX_PROMPT
    # the infotext written into the PNG stays bounded: the two prompts and a line of parameters
    png = server.client.get("/api/image", params={"task_id": task}).content
    info = server.client.post("/api/png-info", files={"image": ("a.png", png, "image/png")}).json()
    assert info["prompt"] == "y" * MAX_PROMPT
    assert len(info["parameters"]) < 2 * MAX_PROMPT + 1000


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "negative_prompt": "n" * (MAX_PROMPT + 1)}, "negative_prompt"),
        ({"prompts": ["a", "b" * (MAX_PROMPT + 1)]}, "prompts[1]"),
        ({"prompt": "a", "model": "m" * 10_000}, "model"),
        ({"prompt": "a", "webhook_url": "http://h/" + "p" * 10_000}, "webhook_url"),
        ({"prompt": "a", "loras": [{"name": "l" * 10_000}]}, "loras[0].name"),
        ({"prompt": "a", "metadata": {"notes": "z" * 300_000}}, "metadata"),
    ],
)
def test_every_text_field_has_a_limit(server: RunningServer, body: dict[str, Any], param: str) -> None:
    refused(server.client.post("/api/generate", json=body), param, "text_too_long")


def test_the_openai_routes_and_forms_have_the_same_limits(server: RunningServer) -> None:
    r = server.client.post("/v1/images/generations", json={"prompt": "x" * (MAX_PROMPT + 1)})
    refused(r, "prompt", "text_too_long")
    r = server.client.post("/api/generate", data={"prompt": "x" * (MAX_PROMPT + 1)}, files={"unused": ("u", b"", "text/plain")})
    refused(r, "prompt", "text_too_long")
    r = server.client.post("/v1/images/generations", json={"prompt": "a", "user": "u" * 10_000})
    refused(r, "user", "text_too_long")


# ----- bytes that are not text -------------------------------------------------------


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_bytes_that_are_not_utf8_in_a_json_body_are_a_400_naming_the_field(server: RunningServer, path: str) -> None:
    error = refused(raw_json(server, path, b'{"prompt": "caf\xe9 at dusk"}'), "prompt", "invalid_utf8")
    assert "UTF-8" in error["message"]


def test_bytes_that_are_not_utf8_in_a_form_field_are_refused_not_stored_garbled(server: RunningServer) -> None:
    files = {"prompt": (None, b"caf\xe9 at dusk"), "n": (None, b"1")}
    for path in ("/api/generate", "/v1/images/generations"):
        refused(server.client.post(path, files=files), "prompt", "invalid_utf8")
    # real UTF-8 in a form is kept exactly
    r = server.client.post("/api/generate", files={"prompt": (None, "café at dusk ☕".encode())})
    assert r.status_code == 200, r.text
    status = wait_done(server.client, r.json()["task_id"])
    assert status["images"][0]["prompt"] == "café at dusk ☕"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b'{"prompt": "a\\u0000b"}', "prompt", "invalid_text"),
        (b'{"prompt": "a", "metadata": {"k": "v\\u0000"}}', "metadata.k", "invalid_text"),
        (b'{"prompt": "\\ud800"}', "prompt", "invalid_text"),
        (b'{"prompt": "x\\udc00y"}', "prompt", "invalid_text"),
        (b'{"prompt": "a", "metadata": {"k": "\\ud83d"}}', "metadata", "invalid_text"),
        (b'{"prompt": "a", "priority": 100000000000000000000000000}', "priority", "invalid_value"),
        (b'{"prompt": "a", "seed": 100000000000000000000000000}', "seed", "invalid_value"),
        (b'{"prompt": "a", "n": 1' + b"0" * 400 + b"}", "n", "invalid_value"),
        (b'{"prompt": "a", "guidance": 1e999}', "guidance", "invalid_value"),
        (b'{"prompt": "a", "metadata": {"k": 1' + b"0" * 40 + b"}}", "metadata.k", "invalid_text"),
        (b'{"prompt": "a", "metadata": {"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", None, "too_deep"),
        (b'{"prompt": "a", "metadata": {"k": ' + b"[" * 100 + b"]" * 100 + b"}}", "metadata", "invalid_text"),
    ],
)
def test_nul_surrogates_overlong_numbers_and_deep_nesting_are_a_400(server: RunningServer, body: bytes, param: str | None, code: str) -> None:
    for path in ("/api/generate", "/v1/images/generations"):
        refused(raw_json(server, path, body), param, code)


@pytest.mark.parametrize(
    ("query", "param"),
    [(b"task_id=%FF%FE", "task_id"), (b"task_id=a%00b", "task_id"), (b"%ED%A0%80=1", None), (b"task_id=x&limit=%C0%AF", "limit")],
)
def test_a_query_that_is_not_utf8_or_holds_nul_is_a_400(server: RunningServer, query: bytes, param: str | None) -> None:
    for path in ("/api/status", "/api/image", "/api/tasks", "/v1/models"):
        r = server.client.get(path + "?" + query.decode())
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"].get("param") == param


def test_a_json_body_that_is_not_an_object_or_misses_a_field_says_so(server: RunningServer) -> None:
    error = refused(raw_json(server, "/api/generate", b"[1, 2]"), None, "invalid_value")
    assert "must be a JSON object" in error["message"] and "not valid JSON" not in error["message"]
    error = refused(raw_json(server, "/api/load", json.dumps({}).encode()), "model", "invalid_value")
    assert error["message"].startswith("model is required")
    error = refused(raw_json(server, "/api/generate", b'{"prompt": "a",}'), None, "invalid_json")
    assert "not valid JSON" in error["message"]
