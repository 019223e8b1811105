"""``X-Forwarded-Proto``, ``-Host`` and ``-For``, honoured only from the proxies
named in ``http.trusted_proxies`` (addresses or networks such as 10.0.0.0/8).

From anyone else these headers are ignored: they would decide the image URLs easel
hands out (status answers, webhook payloads).  ``http.public_url``, when set, decides
them instead, whatever the request says (``routes/common.base_url``)."""

from __future__ import annotations

import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: list[str]) -> list[Network]:
    """``http.trusted_proxies`` -> networks; ValueError names a bad entry."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"entry {entry!r} is not an IP address or network (such as 10.0.0.1 or 10.0.0.0/8)") from None
    return out


def _first(value: bytes) -> str:
    """The first (the original client's) of a comma-separated list of hops."""
    return value.decode("latin-1").split(",")[0].strip()


class ForwardedMiddleware:
    def __init__(self, app: ASGIApp, trusted: list[str]) -> None:
        self.app = app
        self.networks = parse_networks(trusted)

    def _trusted(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in net for net in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._trusted(scope):
            return await self.app(scope, receive, send)
        scope = dict(scope)
        headers = dict(scope["headers"])
        if (proto := _first(headers.get(b"x-forwarded-proto", b"")).lower()) in ("http", "https"):
            scope["scheme"] = proto
        if (host := _first(headers.get(b"x-forwarded-host", b""))) and HOST.fullmatch(host):
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host.encode())]
        if forwarded_for := _first(headers.get(b"x-forwarded-for", b"")):
            try:
                scope["client"] = (str(ipaddress.ip_address(forwarded_for)), 0)
            except ValueError:
                pass
        await self.app(scope, receive, send)
