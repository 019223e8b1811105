"""Speed knobs (``backends/speed.py``) on the tiny pipelines: each changes how the
denoiser runs, not what it computes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from server.backends.base import BackendError
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff

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
