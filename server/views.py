"""Job records -> the wire types the API answers with (``schemas``)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from msgspec import UNSET

from .jobs import JobRecord
from .quotas import gpu_seconds
from .schemas import ImageInfo, JobStatusResponse, SubmitResponse
from .standing import Where

FINISHED = Where(0, 0.0)
Signer = Callable[[str, JobRecord, int], str]  # (url, job, image index) -> the url with a signature


def _unsigned(url: str, job: JobRecord, index: int) -> str:
    return url


def image_url(base_url: str, job: JobRecord, index: int) -> str:
    return f"{base_url}api/image?task_id={job.id}&index={index}"


def job_status(job: JobRecord, base_url: str, where: Where = FINISHED, sign: Signer | None = None) -> JobStatusResponse:
    """``job`` as the status API shows it; image URLs are absolute under ``base_url``
    (and signed with ``sign``, so they work without the key)."""
    sign = sign or _unsigned
    steps = [item.steps for item in job.items for _ in range(item.n)]  # image index -> its item's steps
    return JobStatusResponse(
        task_id=job.id,
        status=job.status.value,  # type: ignore[arg-type]
        model=job.model,
        task=job.task,
        pos=where.pos,
        wait_remaining=round(where.wait, 3) if where.wait is not None else UNSET,
        expected_time_seconds=round(job.expected_at_submit, 3),
        progress=round(job.progress, 4),
        step=job.step,
        total_steps=job.total_steps,
        task_length=job.task_length,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        seed=job.seed,
        message=job.message or where.note,
        images=[
            ImageInfo(
                index=r.index,
                seed=r.seed,
                width=r.width,
                height=r.height,
                format=r.format,
                prompt=r.prompt,
                bytes=0 if r.gone else r.bytes,
                url=sign(image_url(base_url, job, r.index), job, r.index),
                upload=r.upload,
                seconds=r.seconds,
                steps=steps[r.index] if r.index < len(steps) else None,
            )
            for r in job.results
        ],
        metadata=job.metadata,
        extra=({**job.extra, "evicted": True} if any(r.gone and r.gone.startswith("evicted") for r in job.results) else job.extra) or None,
        webhook=job.webhook,
        attempt=job.attempt,
        gpu_seconds=round(gpu_seconds(job), 4) if job.status.finished else None,
        deadline_at=job.deadline_at,
        code=job.code,
        worker=job.worker,
        warnings=job.warnings,
        paused=where.paused,
        prompt=job.items[0].prompt if job.items else None,
        width=job.items[0].width if job.items else None,
        height=job.items[0].height if job.items else None,
    )


def private_status(status: JobStatusResponse) -> JobStatusResponse:
    """Another key's job as a shared listing shows it: a job, without what it asked
    (prompt, images, metadata, seed, webhook, the backend's extra, warnings)."""
    return msgspec.structs.replace(
        status, prompt=None, seed=None, images=[], metadata=None, extra=None, webhook=None, warnings=[], private=True,
        message=status.message if status.status == "waiting" else None,
    )  # fmt: skip


def submitted(job: JobRecord) -> SubmitResponse:
    return SubmitResponse(
        task_id=job.id,
        task_length=job.task_length,
        expected_time_seconds=round(job.expected_at_submit, 3),
        pos=job.pos_at_submit,
        status=job.status.value,
        seed=job.seed,
    )
