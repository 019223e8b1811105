"""The outbound-request guard: URL validation and the connect-time check."""

from __future__ import annotations

import io

import anyio
import pytest
from PIL import Image

from server.config import DeliveryConfig
from server.delivery import FetchError, UnsafeURL, fetch_image, make_client, validate_url
from server.delivery.ssrf import Guard
from tests.loopback_http import LoopbackServer, Reply

REFUSED = [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/x.png", "private"),
    ("http://127.0.0.1/x.png", "loopback"),
    ("http://localhost/x.png", "loopback"),
    ("http://[::1]/x.png", "loopback"),
    ("http://0.0.0.0/x.png", "unspecified"),
    ("http://2130706433/x.png", "loopback"),  # decimal form of 127.0.0.1
    ("http://0x7f.1/x.png", "loopback"),  # hex/short form of 127.0.0.1
    ("http://100.64.0.1/x.png", "carrier-grade NAT"),
    ("http://192.168.1.1/x.png", "private"),
    ("http://[fc00::1]/x.png", "private"),
    ("http://[fe80::1]/x.png", "link-local"),
    ("http://224.0.0.1/x.png", "multicast"),
    ("http://[::ffff:169.254.169.254]/x.png", "IPv6 form of 169.254.169.254"),
    ("http://[64:ff9b::a00:1]/x.png", "IPv6 form of 10.0.0.1"),
]


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_internal_addresses_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason) as info:
        validate_url(url, [], field="upload_urls[0]")
    assert "upload_urls[0]" in str(info.value)
    assert "delivery.allowed_hosts" in str(info.value)


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://h/", "//no-scheme/x"])
def test_only_http_and_https_schemes_are_accepted(url: str) -> None:
    with pytest.raises(UnsafeURL, match="only http:// and https://"):
        validate_url(url, [])


def test_public_addresses_pass() -> None:
    validate_url("https://1.1.1.1/image.png", [])
    validate_url("http://[2606:4700::1111]:8080/image.png", [])


def test_allowed_host_and_port_lets_loopback_through() -> None:
    validate_url("http://127.0.0.1:9000/bucket/key", ["127.0.0.1:9000"])
    with pytest.raises(UnsafeURL, match="127.0.0.1:9001"):
        validate_url("http://127.0.0.1:9001/bucket/key", ["127.0.0.1:9000"])


def test_allow_list_accepts_bare_hosts_ipv6_and_networks() -> None:
    validate_url("http://127.0.0.1:1234/", ["127.0.0.1"])
    validate_url("http://[::1]:9000/", ["[::1]:9000"])
    validate_url("http://10.20.30.40/", ["10.0.0.0/8"])
    validate_url("http://localhost:9000/", ["127.0.0.1:9000"])  # the address it resolves to is allowed


def test_bad_allow_list_entry_is_reported() -> None:
    with pytest.raises(ValueError, match="allowed_hosts entry 'host:port'"):
        validate_url("http://1.1.1.1/", ["host:port"])


def test_message_does_not_leak_presigned_signature() -> None:
    with pytest.raises(UnsafeURL) as info:
        validate_url("http://10.0.0.1/b/k.png?X-Amz-Signature=secret123", [], field="upload_urls[1]")
    assert "secret123" not in str(info.value)
    assert "http://10.0.0.1/b/k.png" in str(info.value)


def test_connection_to_unlisted_loopback_server_is_refused_before_sending() -> None:
    with LoopbackServer([Reply(200, png_bytes())]) as srv:
        with pytest.raises(UnsafeURL, match="loopback"):
            anyio.run(fetch_image, srv.url("/x.png"), DeliveryConfig())
    assert srv.requests == []


