"""One submit sequence for every route family that makes images (the job API, the
OpenAI shim, the A1111 API): the model that serves it, the job built from a
``GenerateRequest`` (``build.build_job``: 400s there), the idempotency fingerprint
(of that request and its uploads, so the same job has the same fingerprint whatever
route family it came through), then ``Service.submit``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from .allowlist import check_model
from .build import build_job
from .service import Idempotency

if TYPE_CHECKING:
    from .auth import Caller
    from .jobs import JobRecord
    from .registry import ModelState
    from .schemas import GenerateRequest
    from .service import Service


async def submit_generation(
    service: Service, req: GenerateRequest, task: str, caller: Caller, *, model: ModelState | None = None,
    uploads: Sequence[bytes] = (), mask: bytes | None = None, base_url: str = "", idempotency_key: str | None = None,
    partial_images: int = 0,
) -> JobRecord:  # fmt: skip
    """Queue ``req`` as a ``task`` job for ``caller`` (``model``: already resolved by the
    caller, else ``req.model``'s); the job as queued, or the one an earlier request with
    the same ``idempotency_key`` made."""
    ms = model if model is not None else await service.served_model(req.model)
    check_model(caller, ms.name)  # before any reference image is fetched
    job, inputs = await build_job(req, ms, service.settings, task, uploads=list(uploads), fetch=service.fetch_url, mask=mask)
    job.base_url = base_url
    job.partial_images = partial_images
    idempotency = Idempotency.of(idempotency_key, task.encode(), msgspec.json.encode(req), *uploads, *([mask] if mask else []))
    return await service.submit(job, inputs.blobs, caller, idempotency)
