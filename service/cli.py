"""``largebatch serve`` and ``largebatch keys create|list|revoke``.

Registered through the ``largebatch.commands`` entry points; fastapi, uvicorn and the store are
imported inside the handlers so ``largebatch recommend`` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys

from largebatch.scaling_rules.cli import CLIError

__all__ = ["register_keys", "register_serve"]

log = logging.getLogger("largebatch.service")

_STORE_HELP = "study store URL (default: $LARGEBATCH_STORE_URL, else a SQLite file under $XDG_DATA_HOME/largebatch)"


def _store_url(arg: str | None) -> str | None:
    return arg or os.environ.get("LARGEBATCH_STORE_URL") or None


def _display_url(url: str | None) -> str:
    from largebatch.service.storage import default_url

    url = url or default_url()
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses ("memory"): nothing secret in it
        return url


def _short(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------ serve


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the REST service (uvicorn)",
        description="Run the largebatch REST service. On a loopback host it runs in open mode (no API key "
                    "needed; said loudly in the log) unless --require-keys; on any other host keys are required "
                    "unless --open.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--store", metavar="URL", help=_STORE_HELP)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--require-keys", action="store_true", help="every /v1 request needs an API key")
    mode.add_argument("--open", action="store_true",
                      help="open mode on any host: requests without a key act in the 'default' namespace")
    p.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.set_defaults(func=_cmd_serve)


def _prepare_multiprocess_metrics() -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, workers share counters through files there: start from none."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    from pathlib import Path

    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    except OSError as e:
        raise CLIError(f"PROMETHEUS_MULTIPROC_DIR={folder}: {e.strerror}") from None


_WILDCARDS = ("", "0.0.0.0", "::")


def _allowed_hosts(host: str, open_mode: bool) -> str:
    """The Host names served unless LARGEBATCH_ALLOWED_HOSTS says: the loopback names and the bound host.
    Bound to every interface with keys required, any name (a load balancer's); in open mode, never."""
    from largebatch.service.browser import LOCAL_HOSTS

    if host in _WILDCARDS:
        return ",".join(LOCAL_HOSTS) if open_mode else "*"
    return ",".join(dict.fromkeys([*LOCAL_HOSTS, host]))


def _check_port_free(host: str, port: int) -> None:
    """Fail before announcing anything when the port is taken (uvicorn would log "serving" first)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CLIError(f"port {port} is in use: try --port {port + 1 if port < 65535 else 8001}") from None
            if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
                raise CLIError(f"--host {host}: cannot bind to this address ({e.strerror})") from None
            raise CLIError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    _check_port_free(args.host, args.port)
    import uvicorn
    from sqlalchemy.exc import DBAPIError

    from largebatch.service.settings import Settings
    from largebatch.service.storage import InvalidArgument, StoreUnavailable, initialize_schema

    url = _store_url(args.store)
    if args.require_keys:
        open_mode = False
    elif args.open:
        open_mode = True
    else:
        env = _env_flag("LARGEBATCH_OPEN_MODE")
        open_mode = env if env is not None else is_loopback(args.host)
    # Workers (one or many) build their app from the environment: pass the options through it.
    if url is not None:
        os.environ["LARGEBATCH_STORE_URL"] = url
    os.environ["LARGEBATCH_OPEN_MODE"] = "true" if open_mode else "false"
    if args.log_level:
        os.environ["LARGEBATCH_LOG_LEVEL"] = args.log_level
    if not os.environ.get("LARGEBATCH_ALLOWED_HOSTS"):
        os.environ["LARGEBATCH_ALLOWED_HOSTS"] = _allowed_hosts(args.host, open_mode)
    try:
        settings = Settings()
    except Exception as e:
        raise CLIError(f"bad LARGEBATCH_* setting: {e}") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _prepare_multiprocess_metrics()
    shown = _display_url(url)
    # The schema is created once here, before any worker starts (workers then only check it).
    try:
        versions = initialize_schema(url)
        os.environ["LARGEBATCH_INIT_SCHEMA"] = "false"
        log.info("study store %s ready (schema %s)", shown, versions)
    except InvalidArgument as e:
        raise CLIError(f"--store: {e}") from None
    except (StoreUnavailable, DBAPIError) as e:  # a driver error escaping schema set-up: database down too
        log.warning("study store %s unreachable (%s): serving 503 until it is", shown, _short(e))
    if url is not None and url.startswith("sqlite") and args.workers > 1:
        log.warning("%d workers on one SQLite file: writes are serialised; use PostgreSQL to scale out", args.workers)
    if open_mode:
        log.warning("=" * 78)
        log.warning("OPEN MODE on %s:%d: requests WITHOUT an API key may read and WRITE namespace %r.",
                    args.host, args.port, settings.open_namespace)
        if not is_loopback(args.host):
            log.warning("This host is reachable from the network. Use --require-keys unless you mean it.")
        log.warning("=" * 78)
    else:
        log.info("API keys required (create one: largebatch keys create --namespace NAME --scope write)")
    log.info("serving on http://%s:%d (docs at /docs), %d worker(s)", args.host, args.port, args.workers)
    from largebatch.service.protocol import DeadlineHttpProtocol

    uvicorn.run(
        "largebatch.service.app:create_app_from_env",
        factory=True,
        # Slow or silent clients are cut off: each request must be read within read_timeout_s, an idle
        # connection is closed after keep_alive_s (uvicorn alone never times out reading a request).
        http=DeadlineHttpProtocol,
        timeout_keep_alive=settings.keep_alive_s,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=10,
    )
    return 0


# ------------------------------------------------------------------------------------ keys


def register_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="manage the service's API keys", description="Create, list and revoke API keys.")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="{create,list,revoke}")
    c = ks.add_parser("create", help="create a key and print it (once)")
    c.add_argument("--namespace", required=True, help="the namespace the key sees and changes")
    c.add_argument("--scope", choices=["read", "write"], default="write", help="read, or write (includes read)")
    c.add_argument("--store", metavar="URL", help=_STORE_HELP)
    c.set_defaults(func=_cmd_keys_create)
    ls = ks.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--namespace", help="only this namespace")
    ls.add_argument("--store", metavar="URL", help=_STORE_HELP)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_cmd_keys_list)
    r = ks.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id", type=int, help="key id (from `largebatch keys list`)")
    r.add_argument("--store", metavar="URL", help=_STORE_HELP)
    r.set_defaults(func=_cmd_keys_revoke)


def _open(args: argparse.Namespace):
    from sqlalchemy.exc import DBAPIError

    from largebatch.service.storage import InvalidArgument, StoreUnavailable, open_store

    url = _store_url(args.store)
    try:
        return open_store(url)
    except InvalidArgument as e:
        raise CLIError(f"--store: {e}") from None
    except (StoreUnavailable, DBAPIError) as e:
        raise CLIError(f"study store {_display_url(url)} unreachable: {_short(e)}") from None


def _store_errors(fn):
    def wrapper(args: argparse.Namespace) -> int:
        from largebatch.service.storage import InvalidArgument, NotFound, StoreError

        try:
            return fn(args)
        except NotFound as e:
            raise CLIError(str(e)) from None
        except InvalidArgument as e:
            raise CLIError(str(e)) from None
        except StoreError as e:
            raise CLIError(f"study store: {e}") from None

    return wrapper


@_store_errors
def _cmd_keys_create(args: argparse.Namespace) -> int:
    with _open(args) as store:
        key_id, plaintext = store.create_api_key(args.namespace, args.scope)
    print(plaintext)
    print(f"key {key_id}: namespace {args.namespace}, scope {args.scope}. This is the only time the key is "
          "shown: store it now (send it as 'Authorization: Bearer <key>').", file=sys.stderr)
    return 0


@_store_errors
def _cmd_keys_list(args: argparse.Namespace) -> int:
    with _open(args) as store:
        keys = store.list_api_keys(args.namespace)
    if args.json:
        print(json.dumps([k.model_dump(mode="json") for k in keys], indent=2))
        return 0
    if not keys:
        print("no keys", file=sys.stderr)
        return 0
    print(f"{'id':>5}  {'namespace':<24} {'scope':<6} {'prefix':<12} {'created (UTC)':<20} revoked")
    for k in keys:
        revoked = k.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if k.revoked_at else "-"
        print(f"{k.id:>5}  {k.namespace:<24} {k.scope:<6} {k.prefix:<12} "
              f"{k.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20} {revoked}")
    return 0


@_store_errors
def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _open(args) as store:
        key = store.revoke_api_key(args.id)
    print(f"key {key.id} ({key.namespace}, {key.scope}) revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S} UTC; "
          "running services stop accepting it within their key cache time (5 s by default)", file=sys.stderr)
    return 0
