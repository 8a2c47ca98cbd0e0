"""What a browser may do to the service: only pages on an allowed host reach it (no DNS rebinding),
another site cannot make it change state (no cross-site request forgery), and no page frames it.

Pure ASGI: a refused request costs a header scan; an allowed one, a few header appends.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from largebatch.service.middleware import send_error

__all__ = ["LOCAL_HOSTS", "BrowserGuardMiddleware", "host_name"]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                     (b"referrer-policy", b"no-referrer")]
_FRAME_ANCESTORS = b"frame-ancestors 'none'"


def host_name(host: str) -> str:
    """The name in a ``Host`` header or an origin's netloc, lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _with_security_headers(headers: list) -> list:
    out = []
    csp_seen = False
    for name, value in headers:
        if name.lower() == b"content-security-policy":
            csp_seen = True
            if b"frame-ancestors" not in value:
                value = value + b"; " + _FRAME_ANCESTORS
        out.append((name, value))
    if not csp_seen:
        out.append((b"content-security-policy", _FRAME_ANCESTORS))
    out.extend(_SECURITY_HEADERS)
    return out


class BrowserGuardMiddleware:
    """Every answer carries ``X-Content-Type-Options: nosniff`` and ``frame-ancestors 'none'``. A request
    whose ``Host`` is not allowed is 400 (a rebound DNS name reaches nothing); a state-changing request
    that a browser sent from another origin (``Origin`` not this host, or ``Sec-Fetch-Site: cross-site``)
    is 403, so a body-less cross-site POST, the one kind a page may send without a preflight, changes
    nothing. ``allowed_hosts``: names (``*`` allows any host)."""

    def __init__(self, app, allowed_hosts: Iterable[str] = LOCAL_HOSTS):
        self.app = app
        names = {host_name(h) for h in allowed_hosts}
        self.any_host = "*" in names
        self.allowed = frozenset(names - {"*"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_security_headers(list(message.get("headers", ())))}
            await send(message)

        host = origin = fetch_site = None
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"sec-fetch-site":
                fetch_site = value.decode("latin-1").strip().lower()
        name = host_name(host) if host is not None else ""
        if not self.any_host and name not in self.allowed:
            await send_error(secured_send, 400, "bad_request",
                             f"host {name!r} is not served here: add it to LARGEBATCH_ALLOWED_HOSTS")
            return
        if scope["method"] in _STATE_CHANGING and self._cross_site(origin, fetch_site, host):
            await send_error(secured_send, 403, "forbidden",
                             "a state-changing request from another site's page is refused")
            return
        await self.app(scope, receive, secured_send)

    def _cross_site(self, origin: str | None, fetch_site: str | None, host: str | None) -> bool:
        if fetch_site in ("cross-site", "same-site"):
            return True
        if origin is None:
            return False  # not a browser, or a same-origin navigation of an old browser
        if origin == "null":
            return True  # a sandboxed frame or a file: page
        netloc = urlsplit(origin).netloc
        return netloc.lower() != (host or "").strip().lower()
