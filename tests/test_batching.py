"""Batching across requests: compatible jobs of one model in one pipeline call.

The backends' batched call on tiny random-weight pipelines of every family that
batches (image k of a batched item equals the same item run alone), the worker's
batches (each job stays a job: its own result, progress, cancel), the claim of a
batch in both brokers, and the forecast's decision."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from server.backends.base import BackendError, BatchSteps, JobCancelled, batches
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff

if TYPE_CHECKING:
    from collections.abc import Iterator

    from server.backends.base import Backend

pytest_plugins = ["tests.backend_fixtures"]

BATCHING = ("sdxl", "flux2_klein", "z_image")


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs: dict[str, Path], tiny_runtime: None) -> Iterator[dict[str, Backend]]:
    backends = {b: load_backend(b, model_path=str(tiny_model_dirs[b])) for b in BATCHING}
    yield backends
    for backend in backends.values():
        backend.unload()


# ----------------------------------------------------------------------------- the backends' batched call


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", BATCHING)
def test_a_batched_items_images_equal_the_item_run_alone(loaded: dict[str, Backend], name: str) -> None:
    backend = loaded[name]
    assert batches(backend)
    items = [
        item(prompt="a red fox", seed=3, negative_prompt="blurry"),
        item(prompt="a lighthouse at night, long exposure", seed=40, n=2, negative_prompt="text"),
        item(prompt="cat", seed=7, negative_prompt="dark, grainy, low quality"),
    ]
    ctxs = [RecordingContext() for _ in items]
    together = backend.run_batch(items, BatchSteps(ctxs))  # type: ignore[attr-defined]
    assert [len(images) for images in together] == [1, 2, 1]
    for work, images, ctx in zip(items, together, ctxs, strict=True):
        alone = backend.run(work, RecordingContext())
        for a, b in zip(alone, images, strict=True):
            assert max_diff(a, b) <= 2, f"{name}: {work.prompt!r} differs batched"
        assert ctx.steps == [(1, 2), (2, 2)]  # every job sees each step of the one call


@pytest.mark.timeout(120)
def test_a_cancelled_item_is_dropped_while_the_others_finish(loaded: dict[str, Backend]) -> None:
    backend = loaded["sdxl"]
    items = [item(prompt="a", seed=1), item(prompt="b", seed=2)]
    ctxs = [RecordingContext(cancel_after=1), RecordingContext()]
    steps = BatchSteps(ctxs)  # type: ignore[arg-type]
    images = backend.run_batch(items, steps)  # type: ignore[attr-defined]
    assert steps.dropped == [True, False]
    assert ctxs[1].steps == [(1, 2), (2, 2)] and ctxs[0].steps == [(1, 2)]
    assert max_diff(images[1][0], backend.run(items[1], RecordingContext())[0]) <= 2


@pytest.mark.timeout(120)
def test_a_batch_whose_items_are_all_cancelled_stops(loaded: dict[str, Backend]) -> None:
    backend = loaded["z_image"]
    ctxs = [RecordingContext(cancel_after=1), RecordingContext(cancel_after=1)]
    with pytest.raises(JobCancelled):
        backend.run_batch([item(seed=1), item(seed=2)], BatchSteps(ctxs))  # type: ignore[attr-defined, arg-type]


@pytest.mark.timeout(120)
def test_items_that_cannot_share_a_call_are_refused(loaded: dict[str, Backend]) -> None:
    with pytest.raises(BackendError, match="cannot share a pipeline call"):
        loaded["flux2_klein"].run_batch([item(steps=2), item(steps=3)], BatchSteps([RecordingContext(), RecordingContext()]))  # type: ignore[attr-defined, arg-type]


@pytest.mark.timeout(120)
def test_previews_of_a_batch_go_to_each_job(loaded: dict[str, Backend]) -> None:
    backend = loaded["sdxl"]
    ctxs = [RecordingContext(preview_every=1), RecordingContext()]
    backend.run_batch([item(seed=1, steps=3), item(seed=2, steps=3)], BatchSteps(ctxs))  # type: ignore[attr-defined, arg-type]
    assert len(ctxs[0].previews) >= 1
