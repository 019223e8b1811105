"""Delivery wired into the job flow: URL checks at submit, uploads and webhooks
after a job ends.

* ``fetch_url`` — ``{url}`` reference images, downloaded through the SSRF guard;
  a refused or failed download is a 400 naming the field;
* ``check`` (a submit check of the service) — ``upload_urls`` (one per output
  image) and ``webhook_url`` are validated against ``delivery.allowed_hosts`` (in
  a thread: DNS) before the job is queued; a refusal is a 400 naming the field and
  no job is created;
* the outbox — every broker step that ends a job (done, error, cancelled, a missed
  deadline, lost twice) puts it in the broker's outbox when it has a webhook or
  uploads to deliver, in that same step; ``run`` delivers one entry: each pending
  image is PUT to its ``upload_urls[i]`` (``ImageResult.upload`` reads ``pending``
  until then, then ``ok`` or ``failed: <reason>``; a failed upload leaves the image
  fetchable), then the job's final status (the ``/api/status`` shape, absolute image
  URLs) is POSTed to ``webhook_url``.  ``JobRecord.webhook`` reads ``pending`` until
  the receiver took it (``ok``) or ``delivery.give_up_seconds`` passed
  (``failed: <reason>``); a failed POST stays in the outbox and is tried again, by
  any node (``outbox.Outbox`` drains it).  ``deliver`` is the worker's last step: the
  job it just finished, delivered at once unless a drainer has it.  At least once,
  with one ``webhook-id`` per job, which receivers use to drop duplicates.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import anyio.to_thread
import httpx
import msgspec

from ..broker.base import BrokerUnavailable
from ..errors import BadRequest
from ..jobs import PENDING, ImageResult, JobRecord, JobStatus, result_key
from ..views import Signer, job_status
from .client import make_client
from .ssrf import UnsafeURL, validate_url
from .transfer import DeliveryOutcome, FetchError, fetch_image, post_webhook, put_upload

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..broker.base import Broker
    from ..config import DeliveryConfig, Settings

log = logging.getLogger("easel")


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
        self.unrecorded: dict[str, tuple[dict[str, object], float | None]] = {}  # job -> outcome not yet in the broker

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
        """The job just ended here: deliver it now, if no drainer has claimed it (with
        the broker away, the outbox delivers it, or records its outcome, later)."""
        try:
            if await self.broker.claim_deliveries(claim_seconds(self.cfg), 1, job.id):
                await self.run(job.id)
        except BrokerUnavailable as exc:
            log.warning("job %s: delivery left to the outbox (%s)", job.id, exc)

    async def run(self, job_id: str) -> None:
        """One claimed outbox entry: the uploads still pending, then the webhook with
        the final status; the outcomes recorded and the entry ended in one broker step.
        A webhook that failed stays in the outbox, due again later (any node), until
        ``delivery.give_up_seconds`` after the job ended; then it reads ``failed``."""
        job = await self.broker.get(job_id)
        if job is None:  # expired: nothing to deliver any more
            await self.broker.end_delivery(job_id, {})
            return
        fields: dict[str, object] = {}
        retry_in: float | None = None
        try:
            async with make_client(self.cfg) as http:
                urls = (job.upload_urls or []) if job.status is JobStatus.DONE else []
                uploads = [(r, urls[r.index]) for r in job.results if r.upload == PENDING and r.index < len(urls)]
                if uploads:
                    outcomes = await asyncio.gather(*(self._upload(http, job, r, url) for r, url in uploads))
                    done = {r.index: outcome for (r, _), outcome in zip(uploads, outcomes, strict=True)}
                    results = [msgspec.structs.replace(r, upload=done[r.index]) if r.index in done else r for r in job.results]
                    await self.broker.update(job, {"results": results})  # the webhook's payload shows them
                if job.webhook_url is not None and job.webhook == PENDING:
                    outcome = await self._webhook(http, job, job.webhook_url)
                    if outcome.ok:
                        fields["webhook"] = "ok"
                    elif self.broker.now() - (job.finished_at or 0.0) < self.cfg.give_up_seconds:
                        retry_in = retry_delay(self.broker.now() - (job.finished_at or 0.0))
                        log.warning("job %s webhook: %s; retrying in %.0fs", job.id, outcome.error, retry_in)
                    else:
                        fields["webhook"] = f"failed: {outcome.error}"
        except BrokerUnavailable:
            raise
        except Exception:
            log.exception("delivery of job %s failed", job.id)
            retry_in = retry_delay(self.broker.now() - (job.finished_at or 0.0))
        if fields.get("webhook"):
            log.info("job %s webhook: %s", job.id, fields["webhook"])
        try:
            await self.broker.end_delivery(job.id, fields, retry_in)
        except BrokerUnavailable:
            self.unrecorded[job.id] = (fields, retry_in)  # recorded later (Outbox); else its claim runs out: sent again
            raise

    async def record_pending(self) -> None:
        """Outcomes a broker outage kept from being recorded, recorded now."""
        for job_id, (fields, retry_in) in list(self.unrecorded.items()):
            await self.broker.end_delivery(job_id, fields, retry_in)
            self.unrecorded.pop(job_id, None)

    async def _upload(self, http: httpx.AsyncClient, job: JobRecord, result: ImageResult, url: str) -> str:
        data = None if result.gone else await self.broker.get_blob(result_key(job.id, result.index))
        if data is None:
            outcome = "failed: the image was deleted (delete=true) or evicted before it could be uploaded"
        else:
            sent = await put_upload(url, data, result.media_type, self.cfg, client=http)
            outcome = "ok" if sent.ok else f"failed: {sent.error}"
        log.info("job %s image %d upload: %s", job.id, result.index, outcome)
        return outcome

    async def _webhook(self, http: httpx.AsyncClient, job: JobRecord, url: str) -> DeliveryOutcome:
        job = await self.broker.get(job.id) or job  # with the upload outcomes
        base_url = job.base_url or self.settings.http.public_url or f"http://{self.settings.host}:{self.settings.port}/"
        payload = msgspec.structs.replace(job_status(job, base_url, sign=self.sign), webhook=None)
        return await post_webhook(url, msgspec.to_builtins(payload), self.cfg, client=http, msg_id=webhook_id(job))


def webhook_id(job: JobRecord) -> str:
    """One ``webhook-id`` per job outcome (a job ends once): the same on every retry and
    from every node, so receivers drop duplicates by it."""
    return f"msg_{job.id}"


def claim_seconds(cfg: DeliveryConfig) -> float:
    """How long a drainer holds an outbox entry: longer than one delivery can take
    (each transfer with its retries and back-off), so only a dead drainer's is taken over."""
    one = cfg.timeout_seconds * (cfg.retries + 1) + cfg.backoff_seconds * (2 ** cfg.retries)
    return 2 * one + 5.0


def retry_delay(age: float) -> float:
    """Seconds until a failed webhook is tried again, by how long ago the job ended:
    1 s at first, growing to a minute."""
    return min(60.0, max(1.0, age / 2))
