"""Python clients for easel: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from clients import Client
    with Client("http://127.0.0.1:4030") as c:
        [image] = c.generate("a lighthouse at dusk", steps=4, output="out.png")

A job is submitted, then waited for either by long-poll (``/api/status?wait=&since=``)
or by Server-Sent Events (``/api/events``), within ``timeout`` seconds.  A job that
fails raises ``JobFailed``, one that is cancelled ``JobCancelled``, one that takes
too long ``Timeout`` (and is cancelled unless ``cancel_on_timeout=False``); a
refused request raises ``ApiError`` with the HTTP status and the offending field.

Everything that does not touch the network is shared in ``clients.common``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

import httpx
from PIL import Image

from .common import (
    FINISHED,
    BaseClient,
    GenerateOptions,
    ImageLike,
    PathLike,
    ProgressCallback,
    SSEParser,
    Status,
    to_data_url,
)
from .errors import ApiError, Timeout

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncClient", "Client", "GenerateOptions"]


class Client(BaseClient):
    """Blocking client on ``httpx.Client``.  Use as a context manager or call ``close()``."""

    def __init__(self, base_url: str = "http://127.0.0.1:4030", api_key: str | None = None, timeout: float = 600.0, **kwargs: Any) -> None:
        super().__init__(base_url, api_key, timeout, **kwargs)
        self.http = httpx.Client(**self._client_args())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._check(self.http.request(method, path, **kwargs))

    # --- low level ---------------------------------------------------------

    def submit(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a job; answers ``{task_id, expected_time_seconds, ...}``."""
        return dict(self._request("POST", path, json=body).json())

    def status(self, task_id: str, wait: float | None = None, since: str | None = None) -> Status:
        params: dict[str, Any] = {"task_id": task_id}
        if wait is not None:
            params["wait"] = wait
        if since is not None:
            params["since"] = since
        return dict(self._request("GET", "/api/status", params=params, timeout=self.http_timeout + (wait or 0)).json())

    def cancel(self, task_id: str) -> Status:
        return dict(self._request("DELETE", f"/api/tasks/{task_id}").json())

    def models(self) -> list[dict[str, Any]]:
        """Loaded models with their capabilities (``/v1/models``)."""
        return list(self._request("GET", "/v1/models").json()["data"])

    def tasks(self, **params: str | float | None) -> dict[str, Any]:
        """``/api/tasks`` with its filters (status, model, since, scope, limit, cursor)."""
        return dict(self._request("GET", "/api/tasks", params={k: v for k, v in params.items() if v is not None}).json())

    def wait(self, task_id: str, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Status:
        """Wait until the job is done and return its last status; raises
        JobFailed / JobCancelled / Timeout."""
        limit, deadline = self._deadline(timeout)
        try:
            waiter = self._wait_sse if self.wait_mode == "sse" else self._wait_poll
            return waiter(task_id, deadline, on_progress)
        except (Timeout, httpx.TimeoutException):
            cancelled = self.cancel_on_timeout and self._cancel_quietly(task_id)
            raise Timeout(task_id, limit, cancelled) from None

    def _wait_poll(self, task_id: str, deadline: float, on_progress: ProgressCallback | None) -> Status:
        known: str | None = None
        while (left := deadline - time.monotonic()) > 0:
            params = self._poll_params(task_id, known, left, on_progress is not None)
            st = self.status(task_id, wait=params["wait"], since=params.get("since"))
            if on_progress:
                on_progress(st)
            if self._outcome(st):
                return st
            known = st["status"]
        raise Timeout(task_id, 0, False)

    def _wait_sse(self, task_id: str, deadline: float, on_progress: ProgressCallback | None) -> Status:
        params, timeout = self._sse_args(task_id, deadline)
        parser, last = SSEParser(), None
        with self.http.stream("GET", "/api/events", params=params, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                self._check(response)
            for line in response.iter_lines():
                if (st := self._sse_status(parser, line, task_id, deadline, on_progress)) is not None:
                    last = st
                    if self._outcome(st):
                        return st
        # the stream ended without "done": the status says why
        return self._wait_poll(task_id, deadline, on_progress) if last is None or last["status"] not in FINISHED else last

    def _cancel_quietly(self, task_id: str) -> bool:
        try:
            return self.cancel(task_id).get("status") == "cancelled"
        except (ApiError, httpx.HTTPError):
            return False

    def image(self, task_id: str, index: int = 0, info: dict[str, Any] | None = None) -> Image.Image:
        data = self._request("GET", "/api/image", params=self._image_params(task_id, index)).content
        return self._open_image(data, task_id, info or {"index": index})

    def images(self, status: Status) -> list[Image.Image]:
        return [self.image(status["task_id"], i["index"], i) for i in status["images"]]

    def run(self, path: str, body: dict[str, Any], timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Status:
        """Submit a job and wait for it: its final status."""
        task_id = self.submit(path, body)["task_id"]
        return self.wait(task_id, timeout, on_progress)

    # --- jobs ----------------------------------------------------------------

    def generate(self, prompt: str, *, output: PathLike | Sequence[PathLike] | None = None, timeout: float | None = None,
                 on_progress: ProgressCallback | None = None, **options: Unpack[GenerateOptions]) -> list[Image.Image]:
        """Text to image: the images (``img.info`` has seed and task_id); saved to ``output`` too if given."""
        status = self.run("/api/generate", self._generate_body(prompt, options), timeout, on_progress)
        images = self.images(status)
        self._save(images, output)
        return images

    def edit(self, prompt: str, images: Sequence[ImageLike], *, output: PathLike | Sequence[PathLike] | None = None,
             timeout: float | None = None, on_progress: ProgressCallback | None = None, **options: Unpack[GenerateOptions]) -> list[Image.Image]:
        """Edit with 1..max_images reference images (paths, bytes or PIL images)."""
        status = self.run("/api/edit", self._generate_body(prompt, options, images), timeout, on_progress)
        result = self.images(status)
        self._save(result, output)
        return result

    def upscale(self, image: ImageLike, scale: int = 4, *, format: str = "PNG", output: PathLike | None = None,
                timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Image.Image:
        status = self.run("/api/upscale", {"image": to_data_url(image), "scale": scale, "format": format}, timeout, on_progress)
        [result] = self.images(status)
        self._save([result], output)
        return result

    def train(self, model: str, dataset_dir: str, adapter_name: str, *, timeout: float | None = None,
              on_progress: ProgressCallback | None = None, **options: Any) -> Status:
        """A LoRA training job (steps, rank, learning_rate, batch_size, resolution, seed); its final status."""
        body = {"model": model, "dataset_dir": dataset_dir, "adapter_name": adapter_name, **options}
        return self.run("/api/train", body, timeout, on_progress)


class AsyncClient(BaseClient):
    """The asyncio twin of ``Client`` on ``httpx.AsyncClient``; same methods, awaited."""

    def __init__(self, base_url: str = "http://127.0.0.1:4030", api_key: str | None = None, timeout: float = 600.0, **kwargs: Any) -> None:
        super().__init__(base_url, api_key, timeout, **kwargs)
        self.http = httpx.AsyncClient(**self._client_args())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._check(await self.http.request(method, path, **kwargs))

    async def submit(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict((await self._request("POST", path, json=body)).json())

    async def status(self, task_id: str, wait: float | None = None, since: str | None = None) -> Status:
        params: dict[str, Any] = {"task_id": task_id}
        if wait is not None:
            params["wait"] = wait
        if since is not None:
            params["since"] = since
        return dict((await self._request("GET", "/api/status", params=params, timeout=self.http_timeout + (wait or 0))).json())

    async def cancel(self, task_id: str) -> Status:
        return dict((await self._request("DELETE", f"/api/tasks/{task_id}")).json())

    async def models(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/models")).json()["data"])

    async def tasks(self, **params: str | float | None) -> dict[str, Any]:
        """``/api/tasks`` with its filters (status, model, since, scope, limit, cursor)."""
        return dict((await self._request("GET", "/api/tasks", params={k: v for k, v in params.items() if v is not None})).json())

    async def wait(self, task_id: str, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Status:
        limit, deadline = self._deadline(timeout)
        try:
            waiter = self._wait_sse if self.wait_mode == "sse" else self._wait_poll
            return await waiter(task_id, deadline, on_progress)
        except (Timeout, httpx.TimeoutException):
            cancelled = self.cancel_on_timeout and await self._cancel_quietly(task_id)
            raise Timeout(task_id, limit, cancelled) from None

    async def _wait_poll(self, task_id: str, deadline: float, on_progress: ProgressCallback | None) -> Status:
        known: str | None = None
        while (left := deadline - time.monotonic()) > 0:
            params = self._poll_params(task_id, known, left, on_progress is not None)
            st = await self.status(task_id, wait=params["wait"], since=params.get("since"))
            if on_progress:
                on_progress(st)
            if self._outcome(st):
                return st
            known = st["status"]
        raise Timeout(task_id, 0, False)

    async def _wait_sse(self, task_id: str, deadline: float, on_progress: ProgressCallback | None) -> Status:
        params, timeout = self._sse_args(task_id, deadline)
        parser, last = SSEParser(), None
        async with self.http.stream("GET", "/api/events", params=params, timeout=timeout) as response:
            if not response.is_success:
                await response.aread()
                self._check(response)
            async for line in response.aiter_lines():
                if (st := self._sse_status(parser, line, task_id, deadline, on_progress)) is not None:
                    last = st
                    if self._outcome(st):
                        return st
        return await self._wait_poll(task_id, deadline, on_progress) if last is None or last["status"] not in FINISHED else last

    async def _cancel_quietly(self, task_id: str) -> bool:
        try:
            return (await self.cancel(task_id)).get("status") == "cancelled"
        except (ApiError, httpx.HTTPError):
            return False

    async def image(self, task_id: str, index: int = 0, info: dict[str, Any] | None = None) -> Image.Image:
        data = (await self._request("GET", "/api/image", params=self._image_params(task_id, index))).content
        return self._open_image(data, task_id, info or {"index": index})

    async def images(self, status: Status) -> list[Image.Image]:
        return [await self.image(status["task_id"], i["index"], i) for i in status["images"]]

    async def run(self, path: str, body: dict[str, Any], timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Status:
        task_id = (await self.submit(path, body))["task_id"]
        return await self.wait(task_id, timeout, on_progress)

    async def generate(self, prompt: str, *, output: PathLike | Sequence[PathLike] | None = None, timeout: float | None = None,
                       on_progress: ProgressCallback | None = None, **options: Unpack[GenerateOptions]) -> list[Image.Image]:
        status = await self.run("/api/generate", self._generate_body(prompt, options), timeout, on_progress)
        images = await self.images(status)
        self._save(images, output)
        return images

    async def edit(self, prompt: str, images: Sequence[ImageLike], *, output: PathLike | Sequence[PathLike] | None = None,
                   timeout: float | None = None, on_progress: ProgressCallback | None = None, **options: Unpack[GenerateOptions]) -> list[Image.Image]:
        status = await self.run("/api/edit", self._generate_body(prompt, options, images), timeout, on_progress)
        result = await self.images(status)
        self._save(result, output)
        return result

    async def upscale(self, image: ImageLike, scale: int = 4, *, format: str = "PNG", output: PathLike | None = None,
                      timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Image.Image:
        status = await self.run("/api/upscale", {"image": to_data_url(image), "scale": scale, "format": format}, timeout, on_progress)
        [result] = await self.images(status)
        self._save([result], output)
        return result

    async def train(self, model: str, dataset_dir: str, adapter_name: str, *, timeout: float | None = None,
                    on_progress: ProgressCallback | None = None, **options: Any) -> Status:
        body = {"model": model, "dataset_dir": dataset_dir, "adapter_name": adapter_name, **options}
        return await self.run("/api/train", body, timeout, on_progress)
