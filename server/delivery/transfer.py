"""Fetch reference images, PUT results to presigned URLs, POST webhooks.

Every request goes through ``client.make_client`` (SSRF-guarded at connect time),
is bounded by ``cfg.timeout_seconds`` per attempt (a total deadline, not just per
read) and, for downloads, by ``cfg.max_download_mib``.

Interface (all ``async``; ``client`` is optional — pass one from ``make_client`` to
reuse connections across several calls, or leave it out for a one-off client):

* ``fetch_image(url, cfg, *, client=None, field="image url") -> bytes`` — GET,
  redirects followed (each hop vetted), body size-capped and checked to decode as
  an image with PIL.  Raises ``UnsafeURL`` or ``FetchError`` (both ``ValueError``;
  map them to a 4xx at submit time).
* ``put_upload(url, data, content_type, cfg, *, client=None) -> DeliveryOutcome``
* ``post_webhook(url, payload, cfg, *, client=None, msg_id=None) -> DeliveryOutcome``
  — signed by the Standard Webhooks scheme when ``cfg.webhook_secret`` is set:
  ``webhook-id`` (``msg_id``, the same on every retry), ``webhook-timestamp``
  (each attempt's) and ``webhook-signature: v1,<base64 HMAC-SHA256 of
  "{id}.{timestamp}.{body}">``, which receivers check with any Standard Webhooks
  library (``standardwebhooks.Webhook(secret).verify(body, headers)``).
  Both never raise for delivery failures: they retry ``cfg.retries`` times on
  5xx, 429, timeouts and connection errors (delay ``cfg.backoff_seconds`` doubled
  each retry, at least the server's ``Retry-After``), never on other statuses or
  a refused (unsafe) address, and report the result in a ``DeliveryOutcome``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread
import httpx
import msgspec
from PIL import Image, UnidentifiedImageError

from ..config import DeliveryConfig, webhook_key
from .client import make_client
from .ssrf import UnsafeURL, parse_target, redact

MIB = 1024 * 1024
MAX_DELAY_SECONDS = 60.0
ERROR_EXCERPT_BYTES = 1024


class FetchError(ValueError):
    """A URL that did not yield a usable image; the message says what to fix."""


@dataclass(frozen=True)
class DeliveryOutcome:
    """What happened to one upload or webhook."""

    ok: bool
    attempts: int
    status: int | None = None  # the last HTTP status; None when no response came
    error: str | None = None  # a sentence for the job's status when not ok
    seconds: float = 0.0  # wall time, retries and back-off included


@asynccontextmanager
async def _client_for(cfg: DeliveryConfig, client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    if client is not None:
        yield client
        return
    async with make_client(cfg) as owned:
        yield owned


async def _read_upto(resp: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether that was all of it (the
    rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], False
    return b"".join(chunks), True


def _check_image(data: bytes, subject: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError, EOFError) as exc:
        raise FetchError(f"{subject} is not an image PIL can decode ({exc})") from None


async def fetch_image(
    url: str, cfg: DeliveryConfig, *, client: httpx.AsyncClient | None = None, field: str = "image url"
) -> bytes:
    """Download an image (at most ``cfg.max_download_mib``) and check it decodes."""
    parse_target(url, field)
    subject = f"{field} ({redact(url)})"
    limit = cfg.max_download_mib * MIB
    try:
        async with _client_for(cfg, client) as http:
            with anyio.fail_after(cfg.timeout_seconds):
                async with http.stream("GET", url, follow_redirects=True) as resp:
                    if resp.status_code != 200:
                        raise FetchError(f"{subject} answered HTTP {resp.status_code}; check that the URL is public and current")
                    declared = resp.headers.get("content-length", "")
                    too_big = declared.isdigit() and int(declared) > limit
                    data, complete = (b"", False) if too_big else await _read_upto(resp, limit)
    except UnsafeURL as exc:
        raise UnsafeURL(f"{subject}: {exc}") from None
    except TimeoutError:
        raise FetchError(f"{subject} did not deliver within {cfg.timeout_seconds:g} s (delivery.timeout_seconds)") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{subject} could not be downloaded: {exc or type(exc).__name__}") from None
    if not complete:
        raise FetchError(f"{subject} is larger than {cfg.max_download_mib} MiB (delivery.max_download_mib)")
    await anyio.to_thread.run_sync(_check_image, data, subject)
    return data


def _excerpt(body: bytes) -> str:
    """A short reason from an error body; S3-style XML errors become "Code: Message"."""
    text = re.sub(r"\s+", " ", body[:ERROR_EXCERPT_BYTES].decode("utf-8", "replace")).strip()
    parts = [m.group(1) for tag in ("Code", "Message") if (m := re.search(rf"<{tag}>([^<]*)</{tag}>", text))]
    text = ": ".join(parts) or text
    return f" ({text[:300]})" if text else ""


def _retry_after(resp: httpx.Response) -> float:
    value = resp.headers.get("retry-after", "")
    return float(value) if value.isdigit() else 0.0


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


Attempt = tuple[int | None, str | None, bool, float]  # status, error (None: 2xx), retryable, retry-after


async def _attempt(http: httpx.AsyncClient, method: str, url: str, cfg: DeliveryConfig, kwargs: dict[str, Any]) -> Attempt:
    """One request and how it went."""
    try:
        with anyio.fail_after(cfg.timeout_seconds):
            async with http.stream(method, url, **kwargs) as resp:
                if resp.is_success:
                    return resp.status_code, None, False, 0.0
                body, _ = await _read_upto(resp, ERROR_EXCERPT_BYTES)
    except TimeoutError:
        return None, f"no answer within {cfg.timeout_seconds:g} s", True, 0.0
    except httpx.TransportError as exc:
        return None, f"connection failed ({exc or type(exc).__name__})", True, 0.0
    status = resp.status_code
    note = " (redirects are not followed)" if resp.is_redirect else _excerpt(body)
    return status, f"HTTP {status}{note}", _retryable(status), _retry_after(resp)


async def _deliver(
    what: str,
    method: str,
    url: str,
    cfg: DeliveryConfig,
    client: httpx.AsyncClient | None,
    kwargs: dict[str, Any] | Callable[[], dict[str, Any]],
) -> DeliveryOutcome:
    """Send with the retry policy; ``what`` names the action in error messages;
    ``kwargs`` may be a function, called for each attempt (fresh signatures)."""
    start = time.monotonic()
    subject = f"{what} to {redact(url)}"
    status: int | None = None
    error = "not attempted"
    attempt = 0
    try:
        parse_target(url, what)
        async with _client_for(cfg, client) as http:
            for attempt in range(1, cfg.retries + 2):
                request = kwargs() if callable(kwargs) else kwargs
                status, failure, retryable, retry_after = await _attempt(http, method, url, cfg, request)
                if failure is None:
                    return DeliveryOutcome(True, attempt, status, None, time.monotonic() - start)
                error = failure
                if not retryable or attempt > cfg.retries:
                    break
                delay = max(cfg.backoff_seconds * 2 ** (attempt - 1), retry_after)
                await anyio.sleep(min(delay, MAX_DELAY_SECONDS))
    except UnsafeURL as exc:
        return DeliveryOutcome(False, attempt, None, f"{subject} was not sent: {exc}", time.monotonic() - start)
    tries = f"{attempt} attempt{'s' if attempt != 1 else ''}"
    return DeliveryOutcome(False, attempt, status, f"{subject} failed after {tries}: {error}", time.monotonic() - start)


async def put_upload(
    url: str, data: bytes, content_type: str, cfg: DeliveryConfig, *, client: httpx.AsyncClient | None = None
) -> DeliveryOutcome:
    """PUT ``data`` to a presigned URL.  ``content_type`` must be the one the URL was
    signed for (S3 answers 403 SignatureDoesNotMatch otherwise)."""
    outcome = await _deliver("upload", "PUT", url, cfg, client, {"content": data, "headers": {"Content-Type": content_type}})
    if outcome.status == 403:
        hint = f". The presigned URL may have expired, or was signed for a Content-Type other than {content_type}"
        return replace(outcome, error=f"{outcome.error}{hint}")
    return outcome


async def post_webhook(
    url: str,
    payload: Mapping[str, Any],
    cfg: DeliveryConfig,
    *,
    client: httpx.AsyncClient | None = None,
    msg_id: str | None = None,
) -> DeliveryOutcome:
    """POST ``payload`` as JSON (msgspec-encoded: Structs and dataclasses are fine),
    signed when ``cfg.webhook_secret`` is set (see the module docstring)."""
    body = msgspec.json.encode(payload)
    if cfg.webhook_secret is None:  # unsigned: the id still lets a receiver drop a duplicate
        headers = {"Content-Type": "application/json", **({"webhook-id": msg_id} if msg_id else {})}
        return await _deliver("webhook", "POST", url, cfg, client, {"content": body, "headers": headers})
    key = webhook_key(cfg.webhook_secret)
    ident = msg_id or f"msg_{uuid.uuid4().hex}"

    def signed() -> dict[str, Any]:
        return {"content": body, "headers": {"Content-Type": "application/json", **webhook_headers(key, ident, body)}}

    return await _deliver("webhook", "POST", url, cfg, client, signed)


def webhook_headers(key: bytes, msg_id: str, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed now (https://www.standardwebhooks.com)."""
    ts = str(int(time.time()))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": "v1," + base64.b64encode(mac).decode()}
