"""Liveness (/healthz) and readiness (/readyz) apart: a node that cannot reach its
Redis is alive but not ready, within one heartbeat of Redis stopping, and ready
again once it is back (a real redis-server); a worker whose enabled model failed to
load is not ready and says why."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .redis_fixtures import RedisServer, redis_server_fresh  # noqa: F401  (fixture)
from .servers import RunningServer, start_server, stub_settings

HEARTBEAT = 1.0


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[RunningServer]]:
    out: list[RunningServer] = []
    yield out
    for node in out:
        node.stop()


@pytest.mark.parametrize("role", ["api", "all", "worker"])
def test_readyz_is_503_within_a_heartbeat_of_redis_stopping_and_200_when_it_is_back(
    tmp_path: Path, redis_server_fresh: RedisServer, nodes: list[RunningServer], role: str  # noqa: F811
) -> None:
    settings = {**stub_settings(), "broker": {"heartbeat_seconds": HEARTBEAT, "lease_seconds": 5}}
    node = start_server(tmp_path, settings, ("--broker", redis_server_fresh.url, "--role", role))
    nodes.append(node)
    ready = node.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["broker"] == "ok"
    assert ready.json()["models"] == ({} if role == "api" else {"stub": "loaded"})
    redis_server_fresh.stop()
    stopped = time.monotonic()
    r = node.client.get("/readyz")
    assert r.status_code == 503, r.text
    assert time.monotonic() - stopped < HEARTBEAT
    body = r.json()
    assert body["status"] == "not_ready" and str(redis_server_fresh.port) in body["broker"], body
    assert node.client.get("/healthz").status_code == 200  # alive all the same
    redis_server_fresh.start()
    deadline = time.monotonic() + 10
    while (r := node.client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a probe, as Kubernetes does
    assert r.status_code == 200, r.text


def test_an_enabled_model_that_failed_to_load_keeps_the_node_not_ready(server_factory: Callable[..., RunningServer]) -> None:
    settings = stub_settings(simulate_size_mib=100)
    settings["residency"] = {"memory_budget_mib": {"cpu": 1}}  # the model is bigger than its budget: state error
    node = server_factory(settings)
    r = node.client.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["models"] == {"stub": "error"}
    assert any(p.startswith("model stub: failed to load") for p in r.json()["problems"]), r.json()
    assert node.client.get("/healthz").status_code == 200


def test_a_single_process_with_its_model_loaded_is_ready(server_factory: Callable[..., RunningServer]) -> None:
    r = server_factory(stub_settings()).client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "broker": "ok", "models": {"stub": "loaded"}, "problems": []}
