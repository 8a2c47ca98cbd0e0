"""Open mode, rate limiting (429 + Retry-After), body limits (413, declared or streamed), key cache."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from largebatch.service.app import create_app
from largebatch.service.settings import Settings

from .conftest import bert_request, make_keys


@pytest.fixture(scope="module")
def url(sqlite_url):
    return sqlite_url


def test_open_mode_without_key_writes_default_namespace_and_keys_still_count(url):
    keys = make_keys(url)
    with TestClient(create_app(Settings(store_url=url, open_mode=True, open_namespace="sandbox")), base_url="http://localhost") as c:
        r = c.post("/v1/studies", json={"name": "open-study", "model_params": 5})
        assert r.status_code == 201 and r.json()["namespace"] == "sandbox"
        # A key, when sent, is checked and scopes the caller to its own namespace.
        as_key = c.get("/v1/studies", headers={"Authorization": f"Bearer {keys['read']}"}).json()
        assert "open-study" not in {s["name"] for s in as_key["items"]}
        assert c.post("/v1/studies", json={"name": "x", "model_params": 5},
                      headers={"Authorization": f"Bearer {keys['read']}"}).status_code == 403
        assert c.get("/v1/studies", headers={"Authorization": "Bearer bogus"}).status_code == 401


def test_rate_limit_429_with_retry_after(url):
    keys = make_keys(url)
    # one token per 2 s: the five requests below must not earn a token back even on a slow machine
    app = create_app(Settings(store_url=url, open_mode=True, rate_limit_per_s=0.5, rate_limit_burst=3))
    with TestClient(app, base_url="http://localhost") as c:
        statuses = [c.post("/v1/recommendations", json=bert_request()).status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
        r = c.post("/v1/recommendations", json=bert_request())
        assert r.json()["type"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        # Per client: another key has its own bucket; probes are never limited.
        other = {"Authorization": f"Bearer {keys['read']}"}
        assert c.post("/v1/recommendations", json=bert_request(), headers=other).status_code == 200
        assert all(c.get("/healthz").status_code == 200 for _ in range(10))
        time.sleep(2.1)
        assert c.post("/v1/recommendations", json=bert_request()).status_code == 200
        assert 'status="429"' in c.get("/metrics").text


def test_body_limit_declared_and_streamed(url):
    with TestClient(create_app(Settings(store_url=url, open_mode=True, max_body_bytes=2000)), base_url="http://localhost") as c:
        assert c.post("/v1/recommendations", json=bert_request()).status_code == 200
        big = bert_request(environment={"blob": "x" * 5000})
        r = c.post("/v1/recommendations", json=big)
        assert r.status_code == 413 and r.json()["type"] == "payload_too_large"

        def chunks():  # no Content-Length: the limit applies to what arrives
            yield b'{"model": {"params": 340000000}, "environment": {"blob": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}}'

        r = c.post("/v1/recommendations", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["type"] == "payload_too_large"
        r = c.post("/v1/recommendations", content=b"{}", headers={"content-type": "application/json",
                                                                 "content-length": "abc"})
        assert r.status_code in (400, 422)


def test_revoked_key_stops_within_cache_time(url):
    from largebatch.service.storage import open_store

    with open_store(url) as store:
        key_id, key = store.create_api_key("cache-ns", "write")
    app = create_app(Settings(store_url=url, key_cache_seconds=0.3))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}, base_url="http://localhost") as c:
        assert c.get("/v1/studies").status_code == 200
        with open_store(url) as store:
            store.revoke_api_key(key_id)
        time.sleep(0.4)
        assert c.get("/v1/studies").status_code == 401


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LARGEBATCH_STORE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("LARGEBATCH_OPEN_MODE", "true")
    monkeypatch.setenv("LARGEBATCH_RATE_LIMIT_PER_S", "50")
    s = Settings()
    assert s.store_url.endswith("env.db") and s.open_mode and s.rate_limit_per_s == 50
    from largebatch.service.app import create_app_from_env

    with TestClient(create_app_from_env(), base_url="http://localhost") as c:
        assert c.post("/v1/studies", json={"name": "e", "model_params": 1}).status_code == 201
    assert (tmp_path / "env.db").exists()
