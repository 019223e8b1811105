"""The prompt-embedding cache (``models.NAME.prompt_cache_size``): a repeated prompt
skips the text encoder and gives the same pixels; anything that changes the encoder's
output (another prompt, negative prompt, LoRA) misses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from server.items import Lora
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff, reference

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(120)]

CACHING = ("flux2_klein", "sdxl", "z_image")


def encoder_calls(backend: Any, work: Any) -> tuple[int, Any]:
    """How many times the text encoder(s) ran during one job, and its first image."""
    calls: list[int] = []
    encoders = [getattr(backend.pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(backend.pipe, n, None)]
    hooks = [e.register_forward_hook(lambda *_: calls.append(1)) for e in encoders]
    try:
        image = backend.run(work, RecordingContext())[0]
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls), image


@pytest.mark.parametrize("name", CACHING)
def test_a_repeated_prompt_skips_the_text_encoder_and_gives_the_same_pixels(
    tiny_model_dirs: dict[str, Path], name: str
) -> None:
    cached = load_backend(name, model_path=str(tiny_model_dirs[name]))
    plain = load_backend(name, model_path=str(tiny_model_dirs[name]), prompt_cache_size=0)
    work = item(negative_prompt="blurry", guidance=4.0)
    first, a = encoder_calls(cached, work)
    again, b = encoder_calls(cached, item(negative_prompt="blurry", guidance=4.0, seed=1))
    off, c = encoder_calls(plain, work)
    assert first > 0 and again == 0 and off == first
    assert max_diff(a, c) == 0 and max_diff(b, c) > 0  # cached embeddings give the uncached pixels
    other, _ = encoder_calls(cached, item(prompt="a blue fox", negative_prompt="blurry", guidance=4.0))
    negative, _ = encoder_calls(cached, item(negative_prompt="dark", guidance=4.0))
    assert other > 0 and negative > 0


def test_a_lora_job_misses_and_the_cache_is_bounded(tiny_flux2_klein: Path, lora_dirs: dict[str, Path]) -> None:
    backend: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), lora_dir=str(lora_dirs["flux2_klein"]),
                                prompt_cache_size=2)  # fmt: skip
    assert encoder_calls(backend, item())[0] > 0
    assert encoder_calls(backend, item(loras=[Lora("style", 1.0)]))[0] > 0
    assert encoder_calls(backend, item(loras=[Lora("style", 1.0)]))[0] == 0
    assert encoder_calls(backend, item(prompt="third"))[0] > 0  # evicts the first
    assert len(backend.prompt_cache) == 2
    assert encoder_calls(backend, item())[0] > 0
    backend.unload()
    assert len(backend.prompt_cache) == 0


def test_an_edit_that_encodes_its_images_with_the_prompt_is_not_cached(tiny_qwen_edit: Path) -> None:
    backend: Any = load_backend("qwen_edit_gguf", model_path=str(tiny_qwen_edit))
    work = item("edit", images=[reference()])
    assert encoder_calls(backend, work)[0] > 0 and encoder_calls(backend, work)[0] > 0
    assert len(backend.prompt_cache) == 0
