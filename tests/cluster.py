"""Nodes of one easel on one Redis (API nodes, workers), for the Redis-mode tests."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from .redis_fixtures import RedisServer
from .servers import RunningServer, start_server


class Cluster:
    """Nodes started on ``redis`` (``default``: the settings of a node started without
    its own), killed at the end of the test (``stop``)."""

    def __init__(self, tmp: Path, redis: RedisServer, default: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.redis = redis
        self.default = default
        self.nodes: list[RunningServer] = []

    def start(self, role: str, cfg: dict[str, Any] | None = None) -> RunningServer:
        settings = cfg if cfg is not None else self.default
        assert settings is not None, "no settings for the node"
        node = start_server(self.tmp, settings, ("--broker", self.redis.url, "--role", role))
        self.nodes.append(node)
        return node

    def api(self, cfg: dict[str, Any] | None = None) -> RunningServer:
        return self.start("api", cfg)

    def worker(self, cfg: dict[str, Any] | None = None) -> RunningServer:
        return self.start("worker", cfg)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL)
