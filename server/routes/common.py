"""Helpers shared by the route modules: body decoding with a size cap, JSON
responses from msgspec Structs, the request's base URL, waiting for a job while
the caller is connected."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from ..config import LimitsConfig
from ..errors import BadRequest, PayloadTooLarge, explain, validation_message
from ..textcheck import MAX_DEPTH, check_request

if TYPE_CHECKING:
    from ..jobs import JobRecord
    from ..service import Service
    from ..upscaling import Upscaler

log = logging.getLogger("easel")
T = TypeVar("T")
HEARTBEAT_SECONDS = 15.0
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}
MAX_SIDE = 8192  # the schema's largest width or height


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


def decode(data: bytes | dict[str, Any], typ: type[T], limits: LimitsConfig | None = None) -> T:
    """``data`` (a JSON body, or form fields) as ``typ``; any fault is a 400 naming the
    field.  With ``limits``, the text fields are checked too (``textcheck``)."""
    try:
        if isinstance(data, dict):
            req = msgspec.convert(data, typ, strict=False)
        else:
            if not data.strip():
                raise BadRequest("the request body is empty; send a JSON object (Content-Type: application/json)", code="empty_body")
            dec = _decoders.get(typ)
            if dec is None:
                dec = _decoders[typ] = msgspec.json.Decoder(typ)
            req = dec.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        if isinstance(data, bytes) and (error := _surrogate_error(data, str(exc))) is not None:
            raise error from None
        message, param = validation_message(exc)
        if param is not None and isinstance(exc, msgspec.ValidationError):
            message = _with_value(data, param, str(exc).rpartition(" - at `$.")[0]) or message
        code = "invalid_value" if isinstance(exc, msgspec.ValidationError) else "invalid_json"
        raise BadRequest(message, param=param, code=code) from None
    except UnicodeDecodeError as exc:
        assert isinstance(data, bytes)
        field = _field_with(data.decode("utf-8", "replace"), lambda t: "\ufffd" in t)
        where = f"{field}: " if field else "the request body: "
        raise BadRequest(
            f"{where}the text is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); send UTF-8 text "
            "(JSON escapes such as \\u00e9 work too)",
            param=field,
            code="invalid_utf8",
        ) from None
    except RecursionError:
        raise BadRequest(f"the request body is nested too deeply; send at most {MAX_DEPTH} levels of lists and objects", code="too_deep") from None
    if limits is not None:
        check_request(req, limits)
    return req  # type: ignore[no-any-return]


def _with_value(data: bytes | dict[str, Any], param: str, text: str) -> str | None:
    """``explain``'s sentence for a top-level field, with the value the request sent."""
    try:
        fields = msgspec.json.decode(data) if isinstance(data, bytes) else data
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(fields, dict) or param not in fields:
        return None
    value = fields[param]
    if isinstance(value, str):  # a form field: numbers arrive as text
        try:
            value = int(value)
        except ValueError:
            return None
    return explain(param, value, text, hi=MAX_SIDE if param in ("width", "height") else None)


def _field_with(text: str, bad: Callable[[str], bool]) -> str | None:
    """The top-level field of a JSON body whose text (or name) is ``bad``, for the
    message, if the body is otherwise readable."""
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict):
        return None
    for name, value in fields.items():
        if bad(name) or bad(json.dumps(value, ensure_ascii=False)):
            return str(name)
    return None


def _surrogate_error(data: bytes, reason: str) -> BadRequest | None:
    """A 400 naming the field for a ``\\ud800``-style escape on its own (msgspec says
    "invalid utf-16 surrogate pair", or for a high half at the end "truncated")."""
    if re.search(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}", data) is None:
        return None
    field = _field_with(data.decode("utf-8", "replace"), _lone_surrogate)
    if field is None and "surrogate" not in reason:
        return None
    return BadRequest(
        f"{field or 'the request body'}: a \\u escape names half of a UTF-16 surrogate pair (such as \\ud800 alone), "
        "which is not a character; send the pair, or the character itself",
        param=field,
        code="invalid_text",
    )


def _lone_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


async def decode_json(request: Request, typ: type[T]) -> T:
    return decode(await read_body(request), typ, service_of(request).settings.limits)


FILE_FIELDS = ("images", "image", "image[]", "images[]")
LIST_FIELDS = ("prompts", "upload_urls")


async def decode_form(request: Request, typ: type[T], file_fields: tuple[str, ...] = FILE_FIELDS) -> tuple[T, list[bytes], dict[str, bytes]]:
    """Multipart/form-data: fields -> ``typ`` (numbers coerced), files in
    ``file_fields`` -> a list of bytes, other files by field name."""
    limit = body_limit(request)
    try:
        form = await StrictMultiPartParser(request.headers, request.stream(), max_part_size=limit).parse()
    except MultiPartException as exc:
        raise BadRequest(f"the multipart body cannot be read: {exc.message}", code="invalid_multipart") from None
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
    return decode(fields, typ, service_of(request).settings.limits), files, named


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, but a text field that is not UTF-8 is a 400 naming it
    (Starlette reads it as Latin-1: the text would be stored garbled)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                self.items.append((part.field_name, bytes(part.data).decode("utf-8")))
            except UnicodeDecodeError as exc:
                raise BadRequest(
                    f"form field {part.field_name!r} is not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                    f"position {exc.start}); send UTF-8",
                    param=part.field_name,
                    code="invalid_utf8",
                ) from None
            return
        super().on_part_end()


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
    """The base of the URLs easel hands out (image links, webhook payloads):
    ``http.public_url``, else the server's URL as the request names it (its Host, and
    X-Forwarded-* from a trusted proxy: ``forwarded.py``)."""
    return service_of(request).settings.http.public_url or str(request.base_url)


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
