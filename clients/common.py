"""What the blocking and the asyncio client share: request bodies, response
checks, job outcomes, SSE parsing and image helpers; nothing here does I/O
on the network."""


from __future__ import annotations

import base64
import io
import json
import mimetypes
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx
from PIL import Image

from .errors import ApiError, JobCancelled, JobFailed, Timeout

ImageLike = str | Path | bytes | Image.Image
PathLike = str | Path
Status = dict[str, Any]
ProgressCallback = Callable[[Status], None]
WaitMode = Literal["poll", "sse"]
FINISHED = ("done", "error", "cancelled")
POLL_STEP = 1.0  # long-poll slice when a progress callback wants step updates


class GenerateOptions(TypedDict, total=False):
    """Optional fields of /api/generate and /api/edit (see the OpenAPI document)."""

    model: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    scheduler: str
    seed: int
    n: int
    format: str
    quality: int
    priority: bool | int
    loras: list[dict[str, Any]]
    upscale: int
    metadata: dict[str, Any]


class SSEParser:
    """Incremental ``text/event-stream`` parser: feed lines, get (event, data)."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if line == "":
            if not self.data:
                return None
            out = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self.event = value
        elif field == "data":
            self.data.append(value)
        return None


def _sniff(data: bytes) -> str:
    try:
        return Image.MIME.get(Image.open(io.BytesIO(data)).format or "", "image/png")
    except OSError:  # not an image PIL knows: let the server say what is wrong
        return "image/png"


def to_data_url(image: ImageLike) -> str:
    """A reference image (path, bytes, PIL image, or an existing data URL) as a data URL."""
    if isinstance(image, str) and image.startswith("data:"):
        return image
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        data, mime = buf.getvalue(), "image/png"
    elif isinstance(image, bytes):
        data, mime = image, _sniff(image)
    else:
        path = Path(image)
        data, mime = path.read_bytes(), mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def output_paths(output: PathLike | Sequence[PathLike] | None, count: int) -> list[Path]:
    """Where to save ``count`` images: a list of paths, or one path
    (``out.png`` -> ``out-0.png``, ``out-1.png``... when there are several)."""
    if output is None:
        return []
    if isinstance(output, (str, Path)):
        path = Path(output)
        if count == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    paths = [Path(p) for p in output]
    if len(paths) != count:
        raise ValueError(f"{count} image(s) but {len(paths)} output path(s)")
    return paths


class BaseClient:
    """Configuration and everything network-free shared by both clients."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:4030",
        api_key: str | None = None,
        timeout: float = 600.0,
        *,
        wait_mode: WaitMode = "poll",
        http_timeout: float = 30.0,
        cancel_on_timeout: bool = True,
        delete_after_fetch: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.wait_mode = wait_mode
        self.http_timeout = http_timeout
        self.cancel_on_timeout = cancel_on_timeout
        self.delete_after_fetch = delete_after_fetch

    def _client_args(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {"base_url": self.base_url, "headers": headers, "timeout": self.http_timeout}

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        """Raise ApiError for a 4xx/5xx with the server's ``{"error": {...}}``."""
        if response.is_success:
            return response
        try:
            err = response.json().get("error", {})
        except (ValueError, AttributeError):
            err = {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
        message = err.get("message") or response.reason_phrase or "request failed"
        raise ApiError(response.status_code, message, err.get("param"), err.get("code"), err.get("type"))

    @staticmethod
    def _generate_body(prompt: str, options: GenerateOptions, images: Sequence[ImageLike] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
        if images is not None:
            body["images"] = [to_data_url(i) for i in images]
        return body

    @staticmethod
    def _outcome(status: Status) -> bool:
        """True when the job is done; raises for error/cancelled; False while unfinished."""
        state = status["status"]
        if state == "error":
            raise JobFailed(status["task_id"], status, f"job {status['task_id']} failed: {status.get('message') or 'no reason given'}")
        if state == "cancelled":
            raise JobCancelled(status["task_id"], status, f"job {status['task_id']} was cancelled")
        return bool(state == "done")

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        limit = self.timeout if timeout is None else timeout
        return limit, time.monotonic() + limit

    def _poll_params(self, task_id: str, known: str | None, left: float, progress: bool) -> dict[str, Any]:
        wait = min(left, POLL_STEP if progress else 60.0)
        params: dict[str, Any] = {"task_id": task_id, "wait": round(max(wait, 0.05), 3)}
        if known is not None:
            params["since"] = known
        return params

    def _sse_args(self, task_id: str, deadline: float) -> tuple[dict[str, Any], httpx.Timeout]:
        """/api/events query (a heartbeat often enough to notice the deadline) and read timeout."""
        left = deadline - time.monotonic()
        params: dict[str, Any] = {"task_id": task_id, "heartbeat": round(max(1.0, min(5.0, left)), 3)}
        return params, httpx.Timeout(self.http_timeout, read=max(0.1, min(left, 65.0)))

    @staticmethod
    def _sse_status(parser: SSEParser, line: str, task_id: str, deadline: float, on_progress: ProgressCallback | None) -> Status | None:
        """One line of /api/events: the status it completes (reported to ``on_progress``),
        or None; raises Timeout past the deadline."""
        if time.monotonic() > deadline:
            raise Timeout(task_id, 0, False)
        event = parser.feed(line)
        if not event or event[0] != "status":
            return None
        status: Status = json.loads(event[1])
        if on_progress:
            on_progress(status)
        return status

    def _image_params(self, task_id: str, index: int) -> dict[str, Any]:
        return {"task_id": task_id, "index": index, "delete": str(self.delete_after_fetch).lower()}

    @staticmethod
    def _open_image(data: bytes, task_id: str, info: dict[str, Any]) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        img.load()
        img.info.update({"task_id": task_id, "seed": info.get("seed"), "prompt": info.get("prompt")})
        return img

    @staticmethod
    def _save(images: list[Image.Image], output: PathLike | Sequence[PathLike] | None) -> None:
        for img, path in zip(images, output_paths(output, len(images)), strict=False):  # output None: nothing to save
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)


