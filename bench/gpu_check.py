"""The GPU check: one script that a lent CUDA machine runs (in well under 8 minutes)
and that prints one table of what works there.

    python3 bench/gpu_check.py                 # every tiny pipeline; on cuda when available, else cpu
    python3 bench/gpu_check.py --quick         # the bounded form tests/test_gpu_check.py runs (64 px, 2 steps)
    python3 bench/gpu_check.py --model-dir flux2_klein=/models/FLUX.2-klein-4B --json gpu-check.json

For each backend on its tiny random-weight pipeline (``tests/tiny_pipelines.py``, built
offline in a temp dir; the Qwen edit one with a Q8_0 GGUF transformer, as that backend
serves it) and on each real folder named by ``--model-dir``, one row per check:

- ``generate fp32 / bf16 / fp16``: one call (fp32 is the CPU's dtype, fp16 CUDA's only, and
  only for the families that allow it: SDXL);
  the images must have the asked size and not be uniform (NaN or overflow);
- ``residency: params + buffers``: the pipeline's bytes, what ``backends.memory.measure_mib``
  counts on the CPU; ``residency: torch.cuda after load``: the growth of
  ``torch.cuda.memory_allocated`` over the load, what it counts on CUDA (the residency
  budget figure), with the memory at rest;
- ``reference sweep`` and ``peak VRAM per reference``: 0..3 reference images (seed 001's
  table; the Qwen edit model 1..3; SDXL and Z-Image take one, the img2img source);
- ``fp8 weight-only (torchao)``: ``quantization: "fp8"`` (FLUX.2-klein only);
- ``model offload`` / ``sequential offload``: ``offload: model|sequential`` (CUDA);
- ``prompt cache``, ``attention backends``, ``compile regional``, ``fp8dq (torchao, Hopper)``,
  ``batched calls 1/2/4``: the speed knobs (``bench/gpu_check_knobs.py``; the prompt
  cache and the batched calls on the CPU too);
- ``huge job -> error, worker goes on``: through a real server (``tests/servers.start_server``;
  the model in its own process, as served by default) an 8192x8192 n=64 job must end as
  ``error`` naming the memory failure, then a normal job on the same model must
  complete.  On CUDA the server's allocator is capped
  (``PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction``) a few GiB above the largest
  model, so the OOM comes at once.  The CPU has no CUDA OOM to force: the same path is
  driven by a host allocation refused under ``RLIMIT_AS`` (set on the model's process for
  that job only), which the server reports as a model failure.

For the other checks models load as the server loads them (``ModelHost.load``:
``create_backend``, ``load``, ``backends.memory.measure_mib``), in this process
(``isolate: false``: the checks look into the pipeline and this process's
``torch.cuda``), and run as its worker runs them (``backend.run(WorkItem, ctx)``).
Each check is isolated: an exception becomes its row's ``FAILED``; a check that
cannot run here is ``skipped``, with the reason.  The exit code is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench.gpu_check_core import (  # noqa: E402
    BACKENDS,
    DTYPES,
    EDIT_ONLY,
    HUGE,
    MIB,
    ONE_REFERENCE,
    OOM_CHECK,
    PROMPT,
    SLOW_BF16_ON_CPU,
    Check,
    Env,
    Loaded,
    Result,
    Row,
    Skip,
    Target,
    mib,
    storage_bytes,
    timed_run,
    work,
)  # fmt: skip
from bench.gpu_check_knobs import knob_checks  # noqa: E402
from server.backends.memory import module_bytes  # noqa: E402
from server.families import FAMILIES  # noqa: E402
from tests import tiny_pipelines as tp  # noqa: E402
from tests.backend_helpers import reference  # noqa: E402
from tests.servers import RunningServer, model_processes, start_server  # noqa: E402

# ----------------------------------------------------------------------------- in-process checks


def generate(dtype: str) -> Check:
    def run(env: Env, target: Target, loaded: Loaded) -> Result:
        if dtype == "fp16":
            env.needs_cuda()
            if not FAMILIES[target.backend].float16:
                raise Skip(f"float16 is refused for {target.backend} (it overflows: black images); bf16 is served")
        if dtype == "fp32" and env.cuda:
            raise Skip("fp32 is the CPU's dtype; on CUDA the server serves bf16 (auto) or fp16")
        if dtype == "bf16" and env.quick and not env.cuda and target.backend in SLOW_BF16_ON_CPU:
            raise Skip("--quick: bf16 on the CPU takes ~16 s for this model (its 3-D VAE); the full run does it")
        ms = loaded.get(target, dtype)
        item = work(target)
        seconds, peak = timed_run(env, ms, item)
        target.found[f"peak {dtype}"] = peak
        target.found[f"seconds {dtype}"] = seconds
        refs = f", {len(item.images)} ref" if item.images else ""
        detail = f"{item.spec.steps} steps{refs}, {DTYPES[dtype]} on {env.device}; loaded in {loaded.seconds:.2f} s"
        return Result(seconds, peak, f"{item.spec.width}x{item.spec.height}", detail)

    return Check(f"generate {dtype}", run)


def residency_params(env: Env, target: Target, loaded: Loaded) -> Result:
    ms = loaded.get(target, env.served)
    params = target.found["params_mib"] = module_bytes(ms.backend.pipe) / MIB  # type: ignore[union-attr]
    if not env.cuda and (ms.size_mib is None or abs(ms.size_mib - params) > 0.2):
        raise AssertionError(f"the registry measured {ms.size_mib} MiB, the pipeline's params + buffers are {params:.1f} MiB")
    how = "= the registry's measured size on the CPU" if not env.cuda else "on the GPU: compare the torch.cuda row"
    return Result(value=f"{params:.1f} MiB", detail=f"{DTYPES[env.served]}; {how}")


def residency_cuda(env: Env, target: Target, loaded: Loaded) -> Result:
    env.needs_cuda()
    ms = loaded.get(target, env.served)
    params = module_bytes(ms.backend.pipe) / MIB  # type: ignore[union-attr]
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated() / MIB, torch.cuda.memory_reserved() / MIB
    free, total = (x / MIB for x in torch.cuda.mem_get_info())
    target.found["size_mib"] = ms.size_mib
    if not ms.size_mib or not 0.9 * params <= ms.size_mib <= 1.5 * params + 8:
        raise AssertionError(f"measured {ms.size_mib} MiB over the load, but the weights are {params:.1f} MiB")
    return Result(
        value=f"{ms.size_mib:.1f} MiB",
        detail=f"memory_allocated growth over the load (the budget figure); at rest allocated {allocated:.0f}, "
        f"reserved {reserved:.0f} MiB; params {params:.1f} MiB; GPU {free:.0f} of {total:.0f} MiB free",
    )


def reference_sweep(env: Env, target: Target, loaded: Loaded) -> Result:
    ms = loaded.get(target, env.served)
    points = [(k, *timed_run(env, ms, work(target, refs=k, size=target.sweep_size))) for k in target.ref_counts]
    target.found["sweep"] = points
    peak = max(p or 0.0 for *_, p in points) if env.cuda else None
    w, h = target.sweep_size
    return Result(sum(s for _, s, _ in points), peak, f"{w}x{h}", ", ".join(f"{k} ref {s:.2f} s" for k, s, _ in points))


def peak_per_reference(env: Env, target: Target, loaded: Loaded) -> Result:
    env.needs_cuda()
    points = target.found.get("sweep")
    if not points or len(points) < 2:
        raise RuntimeError("the reference sweep did not run (see its row)")
    (k0, _, p0), (k1, _, p1) = points[0], points[-1]
    deltas = ", ".join(f"{b[2] - a[2]:+.1f}" for a, b in zip(points, points[1:], strict=False))
    peaks = ", ".join(f"{p:.0f}" for *_, p in points)
    return Result(peak_mib=p1, value=f"{(p1 - p0) / (k1 - k0):+.1f} MiB/ref", detail=f"peaks {peaks} MiB; deltas {deltas}")


def fp8(env: Env, target: Target, loaded: Loaded) -> Result:
    if target.backend != "flux2_klein":
        raise Skip("only the flux2_klein backend implements quantization 'fp8'")
    try:
        import torchao
    except ImportError:
        raise Skip("torchao is not installed (pip install -r requirements-gpu.txt)") from None
    ms = loaded.get(target, env.served, quantization="fp8")
    transformer = ms.backend.pipe.transformer  # type: ignore[union-attr]
    weights = [p for p in transformer.parameters() if type(p).__name__.startswith("Float8")]
    if not weights:
        raise AssertionError("no weight of the transformer was quantized")
    seconds, peak = timed_run(env, ms, work(target))
    held, counted = sum(storage_bytes(p) for p in transformer.parameters()) / MIB, module_bytes(transformer) / MIB
    return Result(
        seconds,
        peak,
        f"{held:.2f} MiB",
        f"torchao {torchao.__version__}: {len(weights)} transformer weights float8 on {env.device}; the transformer holds "
        f"{held:.2f} MiB, backends.memory.module_bytes counts {counted:.2f} MiB; the registry measured {ms.size_mib} MiB for the pipeline",
    )


def offload(mode: str) -> Check:
    def run(env: Env, target: Target, loaded: Loaded) -> Result:
        env.needs_cuda()
        if mode == "sequential" and str(target.cfg.get("transformer_path") or "").endswith(".gguf"):
            raise Skip("refused with a GGUF transformer (accelerate cannot re-create its parameters: Diffusers issue #14691)")
        ms = loaded.get(target, env.served, offload=mode)
        seconds, peak = timed_run(env, ms, work(target))
        return Result(
            seconds, peak, f"{mib(peak)} MiB", f"without offload {mib(target.found.get('peak ' + env.served))} MiB peak"
        )

    return Check(f"{mode} offload", run)


def in_process_checks(env: Env) -> list[Check]:
    """In an order where the checks on one load run together (one load each)."""
    return [
        generate(env.served),
        Check("residency: params + buffers", residency_params),
        Check("residency: torch.cuda after load", residency_cuda),
        Check("reference sweep", reference_sweep),
        Check("peak VRAM per reference", peak_per_reference),
        *(generate(d) for d in DTYPES if d != env.served),
        Check("fp8 weight-only (torchao)", fp8),
        offload("model"),
        offload("sequential"),
        *knob_checks(env),
    ]


# ----------------------------------------------------------------------------- the server check


def start_check_server(env: Env, targets: list[Target]) -> RunningServer:
    """One server with every target as a model (not loaded) that accepts the huge job."""
    models = {
        t.name: {**t.cfg, "max_pixels": HUGE["width"] * HUGE["height"], "max_output_images": HUGE["n"],
                 "default_width": t.size, "default_height": t.size, "recommended_steps": t.steps}
        for t in targets
    }  # fmt: skip
    settings = {"models": models, "default_model": targets[0].name}
    if not env.cuda:  # tests/tiny_server.py: the tests' torch threads and 64x64 Qwen reference resize
        threads = {"OMP_NUM_THREADS": str(env.threads), "EASEL_TEST_THREADS": str(env.threads)}
        return start_server(env.tmp, settings, env=threads, script=ROOT / "tests" / "tiny_server.py")
    total = torch.cuda.mem_get_info()[1] / MIB
    biggest = max((max(t.found.get("size_mib") or 0.0, t.found.get("params_mib") or 0.0) for t in targets), default=0.0)
    fraction = min(1.0, (1.5 * biggest + 4096) / total)
    env.cap_mib = fraction * total
    conf = ",".join(filter(None, [os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), f"per_process_memory_fraction:{fraction:.4f}"]))
    return start_server(env.tmp, settings, env={"PYTORCH_CUDA_ALLOC_CONF": conf})


def job(c: httpx.Client, target: Target, **body: Any) -> dict[str, Any]:
    """Submit over the API (an edit with one reference for the edit-only model) and long-poll to its end."""
    task = "edit" if target.backend in EDIT_ONLY else "generate"
    body = {"model": target.name, "prompt": PROMPT, "seed": 1, "format": "PNG", **body}
    if task == "edit":
        buf = io.BytesIO()
        reference(target.ref_side, target.ref_side).save(buf, "PNG")
        body["images"] = ["data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()]
    r = c.post(f"/api/{task}", json=body)
    if r.status_code != 200:
        raise AssertionError(f"submission refused: {r.status_code} {r.text[:300]}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st: dict[str, Any] = c.get("/api/status", params={"task_id": r.json()["task_id"], "wait": 10}).json()
        if st["status"] in ("done", "error", "cancelled"):
            return st
    raise AssertionError(f"job {r.json()['task_id']} did not end within 300 s")


def model_process(server_pid: int) -> int:
    """The pid of the server's one model process (every backend but the stub runs in its
    own by default: a multiprocessing spawn child), else the server's own."""
    kids = model_processes(server_pid)
    return next(iter(kids)) if len(kids) == 1 else server_pid