class ScriptedResolver:
    """Answers each lookup with the next address list (a rebinding DNS server)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self.answers[min(len(self.lookups), len(self.answers)) - 1]


def test_dns_rebinding_is_caught_at_connect_time() -> None:
    resolver = ScriptedResolver(["93.184.216.34"], ["127.0.0.1"])
    guard = Guard([], resolver)
    with LoopbackServer([Reply(200, png_bytes())]) as srv:
        assert anyio.run(guard.vetted_addresses, "rebind.test", srv.port) == ["93.184.216.34"]

        async def fetch() -> bytes:
            async with make_client(DeliveryConfig(), resolver) as client:
                return await fetch_image(f"http://rebind.test:{srv.port}/x.png", DeliveryConfig(), client=client)

        with pytest.raises(UnsafeURL, match="resolves to 127.0.0.1, which is a loopback address"):
            anyio.run(fetch)
    assert srv.requests == []
    assert resolver.lookups == ["rebind.test", "rebind.test"]


def test_connection_goes_to_vetted_address_with_original_host_header() -> None:
    resolver = ScriptedResolver(["127.0.0.1"])  # system DNS does not know images.test
    cfg = DeliveryConfig(allowed_hosts=["images.test"])
    with LoopbackServer([Reply(200, png_bytes(), {"Content-Type": "image/png"})]) as srv:

        async def fetch() -> bytes:
            async with make_client(cfg, resolver) as client:
                return await fetch_image(f"http://images.test:{srv.port}/x.png", cfg, client=client)

        assert anyio.run(fetch) == png_bytes()
    assert srv.requests[0].headers["host"] == f"images.test:{srv.port}"


def test_redirect_to_unlisted_host_is_refused() -> None:
    with LoopbackServer([Reply(200, png_bytes())]) as target:
        redirect = Reply(302, headers={"Location": target.url("/x.png")})
        with LoopbackServer([redirect]) as first:
            cfg = DeliveryConfig(allowed_hosts=[first.host_port])
            with pytest.raises(UnsafeURL, match=f"127.0.0.1:{target.port}"):
                anyio.run(fetch_image, first.url("/start"), cfg)
    assert len(first.requests) == 1
    assert target.requests == []


def test_redirect_to_allowed_host_is_followed() -> None:
    with LoopbackServer([Reply(200, png_bytes())]) as target:
        with LoopbackServer([Reply(302, headers={"Location": target.url("/x.png")})]) as first:
            cfg = DeliveryConfig(allowed_hosts=[first.host_port, target.host_port])
            assert anyio.run(fetch_image, first.url("/start"), cfg) == png_bytes()


def test_download_over_size_cap_is_refused() -> None:
    big = b"\0" * (1024 * 1024 + 1)
    for reply in (Reply(200, big), Reply(200, big, content_length=False)):
        with LoopbackServer([reply]) as srv:
            cfg = DeliveryConfig(allowed_hosts=[srv.host_port], max_download_mib=1)
            with pytest.raises(FetchError, match="larger than 1 MiB"):
                anyio.run(fetch_image, srv.url("/big.png"), cfg)


def test_download_that_is_not_an_image_is_refused() -> None:
    with LoopbackServer([Reply(200, b"<html>login</html>")]) as srv:
        cfg = DeliveryConfig(allowed_hosts=[srv.host_port])
        with pytest.raises(FetchError, match="not an image"):
            anyio.run(fetch_image, srv.url("/x.png"), cfg)


def test_download_error_status_is_reported() -> None:
    with LoopbackServer([Reply(404)]) as srv:
        cfg = DeliveryConfig(allowed_hosts=[srv.host_port])
        with pytest.raises(FetchError, match="HTTP 404"):
            anyio.run(fetch_image, srv.url("/missing.png"), cfg)


def test_slow_download_times_out() -> None:
    with LoopbackServer([Reply(200, png_bytes(), delay=1.0)]) as srv:
        cfg = DeliveryConfig(allowed_hosts=[srv.host_port], timeout_seconds=0.2)
        with pytest.raises(FetchError, match="within 0.2 s"):
            anyio.run(fetch_image, srv.url("/x.png"), cfg)
