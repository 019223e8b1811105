"""Token counts with the model's own tokenizer (OpenAI ``usage``) and the warning for
a prompt longer than the text encoder takes, on tiny SDXL (CLIP: 77) and
FLUX.2-klein (Qwen3, the pipeline's max_sequence_length 512) served over HTTP."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import pytest
from openai import OpenAI
from PIL import Image

from tests.servers import ROOT, stub_settings
from tests.test_api import wait_done

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.servers import RunningServer

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = pytest.mark.timeout(240)

LONG = " ".join(f"fox{i % 10}" for i in range(200))  # 200 words


@pytest.fixture(scope="module")
def srv(server_factory: Callable[..., RunningServer], tiny_sdxl: Path, tiny_flux2_klein: Path) -> RunningServer:
    common = {"enabled": True, "default_width": 64, "default_height": 64, "recommended_steps": 2, "max_images": 2}
    settings = stub_settings()
    settings["models"].update(
        sdxl={"backend": "sdxl", "model_path": str(tiny_sdxl), **common},
        flux2_klein={"backend": "flux2_klein", "model_path": str(tiny_flux2_klein), **common},
        isolated={"backend": "sdxl", "model_path": str(tiny_sdxl), "isolate": True, **common},  # tokenizer in its process
    )
    return server_factory(settings, env={"OMP_NUM_THREADS": "1"}, script=ROOT / "tests" / "tiny_server.py")


def expected(folder: Path, backend: str, prompt: str) -> int:
    """The prompt's length as the pipeline tokenizes it (special and template tokens included)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text: Any = prompt
    if backend == "flux2_klein":
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)  # fmt: skip
    return len(tok(text, truncation=False)["input_ids"])


@pytest.mark.parametrize(("model", "limit"), [("sdxl", 77), ("flux2_klein", 512), ("isolated", 77)])
def test_usage_counts_the_models_tokens_and_a_long_prompt_is_cut_with_a_warning(
    srv: RunningServer, tiny_sdxl: Path, tiny_flux2_klein: Path, tiny_runtime: None, model: str, limit: int
) -> None:
    folder = {"sdxl": tiny_sdxl, "flux2_klein": tiny_flux2_klein, "isolated": tiny_sdxl}[model]
    client = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    short = client.images.generate(model=model, prompt="a red fox", size="64x64")
    assert short.usage is not None
    assert short.usage.input_tokens_details.text_tokens == expected(folder, model, "a red fox")
    assert short.usage.output_tokens == 255  # one 64x64 image: 85 + 170 x one tile

    raw = client.images.with_raw_response.generate(model=model, prompt=LONG, size="64x64")
    r = raw.parse()
    tokens = expected(folder, model, LONG)  # "isolated" is SDXL: no chat template
    assert tokens > limit and r.usage is not None and r.usage.input_tokens_details.text_tokens == tokens
    assert r.data is not None and Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json or ""))).size == (64, 64)
    st = srv.client.get("/api/status", params={"task_id": raw.headers["x-request-id"]}).json()
    assert st["status"] == "done"
    (warning,) = st["warnings"]
    assert f"is {tokens} tokens" in warning and f"takes {limit}" in warning and f"last {tokens - limit} tokens were cut" in warning


def test_the_job_api_shows_the_warning_and_a_short_prompt_has_none(srv: RunningServer, tiny_runtime: None) -> None:
    body: dict[str, Any] = {"model": "sdxl", "prompts": ["a red fox", LONG], "seed": 1, "width": 64, "height": 64, "steps": 2}
    st = wait_done(srv.client, srv.client.post("/api/generate", json=body).json()["task_id"], timeout=120)
    assert st["status"] == "done" and len(st["images"]) == 2
    (warning,) = st["warnings"]
    assert warning.startswith("prompt 2 is ") and "model 'sdxl' takes 77" in warning
    one = wait_done(srv.client, srv.client.post("/api/generate", json={**body, "prompts": ["a red fox"]}).json()["task_id"], timeout=120)
    assert one["status"] == "done" and one["warnings"] == []
