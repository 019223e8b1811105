"""LoRA training jobs: dataset checks (``dataset``), the per-pipeline hooks
(``families``), the training loop (``lora_trainer``), adapters on disk
(``adapters``) and request -> queued job (``submit``)."""

from __future__ import annotations
