"""Speed knobs (``backends/speed.py``) on the tiny pipelines: each changes how the
denoiser runs, not what it computes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from server.backends.base import BackendError
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff, reference

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(240)]


def processors(backend: Any) -> set[Any]:
    return {getattr(m.processor, "_attention_backend", "none") for m in backend.pipe.transformer.modules() if hasattr(m, "processor")}


def test_attention_backend_is_set_on_the_transformer_and_reset_at_unload(tiny_flux2_klein: Path) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    native: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein))
    math: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), attention_backend="_native_math")
    try:
        assert processors(math) == {AttentionBackendName("_native_math")}
        assert processors(native) == {None}  # Diffusers' default: native
        assert max_diff(native.run(item(), RecordingContext())[0], math.run(item(), RecordingContext())[0]) <= 2
    finally:
        math.unload()
    assert _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE


def test_unknown_attention_backend_is_a_load_error_listing_the_names(tiny_flux2_klein: Path) -> None:
    with pytest.raises(BackendError, match=r"'fastest' is not one Diffusers has; one of: .*_native_cudnn"):
        load_backend("flux2_klein", model_path=str(tiny_flux2_klein), attention_backend="fastest")


def test_regional_compile_compiles_the_repeated_blocks_and_keeps_the_pixels(tiny_flux2_klein: Path) -> None:
    plain: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein))
    compiled: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), compile="regional")
    blocks = [m for m in compiled.pipe.transformer.modules() if type(m).__name__ in compiled.pipe.transformer._repeated_blocks]
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    assert plain.pipe.transformer.transformer_blocks[0]._compiled_call_impl is None
    a = plain.run(item(steps=2), RecordingContext())[0]
    b = compiled.run(item(steps=2), RecordingContext())[0]
    assert max_diff(a, b) <= 2


def block_calls(backend: Any, steps: int, cache: str | None = None) -> int:
    calls: list[int] = []
    hook = backend.pipe.transformer.transformer_blocks[-1].attn.register_forward_hook(lambda *_: calls.append(1))
    try:
        backend.run(item("edit", images=[reference()], steps=steps, cache=cache), RecordingContext())
    finally:
        hook.remove()
    return len(calls)


def test_first_block_step_cache_skips_the_other_blocks_and_resets_per_job(tiny_qwen_edit: Path) -> None:
    """Qwen-Image-Edit (true CFG: two transformer passes a step): with a threshold no
    step's change reaches, the blocks after the first run only in the first step."""
    plain: Any = load_backend("qwen_edit_gguf", model_path=str(tiny_qwen_edit))
    cached: Any = load_backend("qwen_edit_gguf", model_path=str(tiny_qwen_edit), step_cache="first_block",
                               step_cache_threshold=1.0)  # fmt: skip
    assert block_calls(plain, 4) == 8
    first = block_calls(cached, 4)
    assert 2 <= first < 8
    assert block_calls(cached, 4) == first  # the next job starts afresh (no residual of the last one)


# ----------------------------------------------------------------------------- the step cache per request


def test_a_job_turns_the_step_cache_off_and_the_next_gets_it_back(tiny_qwen_edit: Path) -> None:
    """``cache: "off"`` runs every block of every step; a job that does not say so
    (or says "fast") runs the model's step cache again."""
    cached: Any = load_backend("qwen_edit_gguf", model_path=str(tiny_qwen_edit), step_cache="first_block", step_cache_threshold=1.0)
    first = block_calls(cached, 4)
    assert 2 <= first < 8
    assert block_calls(cached, 4, cache="off") == 8  # as a model without the cache
    assert block_calls(cached, 4) == first
    assert block_calls(cached, 4, cache="fast") == first


