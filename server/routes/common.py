"""Helpers shared by the route modules: body decoding with a size cap, JSON
responses from msgspec Structs, and job -> status rendering."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from ..errors import BadRequest, PayloadTooLarge, validation_message
from ..jobs import Job
from ..schemas import ImageInfo, JobStatusResponse

if TYPE_CHECKING:
    from ..engine import Engine
    from ..upscaling import Upscaler

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def engine_of(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def upscaler_of(request: Request) -> Upscaler:
    return request.app.state.upscaler  # type: ignore[no-any-return]


class MsgspecResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return MsgspecResponse(content, status_code=status_code, headers=headers)


def body_limit(request: Request) -> int:
    """The body size limit in bytes; a declared Content-Length over it is a 413 at once."""
    limit = engine_of(request).settings.limits.max_body_mib * 2**20
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {int(declared)} bytes; the limit is {limit} bytes (limits.max_body_mib)")
    return limit


async def read_body(request: Request) -> bytes:
    limit = body_limit(request)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes (limits.max_body_mib)")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(data: bytes | dict[str, Any], typ: type[T]) -> T:
    try:
        if isinstance(data, dict):
            return msgspec.convert(data, typ, strict=False)
        if not data.strip():
            raise BadRequest("the request body is empty; send a JSON object (Content-Type: application/json)")
        dec = _decoders.get(typ)
        if dec is None:
            dec = _decoders[typ] = msgspec.json.Decoder(typ)
        return dec.decode(data)  # type: ignore[no-any-return]
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        message, param = validation_message(exc)
        raise BadRequest(message, param=param) from None


async def decode_json(request: Request, typ: type[T]) -> T:
    return decode(await read_body(request), typ)


FILE_FIELDS = ("images", "image", "image[]", "images[]")
LIST_FIELDS = ("prompts", "upload_urls")


async def decode_form(request: Request, typ: type[T], file_fields: tuple[str, ...] = FILE_FIELDS) -> tuple[T, list[bytes], dict[str, bytes]]:
    """Multipart/form-data: fields -> ``typ`` (numbers coerced), files in
    ``file_fields`` -> a list of bytes, other files by field name."""
    limit = body_limit(request)
    form = await request.form(max_part_size=limit)
    fields: dict[str, Any] = {}
    files: list[bytes] = []
    named: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            if key in file_fields:
                files.append(data)
            else:
                named[key] = data
        elif key in LIST_FIELDS or key.endswith("[]"):
            fields.setdefault(key.removesuffix("[]"), []).append(value)
        elif "[" in key and key.endswith("]"):  # metadata[steps]=4, as the openai SDK flattens objects
            _put_nested(fields, key, value)
        elif key in ("metadata", "loras") or value.startswith(("{", "[")):
            try:
                fields[key] = msgspec.json.decode(value)
            except msgspec.DecodeError:
                fields[key] = value
        elif value.lower() in ("true", "false") and key in ("priority", "stream"):
            fields[key] = value.lower() == "true"
        else:
            fields[key] = value
    await form.close()
    return decode(fields, typ), files, named


def _put_nested(fields: dict[str, Any], key: str, value: str) -> None:
    head, _, rest = key.partition("[")
    *parents, leaf = [head, *rest[:-1].split("][")]
    target = fields
    for name in parents:
        child = target.setdefault(name, {})
        if not isinstance(child, dict):
            raise BadRequest(f"form field {key!r} conflicts with field {name!r}", param=name)
        target = child
    target[leaf] = value


_base_urls: dict[tuple[Any, ...], str] = {}


def base_url(request: Request) -> str:
    """``str(request.base_url)``, remembered per scheme, Host header, server address
    and root path (Starlette builds and parses a URL for it on every call)."""
    scope = request.scope
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    key = (scope.get("scheme"), host, scope.get("server"), scope.get("root_path"), scope.get("app_root_path"))
    url = _base_urls.get(key)
    if url is None:
        if len(_base_urls) >= 256:  # Host headers are the client's to choose: keep it bounded
            _base_urls.clear()
        url = _base_urls[key] = str(request.base_url)
    return url


def image_url(request: Request, job: Job, index: int) -> str:
    return absolute_image_url(base_url(request), job, index)


def absolute_image_url(base_url: str, job: Job, index: int) -> str:
    return f"{base_url}api/image?task_id={job.id}&index={index}"


def status_of(request: Request, job: Job) -> JobStatusResponse:
    return job_status(engine_of(request), job, base_url(request))


def job_status(engine: Engine, job: Job, base_url: str) -> JobStatusResponse:
    """``job`` as the status API shows it; image URLs are absolute under ``base_url``."""
    pos, wait = engine.standing(engine.registry.models[job.model], job)
    return JobStatusResponse(
        task_id=job.id,
        status=job.status.value,  # type: ignore[arg-type]
        model=job.model,
        task=job.task,
        pos=pos,
        wait_remaining=round(wait, 3),
        expected_time_seconds=round(job.expected_at_submit, 3),
        progress=round(job.progress, 4),
        step=job.step,
        total_steps=job.total_steps,
        task_length=job.task_length,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        seed=job.seed,
        message=job.message,
        images=[
            ImageInfo(
                index=r.index,
                seed=r.seed,
                width=r.width,
                height=r.height,
                format=r.format,
                prompt=r.prompt,
                bytes=len(r.data) if r.data is not None else 0,
                url=absolute_image_url(base_url, job, r.index),
                upload=r.upload,
                seconds=r.seconds,
            )
            for r in job.results
        ],
        metadata=job.metadata,
        extra=job.extra or None,
        webhook=job.webhook,
    )
