"""``POST /v1/runs/{id}/critical-batches`` and the calibration it gives ``GET /v1/studies/{name}/critical-batch``,
through HTTP on SQLite and PostgreSQL (the ``api`` fixture)."""

from __future__ import annotations

import math
import random

import pytest

from largebatch.scaling_rules.wire import MAX_MEASURED_PER_RUN, CriticalBatchOut, MeasuredCriticalBatch

from .test_api import assert_error, new_study, open_run
from .test_critical_batch import _send, _truth

RATIO = 2.5  # measured B_crit / streaming B_noise, what the calibration must find


def _body(step: int, batch: int = 64, **kw) -> dict:
    x = (step + 1) * batch
    return {"step": step, "examples_seen": x, "critical_batch": RATIO * _truth(x), "critical_batch_low": _truth(x),
            "critical_batch_high": 4 * _truth(x), "noise_scale": _truth(x), "batch_size": batch, "ks": [1, 2, 4, 8],
            **kw}


def _get(c, study: str) -> CriticalBatchOut:
    r = c.get(f"/v1/studies/{study}/critical-batch")
    assert r.status_code == 200, r.text
    return CriticalBatchOut.model_validate(r.json())


def test_the_calibration_recovers_the_measured_ratio_and_scales_the_curve(api):
    c = api.client()
    study = new_study(c)
    rng = random.Random(1)
    runs = [open_run(c, study) for _ in range(2)]
    for run in runs:
        _send(c, run.id, range(2000), 64, rng)
    plain = _get(c, study)
    assert plain.calibration.factor == 1.0 and plain.calibration.measured == 0 and "no measured" in \
        plain.calibration.detail
    # Measured at 8 points: 4 with the job's streaming B_noise (spread x/÷ e^0.1 around RATIO), 4 without
    # (compared with the fitted curve there).
    for i, step in enumerate((100, 300, 700, 1500)):
        jitter = math.exp(0.1 if i % 2 else -0.1)
        stream = _truth((step + 1) * 64) * 1.3  # the job's own value, off the pooled curve: the ratio is to it
        r = c.post(f"/v1/runs/{runs[0].id}/critical-batches",
                   json=_body(step, noise_scale=stream, critical_batch=RATIO * stream * jitter,
                              critical_batch_low=stream, critical_batch_high=None))
        assert r.status_code == 201, r.text
        body = {k: v for k, v in _body(step + 1).items() if k != "noise_scale"}
        body["critical_batch"] *= jitter
        assert c.post(f"/v1/runs/{runs[1].id}/critical-batches", json=body).status_code == 201
    out = _get(c, study)
    cal = out.calibration
    assert cal.measured == 8 and cal.factor == pytest.approx(RATIO, rel=0.03)
    assert cal.factor_low < RATIO < cal.factor_high and cal.geometric_sd == pytest.approx(math.exp(0.1), rel=0.05)
    assert "4 against the B_noise the job sent" in cal.detail and "4 against the fitted curve" in cal.detail
    for a, b in zip(plain.fit.points, out.fit.points, strict=True):
        assert b.noise_scale == pytest.approx(cal.factor * a.noise_scale)
        assert b.noise_scale_low == pytest.approx(cal.factor * a.noise_scale_low)
    assert out.fit.coefficient == plain.fit.coefficient  # the formula's coefficient stays uncalibrated


def test_one_measurement_without_a_trajectory_and_a_resend(api):
    c = api.client()
    study = new_study(c)
    run = open_run(c, study)
    r = c.post(f"/v1/runs/{run.id}/critical-batches", json=_body(10, tokens_seen=128 * 704))
    assert r.status_code == 201, r.text
    stored = MeasuredCriticalBatch.model_validate(r.json())
    assert stored.run_id == run.id and stored.tokens_seen == 128 * 704 and stored.ks == [1, 2, 4, 8]
    again = c.post(f"/v1/runs/{run.id}/critical-batches", json=_body(10, tokens_seen=128 * 704))
    assert again.status_code == 200 and MeasuredCriticalBatch.model_validate(again.json()) == stored
    assert_error(c.post(f"/v1/runs/{run.id}/critical-batches", json=_body(10, critical_batch=100.0,
                                                                           critical_batch_low=50.0)), "conflict")
    out = _get(c, study)
    assert out.fit is None and out.calibration.measured == 1
    assert out.calibration.factor == pytest.approx(RATIO) and out.calibration.factor_low is None


@pytest.mark.parametrize(("change", "loc"), [
    ({"critical_batch": -1.0}, "critical_batch"), ({"critical_batch": "300"}, "critical_batch"),
    ({"critical_batch_low": 1e9}, "body"), ({"critical_batch_high": 1.0}, "body"),
    ({"examples_seen": 0}, "examples_seen"), ({"noise_scale": 0.0}, "noise_scale"),
    ({"step": -1}, "step"), ({"step": True}, "step"), ({"ks": [1]}, "ks"), ({"ks": [1, 1]}, "ks"),
    ({"batch_size": 0}, "batch_size"), ({"extra": 1}, "extra"), ({"examples_seen": 1e300}, "examples_seen"),
])
def test_bad_measurements_are_422_naming_the_field_and_store_nothing(api, change, loc):
    c = api.client()
    study = new_study(c)
    run = open_run(c, study)
    body = _body(10) | change
    r = c.post(f"/v1/runs/{run.id}/critical-batches", json=body)
    err = assert_error(r, "validation_error")
    assert any(loc in map(str, e["loc"]) for e in err.detail), err.detail  # type: ignore[union-attr]
    assert _get(c, study).calibration.measured == 0


def test_another_namespace_a_finished_run_and_the_bound(api):
    c = api.client()
    study = new_study(c)
    run = open_run(c, study)
    assert_error(api.client("other").post(f"/v1/runs/{run.id}/critical-batches", json=_body(1)), "not_found")
    assert_error(api.client("read").post(f"/v1/runs/{run.id}/critical-batches", json=_body(1)), "forbidden")
    assert_error(c.post("/v1/runs/999999999/critical-batches", json=_body(1)), "not_found")
    for s in range(MAX_MEASURED_PER_RUN):
        assert c.post(f"/v1/runs/{run.id}/critical-batches", json=_body(s)).status_code == 201
    over = assert_error(c.post(f"/v1/runs/{run.id}/critical-batches", json=_body(MAX_MEASURED_PER_RUN)), "conflict")
    assert str(MAX_MEASURED_PER_RUN) in str(over.detail)
    assert _get(c, study).calibration.measured == MAX_MEASURED_PER_RUN
    done = open_run(c, study)
    assert c.post(f"/v1/runs/{done.id}/complete", json={"outcome": "completed", "metric": 1.0}).status_code == 200
    assert_error(c.post(f"/v1/runs/{done.id}/critical-batches", json=_body(1)), "conflict")
    assert _get(c, study).calibration.measured == MAX_MEASURED_PER_RUN
