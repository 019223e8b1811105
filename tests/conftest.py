"""Shared fixtures: a real easel server (``python server.py``, ``tests/servers.py``) per broker."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .redis_fixtures import RedisServer
from .servers import BROKERS, ROOT, RunningServer, free_port, start_server, stub_settings


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningServer]]:
    servers: list[RunningServer] = []

    def make(
        settings: dict[str, Any] | None = None, *args: str, env: dict[str, str] | None = None, script: Path = ROOT / "server.py"
    ) -> RunningServer:
        srv = start_server(tmp_path_factory.mktemp("srv"), settings or stub_settings(), args, env, script)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One redis-server for the servers of the whole session (each its own key prefix)."""
    server = RedisServer(Path(tempfile.mkdtemp(prefix="easel-redis-shared-")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def broker_args(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], tuple[dict[str, Any], tuple[str, ...]]]:
    """For a fixture parametrised over ``BROKERS``: (settings, extra args) that put a
    server on that broker (``redis``: role all on the shared redis-server)."""

    def on(settings: dict[str, Any], broker: str) -> tuple[dict[str, Any], tuple[str, ...]]:
        if broker == "memory":
            return settings, ()
        redis = request.getfixturevalue("shared_redis")
        prefix = f"t{free_port()}:"  # servers of one session never share keys
        return {**settings, "broker": {**settings.get("broker", {}), "prefix": prefix}}, ("--broker", redis.url)

    return on  # type: ignore[return-value]




@pytest.fixture(scope="session", params=BROKERS)
def server(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    """A fast stub server shared by the API tests (no simulated delay), once per broker."""
    settings, args = broker_args(stub_settings(), request.param)
    return server_factory(settings, *args)


@pytest.fixture(scope="session", params=BROKERS)
def slow_server(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    """A stub whose steps take real time: 0.05 s per step at 64x64 -> 12 s/step/MP."""
    settings, args = broker_args(stub_settings(simulate_step_seconds=12.0), request.param)
    return server_factory(settings, *args)