@contextmanager
def host_memory_cap(pid: int, headroom_mib: int = 512) -> Iterator[None]:
    """Process ``pid`` may map only ``headroom_mib`` more (RLIMIT_AS soft limit) until the block ends."""
    proc = psutil.Process(pid)
    old = proc.rlimit(psutil.RLIMIT_AS)  # type: ignore[attr-defined]
    proc.rlimit(psutil.RLIMIT_AS, (proc.memory_info().vms + headroom_mib * MIB, old[1]))  # type: ignore[attr-defined]
    try:
        yield
    finally:
        proc.rlimit(psutil.RLIMIT_AS, old)  # type: ignore[attr-defined]


def oom_check(env: Env, target: Target) -> Result:
    if not env.cuda and not hasattr(psutil, "RLIMIT_AS"):
        raise Skip("needs CUDA, or RLIMIT_AS (Linux) to refuse a host allocation instead")
    assert env.server is not None
    c = env.server.client
    r = c.post(f"/v1/admin/models/{target.name}/load")
    if r.status_code != 200 or r.json().get("state") != "loaded":
        raise RuntimeError(f"the server could not load the model: {r.text[:300]}")
    try:
        start = time.perf_counter()
        if env.cuda:
            st = job(c, target, **HUGE)
            how, expect = f"CUDA OOM (allocator capped at {(env.cap_mib or 0) / 1024:.1f} GiB)", "out of GPU memory"
        else:
            with host_memory_cap(model_process(env.server.proc.pid)):
                st = job(c, target, **HUGE)
            how, expect = "CPU: host allocation refused under RLIMIT_AS, not a CUDA OOM", "out of host memory"
        huge_s = time.perf_counter() - start
        message = st.get("message") or ""
        if st["status"] != "error" or expect not in message:
            raise AssertionError(f"the huge job ended as {st['status']!r} ({message!r}), not an error naming {expect!r}")
        start = time.perf_counter()
        after = job(c, target, width=target.size, height=target.size, steps=target.steps)
        png = c.get("/api/image", params={"task_id": after["task_id"], "delete": "true"})
        if after["status"] != "done" or not png.content.startswith(b"\x89PNG"):
            raise AssertionError(f"the next job ended as {after['status']!r} ({after.get('message')}), image {png.status_code}")
        next_s = time.perf_counter() - start
    finally:
        c.post(f"/v1/admin/models/{target.name}/unload")
    at = max(0, message.find(expect) - 30)
    excerpt = ("..." if at else "") + message[at : at + 100] + "..."
    detail = f"{HUGE['width']}x{HUGE['height']} n={HUGE['n']}: {how}: {excerpt!r}; next job done in {next_s:.2f} s"
    return Result(huge_s, None, "error, then done", detail)


