"""An httpx client that can only reach addresses the SSRF guard vetted.

Validating a URL before a job runs is not enough: DNS may answer differently when
the request is finally made (DNS rebinding).  So the check happens where the socket
is opened: ``GuardedNetworkBackend.connect_tcp`` resolves the host itself, vets
every address (``ssrf.Guard``) and connects to a vetted IP.  httpcore still sends
the original host in the ``Host`` header and as the TLS server name (SNI), and
verifies the certificate against it, so HTTPS works unchanged.  Every redirect hop
opens its own connection and is vetted the same way.

Interface:

* ``make_client(cfg, resolver=None) -> httpx.AsyncClient`` — for ``transfer``'s
  functions; close it (``async with``) when done.  ``resolver`` replaces the
  system resolver (tests).
"""

from __future__ import annotations

from collections.abc import Iterable

import httpcore
import httpx

from ..config import DeliveryConfig
from .ssrf import Guard, Resolver, UnsafeURL

USER_AGENT = "easel-delivery/1"
MAX_REDIRECTS = 5


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to addresses ``guard`` accepts."""

    def __init__(self, guard: Guard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.guard.vetted_addresses(host, port, subject=f"the connection to {host}:{port}")
        error: Exception = httpcore.ConnectError(f"{host} has no address to connect to")
        for address in addresses:  # connect to the vetted IP, never to the name again
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeURL("delivery connections over unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request/response mapping, exception mapping) over a
    connection pool whose sockets come from ``GuardedNetworkBackend``.

    httpx offers no public hook for the network backend, so the pool it builds in
    ``__init__`` is replaced; ``tests/test_delivery_ssrf.py`` fails loudly if a future
    httpx stops routing through it.
    """

    def __init__(self, guard: Guard, *, verify: bool = True) -> None:
        super().__init__(verify=verify, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            network_backend=GuardedNetworkBackend(guard),
        )


def make_client(cfg: DeliveryConfig, resolver: Resolver | None = None) -> httpx.AsyncClient:
    """A client for user-supplied URLs: guarded sockets, no proxies from the
    environment, per-operation timeout ``cfg.timeout_seconds``, no redirects unless
    a request asks for them (each hop is vetted at connect time)."""
    return httpx.AsyncClient(
        transport=GuardedTransport(Guard(cfg.allowed_hosts, resolver)),
        timeout=httpx.Timeout(cfg.timeout_seconds),
        follow_redirects=False,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )
