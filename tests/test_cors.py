"""``http.cors_origins``: preflights and responses carry CORS headers for the listed
origins only, preflights need no API key, and nothing changes when it is unset."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.config import ConfigError, load_settings

from .servers import RunningServer, stub_settings

APP = "http://app.example:8080"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}


@pytest.fixture(scope="module")
def listed(server_factory: Callable[..., RunningServer]) -> RunningServer:
    settings = stub_settings()
    settings["http"] = {"cors_origins": [APP, "null"]}
    settings["auth"] = {"api_keys": ["user-key"]}
    return server_factory(settings)


def test_a_preflight_from_a_listed_origin_passes_without_a_key(listed: RunningServer) -> None:
    r = listed.client.options("/api/generate", headers={"Origin": APP, **PREFLIGHT})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP
    allowed = r.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("authorization", "content-type", "idempotency-key", "last-event-id"))
    assert "POST" in r.headers["access-control-allow-methods"] and "DELETE" in r.headers["access-control-allow-methods"]


def test_responses_carry_the_headers_even_a_401(listed: RunningServer) -> None:
    c = listed.client
    refused = c.post("/api/generate", json={"prompt": "x"}, headers={"Origin": APP})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP
    ok = c.post("/api/generate", json={"prompt": "x"}, headers={"Origin": APP, "Authorization": "Bearer user-key"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
    assert "retry-after" in ok.headers["access-control-expose-headers"].lower()


def test_file_pages_need_an_explicit_null_and_other_origins_get_nothing(listed: RunningServer) -> None:
    c = listed.client
    assert c.options("/api/status", headers={"Origin": "null", **PREFLIGHT}).headers["access-control-allow-origin"] == "null"
    evil = c.options("/api/generate", headers={"Origin": "http://evil.example", **PREFLIGHT})
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "http://evil.example"}).headers


def test_a_star_allows_every_origin_file_pages_included(server_factory: Callable[..., RunningServer]) -> None:
    settings = stub_settings()
    settings["http"] = {"cors_origins": ["*"]}
    c = server_factory(settings).client
    for origin in ("http://anywhere.example", "null"):
        r = c.options("/api/generate", headers={"Origin": origin, **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", origin)
        assert c.get("/api/tasks", headers={"Origin": origin}).headers["access-control-allow-origin"] == "*"


def test_unset_means_same_origin_only(server_factory: Callable[..., RunningServer]) -> None:
    c = server_factory(stub_settings()).client
    r = c.options("/api/generate", headers={"Origin": APP, **PREFLIGHT})
    assert r.status_code == 404 and "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in c.get("/api/tasks", headers={"Origin": APP}).headers


@pytest.mark.parametrize("origin", ["http://app.example/", "app.example", "http://app.example/path"])
def test_a_malformed_origin_stops_start_up(origin: str) -> None:
    with pytest.raises(ConfigError, match="http.cors_origins"):
        load_settings(overrides={"http": {"cors_origins": [origin]}})