# ----------------------------------------------------------------------------- targets


def ref_counts(backend: str, n: int) -> list[int]:
    if backend in ONE_REFERENCE:
        return [0, 1]
    return list(range(1 if backend in EDIT_ONLY else 0, n))


def tiny_targets(env: Env, backends: list[str]) -> list[Target]:
    size, steps, counts = (64, 2, 3) if env.quick else (128, 4, 4)
    targets = []
    for b in backends:
        folder = tp.BUILDERS[b](env.tmp / b)
        cfg: dict[str, Any] = {"backend": b, "device": env.device, "model_path": str(folder), "max_images": 16}
        if b == "qwen_edit_gguf":  # the backend's own form: a GGUF transformer, the rest from the folder
            gguf = tp.write_qwen_transformer_gguf(folder, env.tmp / "qwen_transformer-Q8_0.gguf")
            cfg.update(model_path=None, transformer_path=str(gguf), base_model_path=str(folder))
        targets.append(Target(f"{b} (tiny)", f"{b}-tiny", b, cfg, size, steps, (size, size), 64, ref_counts(b, counts)))
    return targets


def parse_pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for text in items:
        name, sep, path = text.partition("=")
        if not sep or name not in BACKENDS:
            raise SystemExit(f"{flag} takes BACKEND=PATH with BACKEND one of {', '.join(BACKENDS)}, not {text!r}")
        out.append((name, path))
    return out


