"""/api/tasks on both brokers: limit and a cursor page through the finished jobs
(no job twice, none missed, whatever finishes meanwhile), and the answer says how
many there are, counting only what the caller may list."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .servers import BROKERS, RunningServer, stub_settings
from .test_api import wait_done

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
ROOT = {"Authorization": "Bearer root-key"}
AUTH = {"api_keys": [{"key": "alice-key", "name": "alice"}, {"key": "bob-key", "name": "bob"}], "admin_keys": [{"key": "root-key", "name": "root"}]}


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    settings, args = broker_args({**stub_settings(), "auth": AUTH}, request.param)
    return server_factory(settings, *args)


def run(srv: RunningServer, headers: dict[str, str], count: int) -> list[str]:
    with httpx.Client(base_url=srv.url, headers=headers, timeout=60) as c:
        ids = [c.post("/api/generate", json={"prompt": f"job {i}"}).json()["task_id"] for i in range(count)]
        for task_id in ids:
            assert wait_done(c, task_id)["status"] == "done"
    return ids


def pages(srv: RunningServer, headers: dict[str, str], limit: int, between: Callable[[], Any] = lambda: None) -> tuple[list[str], list[dict[str, Any]]]:
    seen: list[str] = []
    answers = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        body = srv.client.get("/api/tasks", params=params, headers=headers).json()
        answers.append(body)
        assert len(body["recent"]) <= limit
        seen += [st["task_id"] for st in body["recent"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, answers
        between()


def test_a_cursor_pages_through_a_keys_finished_jobs_and_the_totals_say_how_many(srv: RunningServer) -> None:
    alice = run(srv, ALICE, 7)
    run(srv, BOB, 3)
    seen, answers = pages(srv, ALICE, 3)
    assert len(answers) == 3  # 3 + 3 + 1
    assert sorted(seen) == sorted(alice) and len(seen) == len(set(seen))
    assert all(a["recent_total"] == 7 and a["queue_total"] == 0 for a in answers)
    finished = [st["finished_at"] for a in answers for st in a["recent"]]
    assert finished == sorted(finished, reverse=True)
    admin = srv.client.get("/api/tasks", params={"limit": 4}, headers=ROOT).json()
    assert admin["recent_total"] >= 10 and len(admin["recent"]) == 4 and admin["next_cursor"]


def test_jobs_that_finish_while_paging_neither_repeat_nor_hide_older_ones(srv: RunningServer) -> None:
    older = srv.client.get("/api/tasks", params={"limit": 1000}, headers=BOB).json()["recent"]
    seen, _ = pages(srv, BOB, 2, between=lambda: run(srv, BOB, 1))
    assert len(seen) == len(set(seen))
    assert {st["task_id"] for st in older} <= set(seen)


def test_a_bad_cursor_or_limit_is_a_400_naming_it(srv: RunningServer) -> None:
    for params, param in (({"cursor": "nonsense"}, "cursor"), ({"cursor": "inf_abc"}, "cursor"), ({"limit": 0}, "limit"), ({"limit": 1001}, "limit")):
        r = srv.client.get("/api/tasks", params=params, headers=ALICE)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
