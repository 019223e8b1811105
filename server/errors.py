"""Errors that carry their HTTP status, and the one handler that renders them.

Every error body has OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` so that the job API and the OpenAI shim answer alike.  Unknown
exceptions answer a fixed 500 message; the traceback goes to the log only.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("easel")


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = "invalid_request"
    retryable = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {} if self.retryable else {"x-should-retry": "false"}

    def details(self) -> dict[str, float | str]:
        """Extra fields of the error body (``ErrorDetail``)."""
        return {}


class BadRequest(ApiError):
    status = 400
    code = "invalid_request"  # the general one: routes name a more precise code where one helps


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotAllowed(Forbidden):
    """A job outside its key's allow-lists (``models``, ``loras``, ``max_pixels``,
    ``max_steps``, ``max_images``): ``limit`` names the setting."""

    code = "not_allowed"

    def __init__(self, message: str, *, param: str, limit: str) -> None:
        super().__init__(message, param=param)
        self.limit = limit

    def details(self) -> dict[str, float | str]:
        return {"limit": self.limit}


class NotFound(ApiError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Gone(ApiError):
    status = 410
    type = "not_found_error"
    code = "gone"


class Conflict(ApiError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class QueueFull(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retryable = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class QuotaExceeded(ApiError):
    """A key over its quota (``auth.quota``): retry after ``retry_after`` seconds, or
    never (None: the job alone is over the budget)."""

    status = 429
    type = "rate_limit_error"
    code = "quota_exceeded"

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message, param="quota")
        self.retry_after = None if retry_after is None else max(1, int(retry_after + 0.999))
        self.retryable = retry_after is not None

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {"x-should-retry": "false"}
        return {"Retry-After": str(self.retry_after)}


class DeadlineUnreachable(ApiError):
    """The job is forecast to finish after its deadline: refused before it exists."""

    status = 422
    code = "deadline_unreachable"

    def __init__(self, message: str, *, forecast_finish_at: float, earliest_deadline_at: float, now: float) -> None:
        super().__init__(message, param="deadline_seconds")
        self.finish = forecast_finish_at
        self.earliest = earliest_deadline_at
        self.now = now

    def details(self) -> dict[str, float | str]:
        return {
            "forecast_finish_at": round(self.finish, 3),
            "earliest_deadline_at": round(self.earliest, 3),
            "earliest_deadline_seconds": round(self.earliest - self.now, 3),
        }


class Unavailable(ApiError):
    status = 503
    type = "server_error"
    code = "unavailable"
    retryable = True

    def __init__(self, message: str, *, retry_after: float = 1.0, task_id: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))
        self.task_id = task_id

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def details(self) -> dict[str, float | str]:
        return {"task_id": self.task_id} if self.task_id is not None else {}


class JobFailed(ApiError):
    """A job that ran and failed; retrying the same request will not help."""

    status = 500
    type = "server_error"
    code = "job_failed"


_encoder = msgspec.json.Encoder()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **details: Any) -> bytes:
    detail = ErrorDetail(message=printable(message), type=type_, param=None if param is None else printable(param), code=code, **details)
    return _encoder.encode(ErrorResponse(error=detail))


def printable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (from a ``\\ud800`` escape in
    a request's field name) becomes its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def render(exc: ApiError) -> Response:
    return Response(
        error_body(exc.message, exc.type, exc.param, exc.code, **exc.details()),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers(),
    )


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return render(exc)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    from starlette.exceptions import HTTPException

    assert isinstance(exc, HTTPException)
    typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    code = "invalid_request"
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}; see /openapi.json for the API"
        code = "not_found"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        code = "method_not_allowed"
    return Response(
        error_body(message, typ, code=code),
        status_code=exc.status_code,
        media_type="application/json",
        headers=dict(exc.headers or {}),
    )


async def broker_unavailable_handler(request: Request, exc: Exception) -> Response:
    """The shared broker (Redis) is down or slow: 503 with ``Retry-After``; nothing
    already accepted is lost.  A submit whose outcome the broker did not tell
    (``SubmitUnknown``) names its ``task_id``: ``GET /api/status`` says whether it was
    queued (it cannot be any more), and a retry with the same ``Idempotency-Key`` is
    always safe."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    if (task_id := getattr(exc, "task_id", None)) is not None:  # broker.base.SubmitUnknown
        return render(Unavailable(f"{exc}; retry with the same Idempotency-Key, or look the task up", task_id=task_id))
    return render(Unavailable(f"{exc}; jobs already accepted are kept; retry shortly"))


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(
        error_body("internal server error; the server log has the details", "server_error", code="internal_error"),
        status_code=500,
        media_type="application/json",
    )


BOUND = re.compile(r"Expected `(int|float|number)` (>=|<=|>|<) (-?[0-9.e+]+)$")
MULTIPLE = re.compile(r"Expected `int` that's a multiple of (\d+)$")


def explain(param: str, value: object, text: str, lo: float | None = None, hi: float | None = None) -> str | None:
    """A sentence for a bad number with the value sent and a valid suggestion, from
    msgspec's ``text`` (e.g. "width 100 must be a positive multiple of 16 (e.g. 96)");
    None when ``text`` is not about a bound or a multiple."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if (m := MULTIPLE.match(text)) is not None:
        step = int(m[1])
        near = max(step, round(value / step) * step)
        if hi is not None:
            near = min(near, int(hi // step) * step)
        return f"{param} {value} must be a positive multiple of {step} (e.g. {near})"
    if (m := BOUND.match(text)) is not None:
        op, bound = m[2], m[3]
        words = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than"}[op]
        return f"{param} {value} must be {words} {bound}"
    return None


def validation_message(exc: msgspec.ValidationError | msgspec.DecodeError) -> tuple[str, str | None]:
    """Turn msgspec's message into (sentence, param).

    msgspec says e.g. ``Expected `int` >= 16 - at `$.width```.
    """
    text = str(exc)
    param = None
    if " - at `$." in text:
        text, _, path = text.rpartition(" - at `$.")
        param = path.rstrip("`")
        text = f"{param}: {text}"
    elif text.startswith("Object contains unknown field"):
        param = text.split("`")[1] if "`" in text else None
        text = f"{text}; remove it (see /openapi.json for the accepted fields)"
    elif text.startswith("Object missing required field"):
        param = text.split("`")[1] if "`" in text else None
        text = f"{param} is required; add it (see /openapi.json for the fields)"
    elif isinstance(exc, msgspec.ValidationError):  # the body as a whole, e.g. an array
        text = f"the request body must be a JSON object ({text})"
    else:
        text = f"the request body is not valid JSON ({text})"
    return text, param
