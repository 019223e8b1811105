"""``bench/gpu_check.py`` in its bounded form (``--quick --device cpu``), run as a user
runs it, so that the script a lent GPU machine will run cannot rot: on the CPU its
CPU rows run and pass with numbers, and the rows that need CUDA say so."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.timeout(420)

TINY = ("sdxl", "flux2_klein", "z_image", "qwen_edit_gguf")
CUDA_ONLY = (
    "generate fp16",
    "residency: torch.cuda after load",
    "peak VRAM per reference",
    "model offload",
    "sequential offload",
    "attention backends",
    "compile regional",
    "fp8dq (torchao, Hopper)",
    "device_map load",
    "LoRA hotswap under compile",
)
SWEEP = {"sdxl": [0, 1], "z_image": [0, 1], "flux2_klein": [0, 1, 2], "qwen_edit_gguf": [1, 2]}


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_check") / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick", "--device", "cpu", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    data = json.loads(Path(out).read_text())
    data["stdout"] = proc.stdout
    return data  # type: ignore[no-any-return]


def row(data: dict[str, Any], backend: str, name: str) -> dict[str, Any]:
    found = [r for r in data["rows"] if r["target"] == f"{backend} (tiny)" and r["check"] == name]
    assert len(found) == 1, (backend, name, [r["check"] for r in data["rows"]])
    return found[0]


@pytest.mark.parametrize("backend", TINY)
def test_cpu_rows_pass_with_numbers(check: dict[str, Any], backend: str) -> None:
    gen = row(check, backend, "generate fp32")
    assert gen["status"] == "ok" and gen["seconds"] > 0 and gen["value"] == "64x64", gen
    size = row(check, backend, "residency: params + buffers")
    assert size["status"] == "ok" and float(size["value"].split()[0]) > 0, size
    sweep = row(check, backend, "reference sweep")
    assert sweep["status"] == "ok" and sweep["seconds"] > 0, sweep
    points = check["reference_sweeps"][f"{backend} (tiny)"]
    assert [p["references"] for p in points] == SWEEP[backend] and all(p["seconds"] > 0 and p["peak_mib"] is None for p in points)
    huge = row(check, backend, "huge job -> error, worker goes on")
    assert huge["status"] == "ok" and huge["value"] == "error, then done" and "out of host memory" in huge["detail"], huge


@pytest.mark.parametrize("backend", TINY)
def test_bf16_runs_on_the_cpu_except_where_quick_says_why(check: dict[str, Any], backend: str) -> None:
    bf16 = row(check, backend, "generate bf16")
    if backend == "qwen_edit_gguf":
        assert bf16["status"] == "skipped" and bf16["detail"].startswith("--quick"), bf16
    else:
        assert bf16["status"] == "ok" and bf16["seconds"] > 0, bf16


@pytest.mark.parametrize("backend", TINY)
@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_rows_are_named_as_skipped(check: dict[str, Any], backend: str, name: str) -> None:
    r = row(check, backend, name)
    assert r["status"] == "skipped" and r["detail"].startswith("needs CUDA (") and r["seconds"] is None, r


def test_fp8_runs_through_torchao_where_it_is_installed(check: dict[str, Any]) -> None:
    r = row(check, "flux2_klein", "fp8 weight-only (torchao)")
    if importlib.util.find_spec("torchao") is None:
        assert r["status"] == "skipped" and "torchao is not installed" in r["detail"], r
    else:
        assert r["status"] == "ok" and "float8" in r["detail"] and r["seconds"] > 0, r
    for backend in ("sdxl", "z_image", "qwen_edit_gguf"):
        other = row(check, backend, "fp8 weight-only (torchao)")
        assert other["status"] == "skipped" and "only the flux2_klein backend" in other["detail"], other


@pytest.mark.parametrize("backend", TINY)
def test_prompt_cache_row_skips_the_text_encoder(check: dict[str, Any], backend: str) -> None:
    r = row(check, backend, "prompt cache")
    if backend == "qwen_edit_gguf":
        assert r["status"] == "skipped" and "encodes its reference images" in r["detail"], r
    else:
        assert r["status"] == "ok" and r["value"].endswith("x") and "ran 0 times" in r["detail"] and r["seconds"] > 0, r


def test_prints_one_table_with_every_row(check: dict[str, Any]) -> None:
    out = check["stdout"]
    lines = out.splitlines()
    assert "easel GPU check on cpu" in out and "| backend" in out and " 0 failed in " in out
    assert len(check["rows"]) == len(TINY) * 19
    for r in check["rows"]:
        assert any(r["target"] in line and f"| {r['check']} " in line and f"| {r['status']} " in line for line in lines), r
    assert "Peak VRAM per reference image, flux2_klein (tiny)" in out and "| # references |" in out


@pytest.mark.parametrize("backend", TINY)
def test_step_cache_row_runs_on_the_cpu_where_the_family_takes_it(check: dict[str, Any], backend: str) -> None:
    r = row(check, backend, "step cache per job")
    if backend == "qwen_edit_gguf":
        assert r["status"] == "ok" and r["value"].endswith("x") and r["seconds"] > 0 and "passes of the last block" in r["detail"], r
    else:
        assert r["status"] == "skipped" and "qwen_edit_gguf" in r["detail"], r


@pytest.mark.parametrize("backend", TINY)
def test_batched_calls_row_gives_jobs_a_second_for_calls_of_1_2_and_4(check: dict[str, Any], backend: str) -> None:
    r = row(check, backend, "batched calls 1/2/4")
    if backend == "qwen_edit_gguf":  # its family runs one job per call
        assert r["status"] == "skipped" and "one job per call" in r["detail"], r
        return
    assert r["status"] == "ok" and r["seconds"] > 0, r
    rates = [float(x) for x in r["value"].removesuffix(" jobs/s").split(" / ")]
    assert len(rates) == 3 and all(x > 0 for x in rates), r
    assert "calls of 1, 2, 4 jobs" in r["detail"], r
