"""Uploads and webhooks: the retry policy and what the receiver gets."""

from __future__ import annotations

import json
import time

import anyio
import pytest

from server.config import DeliveryConfig
from server.delivery import post_webhook, put_upload
from tests.loopback_http import LoopbackServer, Reply, closed_port

FAST = {"backoff_seconds": 0.01}


def cfg_for(*hosts: str, **kw: float) -> DeliveryConfig:
    return DeliveryConfig(allowed_hosts=list(hosts), **{**FAST, **kw})  # type: ignore[arg-type]


def test_upload_succeeds_after_two_503s() -> None:
    with LoopbackServer([Reply(503), Reply(503), Reply(200)]) as srv:
        outcome = anyio.run(put_upload, srv.url("/k.png"), b"PNGDATA", "image/png", cfg_for(srv.host_port))
    assert outcome.ok and outcome.attempts == 3 and outcome.status == 200 and outcome.error is None
    assert [r.method for r in srv.requests] == ["PUT"] * 3
    assert all(r.body == b"PNGDATA" and r.headers["content-type"] == "image/png" for r in srv.requests)


def test_upload_is_not_retried_on_400_and_says_why() -> None:
    with LoopbackServer([Reply(400, b"<Error><Code>BadDigest</Code></Error>")]) as srv:
        outcome = anyio.run(put_upload, srv.url("/k.png?X-Amz-Signature=s3cr3t"), b"x", "image/png", cfg_for(srv.host_port))
    assert not outcome.ok and outcome.attempts == 1 and outcome.status == 400
    assert outcome.error is not None
    assert "HTTP 400 (BadDigest)" in outcome.error and "after 1 attempt:" in outcome.error
    assert "s3cr3t" not in outcome.error
    assert len(srv.requests) == 1


def test_429_is_retried() -> None:
    with LoopbackServer([Reply(429, headers={"Retry-After": "0"}), Reply(204)]) as srv:
        outcome = anyio.run(post_webhook, srv.url("/hook"), {"a": 1}, cfg_for(srv.host_port))
    assert outcome.ok and outcome.attempts == 2 and outcome.status == 204


def test_retries_stop_after_configured_count() -> None:
    with LoopbackServer([Reply(500)]) as srv:
        outcome = anyio.run(post_webhook, srv.url("/hook"), {}, cfg_for(srv.host_port, retries=2))
    assert not outcome.ok and outcome.attempts == 3 and outcome.status == 500
    assert outcome.error is not None and "after 3 attempts: HTTP 500" in outcome.error


def test_backoff_doubles_between_attempts() -> None:
    with LoopbackServer([Reply(503), Reply(503), Reply(200)]) as srv:
        start = time.monotonic()
        outcome = anyio.run(put_upload, srv.url("/k"), b"x", "image/png", cfg_for(srv.host_port, backoff_seconds=0.1))
        elapsed = time.monotonic() - start
    assert outcome.ok and outcome.attempts == 3
    assert elapsed >= 0.3  # 0.1 + 0.2


def test_connection_errors_are_retried() -> None:
    port = closed_port()
    outcome = anyio.run(post_webhook, f"http://127.0.0.1:{port}/hook", {}, cfg_for(f"127.0.0.1:{port}", retries=1))
    assert not outcome.ok and outcome.attempts == 2 and outcome.status is None
    assert outcome.error is not None and "connection failed" in outcome.error


def test_timeouts_are_retried() -> None:
    with LoopbackServer([Reply(200, delay=0.5), Reply(200)]) as srv:
        outcome = anyio.run(post_webhook, srv.url("/hook"), {}, cfg_for(srv.host_port, timeout_seconds=0.2))
    assert outcome.ok and outcome.attempts == 2


def test_redirect_is_not_followed_for_uploads() -> None:
    with LoopbackServer([Reply(307, headers={"Location": "http://169.254.169.254/"})]) as srv:
        outcome = anyio.run(put_upload, srv.url("/k"), b"x", "image/png", cfg_for(srv.host_port))
    assert not outcome.ok and outcome.attempts == 1
    assert outcome.error is not None and "redirects are not followed" in outcome.error


def test_webhook_receiver_gets_the_json_payload() -> None:
    payload = {"task_id": "abc", "status": "done", "images": [{"index": 0, "url": "https://x/y.png"}], "metadata": {"k": 1}}
    with LoopbackServer([Reply(200)]) as srv:
        outcome = anyio.run(post_webhook, srv.url("/hook"), payload, cfg_for(srv.host_port))
    assert outcome.ok and outcome.attempts == 1
    (request,) = srv.requests
    assert request.method == "POST" and request.path == "/hook"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == payload


def test_webhook_to_unlisted_loopback_is_not_sent() -> None:
    with LoopbackServer([Reply(200)]) as srv:
        outcome = anyio.run(post_webhook, srv.url("/hook"), {"a": 1}, cfg_for())
    assert not outcome.ok and outcome.status is None
    assert outcome.error is not None and "was not sent" in outcome.error and "delivery.allowed_hosts" in outcome.error
    assert srv.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url"])
def test_bad_scheme_is_not_attempted(url: str) -> None:
    outcome = anyio.run(post_webhook, url, {}, cfg_for())
    assert not outcome.ok and outcome.attempts == 0
    assert outcome.error is not None and "http://" in outcome.error
