"""Through HTTP, on SQLite and PostgreSQL: a recommendation for a study whose runs sent trajectories is fed
the study's calibrated critical batch curve, and a measured critical batch that revives a swept run counts
in ``largebatch_runs_revived``. A store of its own: sweeping its leases touches no other test's runs."""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime, timedelta

import pytest

from .conftest import PG_URL, in_process_api, throwaway_pg_database, unique
from .test_critical_batch import _send, _truth
from .test_critical_batch_measured import _body

REFERENCE = {"batch_size": 64, "lr": 1e-3, "steps": 2000, "seq_len": 128}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def own_api(request, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            url = PG_URL.format(db=stack.enter_context(throwaway_pg_database("lb_curve")))
        else:
            url = f"sqlite:///{tmp_path_factory.mktemp('curve') / 'curve.db'}"
        yield from in_process_api(url, f"curve-{request.param}")


def _study(c) -> str:
    name = unique("study")
    assert c.post("/v1/studies", json={"name": name, "model_params": 110_000_000}).status_code == 201
    return name


def _open(c, study: str) -> int:
    r = c.post(f"/v1/studies/{study}/runs", json={"request": {
        "model": {"params": 110_000_000}, "reference": REFERENCE, "target": {"batch_size": 64}}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _recommend(c, study: str, **reference) -> dict:
    r = c.post("/v1/recommendations", json={
        "model": {"params": 110_000_000}, "reference": {**REFERENCE, **reference}, "target": {"batch_size": 1024},
        "budget": "same-loss", "study": study})
    assert r.status_code == 200, r.text
    return r.json()


def _revived(c) -> float:
    line = next(x for x in c.get("/metrics").text.splitlines() if x.startswith("largebatch_runs_revived_total"))
    return float(line.split()[-1])


def test_a_recommendation_is_fed_the_studys_curve_and_its_calibration(own_api):
    c = own_api.client()
    study = _study(c)
    runs = [_open(c, study) for _ in range(2)]
    rng = random.Random(3)
    for run in runs:
        _send(c, run, range(2000), 64, rng)
    fitted = _recommend(c, study)
    fed = next(r for r in fitted["rationale"] if r.startswith("the study's critical batch along the run"))
    assert "fitted over 2 run(s)' trajectories" in fed and "(no measured critical batch)" in fed, fed
    median = c.get(f"/v1/runs/{runs[0]}").json()["noise_scale"]
    constant = _recommend(c, study, noise_scale=median)  # the request's own B_noise: the study's is not fed
    assert not any(r.startswith("the study's critical batch") for r in constant["rationale"])
    assert fitted["total_steps"] > 1.2 * constant["total_steps"]
    # Measured critical batches at twice the streaming B_noise: this worker sees them at once.
    for step in (200, 900):
        x = (step + 1) * 64
        r = c.post(f"/v1/runs/{runs[1]}/critical-batches", json=_body(step, critical_batch=2 * _truth(x),
                                                                        noise_scale=_truth(x)))
        assert r.status_code == 201, r.text
    calibrated = _recommend(c, study)
    fed = next(r for r in calibrated["rationale"] if r.startswith("the study's critical batch along the run"))
    assert "calibration factor 2 (from 2 measured critical batch(es))" in fed, fed
    assert calibrated["total_steps"] < fitted["total_steps"]


def test_a_measurement_that_revives_a_swept_run_counts_as_a_revival(own_api):
    c = own_api.client()
    study = _study(c)
    run = _open(c, study)
    store = own_api.app.state.store_holder.get()
    assert run in store.expire_leases(now=datetime.now(UTC) + timedelta(days=2))
    assert c.get(f"/v1/runs/{run}").json()["state"] == "preempted"
    before = _revived(c)
    r = c.post(f"/v1/runs/{run}/critical-batches", json=_body(10))
    assert r.status_code == 201, r.text
    assert c.get(f"/v1/runs/{run}").json()["state"] == "running"
    assert _revived(c) == before + 1
    # On a running run, the resend and another measurement revive nothing.
    assert c.post(f"/v1/runs/{run}/critical-batches", json=_body(10)).status_code == 200
    assert c.post(f"/v1/runs/{run}/critical-batches", json=_body(20)).status_code == 201
    assert _revived(c) == before + 1
    # Swept again, the resend of a stored measurement revives it too, and says so.
    assert run in store.expire_leases(now=datetime.now(UTC) + timedelta(days=4))
    assert c.post(f"/v1/runs/{run}/critical-batches", json=_body(20)).status_code == 200
    assert _revived(c) == before + 2
