"""The request body limit (``limits.max_body_mib``), for every route, before parsing.

An ASGI middleware: a declared ``Content-Length`` over the limit is answered 413 at
once, without reading the body; a body that arrives in chunks (no length, or more
than it declared) is stopped as soon as it grows past the limit — the route reading
it gets ``PayloadTooLarge`` (a 413 in the JSON error shape of ``errors.py``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLarge, render


def too_large(limit: int, size: int | None = None) -> PayloadTooLarge:
    said = f"is {size} bytes" if size is not None else "grew past the limit"
    mib = limit // 2**20
    return PayloadTooLarge(
        f"the request body {said}; the limit is {limit} bytes ({mib} MiB, limits.max_body_mib): "
        "send smaller or fewer images, or raise limits.max_body_mib"
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await render(too_large(self.limit, int(value)))(scope, receive, send)
        size = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.limit:
                    raise too_large(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:  # raised where no exception handler caught it
            if started:
                raise
            await render(exc)(scope, receive, send)
