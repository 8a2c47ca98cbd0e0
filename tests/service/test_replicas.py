"""Two ``largebatch serve`` processes on one PostgreSQL: a run opened on one is completed on the other,
and both see it (the deployment the README describes: replicas behind a load balancer)."""

from __future__ import annotations

import httpx
import pytest

from .conftest import UvicornServer, bert_request, make_keys, unique

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_run_opened_on_one_replica_is_completed_on_the_other(pg_url, tmp_path):
    keys = make_keys(pg_url)
    auth = {"Authorization": f"Bearer {keys['write']}"}
    # Replica A runs two workers sharing their metrics, as docker/compose.yaml does.
    a = UvicornServer(pg_url, "--require-keys", "--workers", "2", log=tmp_path / "a.log",
                      env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")})
    b = UvicornServer(pg_url, "--require-keys", log=tmp_path / "b.log")
    try:
        ca = httpx.Client(base_url=a.base_url, headers=auth, timeout=30)
        cb = httpx.Client(base_url=b.base_url, headers=auth, timeout=30)
        study = unique()
        assert ca.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
        assert cb.get(f"/v1/studies/{study}").status_code == 200
        body = bert_request(study=study, start_run=True)
        run = ca.post("/v1/recommendations", json=body, headers={"Idempotency-Key": "job-7"}).json()["run"]
        # The job retries on the other replica: same key, same run.
        retry = cb.post("/v1/recommendations", json=body, headers={"Idempotency-Key": "job-7"}).json()["run"]
        assert retry["id"] == run["id"]
        for i, client in enumerate((ca, cb, ca, cb, ca, cb)):
            r = client.post(f"/v1/runs/{run['id']}/reports", json={"step": i, "loss": 10.0 - i})
            assert r.status_code == 200 and not r.json()["should_stop"], r.text
        assert cb.post(f"/v1/runs/{run['id']}/heartbeat", json={}).status_code == 200
        done = cb.post(f"/v1/runs/{run['id']}/complete", json={"outcome": "completed", "metric": 1.1})
        assert done.status_code == 200 and done.json()["state"] == "completed"
        for client in (ca, cb):
            seen = client.get(f"/v1/runs/{run['id']}").json()
            assert (seen["state"], seen["metric"], seen["last_step"]) == ("completed", 1.1, 5)
            listed = client.get(f"/v1/studies/{study}/runs", params={"state": "completed"}).json()
            assert [r["id"] for r in listed["items"]] == [run["id"]]
        # Either worker's /metrics counts the three reports replica A served, whichever worker took them.
        metrics = ca.get("/metrics").text
        line = 'largebatch_http_requests_total{method="POST",route="/v1/runs/{id}/reports",status="200"}'
        assert any(x.startswith(line) and float(x.split()[-1]) == 3.0 for x in metrics.splitlines()), metrics[-3000:]
        # The container healthcheck script (docker/) against a live replica, and a dead port.
        import subprocess
        import sys
        from pathlib import Path

        check = Path(__file__).resolve().parents[2] / "docker" / "healthcheck.py"
        assert subprocess.run([sys.executable, str(check), f"{b.base_url}/readyz"], timeout=30).returncode == 0
        assert subprocess.run([sys.executable, str(check), "http://127.0.0.1:9/readyz"], timeout=30).returncode == 1
        # A conflicting outcome sent to the first replica is refused there too.
        assert ca.post(f"/v1/runs/{run['id']}/complete", json={"outcome": "failed"}).status_code == 409
        # A divergence recorded through one replica caps the recipe the other one serves.
        run2 = cb.post(f"/v1/studies/{study}/runs", json={"request": bert_request(65536)}).json()
        lr = run2["peak_lr"]
        assert ca.post(f"/v1/runs/{run2['id']}/reports", content=b'{"step": 1, "loss": NaN}',
                       headers={"content-type": "application/json"}).json()["should_stop"]
        capped = cb.post("/v1/recommendations", json=bert_request(65536, study=study)).json()
        assert capped["stages"][0]["peak_lr"] < lr
        assert any("diverged" in line for line in capped["rationale"])
    finally:
        a.stop()
        b.stop()
