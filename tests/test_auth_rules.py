"""Auth that says what it does: with any key configured (user or admin keys alike)
callers without one are refused unless auth.anonymous; /metrics needs a key unless
metrics.public, and an anonymous scrape never sees key ids; a Redis that cannot be
reached at start is one clean line naming it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import httpx

from .servers import ROOT, RunningServer, free_port, stub_settings
from .test_api import wait_done

ROOT_KEY = {"Authorization": "Bearer root-key"}


def run_one(srv: RunningServer, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=srv.url, headers=headers, timeout=60) as c:
        assert wait_done(c, c.post("/api/generate", json={"prompt": "x"}).json()["task_id"])["status"] == "done"


def test_only_admin_keys_configured_still_refuses_callers_without_a_key(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory({**stub_settings(), "auth": {"admin_keys": [{"key": "root-key", "name": "root"}]}})
    r = srv.client.post("/api/generate", json={"prompt": "x"})
    assert r.status_code == 401, r.text
    assert "auth.anonymous" in r.json()["error"]["message"]
    assert srv.client.post("/api/generate", json={"prompt": "x"}, headers=ROOT_KEY).status_code == 200


def test_auth_anonymous_opens_the_job_api_but_not_the_admin_routes(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory({**stub_settings(), "auth": {"admin_keys": ["root-key"], "anonymous": True}})
    r = srv.client.post("/api/generate", json={"prompt": "x"})
    assert r.status_code == 200, r.text
    assert srv.client.get("/v1/admin/models").status_code == 401
    assert srv.client.get("/metrics").status_code == 401  # auth.anonymous opens the job API, not the metrics
    assert srv.client.get("/v1/admin/models", headers=ROOT_KEY).status_code == 200


def test_metrics_need_a_key_when_keys_are_on(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory({**stub_settings(), "auth": {"api_keys": [{"key": "alice-key", "name": "alice"}]}})
    alice = {"Authorization": "Bearer alice-key"}
    run_one(srv, alice)
    assert srv.client.get("/metrics").status_code == 401
    assert 'easel_gpu_seconds_total{key="alice",model="stub"}' in srv.client.get("/metrics", headers=alice).text


def test_public_metrics_show_anonymous_scrapers_no_key_ids(server_factory: Callable[..., RunningServer]) -> None:
    settings = {**stub_settings(), "auth": {"api_keys": [{"key": "alice-key", "name": "alice"}]}, "metrics": {"public": True}}
    srv = server_factory(settings)
    alice = {"Authorization": "Bearer alice-key"}
    for _ in range(2):
        run_one(srv, alice)
    text = srv.client.get("/metrics").text
    assert "alice" not in text and 'key="' not in text
    assert 'easel_gpu_seconds_total{model="stub"}' in text
    assert 'easel_jobs_submitted_total{model="stub",task="generate"} 2.0' in text  # other series as they are
    assert 'key="alice"' in srv.client.get("/metrics", headers=alice).text


def test_a_redis_that_cannot_be_reached_at_start_is_one_clean_line_naming_it(tmp_path: object) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    run = subprocess.run([sys.executable, str(ROOT / "server.py"), "--broker", url, "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 2
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert url.replace(":hunter2", "***") in lines[0] and "hunter2" not in lines[0]
    assert "Traceback" not in lines[0]
