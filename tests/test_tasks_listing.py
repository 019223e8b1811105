"""/api/tasks on both brokers: scopes (own, shared, all), private prompts in shared
listings, filters (status, model, since) with the cursor, and totals that count
what the filtered listing holds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from clients.easel import Client

from .servers import BROKERS, RunningServer, stub_settings
from .test_api import wait_done

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
ROOT = {"Authorization": "Bearer root-key"}
AUTH = {"api_keys": [{"key": "alice-key", "name": "alice"}, {"key": "bob-key", "name": "bob"}], "admin_keys": [{"key": "root-key", "name": "root"}]}
SECRET = "alice's secret prompt"


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    cfg = stub_settings()
    cfg["models"]["other"] = dict(cfg["models"]["stub"])
    settings, args = broker_args({**cfg, "auth": AUTH}, request.param)
    return server_factory(settings, *args)


def client(srv: RunningServer, headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers=headers, timeout=60)


def submit(c: httpx.Client, prompt: str, model: str = "stub", **body: Any) -> str:
    r = c.post("/api/generate", json={"prompt": prompt, "model": model, "metadata": {"note": prompt}, **body})
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def tasks(srv: RunningServer, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    r = srv.client.get("/api/tasks", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def paused(srv: RunningServer) -> Iterator[None]:
    """The stub model's queue paused: jobs submitted meanwhile stay queued."""
    srv.client.post("/v1/admin/models/stub/pause", headers=ROOT)
    yield
    srv.client.post("/v1/admin/models/stub/resume", headers=ROOT)


def test_a_shared_listing_shows_another_keys_queued_job_without_its_prompt_and_an_admin_sees_it(srv: RunningServer, paused: None) -> None:
    with client(srv, ALICE) as alice, client(srv, BOB) as bob:
        secret = submit(alice, SECRET, width=128, height=64)
        mine = submit(bob, "bob's own prompt")
        own = tasks(srv, BOB)
        assert own["scope"] == "own" and [j["task_id"] for j in own["queue"]] == [mine]
        shared = srv.client.get("/api/tasks", params={"scope": "shared"}, headers=BOB)
        assert SECRET not in shared.text
        body = shared.json()
        assert body["scope"] == "shared" and body["queue_total"] >= 2
        listed = {j["task_id"]: j for j in body["queue"]}
        other = listed[secret]
        assert other["private"] is True and other["metadata"] is None and other["images"] == [] and other["seed"] is None
        assert (other["model"], other["status"], other["pos"], other["width"], other["height"]) == ("stub", "waiting", 0, 128, 64)
        assert listed[mine]["private"] is False and listed[mine]["metadata"] == {"note": "bob's own prompt"}
        assert listed[mine]["pos"] == 1
        for scope in ("all", "shared"):
            admin = srv.client.get("/api/tasks", params={"scope": scope}, headers=ROOT)
            assert SECRET in admin.text
            assert next(j for j in admin.json()["queue"] if j["task_id"] == secret)["private"] is False
        alice.delete(f"/api/tasks/{secret}")
        bob.delete(f"/api/tasks/{mine}")


def test_finished_jobs_of_another_key_stay_out_of_a_shared_listing(srv: RunningServer) -> None:
    with client(srv, ALICE) as alice:
        done = submit(alice, SECRET)
        assert wait_done(alice, done)["status"] == "done"
    shared = srv.client.get("/api/tasks", params={"scope": "shared", "limit": 1000}, headers=BOB)
    assert done not in shared.text and SECRET not in shared.text


def test_scope_all_is_for_admins_and_bad_filters_are_400s_naming_them(srv: RunningServer) -> None:
    r = srv.client.get("/api/tasks", params={"scope": "all"}, headers=BOB)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only" and r.json()["error"]["param"] == "scope"
    for params, param in (({"scope": "mine"}, "scope"), ({"status": "finished"}, "status"), ({"status": ","}, "status"),
                          ({"since": "yesterday"}, "since"), ({"since": "inf"}, "since")):  # fmt: skip
        r = srv.client.get("/api/tasks", params=params, headers=BOB)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert srv.client.get("/api/tasks", params={"model": "nope"}, headers=BOB).status_code == 404


