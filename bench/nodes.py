"""The server's processes for the benches: a node that takes submissions (memory:
one ``server.py``; Redis: a redis-server, an API node and a worker node), and
``--pin``'s layout of them over the cores (``lay_out``): the model's process alone on
core 0 (it plays the GPU), everything else on the others."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from tests.redis_fixtures import RedisServer
from tests.servers import RunningServer, start_server


@contextmanager
def cluster(
    tmp: Path, mode: str, settings: dict[str, Any], env: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> Iterator[tuple[RunningServer, dict[str, int]]]:
    """The node that takes submissions: memory (role all) or Redis (api + worker),
    and the pids of the processes (for their CPU time).  ``headers``: what a call of
    the API node needs (a key, where the settings ask for one)."""
    if mode == "memory":
        srv = start_server(tmp, settings, env=env)
        try:
            yield srv, {"server": srv.proc.pid}
        finally:
            srv.stop()
        return
    redis = RedisServer(tmp / "redis")
    redis.start()
    nodes: list[RunningServer] = []
    try:
        api = start_server(tmp, settings, ("--broker", redis.url, "--role", "api"), env=env)
        nodes.append(api)
        worker = start_server(tmp, settings, ("--broker", redis.url, "--role", "worker"), env=env)
        nodes.append(worker)
        deadline = time.monotonic() + 60
        while not api.client.get("/v1/models", headers=headers).json()["data"]:  # the worker's presence
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never announced its model")
            time.sleep(0.1)
        assert redis.proc is not None
        yield api, {"api": api.proc.pid, "worker": worker.proc.pid, "redis": redis.proc.pid}
    finally:
        for node in nodes:
            node.stop(signal.SIGTERM)
        redis.stop()


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (and the threads it starts later) onto ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def lay_out(pids: dict[str, int], model_core: set[int], other_cores: set[int]) -> None:
    """``--pin``: the model's process (a child of the worker or server node, up once
    a job ran) on ``model_core``; the nodes, redis-server and this process on
    ``other_cores``.  A node without a child (the model in its process) may use
    every core."""
    for name, pid in pids.items():
        children = psutil.Process(pid).children(recursive=True) if name in ("worker", "server") else []
        if name not in ("worker", "server") or children:
            pin(pid, other_cores)  # the host's CPU: API node, redis-server, the worker's loop and encoding
        for child in children:  # the model's process (and multiprocessing's idle helper): the "GPU"
            pin(child.pid, model_core)
    pin(os.getpid(), other_cores)
