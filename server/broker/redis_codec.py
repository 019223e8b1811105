"""The Redis broker's plumbing: how a record and a forecast vector are written as
Redis values, how connection failures surface (``BrokerUnavailable``), and the
client's connection options."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeVar

import msgspec
import numpy as np
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..features import job_vector
from ..jobs import FIELDS, JobRecord
from .base import BrokerUnavailable

PROGRESS_INTERVAL = 0.5  # seconds between two progress writes of a job nobody follows (followed: every step)
LEVEL_SHIFT = 2**20  # priority + shift = level (priorities in [-2^20, 2^20))
PROGRESS_FIELDS = frozenset(("step", "first_step_at", "last_step_at", "extra", "followed_until", "preview_seq", "preview_step", "preview_wanted_until"))
LOST_TWICE = "the worker running this job was lost twice (its lease expired); it was not retried again"
CLAIM_POLL = 0.5  # claim retries at least this often (a missed wake-up costs no more)
READ_BLOCK_MS = 1000
READ_COUNT = 1000
REAP_BATCH = 1000
PAGE = 500
FIELD_SET = frozenset(FIELDS)
FIELD_BYTES = {f.encode(): f for f in FIELDS}
ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, OSError)

P = ParamSpec("P")
T = TypeVar("T")


def guarded(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Connection failures of a broker method raise ``BrokerUnavailable``."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except ERRORS as exc:
            self = args[0]
            raise BrokerUnavailable(f"Redis at {self.address} is not reachable: {exc}") from exc  # type: ignore[attr-defined]

    return wrapper


def to_json(value: Any) -> bytes:
    return msgspec.json.encode(value)


def field_pairs(fields: dict[str, Any]) -> list[Any]:
    """``fields`` (record field -> value) as flat field/JSON pairs for a script;
    ValueError for a name that is not a ``JobRecord`` field."""
    unknown = set(fields) - FIELD_SET
    if unknown:
        raise ValueError(f"not job record fields: {sorted(unknown)}")
    return [x for name, value in fields.items() for x in (name, to_json(value))]


def encode_fields(job: JobRecord, names: Iterable[str] = FIELDS) -> list[Any]:
    """Field/JSON pairs of ``job``, flat (script arguments, HSET)."""
    out: list[Any] = []
    for name in names:
        out.append(name)
        out.append(to_json(getattr(job, name)))
    return out


def decode_record(raw: dict[bytes, bytes] | list[bytes] | None) -> JobRecord | None:
    """A job hash (HGETALL, as a dict or a flat list) -> the record; None if empty."""
    if not raw:
        return None
    items: Iterable[tuple[bytes, bytes]]
    if isinstance(raw, dict):
        items = raw.items()
    else:
        items = zip(raw[0::2], raw[1::2], strict=True)
    parts = [b'"' + k + b'":' + v for k, v in items if k in FIELD_BYTES]
    if not parts:
        return None
    return msgspec.json.decode(b"{" + b",".join(parts) + b"}", type=JobRecord)


def vector_text(job: JobRecord) -> str:
    """The job's forecast vector as the scripts keep it: ``entry=value;...`` (non-zero entries)."""
    vec = job_vector(job.task, np.asarray(job.features, dtype=np.float64), job.batch)
    return ";".join(f"{i}={float(v)!r}" for i, v in enumerate(vec) if v != 0.0 and math.isfinite(v))


def floats(values: list[Any]) -> np.ndarray:
    return np.array([float(v) if v is not None else 0.0 for v in values], dtype=np.float64)


def client_options(socket_timeout: float) -> dict[str, Any]:
    # a pooled connection that a Redis restart closed fails once: retry on a fresh
    # one (connection errors only: a timed-out script may have run)
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(redis.exceptions.ConnectionError,))
    return {
        "protocol": 2,
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "socket_timeout": socket_timeout,
        "health_check_interval": 30,
        "retry": retry,
    }


def id_gt(a: bytes, b: bytes) -> bool:
    """Stream id ``a`` > ``b``."""
    ams, _, aseq = a.partition(b"-")
    bms, _, bseq = b.partition(b"-")
    return (int(ams), int(aseq or 0)) > (int(bms), int(bseq or 0))
