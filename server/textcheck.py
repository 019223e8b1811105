"""The text of a decoded request, checked before anything else sees it: every
string within its field's length limit (``limits``), and no NUL characters.

A prompt (``prompt``, ``negative_prompt``, each of ``prompts``) may be
``limits.max_prompt_chars`` long, ``metadata`` ``limits.max_metadata_bytes`` as
JSON, and any other text (model and adapter names, URLs, paths, ...)
``limits.max_text_chars``.  Image data (data URLs, base64) is bounded by the
body limit alone.  Bytes that are not UTF-8 never get this far: the JSON and
form decoders refuse them (``routes/common.py``), and ``QueryCheckMiddleware``
refuses them (and NUL) in any query string."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import LimitsConfig
from .errors import ApiError, BadRequest, render

PROMPT_FIELDS = frozenset({"prompt", "negative_prompt", "prompts"})
IMAGE_FIELDS = frozenset({"images", "image", "init_image", "mask", "data_url", "image_url"})  # base64 data
METADATA_FIELDS = frozenset({"metadata"})
MAX_DEPTH = 32  # lists and objects inside one another


class TextTooLong(BadRequest):
    code = "text_too_long"


class InvalidText(BadRequest):
    code = "invalid_text"


def check_request(req: Any, limits: LimitsConfig) -> None:
    """Refuse (400, naming the field) a string over its limit or holding a NUL."""
    if not isinstance(req, msgspec.Struct):
        return
    for name in req.__struct_fields__:
        value = getattr(req, name)
        if value is None or name in IMAGE_FIELDS:
            continue
        if name in METADATA_FIELDS:
            _check_metadata(value, name, limits.max_metadata_bytes)
        else:
            limit, setting = (
                (limits.max_prompt_chars, "max_prompt_chars") if name in PROMPT_FIELDS else (limits.max_text_chars, "max_text_chars")
            )
            _walk(value, name, limit, setting)


def _walk(value: Any, path: str, limit: int, setting: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise InvalidText(f"{path} is nested more than {MAX_DEPTH} levels deep; flatten it", param=path.partition(".")[0])
    if isinstance(value, str):
        _check_string(value, path, limit, setting)
    elif isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise InvalidText(f"{path} is a number of {len(str(value))} digits; send at most a 64-bit integer", param=path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", limit, setting, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(key, f"{path} (a key)", limit, setting, depth + 1)
            _walk(item, f"{path}.{key}", limit, setting, depth + 1)
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            if name not in IMAGE_FIELDS and (item := getattr(value, name)) is not None:
                _walk(item, f"{path}.{name}", limit, setting, depth + 1)


def _check_string(value: str, path: str, limit: int, setting: str) -> None:
    if len(value) > limit:
        raise TextTooLong(
            f"{path} is {len(value)} characters long; the limit is {limit} (limits.{setting}); shorten it", param=path
        )
    if "\0" in value:
        raise InvalidText(f"{path} contains a NUL character (\\u0000) at position {value.index(chr(0))}; remove it", param=path)


def _check_metadata(value: Any, path: str, limit: int) -> None:
    size = len(msgspec.json.encode(value))
    if size > limit:
        raise TextTooLong(
            f"{path} is {size} bytes as JSON; the limit is {limit} (limits.max_metadata_bytes); keep less in it", param=path
        )
    _walk(value, path, limit, "max_metadata_bytes")


def check_query(query: bytes) -> None:
    """A query string whose names and values are UTF-8 without NUL (Starlette would
    read bad bytes as U+FFFD: a garbled task id or number, found or misread later)."""
    for pair in query.split(b"&"):
        raw_name, _, raw_value = pair.partition(b"=")
        name = _query_text(raw_name, None)
        _query_text(raw_value, name or "query")


def _query_text(raw: bytes, param: str | None) -> str:
    what = f"query parameter {param}" if param else "a query parameter's name"
    try:
        text = unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidText(f"{what} is not valid UTF-8 once %-decoded; send UTF-8, %-encoded", param=param, code="invalid_utf8") from None
    if "\0" in text:
        raise InvalidText(f"{what} contains a NUL character (%00); remove it", param=param)
    return text


class QueryCheckMiddleware:
    """``check_query`` on every request, before any route reads the query."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            try:
                check_query(scope["query_string"])
            except ApiError as exc:
                return await render(exc)(scope, receive, send)
        await self.app(scope, receive, send)
