"""Backends for the storage tests: one parametrized ``store`` fixture over every backend.

PostgreSQL: the server at 127.0.0.1:5432 (override with ``LARGEBATCH_TEST_PG``). Each test session
creates its own throwaway database (dropped at the end) and each test gets its own schema in it,
so parallel sessions and other engineers' tests never see each other's rows. When the server is
unreachable the PostgreSQL cases are skipped, unless ``LARGEBATCH_REQUIRE_POSTGRES=1`` (set in CI)
turns that into a failure.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from largebatch.service.storage import open_store

PG_SERVER = os.environ.get("LARGEBATCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """URL of a database private to this test session."""
    name = f"lbtest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # pragma: no cover - depends on the machine
        if os.environ.get("LARGEBATCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required but unreachable at {PG_SERVER}: {e}")
        pytest.skip(f"PostgreSQL unreachable at {PG_SERVER}: {e}")
    try:
        yield _with_database(PG_SERVER, name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def pg_schema_url(database_url: str) -> Iterator[str]:
    """A fresh schema in the session database; the URL puts it first on the search_path."""
    schema = f"s_{uuid.uuid4().hex[:12]}"
    eng = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{database_url}?options=-csearch_path%3D{schema}"
    finally:
        with eng.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        eng.dispose()


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    kind = request.param
    if kind == "memory":
        yield "memory"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with pg_schema_url(request.getfixturevalue("pg_database")) as url:
            yield url


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path):
    """A fresh, empty store on each backend."""
    kind = request.param
    if kind == "memory":
        s = open_store("memory")
        yield s
        s.close()
        return
    if kind == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        yield s
        s.close()
        return
    with pg_schema_url(request.getfixturevalue("pg_database")) as url:
        s = open_store(url)
        yield s
        s.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def file_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """URL of a fresh, shareable (multi-process) database: SQLite file or PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        with pg_schema_url(request.getfixturevalue("pg_database")) as url:
            yield url
