"""Outbound delivery: SSRF-guarded downloads, presigned uploads and webhooks.

How the core uses it:

* at submit time, ``validate_url(url, settings.delivery.allowed_hosts, field)``
  for every ``upload_urls[i]``, ``webhook_url`` and reference-image URL (in a
  thread: it resolves DNS); ``UnsafeURL`` -> 400;
* before enqueueing, ``await fetch_image(url, cfg, field=...)`` for references
  given as ``{url}``; ``UnsafeURL``/``FetchError`` -> 400;
* after a job's images are encoded, ``await put_upload(...)`` per image and
  ``await post_webhook(...)`` once; record each ``DeliveryOutcome`` on the job.
"""

from __future__ import annotations

from .client import make_client
from .ssrf import UnsafeURL, validate_url
from .transfer import DeliveryOutcome, FetchError, fetch_image, post_webhook, put_upload

__all__ = [
    "DeliveryOutcome",
    "FetchError",
    "UnsafeURL",
    "fetch_image",
    "make_client",
    "post_webhook",
    "put_upload",
    "validate_url",
]
