"""Schemathesis against a live stub server, bounded (a fixed seed, few examples per
operation, every phase): no generated request may answer 5xx. The long form, many
seeds and examples, is bench/fuzz.sh."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .servers import RunningServer, stub_settings

pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (requirements.txt, tests)")
pytestmark = pytest.mark.timeout(180)
SEED, EXAMPLES = 20240611, 5


def test_no_generated_request_gets_a_server_error(server_factory: Callable[..., RunningServer], tmp_path: Path) -> None:
    settings = stub_settings(max_pixels=262144)
    settings["limits"] = {"max_body_mib": 4, "max_steps": 20}
    srv = server_factory(settings)
    cli = shutil.which("schemathesis") or "schemathesis"
    run = subprocess.run(
        [cli, "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
         "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
         "--suppress-health-check", "all", "--request-timeout", "30", "--no-color"],
        capture_output=True, text=True, timeout=170, cwd=tmp_path,  # its .schemathesis/ cache goes there
    )  # fmt: skip
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "unhandled error" not in srv.log(), srv.log()[-4000:]
