"""The store unreachable: 503 store_unavailable with Retry-After, never a 500; recovery without restart."""

from __future__ import annotations

import pytest

from .conftest import PG_URL, UvicornServer, _pg_admin, bert_request, free_port, unique

pytestmark = pytest.mark.postgres


def _dead_url() -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"  # nothing listens there


def _assert_503(r) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["type"] == "store_unavailable"
    assert int(r.headers["retry-after"]) >= 1


def test_in_process_app_starts_and_answers_503():
    from fastapi.testclient import TestClient

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings

    app = create_app(Settings(store_url=_dead_url(), open_mode=True, retry_after_s=2))
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/healthz").status_code == 200
        _assert_503(c.get("/readyz"))
        _assert_503(c.get("/v1/studies"))
        _assert_503(c.post("/v1/studies", json={"name": "x", "model_params": 1}))
        _assert_503(c.post("/v1/recommendations", json=bert_request(study="x")))
        # A recipe without a study needs no store.
        assert c.post("/v1/recommendations", json=bert_request()).status_code == 200
        _assert_503(c.get("/v1/studies", headers={"Authorization": "Bearer some-key"}))


@pytest.mark.slow
def test_uvicorn_serve_with_dead_database(tmp_path):
    server = UvicornServer(_dead_url(), "--require-keys", log=tmp_path / "serve.log")
    try:
        import httpx

        assert httpx.get(server.base_url + "/healthz").status_code == 200
        _assert_503(httpx.get(server.base_url + "/readyz"))
        _assert_503(httpx.get(server.base_url + "/v1/studies", headers={"Authorization": "Bearer k"}))
    finally:
        server.stop()
    assert "unreachable" in server.log()


@pytest.fixture
def own_database():
    try:
        admin = _pg_admin()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"PostgreSQL unavailable: {e}")
    name = f"lb_svc_{unique('down').replace('-', '_')}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield name
    with _pg_admin() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_database_goes_away_and_comes_back(own_database):
    """Stop access to the database under a running service: 503 + Retry-After; allow it again: 200."""
    from fastapi.testclient import TestClient

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings

    app = create_app(Settings(store_url=PG_URL.format(db=own_database), open_mode=True))
    with TestClient(app, base_url="http://localhost") as c:
        assert c.post("/v1/studies", json={"name": "s", "model_params": 10}).status_code == 201
        with _pg_admin() as admin:
            admin.execute(f'ALTER DATABASE "{own_database}" ALLOW_CONNECTIONS false')
            admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{own_database}'")
        _assert_503(c.get("/v1/studies/s"))
        _assert_503(c.get("/readyz"))
        with _pg_admin() as admin:
            admin.execute(f'ALTER DATABASE "{own_database}" ALLOW_CONNECTIONS true')
        assert c.get("/v1/studies/s").status_code == 200
        assert c.get("/readyz").status_code == 200