def real_targets(env: Env, args: argparse.Namespace) -> list[Target]:
    bases = dict(parse_pairs(args.base_dir, "--base-dir"))
    w, _, h = args.ref_size.partition("x")
    targets = []
    for i, (b, path) in enumerate(parse_pairs(args.model_dir, "--model-dir")):
        cfg: dict[str, Any] = {"backend": b, "device": env.device, "model_path": path, "max_images": 16}
        if b in bases:
            cfg["base_model_path"] = bases[b]
        label = f"{b} ({Path(path).name})"
        targets.append(Target(label, f"{b}-real{i}", b, cfg, args.size, args.steps, (int(w), int(h)), 1024, ref_counts(b, 4)))
    return targets


# ----------------------------------------------------------------------------- running and reporting


def attempt(rows: list[Row], target: Target, name: str, fn: Callable[[], Result]) -> None:
    """Run one check into one row: ok, skipped (the reason) or FAILED (the exception)."""
    start = time.perf_counter()
    try:
        res = fn()
    except Skip as exc:
        rows.append(Row(target=target.label, check=name, status="skipped", detail=str(exc)))
    except Exception as exc:  # a failed check is a row, never the end of the run
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        rows.append(Row(target=target.label, check=name, status="FAILED", detail=f"{type(exc).__name__}: {text}"))
    else:
        rows.append(Row(target=target.label, check=name, status="ok", **asdict(res)))
    took = time.perf_counter() - start
    print(f"  {target.label:<22} {name:<34} {rows[-1].status:<8} {took:6.2f} s", file=sys.stderr, flush=True)


