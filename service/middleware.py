"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware): the error guard, bounded strict JSON bodies
and the rate limit.

All answer in the service's one error shape ``{"type", "detail"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time

from starlette.concurrency import run_in_threadpool

from largebatch.service.bodycheck import BodyProblem, check_body

log = logging.getLogger("largebatch.service")

__all__ = ["InternalErrorMiddleware", "RateLimitMiddleware", "StrictJsonMiddleware", "TokenBucket"]


async def send_error(send, status: int, type_: str, detail, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"type": type_, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class InternalErrorMiddleware:
    """A bug answers 500 ``internal_error`` and the connection stays open. (Starlette's own handler
    for ``Exception`` answers and then re-raises, and the server closes a keep-alive connection
    whose request raised.) Logged with its traceback; the answer carries none."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if started:  # half an answer is out: only closing the connection can tell the client
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await send_error(send, 500, "internal_error", "internal error")


class _TooLarge(Exception):
    pass


def _is_json(content_type: bytes) -> bool:
    if content_type == b"application/json":  # what nearly every client sends
        return True
    media, _, params = content_type.decode("latin-1").partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        return False
    charset = params.strip().lower().removeprefix("charset=").strip('" ') if "charset" in params.lower() else "utf-8"
    return charset in ("utf-8", "utf8")


class StrictJsonMiddleware:
    """Every request body is bounded: 413 for a declared Content-Length above ``max_bytes``, or a streamed
    body that grows past it. Request bodies of the API (``/v1/...``) are JSON: 415 for any other declared
    content type or for a body without one (a browser form or ``text/plain`` post cannot reach a route
    without a CORS preflight), 415 for a body not in UTF-8, 422 for one nested too deep or with strings no
    store can keep (:func:`~largebatch.service.bodycheck.check_body`, linear in the body's size). A large
    body is checked off the event loop, so no request holds up the others while its bytes are scanned.

    A POST always carries a JSON body (``{}`` when it has nothing to say): without a JSON content type it
    is 415, with an empty body 422. A POST without one is what another site's page can send without a
    CORS preflight (a form, a body-less or ``text/plain`` ``fetch``), so none of those changes state. (A
    PUT, PATCH or DELETE needs a preflight whatever it carries.)

    One layer for both (the size limit and the JSON checks): each ASGI layer costs every request a few
    microseconds, about what the bare framework spends on it."""

    METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
    INLINE_BYTES = 64 * 1024

    def __init__(self, app, max_bytes: int, prefix: str = "/v1/"):
        self.app = app
        self.max_bytes = max_bytes
        self.prefix = prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_type = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
            elif name == b"content-type":
                content_type = value
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_error(send, 400, "bad_request", "invalid Content-Length")
                return
            if size > self.max_bytes:
                await self._too_large(send)
                return
        if scope["method"] not in self.METHODS or not scope["path"].startswith(self.prefix):
            if declared is not None:  # the HTTP server delivers exactly Content-Length bytes: nothing to count
                await self.app(scope, receive, send)
            else:
                await self._counted(scope, receive, send)
            return
        chunks = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        needs_body = scope["method"] == "POST"
        declared_json = content_type is not None and _is_json(content_type)
        if not declared_json and (content_type is not None or needs_body or body.strip()):
            await send_error(send, 415, "unsupported_media_type",
                             "request bodies must be JSON: send Content-Type: application/json (UTF-8)")
            return
        if needs_body and not body.strip():
            await send_error(send, 422, "validation_error", [{
                "loc": ["body"], "msg": "a POST carries a JSON body ({} when it has no fields)",
                "type": "missing"}])
            return
        try:
            if len(body) <= self.INLINE_BYTES:
                check_body(body)
            else:
                await run_in_threadpool(check_body, body)
        except BodyProblem as e:
            await send_error(send, e.status, e.type, e.detail)
            return
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await send_error(send, 413, "payload_too_large", f"request body larger than {self.max_bytes} bytes",
                         {"Connection": "close"})

    async def _counted(self, scope, receive, send) -> None:
        """A body of unknown length that the app reads itself: 413 once it grows past the limit."""
        limit = self.max_bytes
        seen = 0
        started = False
        exceeded = False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def send_wrapper(message):
            nonlocal started
            if exceeded:  # the framework turned the aborted read into its own error: answer 413 instead
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._too_large(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except _TooLarge:
            if not started:
                await self._too_large(send)


class TokenBucket:
    """Per-client token buckets: ``rate`` tokens/s, at most ``burst``. Thread-safe, bounded."""

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000):
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Take one token; returns 0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                if len(self._buckets) > self.max_clients:
                    self._prune(now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate

    def wait(self, client: str) -> float:
        """Seconds until ``client`` has a token (0: it has one now); takes nothing."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}


def credential(headers) -> str | None:
    """The API key an ``Authorization`` header carries, parsed as authentication parses it (scheme in any
    case, blanks around), so that spelling the header differently is the same client."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else value.decode("latin-1").strip()
    return None


class RateLimitMiddleware:
    """429 + Retry-After once a client (its API key, else its IP) exceeds its token bucket, or once its IP
    has failed authentication too often (a tenth of the rate, bursts of 10): invented keys, each a client
    of its own, still spend their sender's failures. Probes are exempt."""

    EXEMPT = ("/healthz", "/readyz", "/metrics")
    FAILURE_STATUSES = (401, 403)

    def __init__(self, app, rate: float | None, burst: int):
        self.app = app
        self.bucket = TokenBucket(rate, burst) if rate else None
        self.failures = TokenBucket(rate / 10, min(burst, 10)) if rate else None

    async def __call__(self, scope, receive, send):
        if self.bucket is None or scope["type"] != "http" or scope.get("path") in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        ip = "ip:" + (peer[0] if peer else "unknown")
        key = credential(scope.get("headers", ()))
        client = ip if key is None else "key:" + hashlib.sha256(key.encode()).hexdigest()
        wait = max(self.failures.wait(ip), self.bucket.take(client))
        if wait > 0:
            await send_error(send, 429, "rate_limited", f"rate limit of {self.bucket.rate:g} requests/s exceeded",
                             {"Retry-After": str(max(1, math.ceil(wait)))})
            return

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] in self.FAILURE_STATUSES:
                self.failures.take(ip)
            await send(message)

        await self.app(scope, receive, counting_send)
