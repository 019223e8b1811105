"""Image links easel hands out: a signed link fetches its one image and nothing
else (not another index, not delete=true), lasts auth.link_ttl_seconds, and its
base is http.public_url or the request's own Host; X-Forwarded-* counts only
from http.trusted_proxies."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from openai import OpenAI

from .servers import BROKERS, RunningServer, stub_settings
from .test_api import wait_done

ALICE = {"Authorization": "Bearer alice-key"}
AUTH = {"api_keys": [{"key": "alice-key", "name": "alice"}], "link_ttl_seconds": 120}


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    settings, args = broker_args({**stub_settings(), "auth": AUTH}, request.param)
    return server_factory(settings, *args)


def done_job(srv: RunningServer, n: int = 2) -> dict[str, Any]:
    r = srv.client.post("/api/generate", json={"prompt": "two foxes", "n": n}, headers=ALICE)
    assert r.status_code == 200, r.text
    with httpx.Client(base_url=srv.url, headers=ALICE, timeout=60) as alice:
        return wait_done(alice, r.json()["task_id"])


def test_a_signed_link_opens_its_own_index_only(srv: RunningServer) -> None:
    st = done_job(srv)
    first, second = st["images"][0]["url"], st["images"][1]["url"]
    assert httpx.get(first).status_code == 200 and httpx.get(second).status_code == 200
    assert httpx.get(first.replace("index=0", "index=1")).status_code == 401
    assert httpx.get(first + "&index=1").status_code == 401  # a second index: which one counts would be a guess
    assert httpx.get(first + f"&task_id={st['task_id']}").status_code == 401


def test_a_signed_link_cannot_delete_and_the_owners_key_can(srv: RunningServer) -> None:
    st = done_job(srv, n=1)
    url = st["images"][0]["url"]
    r = httpx.get(url + "&delete=true")
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "link_read_only" and r.json()["error"]["param"] == "delete"
    assert httpx.get(url).status_code == 200  # still there
    owner = httpx.get(url.split("&expires=")[0] + "&delete=true", headers=ALICE)
    assert owner.status_code == 200
    assert httpx.get(url).status_code == 410  # deleted by its owner


def test_the_link_lifetime_is_configurable(srv: RunningServer) -> None:
    url = done_job(srv, n=1)["images"][0]["url"]
    expires = int(parse_qs(urlparse(url).query)["expires"][0])
    assert abs(expires - (time.time() + AUTH["link_ttl_seconds"])) < 30  # not queue.result_ttl_seconds (3600)


def test_public_url_is_the_base_of_every_url_handed_out(server_factory: Callable[..., RunningServer]) -> None:
    settings = {**stub_settings(), "auth": AUTH, "http": {"public_url": "https://images.example.com/easel"}}
    srv = server_factory(settings)
    st = done_job(srv, n=1)
    url = st["images"][0]["url"]
    assert url.startswith("https://images.example.com/easel/api/image?task_id="), url
    spoofed = srv.client.get("/api/status", params={"task_id": st["task_id"]},
                             headers={**ALICE, "Host": "evil.example", "X-Forwarded-Host": "evil.example"})  # fmt: skip
    assert spoofed.json()["images"][0]["url"].startswith("https://images.example.com/easel/")
    client = OpenAI(base_url=srv.url + "/v1", api_key="alice-key")
    got = client.images.generate(prompt="x", response_format="url")
    assert got.data and (got.data[0].url or "").startswith("https://images.example.com/easel/api/image?")


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "proxy.example:8443", "X-Forwarded-For": "203.0.113.9"}


@pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8"], ["127.0.0.1"]])
def test_forwarded_headers_count_only_from_trusted_proxies(server_factory: Callable[..., RunningServer], trusted: list[str]) -> None:
    srv = server_factory({**stub_settings(), "http": {"trusted_proxies": trusted}})
    r = srv.client.post("/api/generate", json={"prompt": "a fox"})
    st = wait_done(srv.client, r.json()["task_id"])
    url = srv.client.get("/api/status", params={"task_id": st["task_id"]}, headers=FORWARDED).json()["images"][0]["url"]
    if "127.0.0.1" in trusted:  # the test's own address: a trusted proxy
        assert url.startswith("https://proxy.example:8443/api/image?"), url
    else:
        assert url.startswith(srv.url + "/api/image?"), url


def test_bad_proxy_and_public_url_settings_are_one_clean_line(server_factory: Callable[..., RunningServer]) -> None:
    for http, words in (({"trusted_proxies": ["nonsense"]}, "http.trusted_proxies"), ({"public_url": "ftp://x"}, "http.public_url")):
        with pytest.raises(RuntimeError) as err:
            server_factory({**stub_settings(), "http": http})
        assert words in str(err.value) and "Traceback" not in str(err.value)
