"""Helpers shared by the route modules: body decoding with a size cap, JSON
responses from msgspec Structs, the request's base URL, waiting for a job while
the caller is connected."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from ..errors import BadRequest, PayloadTooLarge, validation_message

if TYPE_CHECKING:
    from ..jobs import JobRecord
    from ..service import Service
    from ..upscaling import Upscaler

log = logging.getLogger("easel")
T = TypeVar("T")
HEARTBEAT_SECONDS = 15.0
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def service_of(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


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
    limit = service_of(request).settings.limits.max_body_mib * 2**20
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


def base_url(request: Request) -> str:
    """The server's URL as the client sees it (image links, webhook payloads)."""
    return str(request.base_url)


async def wait_for(request: Request, service: Service, job: JobRecord) -> JobRecord:
    """Wait until ``job`` ends.  If the caller disconnects first, cancel the job so no
    GPU time goes to an answer nobody reads, unless it sent an ``Idempotency-Key``:
    then it said it will come back for the answer (a retry with the key waits on the
    same job)."""
    keep = bool(request.headers.get("idempotency-key"))

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if keep:
            log.info("job %s: the caller disconnected; its Idempotency-Key keeps the job", job.id)
            return
        log.info("job %s: the caller disconnected; cancelling", job.id)
        await service.cancel(job)

    watcher = asyncio.create_task(watch())
    try:
        while not job.status.finished:
            job, _ = await service.wait_change(job, HEARTBEAT_SECONDS, progress=False)  # re-read now and then
    finally:
        watcher.cancel()
    return job
