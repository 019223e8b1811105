"""Worker threads that hand their results straight back to the event loop.

``loop.run_in_executor`` goes through ``concurrent.futures``: a work item, a
future with its own lock and condition, an idle-thread semaphore, and a chain of
callbacks from that future to an asyncio one.  The server's threads (each model's,
and the image encoders) need none of it: they take ``(future, function, args)``
from a queue and settle the asyncio future with one ``call_soon_threadsafe``.  On
a small VM that hand-off is a good part of what a small job costs the server.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class LoopThreads:
    """``count`` daemon threads running functions for the event loop, in order of
    submission; ``shutdown`` lets them finish their current function and end."""

    def __init__(self, count: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(count)]
        self._shutdown = False
        for t in self._threads:
            t.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on one of the threads; await the returned future for its
        result or exception.  Cancelling the future does not stop a call under way."""
        if self._shutdown:
            raise RuntimeError("these worker threads have been shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        return fut

    def shutdown(self) -> None:
        self._shutdown = True
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fut, fn, args = item
            del item
            try:
                value, error = fn(*args), None
            except BaseException as exc:  # delivered to the awaiting task
                value, error = None, exc
            _settle(loop, fut, value, error)
            del loop, fut, fn, args, value, error  # hold nothing of a job while idle


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_set, fut, result, exc)
    except RuntimeError:  # the loop is closed: nobody waits for this result any more
        pass


def _set(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