def run_all(env: Env, targets: list[Target], server: bool) -> list[Row]:
    rows: list[Row] = []
    loaded = Loaded()
    for t in targets:
        for check in in_process_checks(env):
            attempt(rows, t, check.name, partial(check.run, env, t, loaded))
        loaded.release()
    if not server:
        rows += [Row(target=t.label, check=OOM_CHECK, status="skipped", detail="--no-server") for t in targets]
    elif targets:
        try:  # after the in-process checks: the CUDA cap needs every target's measured size
            env.server = start_check_server(env, targets)
        except Exception as exc:
            failed = f"the server did not start: {str(exc)[:200]}"
            rows += [Row(target=t.label, check=OOM_CHECK, status="FAILED", detail=failed) for t in targets]
        else:
            try:
                for t in targets:
                    attempt(rows, t, OOM_CHECK, partial(oom_check, env, t))
            finally:
                env.server.stop()
    order = {t.label: i for i, t in enumerate(targets)}
    return sorted(rows, key=lambda r: order[r.target])  # stable: each target's rows in check order


def table(rows: list[Row]) -> str:
    head = ("backend", "check", "status", "s", "peak MiB", "result", "detail / reason")
    cells = [head] + [
        (r.target, r.check, r.status, "-" if r.seconds is None else f"{r.seconds:.2f}", mib(r.peak_mib), r.value or "-", r.detail)
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]  # the last column is not padded
    lines = ["| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=False)) + f" | {c[-1]} |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
    return "\n".join(lines)


def sweep_tables(env: Env, targets: list[Target]) -> str:
    """Seed 001's table per target: peak VRAM by number of reference images."""
    out = []
    for t in targets:
        points = t.found.get("sweep")
        if not points:
            continue
        (w, h), note = t.sweep_size, "" if env.cuda else " (CPU: times only; peak VRAM needs CUDA)"
        out += [f"\nPeak VRAM per reference image, {t.label}: {w}x{h} output, {t.steps} steps, "
                f"{t.ref_side}x{t.ref_side} references{note}",
                "| # references | peak VRAM (MiB) | + per added reference (MiB) | time (s) |", "|---|---|---|---|"]  # fmt: skip
        for i, (k, s, p) in enumerate(points):
            delta = "-" if i == 0 or p is None else f"{(p - points[i - 1][2]) / (k - points[i - 1][0]):+.1f}"
            out.append(f"| {k} | {mib(p)} | {delta} | {s:.2f} |")
    return "\n".join(out)


def versions() -> dict[str, str]:
    import diffusers

    try:
        import torchao

        ao = str(torchao.__version__)
    except ImportError:
        ao = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__, "torchao": ao}