def png_data_url() -> str:
    import base64
    import io

    buf = io.BytesIO()
    reference(64, 64).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_cache_field_reaches_the_job_and_splits_batches() -> None:
    """Built for a model with a step cache, ``cache`` is on each item; two otherwise
    compatible jobs with different ``cache`` never share a pipeline call."""
    import anyio
    import msgspec

    from server.build import build_job
    from server.config import build_settings
    from server.jobs import batch_key
    from server.registry import ModelState
    from server.schemas import GenerateRequest

    settings = build_settings({"models": {"q": {"backend": "qwen_edit_gguf", "model_path": "/models/q.gguf", "step_cache": "first_block"}}})
    ms = ModelState("q", settings.models["q"])
    req = msgspec.convert({"prompt": "a fox", "images": [png_data_url()], "cache": "off", "width": 64, "height": 64}, GenerateRequest)
    job, _ = anyio.run(lambda: build_job(req, ms, settings, "edit"))
    assert [it.cache for it in job.items] == ["off"]
    generate = msgspec.structs.replace(job, task="generate", items=[msgspec.structs.replace(job.items[0], images=[])])
    keys = {c: batch_key(msgspec.structs.replace(generate, items=[msgspec.structs.replace(generate.items[0], cache=c)]), True) for c in ("off", "fast", None)}
    assert all(keys.values()) and len(set(keys.values())) == 3, keys  # batchable, but never together


def test_cache_on_a_model_without_a_step_cache_is_a_400_with_a_stable_code(server_factory: Any) -> None:
    from tests.servers import stub_settings

    c = server_factory(stub_settings()).client
    r = c.post("/api/generate", json={"prompt": "a fox", "cache": "fast"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "cache_unavailable" and error["param"] == "cache"
    assert "step_cache" in error["message"] and "qwen_edit_gguf" in error["message"]
    bad = c.post("/api/generate", json={"prompt": "a fox", "cache": "fastest"})
    assert bad.status_code == 400 and "cache" in bad.text
    assert c.post("/api/generate", json={"prompt": "a fox"}).status_code == 200


# ----------------------------------------------------------------------------- LoRAs on a compiled denoiser


@pytest.mark.timeout(600)  # the first LoRA job compiles: ~2 min on the 2-core machine
def test_loras_switch_on_a_compiled_denoiser_without_recompiling(tiny_flux2_klein: Path, tiny_root: Path) -> None:
    """``compile: "regional"`` with a lora_dir swaps LoRAs in place (Diffusers' hotswap):
    after the first LoRA job (which compiles), another LoRA of a different rank, a job
    without one and a new scale all run the compiled blocks as they are
    (``error_on_recompile``), and each gives what the same LoRA gives uncompiled."""
    import torch._dynamo

    from server.items import Lora
    from tests import tiny_pipelines as tp

    lora_dir = tiny_root / "loras_hotswap"
    tp.make_lora("flux2_klein", tiny_flux2_klein, lora_dir / "one", rank=4, seed=1)
    tp.make_lora("flux2_klein", tiny_flux2_klein, lora_dir / "two", rank=8, seed=2)
    compiled: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), compile="regional", lora_dir=str(lora_dir), lora_max_rank=8)
    plain: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), lora_dir=str(lora_dir))

    def run(backend: Any, *loras: tuple[str, float]) -> Any:
        return backend.run(item(steps=2, loras=[Lora(n, s) for n, s in loras]), RecordingContext())[0]

    try:
        first = run(compiled, ("one", 1.0))  # the first LoRA changes the blocks: this call compiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            two, none, half, one_again = run(compiled, ("two", 1.0)), run(compiled), run(compiled, ("two", 0.5)), run(compiled, ("one", 1.0))
        assert max_diff(first, one_again) <= 2 and max_diff(first, two) > 10
        for got, loras in ((first, [("one", 1.0)]), (two, [("two", 1.0)]), (none, []), (half, [("two", 0.5)])):
            assert max_diff(got, run(plain, *loras)) <= 3, loras
        with pytest.raises(BackendError, match="send one, or set compile"):
            run(compiled, ("one", 1.0), ("two", 1.0))
    finally:
        compiled.unload()
        plain.unload()


def test_two_loras_on_a_compiled_model_are_a_400_at_submission(server_factory: Any, tmp_path: Path) -> None:
    from tests.servers import stub_settings

    c = server_factory(stub_settings(compile="regional", lora_dir=str(tmp_path))).client
    r = c.post("/api/generate", json={"prompt": "a fox", "loras": [{"name": "one"}, {"name": "two"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras", r.text
    assert "one LoRA" in r.json()["error"]["message"]
