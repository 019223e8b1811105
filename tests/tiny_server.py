"""``python tests/tiny_server.py --config ...``: the real server with the settings
that make tiny random-weight pipelines fast on a small shared CPU (the ones the
``tiny_runtime`` fixture applies in-process):

- one torch thread (``EASEL_TEST_THREADS`` to change it);
- QwenImageEditPlus resizes references to 64x64 for VAE encoding instead of ~1 MP,
  and QwenImageEditInpaint generates at 64x64 instead of ~1 MP.

The settings are applied at import, so the spawn children of isolated models
(which import this file as ``__mp_main__``) get them too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as qwen_inpaint  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_plus  # noqa: E402

from server.cli import main  # noqa: E402

torch.set_num_threads(int(os.environ.get("EASEL_TEST_THREADS", "1")))
qwen_plus.VAE_IMAGE_SIZE = 64 * 64
_dimensions = qwen_inpaint.calculate_dimensions
qwen_inpaint.calculate_dimensions = lambda _area, ratio: _dimensions(64 * 64, ratio)  # it runs at ~1 MP otherwise

if __name__ == "__main__":
    sys.exit(main())