def header(env: Env, n_targets: int, took: float) -> str:
    gpu = torch.cuda.get_device_name(0) if env.cuda else "CUDA not used" if torch.cuda.is_available() else "no CUDA device"
    v = versions()
    form = "--quick: 64 px, 2 steps" if env.quick else "128 px, 4 steps"
    return (
        f"\neasel GPU check on {env.device} ({gpu}); torch {v['torch']}, diffusers {v['diffusers']}, torchao {v['torchao']}; "
        f"tiny pipelines {form}, {env.threads} CPU thread(s); {n_targets} target(s), {took:.1f} s\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the bounded form: 64 px, 2 steps, up to 2 references")
    p.add_argument("--backends", default=",".join(BACKENDS), help="tiny pipelines to check, comma-separated ('' for none)")
    p.add_argument("--model-dir", action="append", default=[], metavar="BACKEND=PATH", help="also a real model (repeatable)")
    p.add_argument("--base-dir", action="append", default=[], metavar="BACKEND=PATH", help="its base_model_path (GGUF, FP8 file)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=1024, help="generate size of real models (px)")
    p.add_argument("--steps", type=int, default=4, help="steps of real models")
    p.add_argument("--ref-size", default="1024x768", help="output size of real models' reference sweep (seed 001's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the server")
    p.add_argument("--no-server", action="store_true", help="skip the huge-job check (it starts a server)")
    p.add_argument("--json", type=Path, help="also write the rows and sweeps here")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(BACKENDS):
        p.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="easel-gpu-check-") as d:
        env = Env(args.device, args.quick, args.threads, Path(d))
        if not env.cuda:  # as the tests run tiny pipelines: QwenImageEditPlus resizes references to 64x64, not ~1 MP
            from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_plus

            qwen_plus.VAE_IMAGE_SIZE = 64 * 64
        targets = tiny_targets(env, backends) + real_targets(env, args)
        rows = run_all(env, targets, server=not args.no_server)
    took = time.perf_counter() - started
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "skipped", "FAILED")}
    print(header(env, len(targets), took))
    print(table(rows))
    print(sweep_tables(env, targets))
    print(f"\n{counts['ok']} ok, {counts['skipped']} skipped, {counts['FAILED']} failed in {took:.1f} s")
    if args.json:
        sweeps = {
            t.label: [{"references": k, "seconds": s, "peak_mib": pk} for k, s, pk in t.found.get("sweep", [])] for t in targets
        }
        report = {"device": env.device, "quick": env.quick, "seconds": took, "versions": versions(),
                  "rows": [asdict(r) for r in rows], "reference_sweeps": sweeps}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
