"""Exceptions raised by the easel clients."""

from __future__ import annotations

from typing import Any


class EaselError(Exception):
    """Base class of every client error."""


class ApiError(EaselError):
    """The server refused a request: ``status`` is the HTTP status, ``param``
    the offending field (when the server named one)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None) -> None:
        super().__init__(f"{status}: {message}" + (f" (param: {param})" if param else ""))
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type


class JobError(EaselError):
    """A job ended without images; ``status`` is its last status object."""

    def __init__(self, task_id: str, status: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.status = status


class JobFailed(JobError):
    """The job ran and failed (status ``error``)."""


class JobCancelled(JobError):
    """The job was cancelled (by anyone) before it finished."""


class Timeout(EaselError, TimeoutError):
    """The job did not finish within the timeout."""

    def __init__(self, task_id: str, timeout: float, cancelled: bool) -> None:
        what = "it was cancelled" if cancelled else "it is still on the server"
        super().__init__(f"job {task_id} did not finish within {timeout:g} s; {what}")
        self.task_id = task_id
        self.timeout = timeout
        self.cancelled = cancelled
