"""Run leases: a run whose heartbeats stop is marked preempted by the sweeper, not left running."""

from __future__ import annotations

import contextlib
import time

import pytest

from .conftest import PG_URL, bert_request, in_process_api, throwaway_pg_database, unique


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def short_lease_api(request, tmp_path_factory):
    # A store of its own: the session-wide servers' sweepers must not preempt these runs first (the
    # preempted counter is per replica). 1.5 s leases, swept every 0.2 s: an hour-long lease in seconds.
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            url = PG_URL.format(db=stack.enter_context(throwaway_pg_database("lb_lease")))
        else:
            url = f"sqlite:///{tmp_path_factory.mktemp('lease') / 'lease.db'}"
        yield from in_process_api(url, f"lease-{request.param}", lease_seconds=1.5, sweep_interval_s=0.2)


def _wait_state(c, run_id: int, state: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = c.get(f"/v1/runs/{run_id}").json()
        if run["state"] == state or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


@pytest.mark.slow  # waits, in real time, for leases to run out and the sweeper to pass
def test_silent_run_is_preempted_and_heartbeating_run_is_not(short_lease_api):
    c = short_lease_api.client()
    study = unique()
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    silent = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request()}).json()
    alive = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(16384)}).json()
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        r = c.post(f"/v1/runs/{alive['id']}/heartbeat", json={})
        assert r.status_code == 200 and not r.json()["should_stop"], r.text
        time.sleep(0.3)
    assert _wait_state(c, silent["id"], "preempted")["state"] == "preempted"
    assert c.get(f"/v1/runs/{alive['id']}").json()["state"] == "running"
    # The silent job was alive after all (a partition): its report brings the run back, its outcome stands.
    r = c.post(f"/v1/runs/{silent['id']}/reports", json={"step": 1, "loss": 2.0})
    assert r.status_code == 200 and not r.json()["should_stop"] and r.json()["run"]["state"] == "running", r.text
    assert c.get(f"/v1/runs/{silent['id']}").json()["state"] == "running"
    done = c.post(f"/v1/runs/{silent['id']}/complete", json={"outcome": "completed", "metric": 1.3})
    assert done.status_code == 200 and done.json()["state"] == "completed"
    metrics = c.get("/metrics").text
    assert "largebatch_runs_preempted_total" in metrics
    for counter in ("largebatch_runs_preempted_total", "largebatch_runs_revived_total"):
        line = next(x for x in metrics.splitlines() if x.startswith(counter))
        assert float(line.split()[-1]) >= 1, line
