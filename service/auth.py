"""API keys: ``Authorization: Bearer <key>``; a key has a namespace and a scope (read < write).

Only the sha256 of a key is stored (by the study store); looked-up keys are cached here for
``key_cache_seconds`` (by their hash, never the plaintext), so a revoked key stops working within
that time and most requests cost no database round trip. In open mode a request without a key
acts in ``open_namespace`` with write scope; a request with a key is still checked.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from largebatch.scaling_rules.wire import Scope
from largebatch.service.errors import ApiError

if TYPE_CHECKING:
    from fastapi import Request

    from largebatch.service.storage.base import ApiKeyRecord, ApiKeyStore

__all__ = ["KeyCache", "Principal", "authenticate"]

_RANK = {"read": 1, "write": 2}
_BEARER = {"WWW-Authenticate": 'Bearer realm="largebatch"'}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the namespace they act in and what they may do there."""

    namespace: str
    scope: Scope
    key_id: int | None = None  # None: anonymous, open mode

    def allows(self, needed: Scope) -> bool:
        return _RANK[self.scope] >= _RANK[needed]


class KeyCache:
    """sha256(key) -> (record or None, expiry). Bounded; thread-safe."""

    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: dict[str, tuple[ApiKeyRecord | None, float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> tuple[bool, ApiKeyRecord | None]:
        item = self._items.get(digest)
        if item is None or item[1] < time.monotonic():
            return False, None
        return True, item[0]

    def put(self, digest: str, record: ApiKeyRecord | None) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._items) >= self.max_entries:
                now = time.monotonic()
                self._items = {k: v for k, v in self._items.items() if v[1] >= now}
                if len(self._items) >= self.max_entries:
                    self._items.clear()
            self._items[digest] = (record, time.monotonic() + self.ttl)


def bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError("unauthorized", "Authorization must be 'Bearer <key>'", headers=_BEARER)
    return token


async def authenticate(request: Request, needed: Scope) -> Principal:
    app = request.app
    settings = app.state.settings
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        if settings.open_mode:
            return Principal(settings.open_namespace, "write")
        raise ApiError("unauthorized", "an API key is required: send 'Authorization: Bearer <key>'", headers=_BEARER)
    cache: KeyCache = app.state.key_cache
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    hit, record = cache.get(digest)
    if not hit:
        holder = app.state.store_holder

        def lookup() -> ApiKeyRecord | None:
            keys: ApiKeyStore = holder.get()  # authentication needs the key store only
            return keys.lookup_api_key(token)

        record = await run_in_threadpool(lookup)
        cache.put(digest, record)
    if record is None:
        raise ApiError("unauthorized", "unknown or revoked API key", headers=_BEARER)
    principal = Principal(record.namespace, record.scope, record.id)
    if not principal.allows(needed):
        raise ApiError("forbidden", f"this key has {record.scope} scope; the operation needs {needed}")
    return principal
