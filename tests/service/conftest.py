"""Fixtures: real stores (SQLite file, throwaway PostgreSQL database), the app in-process and under
a real ``largebatch serve`` (uvicorn) subprocess, and API keys in two namespaces."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

# The installed `largebatch` command (the console script next to this interpreter).
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
LAMB_512 = {"batch_size": 512, "lr": 6.25e-4, "warmup_ratio": 0.003125, "steps": 1_000_000}


def bert_request(target: int = 32768, **extra) -> dict:
    return {"model": {"params": 340_000_000}, "reference": dict(LAMB_512), "target": {"batch_size": target}, **extra}


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ databases


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)


@contextlib.contextmanager
def throwaway_pg_database(prefix: str = "lb_svc") -> Iterator[str]:
    """A fresh PostgreSQL database, dropped on exit (other sessions run concurrently)."""
    try:
        conn = _pg_admin()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 unavailable: {e}")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The PostgreSQL database the session-wide servers share."""
    with throwaway_pg_database() as name:
        yield name


@pytest.fixture(scope="session")
def pg_url(pg_database: str) -> str:
    return PG_URL.format(db=pg_database)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'service.db'}"


def store_url(request, backend: str) -> str:
    return request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")


# ------------------------------------------------------------------------------ servers


@dataclass
class Api:
    """One running service plus keys: ``write`` and ``read`` in namespace A, ``other`` (write) in B."""

    name: str
    base_url: str
    store_url: str
    keys: dict[str, str]
    transport: httpx.BaseTransport | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, key: str | None = "write", **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        headers.update(kw.pop("headers", {}))
        c = httpx.Client(base_url=self.base_url, headers=headers, transport=self.transport, timeout=30, **kw)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()


def make_keys(url: str) -> dict[str, str]:
    from largebatch.service.storage import open_store

    ns = unique("ns")
    with open_store(url) as store:
        return {
            "write": store.create_api_key(ns, "write")[1],
            "read": store.create_api_key(ns, "read")[1],
            "other": store.create_api_key(unique("nsb"), "write")[1],
            "namespace": ns,
        }


class UvicornServer:
    """``largebatch serve`` in a subprocess (the real CLI, the real uvicorn)."""

    def __init__(self, url: str, *extra: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [LARGEBATCH, "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--store", url, "--no-access-log", *extra]
        full_env = {**os.environ, "LARGEBATCH_SWEEP_INTERVAL_S": "0.5", "LARGEBATCH_KEY_CACHE_SECONDS": "1",
                    **(env or {})}
        self.log_path = log
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"largebatch serve exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"largebatch serve did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _Buffered(httpx.BaseTransport):
    """The TestClient's transport (runs the app in the TestClient's event loop), for plain httpx clients."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.inner.handle_request(request)
        return httpx.Response(r.status_code, headers=r.headers, content=r.read())


def in_process_api(url: str, name: str, **settings) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings

    app = create_app(Settings(store_url=url, open_mode=False, **settings))
    with TestClient(app, base_url="http://localhost") as tc:
        # httpx clients over the app's ASGI interface, in the TestClient's event-loop thread.
        api = Api(name, "http://localhost", url, make_keys(url), transport=_Buffered(tc._transport))
        api.app = app  # type: ignore[attr-defined]
        yield api
        api.close()


# The uvicorn servers (a `largebatch serve` subprocess each) are `slow`: scripts/test.sh --fast runs
# the same tests against the app in-process on SQLite only.
@pytest.fixture(scope="session", params=["inprocess-sqlite",
                                         pytest.param("inprocess-postgresql", marks=pytest.mark.postgres),
                                         pytest.param("uvicorn-sqlite", marks=pytest.mark.slow),
                                         pytest.param("uvicorn-postgresql", marks=pytest.mark.slow)])
def api(request, tmp_path_factory) -> Iterator[Api]:
    mode, backend = request.param.split("-")
    if backend == "postgresql":
        request.applymarker(pytest.mark.postgres)
    url = store_url(request, backend)
    if mode == "inprocess":
        yield from in_process_api(url, request.param)
        return
    server = UvicornServer(url, "--require-keys", log=tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        api = Api(request.param, server.base_url, url, make_keys(url))
        api.server = server  # type: ignore[attr-defined]
        yield api
        api.close()
    finally:
        server.stop()
