"""mflux-server's polling client functions (seed 003's README), typed.

They talk to easel unchanged: submit with ``mflux_generate_client``, poll with
``mflux_status_ready`` (0 = done, -1 = error, else seconds to wait), fetch with
``mflux_get_image``; ``generate_image`` strings the three together.
"""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any

import requests
from PIL import Image


def mflux_generate_client(mfluxendpoint: str, prompt: str, width: int = 1280, height: int = 720, steps: int = 4,
                          seed: int | str | None = None, format: str = "JPEG", quality: int = 85, priority: bool = False) -> str:
    data: dict[str, Any] = {
        "prompt": prompt,
        "height": height,
        "width": width,
        "steps": steps,
        "format": format,
        "quality": quality,
        "priority": priority,
    }
    if seed is not None:
        data["seed"] = seed
    response = requests.post(mfluxendpoint + "/api/generate", json=data)
    # parse the response and get the task_id
    task_id: str = response.json()["task_id"]
    return task_id


def mflux_status_ready(mfluxendpoint: str, task_id: str) -> float:
    response = requests.get(mfluxendpoint + "/api/status?task_id=" + task_id)
    if response.status_code != 200:
        return -1
    body = response.json()
    if body["status"] == "done":
        return 0
    if body["status"] in ("error", "cancelled"):  # not in seed 003, whose jobs never failed
        return -1
    # read the waiting time
    waiting_time = float(body.get("wait_remaining", 1))
    return max(waiting_time, 1)


def mflux_get_image(mfluxendpoint: str, task_id: str) -> bytes | None:
    response = requests.get(mfluxendpoint + "/api/image?task_id=" + task_id + "&base64=false&delete=true")
    if response.status_code == 200:
        return response.content
    return None


def generate_image(mfluxendpoint: str, prompt: str, width: int = 1280, height: int = 720, steps: int = 4) -> Image.Image:
    startt = time.time()
    task_id = mflux_generate_client(mfluxendpoint, prompt, width=width, height=height, steps=steps)
    for _ in range(10000):
        waiting_time = mflux_status_ready(mfluxendpoint, task_id)
        print("Waiting time: ", waiting_time, " seconds")
        if waiting_time == 0:
            break
        if waiting_time < 0:
            raise RuntimeError(f"image generation {task_id} failed or was cancelled")
        nextsleep = max(min(waiting_time / 4, 10), 1)
        time.sleep(nextsleep)
    imageb = mflux_get_image(mfluxendpoint, task_id)
    if imageb is None:
        raise RuntimeError(f"the image of task {task_id} could not be fetched")
    stopt = time.time()
    print("Time taken: ", stopt - startt, " seconds")
    return Image.open(BytesIO(imageb))