def test_filters_with_the_cursor_page_through_exactly_the_matching_jobs_and_totals_count_them(srv: RunningServer) -> None:
    with client(srv, BOB) as bob:
        before = [submit(bob, f"early {i}", "other") for i in range(2)]
        for t in before:
            wait_done(bob, t)
        since = time.time()
        stub = [submit(bob, f"stub {i}") for i in range(3)]
        other = [submit(bob, f"other {i}", "other") for i in range(5)]
        for t in [*stub, *other]:
            wait_done(bob, t)
        failed = submit(bob, "fail", "other")  # the stub fails this prompt (simulate_faults)
        assert wait_done(bob, failed)["status"] == "error"
    seen: list[str] = []
    cursor = None
    while True:
        page = tasks(srv, BOB, model="other", status="done", since=since, limit=2, **({"cursor": cursor} if cursor else {}))
        assert page["recent_total"] == 5 and page["queue_total"] == 0 and len(page["recent"]) <= 2
        assert all(j["model"] == "other" and j["status"] == "done" and j["created_at"] >= since for j in page["recent"])
        seen += [j["task_id"] for j in page["recent"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(other) and len(seen) == len(set(seen))
    with Client(srv.url, api_key="bob-key") as sdk:  # the Python client passes the filters on
        assert sdk.tasks(model="other", status="done", since=since, limit=1000)["recent_total"] == 5
    errors = tasks(srv, BOB, status="error,cancelled", since=since)
    assert [j["task_id"] for j in errors["recent"]] == [failed] and errors["recent_total"] == 1
    everything = tasks(srv, BOB, since=since, limit=1000)
    assert everything["recent_total"] == 9 and {j["task_id"] for j in everything["recent"]} == {*stub, *other, failed}
    assert tasks(srv, ROOT, scope="own", since=since)["recent_total"] == 0  # an admin's own jobs: none


def test_a_status_filter_on_the_queue_lists_only_those(srv: RunningServer, paused: None) -> None:
    with client(srv, BOB) as bob:
        queued = [submit(bob, f"queued {i}") for i in range(3)]
        waiting = tasks(srv, BOB, status="waiting", model="stub")
        assert [j["task_id"] for j in waiting["queue"]] == queued and waiting["queue_total"] == 3
        assert waiting["recent"] == [] and waiting["recent_total"] == 0
        assert tasks(srv, BOB, status="running", model="stub")["queue"] == []
        for t in queued:
            bob.delete(f"/api/tasks/{t}")


def test_a_keys_own_queued_job_behind_more_than_a_page_of_others_is_listed_and_counted(srv: RunningServer, paused: None) -> None:
    with client(srv, ALICE) as alice, client(srv, BOB) as bob:
        theirs = [submit(alice, f"{SECRET} {i}") for i in range(5)]
        mine = submit(bob, "bob's late job", priority=1)  # a lower priority: behind all of alice's, fair share or not
        own = tasks(srv, BOB, limit=3)
        assert [j["task_id"] for j in own["queue"]] == [mine] and own["queue_total"] == 1
        assert own["queue"][0]["pos"] == 5
        shared = tasks(srv, BOB, limit=3, scope="shared")
        assert [j["task_id"] for j in shared["queue"]] == theirs[:3] and shared["queue_total"] == 6
        early = submit(bob, "bob's job at alice's priority")  # fair share: after one more of alice's, not all five
        assert tasks(srv, BOB, limit=3)["queue"][0]["pos"] == 1
        bob.delete(f"/api/tasks/{early}")
        for t in theirs:
            alice.delete(f"/api/tasks/{t}")
        bob.delete(f"/api/tasks/{mine}")
