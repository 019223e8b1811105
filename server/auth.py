"""Who is calling: API keys, key ids, admin rights, quotas and signed image links.

With keys configured, ``/api``, ``/v1`` and ``/sdapi`` need ``Authorization: Bearer
<key>`` (or HTTP Basic with the key as the password, as A1111 clients send it) and
admin routes an admin key.  Basic with empty credentials is no key at all.  The middleware puts the ``Caller`` in the request
scope; routes hand it to the service, which shows a key only its own jobs (an
admin key sees all).  A job records its owner's *key id* (the key's ``name``, or
``key-`` and a hash of the key), never the key.

Image links given out (status, OpenAI ``url`` responses, webhooks) carry an
expiring HMAC signature (``expires``, ``sig``), so a browser ``<img>`` or a
webhook receiver can fetch the image without the key.  With no keys configured
everything is open, as on a single-user machine.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import KeyConfig, QuotaConfig, Settings
from .errors import ApiError, Forbidden, Unauthorized, render

ADMIN_PREFIXES = ("/v1/admin", "/api/load", "/api/train", "/v1/training")
OPEN_PATHS = ("/healthz",)
GUARDED_PREFIXES = ("/api/", "/v1/", "/sdapi/")
SIGNED_PATH = "/api/image"


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # None: no key (an open server, or a signed link)
    admin: bool = False  # sees and cancels every job
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    signed_for: str | None = None  # a signed image link: this task id only

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
        self.guard_all = bool(auth.api_keys)  # only admin keys: the job API stays open
        self.has_admin = bool(auth.admin_keys)  # none: any API key may use the admin routes
        self._callers: dict[bytes, Caller] = {}
        for entries, admin in ((auth.api_keys, False), (auth.admin_keys, True)):
            for entry in entries:
                key = entry.key if isinstance(entry, KeyConfig) else entry
                self._callers[key.encode()] = Caller(key_id(entry), admin=admin, quota=_quota(entry, auth.quota))
        secret = auth.url_secret or "\n".join(sorted(k.decode() for k in self._callers))
        self._signing_key = hashlib.sha256(b"easel image links\n" + secret.encode()).digest()
        self.link_ttl = settings.queue.result_ttl_seconds
        self.anonymous = Caller(None, quota=auth.quota) if self.enabled else OPEN

    def caller(self, token: bytes) -> Caller | None:
        for key, caller in self._callers.items():
            if hmac.compare_digest(token, key):
                return caller
        return None

    # ----- signed links ------------------------------------------------------------

    def _sig(self, task_id: str, expires: int) -> str:
        return hmac.new(self._signing_key, f"{task_id}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def sign(self, url: str, task_id: str) -> str:
        """``url`` (an /api/image link of ``task_id``) with an expiring signature."""
        if not self.enabled:
            return url
        expires = int(time.time() + self.link_ttl)
        return f"{url}&expires={expires}&sig={self._sig(task_id, expires)}"

    def signed_task(self, query: str) -> str | None:
        """The task id a valid, unexpired signed link names, else None."""
        params = parse_qs(query)
        try:
            task_id, expires, sig = params["task_id"][0], int(params["expires"][0]), params["sig"][0]
        except (KeyError, ValueError, IndexError):
            return None
        if expires < time.time() or not hmac.compare_digest(sig, self._sig(task_id, expires)):
            return None
        return task_id


def _quota(entry: str | KeyConfig, default: QuotaConfig) -> QuotaConfig:
    if not isinstance(entry, KeyConfig) or (entry.max_queued is None and entry.gpu_seconds_per_hour is None):
        return default
    return QuotaConfig(
        max_queued=entry.max_queued if entry.max_queued is not None else default.max_queued,
        gpu_seconds_per_hour=entry.gpu_seconds_per_hour if entry.gpu_seconds_per_hour is not None else default.gpu_seconds_per_hour,
    )


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
        guarded = path.startswith(GUARDED_PREFIXES) and path not in OPEN_PATHS
        error: ApiError | None = None
        if caller is None and path == SIGNED_PATH and (task_id := keys.signed_task(scope["query_string"].decode())):
            caller = Caller(None, signed_for=task_id)
        elif guarded and admin and keys.has_admin and not (caller and caller.admin):
            error = (Forbidden if caller else Unauthorized)("this endpoint needs an admin key: send Authorization: Bearer <admin key>")
        elif guarded and (keys.guard_all or admin) and caller is None and keys.enabled:
            error = Unauthorized("missing or invalid API key: send Authorization: Bearer <key> (or HTTP Basic with the key as the password)")
        if error is not None and scope["method"] != "OPTIONS":  # CORS preflights carry no key
            return await render(error)(scope, receive, send)
        scope.setdefault("state", {})["caller"] = caller or keys.anonymous
        await self.app(scope, receive, send)
