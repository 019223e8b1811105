"""A scripted HTTP server on 127.0.0.1 for delivery tests (stdlib only).

``Reply`` items are answered in order (the last one repeats); every request is
recorded.  Use as a context manager::

    with LoopbackServer([Reply(503), Reply(200)]) as srv:
        url = srv.url("/hook")
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    content_length: bool = True  # False: body delimited by closing the connection


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.owner.record(Recorded(self.command, self.path, headers, body))
        if reply.delay:
            time.sleep(reply.delay)
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if reply.content_length:
            self.send_header("Content-Length", str(len(reply.body)))
        else:
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (size cap, timeout): that is what some tests expect

    do_GET = do_PUT = do_POST = _handle

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LoopbackServer


class LoopbackServer:
    def __init__(self, replies: list[Reply] | None = None) -> None:
        self.replies = list(replies or [Reply()])
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # notified on every request
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port: int = self._server.server_address[1]
        self.host_port = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://{self.host_port}{path}"

    def record(self, request: Recorded) -> Reply:
        with self._lock:
            index = min(len(self.requests), len(self.replies) - 1)
            self.requests.append(request)
            self._arrived.notify_all()
            return self.replies[index]

    def wait_for(self, path: str, timeout: float = 30.0) -> Recorded:
        """The first request for ``path``, waiting (on a condition the handler
        notifies, no polling) until it arrives; ``TimeoutError`` after ``timeout``."""
        with self._arrived:
            found = self._arrived.wait_for(lambda: [r for r in self.requests if r.path == path], timeout)
        if not found:
            raise TimeoutError(f"no request for {path} within {timeout} s")
        return found[0]

    def wait_count(self, path: str, count: int, timeout: float = 30.0) -> list[Recorded]:
        """The requests for ``path`` once there are at least ``count`` (waited for as
        in ``wait_for``)."""
        with self._arrived:
            found = self._arrived.wait_for(lambda: len([r for r in self.requests if r.path == path]) >= count, timeout)
            if not found:
                raise TimeoutError(f"fewer than {count} requests for {path} within {timeout} s")
            return [r for r in self.requests if r.path == path]

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
