"""Outbound-request guard: which URLs easel may fetch from, upload to or call back.

Users hand easel URLs (reference images, presigned upload URLs, webhooks).  Without
a guard they could make the server reach its own loopback services, the cloud
metadata endpoint (169.254.169.254) or the private network behind it (SSRF).

Rules:

* scheme must be ``http`` or ``https``;
* every address the host resolves to must be public: loopback, private (RFC 1918,
  CGNAT 100.64/10, ULA fc00::/7), link-local (169.254/16, fe80::/10), multicast,
  unspecified, reserved and IPv4-mapped/embedded forms of those are refused;
* unless ``delivery.allowed_hosts`` lists it.  An entry is a host name or IP
  (``minio.internal``, ``10.0.0.5``: any port), ``host:port`` / ``[v6]:port``
  (that port only), or a network (``10.0.0.0/8``: any address in it, any port).
  A host-name entry trusts whatever the name resolves to.

Interface:

* ``validate_url(url, allowed_hosts, field="url") -> None`` — synchronous check
  for request validation (it resolves the host; call it off the event loop, e.g.
  ``anyio.to_thread.run_sync``).  Raises ``UnsafeURL`` (a ``ValueError``).
* ``Guard(allowed_hosts, resolver=None)`` — the async check used at connect time
  by ``server.delivery.client`` (``await guard.vetted_addresses(host, port)``);
  connecting only to the addresses it returns defeats DNS rebinding.
* ``Resolver`` — ``async (host, port) -> list[str]``; tests inject a stub.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import anyio

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
# IPv6 prefixes that embed an IPv4 address in their low 32 bits (NAT64)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


class UnsafeURL(ValueError):
    """A URL easel refuses to contact; the message says which, why and how to allow it."""


def redact(url: str) -> str:
    """The URL without query string, fragment and credentials: presigned URLs carry
    their signature in the query, which must not end up in logs or error bodies."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparseable URL>"
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else url[:80]


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None


def unsafe_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` must not be contacted, or None when it is a public address."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            inner = unsafe_reason(embedded)
            return f"an IPv6 form of {embedded}, {inner}" if inner else None
    checks = (
        ("is_unspecified", "the unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address (this includes cloud metadata services)"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private-network address"),
        ("is_reserved", "a reserved address"),
    )
    for attr, reason in checks:
        if getattr(addr, attr):
            return reason
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "a carrier-grade NAT (100.64.0.0/10) address"
    if not addr.is_global:
        return "not a globally routable address"
    return None


class AllowList:
    """``delivery.allowed_hosts`` parsed once."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: set[tuple[str, int | None]] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower()
            if "/" in entry:
                try:
                    self.networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(
                        f"delivery.allowed_hosts entry {raw!r} is neither a host, host:port nor a network like 10.0.0.0/8"
                    ) from None
                continue
            self.names.add(_split_host_port(entry, raw))

    def allows_host(self, host: str, port: int) -> bool:
        host = _canonical_host(host)
        return (host, None) in self.names or (host, port) in self.names

    def allows_address(self, addr: IPAddress, port: int) -> bool:
        return self.allows_host(str(addr), port) or any(addr in net for net in self.networks)


def _canonical_host(host: str) -> str:
    host = host.strip("[]").lower().rstrip(".")
    ip = _ip(host)
    return str(ip) if ip is not None else host


def _split_host_port(entry: str, raw: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:  # a name, an IPv4 address or a bare IPv6 address
        host, port_text = entry, ""
    if port_text and not port_text.isdigit():
        raise ValueError(f"delivery.allowed_hosts entry {raw!r} has a port that is not a number")
    return _canonical_host(host), int(port_text) if port_text else None


def _how_to_allow(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"If this host is trusted, add {shown!r} (or {f'{shown}:{port}'!r}) to delivery.allowed_hosts in the settings file."


def parse_target(url: str, field: str = "url") -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an http(s) URL, or ``UnsafeURL``."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"{field}: {redact(url)!s} is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UnsafeURL(
            f"{field}: {redact(url)} uses the scheme {scheme or '(none)'!r}; only http:// and https:// URLs are accepted"
        )
    if not parts.hostname:
        raise UnsafeURL(f"{field}: {redact(url)} has no host name")
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]


class Guard:
    """Vets hosts and the addresses they resolve to against the allow-list."""

    def __init__(self, allowed_hosts: Iterable[str], resolver: Resolver | None = None) -> None:
        self.allow = AllowList(allowed_hosts)
        self.resolver: Resolver = resolver or system_resolver

    def check(self, host: str, port: int, addresses: list[str], subject: str) -> list[str]:
        """The addresses to connect to, or ``UnsafeURL`` naming ``subject``."""
        if self.allow.allows_host(host, port):
            return addresses
        if not addresses:
            raise UnsafeURL(f"{subject}: the host {host!r} did not resolve to any address")
        for text in addresses:
            addr = _ip(text)
            if addr is None:
                raise UnsafeURL(f"{subject}: the host {host!r} resolved to {text!r}, which is not an IP address")
            reason = unsafe_reason(addr)
            if reason is not None and not self.allow.allows_address(addr, port):
                via = "" if _canonical_host(host) == str(addr) else f" resolves to {addr}, which"
                raise UnsafeURL(f"{subject} is refused: {host}{via} is {reason}. {_how_to_allow(_canonical_host(host), port)}")
        return addresses

    async def vetted_addresses(self, host: str, port: int, subject: str | None = None) -> list[str]:
        """Resolve ``host`` and return its addresses if every one of them is acceptable."""
        subject = subject or f"{host}:{port}"
        literal = _ip(host.strip("[]"))
        if literal is not None:
            return self.check(host, port, [str(literal)], subject)
        try:
            addresses = await self.resolver(host, port)
        except OSError as exc:
            raise _unresolved(host, subject, exc) from None
        return self.check(host, port, addresses, subject)


def _unresolved(host: str, subject: str, exc: OSError) -> UnsafeURL:
    return UnsafeURL(f"{subject}: the host {host!r} could not be resolved ({exc.strerror or exc})")


def _unique_addresses(infos: Iterable[tuple[Any, ...]]) -> list[str]:
    """Distinct addresses, in resolver order, from ``getaddrinfo`` results."""
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses of ``host`` from the operating system's resolver."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return _unique_addresses(infos)


def validate_url(url: str, allowed_hosts: Iterable[str], field: str = "url") -> None:
    """Refuse ``url`` (``UnsafeURL``) unless it is http(s) to a public or allowed host.

    ``field`` names the request field in the message (``upload_urls[2]``).  Blocking:
    it resolves the host with the system resolver.
    """
    _, host, port = parse_target(url, field)
    guard = Guard(allowed_hosts)
    if guard.allow.allows_host(host, port):
        return
    subject = f"{field} ({redact(url)})"
    literal = _ip(host)
    if literal is not None:
        guard.check(host, port, [str(literal)], subject)
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _unresolved(host, subject, exc) from None
    guard.check(host, port, _unique_addresses(infos), subject)
