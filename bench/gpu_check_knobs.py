"""The GPU check's rows for the speed knobs (``bench/gpu_check.py``; the knobs are in
``server/backends/speed.py``, ``prompt_cache.py`` and ``quantize.py``):

- ``prompt cache``: new prompts against a repeated one on the loaded model (CPU too):
  the repeated prompt must not run the text encoder; the value is repeated / new;
- ``compile regional``: the first call (where the compile happens) and the steady job
  time, against the served dtype's uncompiled job (CUDA);
- ``attention backends``: each of Diffusers' attention backends this host can run,
  switched on the loaded model (CUDA);
- ``fp8dq (torchao, Hopper)``: float8 activations and weights (CUDA, compute
  capability 9.0 or newer);
- ``device_map load``: the load straight onto the GPU (``device_map: "device"``)
  against one through host memory (``"off"``) (CUDA);
- ``step cache per job``: a job with ``cache: "off"`` against the model's step cache
  (``"fast"``), transformer passes and seconds (CPU too; the families that take it);
- ``LoRA hotswap under compile``: two LoRAs of different ranks, a job without one and
  a new scale on a regionally compiled denoiser, with recompiles made errors (CUDA;
  the tiny models, which make their LoRAs);
- ``batched calls 1/2/4``: jobs a second with calls of 1, 2 and 4 compatible generates
  (``run_batch``, what ``target_inflight`` 2 and 4 run; the families that batch), at
  512x512 on a real model folder (a FLUX.2-klein folder gives the batching issue's GPU
  row), at the tiny size on a tiny one; CPU too.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.gpu_check_core import Check, Env, Loaded, Result, Skip, Target, respec, timed_run, work
from server.backends.base import BatchSteps
from server.backends.speed import denoiser, reset_attention_backend, set_attention_backend
from server.families import FAMILIES
from server.items import Lora
from tests.backend_helpers import NoopContext

PROMPT_PREFIX = "a lighthouse on a cliff at dusk, number"
BATCH_SIDE = 512  # a real model's batched calls: where batching pays on a GPU (FLUX.2-klein-class jobs at 512x512)

ATTENTION = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flex", "flash", "_flash_3", "sage", "xformers")
HOPPER = (9, 0)


def encoder_calls(pipe: Any) -> tuple[list[int], list[Any]]:
    calls: list[int] = []
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    return calls, [e.register_forward_hook(lambda *_: calls.append(1)) for e in encoders]


def prompt_cache(env: Env, target: Target, loaded: Loaded) -> Result:
    if target.backend == "qwen_edit_gguf":
        raise Skip("Qwen-Image-Edit encodes its reference images with the prompt: its prompts are not cached")
    ms = loaded.get(target, env.served)
    backend: Any = ms.backend
    item = work(target)
    timed_run(env, ms, item)  # the repeated prompt, once
    new: list[float] = []
    repeated: list[float] = []
    calls, hooks = encoder_calls(backend.pipe)
    try:
        for k in range(3):
            new.append(timed_run(env, ms, respec(item, prompt=f"{item.spec.prompt}, take {k}"))[0])
            before = len(calls)
            repeated.append(timed_run(env, ms, item)[0])
            if len(calls) != before:
                raise AssertionError("the text encoder ran for a repeated prompt")
    finally:
        for hook in hooks:
            hook.remove()
    r, n = statistics.median(repeated), statistics.median(new)
    return Result(
        r, None, f"{r / n:.2f}x",
        f"repeated prompt {r * 1e3:.1f} ms, new prompt {n * 1e3:.1f} ms (medians of 3); the text encoder ran 0 times for "
        f"the repeated ones; prompt_cache_size {backend.cfg.prompt_cache_size}",
    )  # fmt: skip


def compile_regional(env: Env, target: Target, loaded: Loaded) -> Result:
    env.needs_cuda()
    ms = loaded.get(target, env.served, compile="regional")
    first, peak = timed_run(env, ms, work(target))
    steady = statistics.median(timed_run(env, ms, work(target))[0] for _ in range(3))
    plain = target.found.get(f"seconds {env.served}")
    versus = f"; uncompiled {plain:.3f} s (its generate row: one call, warm-up included)" if plain else ""
    return Result(
        first, peak, f"{steady:.3f} s/job",
        f"first call {first:.2f} s (compiles); steady {steady:.3f} s a job, {steady / target.steps * 1e3:.1f} ms a step{versus}",
    )  # fmt: skip


def attention_backends(env: Env, target: Target, loaded: Loaded) -> Result:
    env.needs_cuda()
    ms = loaded.get(target, env.served)
    pipe = ms.backend.pipe  # type: ignore[union-attr]
    times: dict[str, float] = {}
    notes: list[str] = []
    try:
        for name in ATTENTION:
            try:
                reset_attention_backend(pipe, "reset")
                set_attention_backend(target.name, pipe, name)
                timed_run(env, ms, work(target))  # warm-up
                times[name] = timed_run(env, ms, work(target))[0]
            except Exception as exc:  # not installed, or not on this GPU: a note, not a failure
                notes.append(f"{name}: n/a ({(str(exc).splitlines() or [''])[0][:80]})")
    finally:
        reset_attention_backend(pipe, "reset")
    if not times:
        raise RuntimeError("; ".join(notes))
    best = min(times, key=times.__getitem__)
    old = "" if hasattr(next(iter(_processors(pipe)), None), "_attention_backend") else "; this denoiser's attention ignores the choice"
    detail = "; ".join([*(f"{k} {v:.3f} s" for k, v in times.items()), *notes]) + old
    return Result(times[best], None, f"fastest {best}", detail)


def _processors(pipe: Any) -> list[Any]:
    return [m.processor for m in denoiser(pipe).modules() if getattr(m, "processor", None) is not None]


def fp8dq(env: Env, target: Target, loaded: Loaded) -> Result:
    env.needs_cuda()
    if target.backend != "flux2_klein":
        raise Skip("only the flux2_klein backend quantizes")
    try:
        import torchao
    except ImportError:
        raise Skip("torchao is not installed (pip install -r requirements-gpu.txt)") from None
    capability = torch.cuda.get_device_capability(torch.device(env.device))
    if capability < HOPPER:
        raise Skip(f"needs compute capability 9.0 or newer (Hopper); this GPU is {capability[0]}.{capability[1]}")
    ms = loaded.get(target, env.served, quantization="fp8dq")
    timed_run(env, ms, work(target))  # warm-up
    seconds, peak = timed_run(env, ms, work(target))
    plain = target.found.get(f"seconds {env.served}")
    versus = f"; {env.served} generate row {plain:.3f} s" if plain else ""
    return Result(seconds, peak, f"{seconds:.3f} s/job", f"torchao {torchao.__version__}, float8 rowwise{versus}")


def device_map_load(env: Env, target: Target, loaded: Loaded) -> Result:
    env.needs_cuda()
    loaded.get(target, env.served, device_map="off")
    through_host = loaded.seconds
    ms = loaded.get(target, env.served, device_map="device")
    if ms.backend.pipe.hf_device_map != "cuda":  # type: ignore[union-attr]
        raise AssertionError(f"the pipeline was not device-mapped: hf_device_map {ms.backend.pipe.hf_device_map!r}")  # type: ignore[union-attr]
    seconds, peak = timed_run(env, ms, work(target))
    return Result(
        loaded.seconds, peak, f"{through_host / loaded.seconds:.2f}x",
        f"load straight to the GPU {loaded.seconds:.2f} s, through host memory {through_host:.2f} s; a job after it {seconds:.3f} s",
    )  # fmt: skip


def step_cache_per_job(env: Env, target: Target, loaded: Loaded) -> Result:
    if not FAMILIES[target.backend].step_cache:
        takes = ", ".join(k for k, f in FAMILIES.items() if f.step_cache)
        raise Skip(f"only {takes} take Diffusers' step cache")
    ms = loaded.get(target, env.served, step_cache="first_block")
    blocks = denoiser(ms.backend.pipe).transformer_blocks  # type: ignore[union-attr]
    calls: list[int] = []
    hook = blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    found: dict[str, tuple[float, int]] = {}
    try:
        for cache in ("fast", "off", "fast"):
            calls.clear()
            found[cache] = (timed_run(env, ms, respec(work(target), cache=cache))[0], len(calls))
    finally:
        hook.remove()
    (fast, fast_calls), (off, off_calls) = found["fast"], found["off"]
    if fast_calls > off_calls:
        raise AssertionError(f"the step cache ran the last block {fast_calls} times, without it {off_calls}")
    return Result(
        fast, None, f"{fast / off:.2f}x",
        f"cache fast {fast:.3f} s ({fast_calls} passes of the last block), off {off:.3f} s ({off_calls}); "
        f"step_cache_threshold {ms.cfg.step_cache_threshold}",
    )  # fmt: skip


def lora_hotswap(env: Env, target: Target, loaded: Loaded) -> Result:
    env.needs_cuda()
    if not target.label.endswith("(tiny)") or target.backend not in ("flux2_klein", "z_image", "sdxl"):
        raise Skip("the tiny FLUX.2-klein, Z-Image and SDXL models make their LoRAs here; real models have none")
    import torch._dynamo

    from tests import tiny_pipelines as tp

    lora_dir = target.cfg["model_path"] + "-loras"
    tp.make_lora(target.backend, target.cfg["model_path"], f"{lora_dir}/one", rank=4, seed=1)  # type: ignore[arg-type]
    tp.make_lora(target.backend, target.cfg["model_path"], f"{lora_dir}/two", rank=8, seed=2)  # type: ignore[arg-type]
    ms = loaded.get(target, env.served, compile="regional", lora_dir=lora_dir, lora_max_rank=8)
    item = work(target)

    def job(*loras: tuple[str, float]) -> float:
        return timed_run(env, ms, respec(item, loras=[Lora(n, s) for n, s in loras]))[0]

    first = job(("one", 1.0))  # the first LoRA changes the blocks: this call compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        swaps = [job(("two", 1.0)), job(), job(("two", 0.5)), job(("one", 1.0))]
    steady = statistics.median(swaps)
    return Result(
        steady, None, "0 recompiles",
        f"first LoRA job {first:.2f} s (compiles); then LoRA two (rank 8), none, scale 0.5, LoRA one: "
        f"{', '.join(f'{s:.3f}' for s in swaps)} s, none recompiled",
    )  # fmt: skip


def batched_calls(env: Env, target: Target, loaded: Loaded) -> Result:
    if not FAMILIES[target.backend].batches:
        raise Skip("this family runs one job per call")
    ms = loaded.get(target, env.served)
    backend: Any = ms.backend
    rates: dict[int, float] = {}
    side = target.size if target.label.endswith("(tiny)") else BATCH_SIDE
    for size in (1, 2, 4):
        items = [respec(work(target, size=(side, side)), prompt=f"{PROMPT_PREFIX} {k}", seed=1 + k) for k in range(size)]
        backend.run_batch(items, BatchSteps([NoopContext() for _ in items]))  # warm-up (and the prompts' embeddings)
        seconds = []
        for _ in range(2):
            if env.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = backend.run_batch(items, BatchSteps([NoopContext() for _ in items]))
            if env.cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            if len(out) != size or any(len(images) != 1 for images in out):
                raise AssertionError(f"a call of {size} jobs returned {[len(images) for images in out]} images per job")
        rates[size] = size / min(seconds)
    return Result(
        4 / rates[4], None, f"{rates[1]:.2f} / {rates[2]:.2f} / {rates[4]:.2f} jobs/s",
        f"{side}x{side}, {target.steps} steps, calls of 1, 2, 4 jobs (the faster of two, after a warm-up): "
        f"{', '.join(f'{k}: {r:.2f} jobs/s' for k, r in rates.items())}; a call of 4 gives {rates[4] / rates[1]:.2f}x the jobs a second of one",
    )  # fmt: skip


def knob_checks(env: Env) -> list[Check]:
    return [
        Check("prompt cache", prompt_cache),
        Check("attention backends", attention_backends),
        Check("compile regional", compile_regional),
        Check("fp8dq (torchao, Hopper)", fp8dq),
        Check("device_map load", device_map_load),
        Check("step cache per job", step_cache_per_job),
        Check("LoRA hotswap under compile", lora_hotswap),
        Check("batched calls 1/2/4", batched_calls),
    ]
