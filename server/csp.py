"""The web UI's Content-Security-Policy (static/, served at /).

The page loads only its own script modules and stylesheet (no inline script, style
or handler); images are its own, the API's, or previews as data: / blob: URLs.
JSON API responses carry no CSP (nothing renders them), and neither does /swagger:
Swagger UI runs an inline script and sets inline styles.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEB_UI_CSP = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data: blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


class WithCsp:
    """Wraps an ASGI app (the static files) to send ``policy`` with every response."""

    def __init__(self, app: ASGIApp, policy: str = WEB_UI_CSP) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("content-security-policy", self.policy)
                headers.setdefault("x-content-type-options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_policy)
