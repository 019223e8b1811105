"""Delivery wired into the job flow: URL checks at submit, image URLs, uploads and
webhooks after a job ends.

``install(engine)`` sets:

* ``engine.fetch_url`` — ``{url}`` reference images, downloaded through the SSRF
  guard; a refused or failed download is a 400 naming the field;
* a submit check — ``upload_urls`` (one per output image) and ``webhook_url`` are
  validated against ``delivery.allowed_hosts`` (in a thread: DNS) before the job
  is queued; a refusal is a 400 naming the field and no job is created;
* a done hook — each image is PUT to its ``upload_urls[i]`` (``ImageResult.upload``
  reads ``pending`` until then, then ``ok`` or ``failed: <reason>``; a failed upload
  leaves the image fetchable), then the job's final status (the ``/api/status``
  shape, absolute image URLs) is POSTed to ``webhook_url`` (``Job.webhook``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import httpx
import msgspec

from ..errors import BadRequest
from ..jobs import PENDING, ImageResult, Job, JobStatus
from ..routes.common import job_status
from .client import make_client
from .ssrf import UnsafeURL, validate_url
from .transfer import FetchError, fetch_image, post_webhook, put_upload

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..engine import Engine

log = logging.getLogger("easel")
UNFINISHED = "failed: delivery was interrupted (server shutdown or an internal error; see the server log)"


def install(engine: Engine) -> Delivery:
    delivery = Delivery(engine)
    engine.fetch_url = delivery.fetch_url
    engine.submit_checks.append(delivery.check)
    engine.done_hooks.append(delivery.deliver)
    return delivery


def _first_unsafe(targets: Iterable[tuple[str, str]], allowed_hosts: list[str]) -> tuple[str, str] | None:
    """(field, reason) of the first URL ``validate_url`` refuses (blocking: DNS)."""
    for field, url in targets:
        try:
            validate_url(url, allowed_hosts, field)
        except UnsafeURL as exc:
            return field, str(exc)
    return None


class Delivery:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cfg = engine.settings.delivery

    async def fetch_url(self, url: str, field: str) -> bytes:
        try:
            return await fetch_image(url, self.cfg, field=field)
        except (UnsafeURL, FetchError) as exc:
            raise BadRequest(str(exc), param=field) from None

    async def check(self, job: Job) -> None:
        targets: list[tuple[str, str]] = []
        urls: list[str] | None = job.options.get("upload_urls")
        if urls is not None:
            if len(urls) != job.task_length:
                raise BadRequest(
                    f"upload_urls has {len(urls)} URL(s) but the job makes {job.task_length} image(s) "
                    "(prompts x n); send one presigned PUT URL per output image",
                    param="upload_urls",
                )
            targets += [(f"upload_urls[{i}]", url) for i, url in enumerate(urls)]
        webhook: str | None = job.options.get("webhook_url")
        if webhook is not None:
            targets.append(("webhook_url", webhook))
        if targets:
            refused = await anyio.to_thread.run_sync(_first_unsafe, targets, self.cfg.allowed_hosts)
            if refused is not None:
                raise BadRequest(refused[1], param=refused[0], code="url_not_allowed")
        if webhook is not None:
            job.webhook = PENDING

    def deliver(self, job: Job) -> Coroutine[Any, Any, None] | None:
        """Done hook: uploads first, then the webhook with the final status."""
        urls: list[str] = job.options.get("upload_urls") or []
        webhook: str | None = job.options.get("webhook_url")
        uploads = list(zip(job.results, urls, strict=False)) if job.status is JobStatus.DONE else []
        if not uploads and webhook is None:
            return None
        return self._deliver(job, uploads, webhook)

    async def _deliver(self, job: Job, uploads: list[tuple[ImageResult, str]], webhook: str | None) -> None:
        try:
            async with make_client(self.cfg) as http:
                await asyncio.gather(*(self._upload(http, job, result, url) for result, url in uploads))
                if webhook is not None:
                    await self._webhook(http, job, webhook)
        except Exception:
            log.exception("delivery of job %s failed", job.id)
        finally:  # never leave a state at pending
            for result in job.results:
                if result.upload == PENDING:
                    result.upload = UNFINISHED
            if job.webhook == PENDING:
                job.webhook = UNFINISHED
            job.touch()

    async def _upload(self, http: httpx.AsyncClient, job: Job, result: ImageResult, url: str) -> None:
        data = result.data
        if data is None:
            result.upload = "failed: the image was deleted (delete=true) or evicted before it could be uploaded"
        else:
            outcome = await put_upload(url, data, result.media_type, self.cfg, client=http)
            result.upload = "ok" if outcome.ok else f"failed: {outcome.error}"
        log.info("job %s image %d upload: %s", job.id, result.index, result.upload)
        job.touch()

    async def _webhook(self, http: httpx.AsyncClient, job: Job, url: str) -> None:
        engine = self.engine
        base_url = job.base_url or f"http://{engine.settings.host}:{engine.settings.port}/"
        payload = msgspec.structs.replace(job_status(engine, job, base_url), webhook=None)
        outcome = await post_webhook(url, msgspec.to_builtins(payload), self.cfg, client=http, msg_id=f"msg_{job.id}")
        job.webhook = "ok" if outcome.ok else f"failed: {outcome.error}"
        log.info("job %s webhook: %s", job.id, job.webhook)
