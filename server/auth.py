"""Who is calling: API keys, key ids, admin rights, quotas and allow-lists (a key's
own settings, else ``auth.quota``'s, field by field), and signed image links.

With keys configured (user or admin keys alike), ``/api``, ``/v1``, ``/sdapi`` and
``/metrics`` need ``Authorization: Bearer <key>`` (or HTTP Basic with the key as the
password, as A1111 clients send it; Basic with empty credentials is no key at all) and
admin routes an admin key; ``auth.anonymous`` opens the job API to callers without a
key, and ``metrics.public`` opens ``/metrics``.  The middleware puts the ``Caller`` in the request
scope; routes hand it to the service, which shows a key only its own jobs (an
admin key sees all).  A job records its owner's *key id* (the key's ``name``, or
``key-`` and a hash of the key), never the key.

Image links given out (status, OpenAI ``url`` responses, webhooks) carry an
expiring HMAC signature (``expires``, ``sig``), so a browser ``<img>`` or a
webhook receiver can fetch the image without the key.  The signature covers the
task, the image's index and what the link may do (``fetch``): a link opens one
image, read-only (``delete=true`` needs the owner's key).  Links last
``auth.link_ttl_seconds`` (default: ``queue.result_ttl_seconds``).  With no keys
configured everything is open, as on a single-user machine.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import msgspec
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Settings
from .config_auth import KeyConfig, QuotaConfig
from .errors import ApiError, Forbidden, Unauthorized, render

if TYPE_CHECKING:
    from .jobs import JobRecord

ADMIN_PREFIXES = ("/v1/admin", "/api/load", "/api/train", "/v1/training")
METRICS_PATH = "/metrics"  # guarded too, unless metrics.public
GUARDED_PREFIXES = ("/api/", "/v1/", "/sdapi/")
SIGNED_PATH = "/api/image"
LINK_ACTION = "fetch"  # what a signed link may do: read its one image


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # None: no key (an open server, or a signed link)
    admin: bool = False  # sees and cancels every job
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    signed_for: str | None = None  # a signed image link: this task id only (one image, fetch only)
    weight: int = 1  # its share of turns within a priority (queue.fairness "fair")

    @property
    def share(self) -> str:
        """Its fair-share key: its key id; every caller without a key shares one."""
        return self.key_id or "-"

    def sees(self, owner: str | None, job_id: str) -> bool:
        return self.admin or owner == self.key_id or self.signed_for == job_id


OPEN = Caller(None, admin=True)  # no keys configured: everything is open


def key_id(entry: str | KeyConfig) -> str:
    if isinstance(entry, KeyConfig) and entry.name:
        return entry.name
    key = entry.key if isinstance(entry, KeyConfig) else entry
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


class Keys:
    """The configured keys: token -> Caller, and the link signer."""

    def __init__(self, settings: Settings) -> None:
        auth = settings.auth
        self.enabled = bool(auth.api_keys or auth.admin_keys)
        self.guard_all = self.enabled and not auth.anonymous  # auth.anonymous: the job API stays open
        self.guard_metrics = self.enabled and not settings.metrics.public
        self.has_admin = bool(auth.admin_keys)  # none: any API key may use the admin routes
        self._callers: dict[bytes, Caller] = {}
        for entries, admin in ((auth.api_keys, False), (auth.admin_keys, True)):
            for entry in entries:
                key = entry.key if isinstance(entry, KeyConfig) else entry
                self._callers[key.encode()] = Caller(
                    key_id(entry), admin=admin, quota=_quota(entry, auth.quota), weight=entry.weight if isinstance(entry, KeyConfig) else 1
                )
        secret = auth.url_secret or "\n".join(sorted(k.decode() for k in self._callers))
        self._signing_key = hashlib.sha256(b"easel image links\n" + secret.encode()).digest()
        self.link_ttl = auth.link_ttl_seconds or settings.queue.result_ttl_seconds
        self.anonymous = Caller(None, quota=auth.quota) if self.enabled else OPEN

    def caller(self, token: bytes) -> Caller | None:
        for key, caller in self._callers.items():
            if hmac.compare_digest(token, key):
                return caller
        return None

    # ----- signed links ------------------------------------------------------------

    def _sig(self, task_id: str, index: int, expires: int) -> str:
        message = f"{task_id}:{index}:{LINK_ACTION}:{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()[:32]

    def sign(self, url: str, task_id: str, index: int) -> str:
        """``url`` (the /api/image link of image ``index`` of ``task_id``) with an expiring
        signature that lets it fetch that image and nothing else."""
        if not self.enabled:
            return url
        expires = int(time.time() + self.link_ttl)
        return f"{url}&expires={expires}&sig={self._sig(task_id, index, expires)}"

    def signer(self, url: str, job: JobRecord, index: int) -> str:
        """``sign`` for a job record (the shape views and delivery take)."""
        return self.sign(url, job.id, index)

    def signed_task(self, query: str) -> str | None:
        """The task id a valid, unexpired signed link names (for the index it names), else None."""
        params = parse_qs(query)
        if any(len(values) > 1 for values in params.values()):  # which one the route reads would be a guess
            return None
        try:
            task_id, expires, sig = params["task_id"][0], int(params["expires"][0]), params["sig"][0]
            index = int(params.get("index", ["0"])[0])
        except (KeyError, ValueError, IndexError):
            return None
        if expires < time.time() or not hmac.compare_digest(sig, self._sig(task_id, index, expires)):
            return None
        return task_id


def _quota(entry: str | KeyConfig, default: QuotaConfig) -> QuotaConfig:
    """A key's quota and allow-lists: each of its own settings, else ``auth.quota``'s."""
    if not isinstance(entry, KeyConfig):
        return default
    own = {f.name: getattr(entry, f.name) for f in msgspec.structs.fields(QuotaConfig)}
    return msgspec.structs.replace(default, **{name: value for name, value in own.items() if value is not None})


def _asks_delete(query: str) -> bool:
    return any(v.lower() in ("1", "true", "yes") for v in parse_qs(query).get("delete", []))


def token_of(authorization: bytes) -> bytes:
    """The key in an Authorization header: ``Bearer <key>``, or ``Basic`` whose password
    is the key (A1111's ``--api-auth user:key``); empty Basic credentials are no key."""
    scheme, _, value = authorization.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return value.strip()
    if scheme.lower() == b"basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return b""
        return password
    return b""


def caller_of(scope: Scope) -> Caller:
    return scope.get("state", {}).get("caller", OPEN)  # type: ignore[no-any-return]


class AuthMiddleware:
    """Bearer (or Basic) keys -> ``scope["state"]["caller"]``; refuses what the key may not do."""

    def __init__(self, app: ASGIApp, keys: Keys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        keys = self.keys
        path: str = scope["path"]
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = token_of(value)
        caller = keys.caller(token) if token else None
        admin = path.startswith(ADMIN_PREFIXES)
        guarded = path.startswith(GUARDED_PREFIXES) or (path == METRICS_PATH and keys.guard_metrics)
        error: ApiError | None = None
        query = scope["query_string"].decode("latin-1")
        if caller is None and path == SIGNED_PATH and (task_id := keys.signed_task(query)):
            caller = Caller(None, signed_for=task_id)
            if _asks_delete(query):
                error = Forbidden(
                    "a signed image link only fetches the image; delete=true needs the owner's key: "
                    "send Authorization: Bearer <key>",
                    param="delete",
                    code="link_read_only",
                )
        elif guarded and admin and keys.has_admin and not (caller and caller.admin):
            error = (Forbidden if caller else Unauthorized)("this endpoint needs an admin key: send Authorization: Bearer <admin key>")
        elif guarded and (keys.guard_all or admin or path == METRICS_PATH) and caller is None and keys.enabled:
            opener = "metrics.public: true would open /metrics" if path == METRICS_PATH else (
                "auth.anonymous: true would let callers without one use the job API"
            )
            error = Unauthorized(
                f"missing or invalid API key: send Authorization: Bearer <key>, or HTTP Basic with the key as the password (this server has keys configured; {opener})"
            )
        if error is not None and scope["method"] != "OPTIONS":  # CORS preflights carry no key
            return await render(error)(scope, receive, send)
        scope.setdefault("state", {})["caller"] = caller or keys.anonymous
        await self.app(scope, receive, send)
