"""Open mode, rate limiting (429 + Retry-After), body limits (413, declared or streamed), key cache."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from largebatch.service.app import create_app
from largebatch.service.settings import Settings

from .conftest import bert_request, make_keys, unique


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


def test_recommendations_see_this_workers_writes_at_once_and_anothers_within_evidence_fresh_s(url):
    keys = make_keys(url)
    auth = {"Authorization": f"Bearer {keys['write']}"}
    settings = Settings(store_url=url)  # the defaults: evidence_fresh_s 0.5 s
    with TestClient(create_app(settings), base_url="http://localhost", headers=auth) as a, \
            TestClient(create_app(settings), base_url="http://localhost", headers=auth) as b:
        study = unique("fresh")
        assert a.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
        body = bert_request(65536, study=study)
        lr = a.post("/v1/recommendations", json=body).json()["stages"][0]["peak_lr"]
        assert b.post("/v1/recommendations", json=body).json()["stages"][0]["peak_lr"] == lr
        # A run at that LR diverges, through worker a: a's next answer honours it, whatever a cached.
        run = a.post(f"/v1/studies/{study}/runs", json={"request": bert_request(65536)}).json()
        assert a.post(f"/v1/runs/{run['id']}/complete", json={"outcome": "diverged"}).status_code == 200
        capped = a.post("/v1/recommendations", json=body).json()
        assert capped["stages"][0]["peak_lr"] < lr, capped["rationale"]
        # Worker b learns of it from the store once its read is older than evidence_fresh_s.
        time.sleep(settings.evidence_fresh_s + 0.1)
        assert b.post("/v1/recommendations", json=body).json() == capped


def test_the_same_request_bytes_get_the_same_answer_and_the_memo_is_bounded(url):
    from largebatch.service.recipes import RecipeMemo

    with TestClient(create_app(Settings(store_url=url, open_mode=True)), base_url="http://localhost") as c:
        answers = {t: c.post("/v1/recommendations", json=bert_request(t)).content for t in (8192, 16384, 8192)}
        assert len(set(answers.values())) == 2
        again = c.post("/v1/recommendations", json=bert_request(8192))
        assert again.status_code == 200 and again.content == answers[8192]
        # A request that is not valid is never memoised: it stays a 422 every time.
        for _ in range(2):
            assert c.post("/v1/recommendations", json=bert_request(0)).status_code == 422
    memo = RecipeMemo(max_entries=4, max_body=10)
    for i in range(10):
        memo.put(b"%d" % i, b"answer %d" % i)
    memo.put(b"x" * 11, b"too big to keep")
    assert [memo.get(b"%d" % i) for i in range(10)] == [None] * 6 + [b"answer %d" % i for i in range(6, 10)]
    assert memo.get(b"x" * 11) is None and memo.get(b"9", ("other",)) is None
