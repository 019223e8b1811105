"""Settings: shipped default + local override + CLI flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import overrides_from, parse_args
from server.config import ConfigError, build_settings, deep_merge, load_settings

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "local.json"
    p.write_text(json.dumps(data))
    return p


def test_shipped_default_serves_the_stub() -> None:
    s = load_settings(None)
    assert s.default_model == "stub" and s.models["stub"].backend == "stub" and s.models["stub"].enabled
    assert s.port == 4030


def test_local_override_merges_key_by_key(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, {"port": 5000, "models": {"stub": {"simulate_step_seconds": 0}, "other": {"backend": "stub"}}}))
    assert s.port == 5000
    assert s.models["stub"].simulate_step_seconds == 0
    assert s.models["stub"].max_images == 16  # kept from the default
    assert set(s.models) == {"stub", "other"}


def test_deep_merge_replaces_lists() -> None:
    assert deep_merge({"a": {"b": [1, 2], "c": 1}}, {"a": {"b": [3]}}) == {"a": {"b": [3], "c": 1}}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"models": {"stub": {"max_pixels": "big"}}}, "$.models.stub.max_pixels"),
        ({"models": {"x": {"backend": "dalle"}}}, "$.models.x.backend"),
        ({"queue": {"capacty": 3}}, "capacty"),
        ({"default_model": "ghost"}, "ghost"),
        ({"models": {"stub": {"default_width": 100}}}, "default_width"),
        ({"models": {"stub": {"forecast_prior": {"steps_mp_n": 1.0}}}}, "models.stub.forecast_prior: unknown terms ['steps_mp_n']"),
        ({"models": {"stub": {"forecast_prior": [0.5, 1.0, 0.0, 0.0]}}}, "$.models.stub.forecast_prior"),
        ({"models": {"sd": {"backend": "sdxl", "quantization": "fp8"}}}, "only the flux2_klein backend quantizes"),
        ({"models": {"q": {"backend": "qwen_edit_gguf", "transformer_path": "/m/q.gguf", "offload": "sequential"}}},
         "models.q.offload 'sequential' does not work with a GGUF transformer"),
        ({"models": {"k": {"backend": "flux2_klein", "torch_dtype": "float16"}}}, "models.k.torch_dtype 'float16'"),
        ({"models": {"z": {"backend": "z_image", "torch_dtype": "float16"}}}, "use 'bfloat16'"),
        ({"models": {"q": {"backend": "qwen_edit_gguf", "torch_dtype": "float16"}}}, "overflow float16"),
        ({"models": {"z": {"backend": "z_image", "vae_path": "/m/vae"}}}, "models.z.vae_path: only the sdxl backend"),
        ({"models": {"k": {"backend": "flux2_klein", "quantization": "fp8dq", "device": "cpu"}}}, "need a CUDA GPU"),
        ({"models": {"k": {"backend": "flux2_klein", "attention_backend": "flash_hub"}}}, "downloads and runs a kernel"),
        ({"models": {"k": {"backend": "flux2_klein", "compile": "max"}}}, "$.models.k.compile"),
        ({"models": {"k": {"backend": "flux2_klein", "quantize_text_encoder": True}}}, "quantize_text_encoder needs quantization"),
        ({"models": {"s": {"backend": "sdxl", "step_cache": "first_block"}}}, "models.s.step_cache: only the qwen_edit_gguf backends"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, override: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, override))
    assert needle in str(err.value)


def test_float16_and_sequential_offload_stay_allowed_where_they_work() -> None:
    settings = build_settings({"models": {
        "sd": {"backend": "sdxl", "torch_dtype": "float16", "vae_path": "/m/sdxl-vae-fp16-fix"},
        "q": {"backend": "qwen_edit_gguf", "model_path": "/m/qwen-edit", "offload": "sequential"},
    }})  # fmt: skip
    assert settings.models["sd"].torch_dtype == "float16" and settings.models["q"].offload == "sequential"


def test_invalid_json_is_reported_with_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text('{\n  "port": 1,\n}')
    with pytest.raises(ConfigError, match="line 3"):
        load_settings(p)


def test_cli_overrides_win(tmp_path: Path) -> None:
    args = parse_args(["--port", "4100", "--device", "cpu", "--model", "stub=/models/x"])
    s = load_settings(None, overrides_from(args, ["stub"]))
    assert s.port == 4100 and s.models["stub"].device == "cpu" and s.models["stub"].model_path == "/models/x"


def test_bad_config_stops_start_up_with_a_message(tmp_path: Path) -> None:
    p = write(tmp_path, {"models": {"stub": {"target_inflight": 0}}})
    r = subprocess.run([sys.executable, str(ROOT / "server.py"), "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "target_inflight" in r.stderr and "Traceback" not in r.stderr


def test_cli_model_not_in_the_settings_gets_its_backend_from_model_index(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl-base"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    args = parse_args(["--model", f"mysdxl={folder}", "--device", "cpu"])
    s = load_settings(None, overrides_from(args, ["stub"]))
    m = s.models["mysdxl"]
    assert (m.backend, m.enabled, m.model_path, m.device) == ("sdxl", True, str(folder), "cpu")
    assert s.default_model == "mysdxl"


@pytest.mark.parametrize(("content", "needle"), [(None, "could not be read"), ({"_class_name": "DallePipeline"}, "not served")])
def test_cli_model_that_cannot_be_recognised_is_a_clear_error(tmp_path: Path, content: object, needle: str) -> None:
    if content is not None:
        (tmp_path / "model_index.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=needle):
        overrides_from(parse_args(["--model", f"x={tmp_path}"]), ["stub"])
