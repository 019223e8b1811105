"""The web UI's LoRA training panel, LoRA picker and models panel in headless
Chromium, against a server with a tiny Z-Image model (lora_dir set, a dataset
root with a small synthetic dataset) and the stub.  Fixtures: web_fixtures.py;
screenshots go to test-artifacts/."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from .datasets import write_dataset
from .servers import RunningServer
from .tiny_pipelines import build_z_image
from .web_fixtures import browser, expect, guard, page, shot  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer], tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    tmp = tmp_path_factory.mktemp("web-training")
    write_dataset(tmp / "datasets" / "shapes")
    zimg = {"backend": "z_image", "enabled": True, "model_path": str(build_z_image(tmp / "zimg")), "device": "cpu",
            "lora_dir": str(tmp / "loras"), "default_width": 64, "default_height": 64, "recommended_steps": 2}  # fmt: skip
    stub = {"backend": "stub", "enabled": True, "default_width": 64, "default_height": 64, "recommended_steps": 2}
    settings = {"models": {"zimg": zimg, "stub": stub}, "default_model": "zimg",
                "training": {"dataset_roots": [str(tmp / "datasets")]}}  # fmt: skip
    return server_factory(settings, env={"OMP_NUM_THREADS": "1"})


def start_training(page: Any, adapter: str, steps: int, dataset: str = "shapes") -> Any:
    """Fill the training panel and start; returns the run's queue row."""
    panel = page.locator("#train-panel")
    expect(panel).to_be_visible()
    if not panel.evaluate("el => el.open"):
        panel.locator("summary").click()
    expect(page.get_by_label("Base model")).to_have_value("zimg")
    fields = {"Adapter name": adapter, "Dataset folder (on the server)": dataset, "Training steps": str(steps),
              "Resolution": "32", "Rank": "4", "Learning rate": "0.05"}  # fmt: skip
    for label, value in fields.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Start training").click()
    return page.locator("#queue li").filter(has_text=f"train: {adapter}")


def test_train_an_adapter_then_generate_with_it(page: Any) -> None:
    expect(page.get_by_label("Model", exact=True)).to_have_value("zimg")  # the server's default_model
    page.get_by_label("Model", exact=True).select_option("stub")
    expect(page.locator("#lora-field")).to_be_hidden()  # the stub has no lora_dir
    page.get_by_label("Model", exact=True).select_option("zimg")
    expect(page.locator("#lora-field")).to_be_visible()
    expect(page.locator("#lora-hint")).to_contain_text("No adapters for this model yet")
    job = start_training(page, "shapes-web", 3)
    expect(job).to_have_attribute("data-status", "done", timeout=60_000)
    expect(job.locator(".pos")).to_have_text(re.compile(r"^3 steps; adapter saved · loss \d+\.\d{4}$"))
    expect(job.get_by_role("progressbar")).to_have_attribute("aria-valuetext", "step 3 of 3")
    shot(page, "web-train-done")

    picker = page.get_by_label("LoRA adapter")
    expect(picker.locator("option", has_text="shapes-web (3 steps, rank 4)")).to_have_count(1)
    picker.select_option("shapes-web")
    page.get_by_label("Scale", exact=True).fill("0.8")
    page.get_by_label("Prompt", exact=True).fill("a circle in the easel style")
    with page.expect_request(lambda r: r.url.endswith("/api/generate")) as req:
        page.get_by_role("button", name="Generate", exact=True).click()
    assert req.value.post_data_json["loras"] == [{"name": "shapes-web", "scale": 0.8}]
    card = page.locator("#gallery .card").filter(has_text="a circle in the easel style")
    expect(card).to_have_count(1, timeout=60_000)
    expect(card.locator("img")).to_have_js_property("complete", True)
    assert card.locator("img").evaluate("img => img.naturalWidth") == 64
    expect(card.locator(".card-meta")).to_contain_text("LoRA shapes-web × 0.8")
    shot(page, "web-train-lora-generate")


def test_stopping_a_training_run_keeps_its_checkpoint(page: Any) -> None:
    job = start_training(page, "stopped-web", 100_000)
    expect(job.locator(".pos")).to_have_text(re.compile(r"^step \d+/100000 · loss \d+\.\d{4}$"), timeout=60_000)
    shot(page, "web-train-running")
    job.get_by_role("button", name="Stop training train: stopped-web").click()
    expect(job).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(job.locator(".pos")).to_contain_text(re.compile(r"^stopped at step \d+; checkpoint saved"))
    steps = re.search(r"step (\d+)", job.locator(".pos").inner_text()).group(1)  # type: ignore[union-attr]
    page.get_by_label("Model", exact=True).select_option("zimg")
    picker = page.get_by_label("LoRA adapter")
    expect(picker.locator("option", has_text=f"stopped-web (stopped at step {steps} of 100000, rank 4)")).to_have_count(1)
    shot(page, "web-train-stopped")
    job.get_by_role("button", name=re.compile("^Dismiss")).click()
    expect(job).to_have_count(0)


def test_models_panel_unloads_and_loads_a_model(page: Any) -> None:
    page.locator("#models-panel summary").click()
    stub = page.locator("table.models tbody tr").filter(has=page.locator("td.name", has_text=re.compile("^stub$")))
    expect(stub.locator(".model-state")).to_have_text("loaded")
    expect(page.get_by_role("list", name="Memory in use")).to_contain_text(re.compile(r"process RSS \d"))
    model_picker = page.get_by_label("Model", exact=True)
    expect(model_picker.locator("option[value=stub]")).to_have_count(1)

    stub.get_by_role("button", name="Unload model stub").click()
    expect(stub.locator(".model-state")).to_have_text("unloaded")
    expect(model_picker.locator("option[value=stub]")).to_have_count(0)
    expect(page.locator("#server-state")).to_have_text("1 model loaded")
    page.locator("#models-panel").scroll_into_view_if_needed()
    shot(page, "web-models-unloaded")

    stub.get_by_role("button", name="Load model stub").click()
    expect(stub.locator(".model-state")).to_have_text("loaded")
    expect(model_picker.locator("option[value=stub]")).to_have_count(1)
    expect(page.locator("#server-state")).to_have_text("2 models loaded")


def test_dataset_error_is_shown_next_to_the_folder_field(page: Any, guard: Any) -> None:
    guard.allowed.append(re.compile(r"status of 400"))  # the refused request is logged by Chromium
    start_training(page, "nothing", 1, dataset="missing")
    field = page.locator("#train-form .field[data-param=dataset_dir]")
    expect(field.get_by_role("alert")).to_contain_text("not a folder")
    expect(page.locator("#queue li")).to_have_count(0)
    shot(page, "web-train-field-error")
