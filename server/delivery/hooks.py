"""Delivery wired into the job flow: URL checks at submit, uploads and webhooks
after a job ends.

* ``fetch_url`` — ``{url}`` reference images, downloaded through the SSRF guard;
  a refused or failed download is a 400 naming the field;
* ``check`` (a submit check of the service) — ``upload_urls`` (one per output
  image) and ``webhook_url`` are validated against ``delivery.allowed_hosts`` (in
  a thread: DNS) before the job is queued; a refusal is a 400 naming the field and
  no job is created;
* ``deliver`` (the runner's last step) — each image is PUT to its ``upload_urls[i]``
  (``ImageResult.upload`` reads ``pending`` until then, then ``ok`` or ``failed:
  <reason>``; a failed upload leaves the image fetchable), then the job's final
  status (the ``/api/status`` shape, absolute image URLs) is POSTed to
  ``webhook_url`` (``JobRecord.webhook``).  At least once: a worker lost between
  the job's end and its webhook is not retried, but a re-run job posts again with
  the same ``webhook-id``, which receivers use to drop the duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import anyio.to_thread
import httpx
import msgspec

from ..errors import BadRequest
from ..jobs import PENDING, ImageResult, JobRecord, JobStatus, result_key
from ..views import Signer, job_status
from .client import make_client
from .ssrf import UnsafeURL, validate_url
from .transfer import FetchError, fetch_image, post_webhook, put_upload

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..broker.base import Broker
    from ..config import Settings

log = logging.getLogger("easel")
UNFINISHED = "failed: delivery was interrupted (server shutdown or an internal error; see the server log)"


def _first_unsafe(targets: Iterable[tuple[str, str]], allowed_hosts: list[str]) -> tuple[str, str] | None:
    """(field, reason) of the first URL ``validate_url`` refuses (blocking: DNS)."""
    for field, url in targets:
        try:
            validate_url(url, allowed_hosts, field)
        except UnsafeURL as exc:
            return field, str(exc)
    return None


class Delivery:
    def __init__(self, settings: Settings, broker: Broker, sign: Signer | None = None) -> None:
        self.settings = settings
        self.broker = broker
        self.sign = sign  # image links in webhook payloads work without the key
        self.cfg = settings.delivery

    async def fetch_url(self, url: str, field: str) -> bytes:
        try:
            return await fetch_image(url, self.cfg, field=field)
        except (UnsafeURL, FetchError) as exc:
            raise BadRequest(str(exc), param=field) from None

    async def check(self, job: JobRecord) -> None:
        targets: list[tuple[str, str]] = []
        urls = job.upload_urls
        if urls is not None:
            if len(urls) != job.task_length:
                raise BadRequest(
                    f"upload_urls has {len(urls)} URL(s) but the job makes {job.task_length} image(s) "
                    "(prompts x n); send one presigned PUT URL per output image",
                    param="upload_urls",
                )
            targets += [(f"upload_urls[{i}]", url) for i, url in enumerate(urls)]
        if job.webhook_url is not None:
            targets.append(("webhook_url", job.webhook_url))
        if targets:
            refused = await anyio.to_thread.run_sync(_first_unsafe, targets, self.cfg.allowed_hosts)
            if refused is not None:
                raise BadRequest(refused[1], param=refused[0], code="url_not_allowed")
        if job.webhook_url is not None:
            job.webhook = PENDING

    async def deliver(self, job: JobRecord) -> None:
        """Uploads first, then the webhook with the final status."""
        job = await self.broker.get(job.id) or job  # as stored: a delete=true fetch may have come first
        urls = job.upload_urls or []
        uploads = list(zip(job.results, urls, strict=False)) if job.status is JobStatus.DONE else []
        results = list(job.results)
        webhook = job.webhook
        try:
            async with make_client(self.cfg) as http:
                outcomes = await asyncio.gather(*(self._upload(http, job, result, url) for result, url in uploads))
                for result, outcome in zip([r for r, _ in uploads], outcomes, strict=True):
                    results[result.index] = msgspec.structs.replace(result, upload=outcome)
                if uploads:
                    await self.broker.update(job, {"results": results})
                if job.webhook_url is not None:
                    webhook = await self._webhook(http, job, job.webhook_url)
        except Exception:
            log.exception("delivery of job %s failed", job.id)
        finally:  # never leave a state at pending
            fields: dict[str, object] = {}
            if any(r.upload == PENDING for r in results):
                fields["results"] = [msgspec.structs.replace(r, upload=UNFINISHED) if r.upload == PENDING else r for r in results]
            if webhook == PENDING:
                fields["webhook"] = UNFINISHED
            if fields:
                try:
                    await self.broker.update(job, fields)
                except Exception:
                    log.exception("job %s: could not record the delivery outcome", job.id)

    async def _upload(self, http: httpx.AsyncClient, job: JobRecord, result: ImageResult, url: str) -> str:
        data = None if result.gone else await self.broker.get_blob(result_key(job.id, result.index))
        if data is None:
            outcome = "failed: the image was deleted (delete=true) or evicted before it could be uploaded"
        else:
            sent = await put_upload(url, data, result.media_type, self.cfg, client=http)
            outcome = "ok" if sent.ok else f"failed: {sent.error}"
        log.info("job %s image %d upload: %s", job.id, result.index, outcome)
        return outcome

    async def _webhook(self, http: httpx.AsyncClient, job: JobRecord, url: str) -> str:
        job = await self.broker.get(job.id) or job  # with the upload outcomes
        base_url = job.base_url or self.settings.http.public_url or f"http://{self.settings.host}:{self.settings.port}/"
        payload = msgspec.structs.replace(job_status(job, base_url, sign=self.sign), webhook=None)
        outcome = await post_webhook(url, msgspec.to_builtins(payload), self.cfg, client=http, msg_id=f"msg_{job.id}")
        webhook = "ok" if outcome.ok else f"failed: {outcome.error}"
        await self.broker.update(job, {"webhook": webhook})
        log.info("job %s webhook: %s", job.id, webhook)
        return webhook
