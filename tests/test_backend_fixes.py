"""Backend fixes found by reading Diffusers 0.42 against the backends (issue 30, part 1),
each shown on the tiny random-weight pipelines on the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from PIL import Image

from tests import tiny_pipelines as tp
from tests.backend_helpers import RecordingContext, item, load_backend, reference

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(120)]


def square_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def transformer_calls(backend: object, work: object) -> int:
    """How many times the denoiser's forward ran during one job."""
    calls: list[int] = []
    transformer = backend.pipe.transformer  # type: ignore[attr-defined]
    hook = transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        backend.run(work, RecordingContext())  # type: ignore[attr-defined]
    finally:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize(("distilled", "per_step"), [(True, 1), (False, 2)])
def test_masked_edit_on_flux2_klein_keeps_is_distilled(tmp_path: Path, distilled: bool, per_step: int) -> None:
    """The inpaint pipeline built from the loaded components keeps the model's
    ``is_distilled``: a distilled model runs no classifier-free guidance (one transformer
    call per step) even with guidance > 1; the base model runs two."""
    folder = tp.build_flux2_klein(tmp_path / "klein", is_distilled=distilled)
    backend = load_backend("flux2_klein", model_path=str(folder))
    work = item("edit", images=[reference(64, 64)], mask=square_mask(), guidance=4.0, steps=2)
    assert transformer_calls(backend, work) == 2 * per_step
    assert backend._variants["inpaint"].config.is_distilled is distilled  # type: ignore[attr-defined]
