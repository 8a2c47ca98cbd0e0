"""``GET /v1/studies/{name}/critical-batch`` and the trajectory fields of a report, through HTTP on SQLite
and PostgreSQL (the ``api`` fixture)."""

from __future__ import annotations

import math
import random

import pytest

from largebatch.service.critical_batch import BOOTSTRAP_RUNS, CriticalBatchOut, fit_power_law
from largebatch.service.storage.trajectory import MAX_BUCKETS

from .test_api import assert_error, new_study, open_run


def _truth(x: float) -> float:
    return 3.0 * x ** 0.5  # B_noise growing 10x over 100x the examples, as on an LM run


def _send(c, run_id: int, steps: range, batch: int, rng: random.Random, *, tokens: bool = True) -> None:
    reports = []
    for s in steps:
        x = (s + 1) * batch
        noise = _truth(x) * math.exp(rng.gauss(0, 0.1))
        grad_sq = 0.01 * (1 + s % 3)  # any |G|^2: the ratio is what matters
        reports.append({"step": s, "loss": 3.0 - s / 10_000, "grad_sq": grad_sq, "trace_sigma": noise * grad_sq,
                        "examples_seen": x, **({"tokens_seen": x * 128} if tokens else {})})
    for i in range(0, len(reports), 1000):
        r = c.post(f"/v1/runs/{run_id}/reports", json={"reports": reports[i:i + 1000]})
        assert r.status_code == 200, r.text


def test_the_study_fits_its_runs_trajectories_and_another_namespace_sees_nothing(api):
    c = api.client()
    study = new_study(c)
    empty = CriticalBatchOut.model_validate(c.get(f"/v1/studies/{study}/critical-batch").json())
    assert empty.fit is None and empty.points == [] and empty.runs == 0 and "no run" in empty.reason
    assert empty.calibration.factor == 1.0 and empty.calibration.measured == 0
    rng = random.Random(0)
    runs = [open_run(c, study) for _ in range(2)]
    for run in runs:
        _send(c, run.id, range(2000), 64, rng)
    r = c.get(f"/v1/studies/{study}/critical-batch")
    assert r.status_code == 200, r.text
    out = CriticalBatchOut.model_validate(r.json())
    assert out.runs == out.runs_with_trajectory == 2 and out.fit is not None and out.reason is None
    fit = out.fit
    assert fit.interval == "t_points" and fit.exponent_low < 0.5 < fit.exponent_high
    assert fit.exponent == pytest.approx(0.5, abs=0.02) and fit.coefficient == pytest.approx(3.0, rel=0.1)
    assert fit.residual_rms == pytest.approx(0.1, rel=0.5)  # the noise put on the points, and no more
    # The curve spans the points (each a bin's mean of examples seen) and never extrapolates past them.
    assert fit.points[0].examples_seen == pytest.approx(64) and 100_000 < fit.points[-1].examples_seen <= 128_000
    for p in fit.points:
        assert p.noise_scale_low < p.noise_scale < p.noise_scale_high
        assert p.noise_scale_low < _truth(p.examples_seen) * 1.02 and p.noise_scale_high > _truth(p.examples_seen) / 1.02
        assert p.tokens_seen == pytest.approx(128 * p.examples_seen)
    assert [p.noise_scale for p in fit.points] == sorted(p.noise_scale for p in fit.points)
    assert 0 < len(out.points) <= MAX_BUCKETS and all(p.runs == 2 for p in out.points)
    assert sum(p.reports for p in out.points) == 4000
    # The run keeps its latest B_noise too (the ratio of the components when noise_scale is not given).
    latest = c.get(f"/v1/runs/{runs[0].id}").json()["noise_scale"]
    assert latest == pytest.approx(_truth(2000 * 64), rel=0.5)
    # The read key sees it; another namespace, an unknown study, a bad name: 404 / 422, in the error model.
    assert api.client("read").get(f"/v1/studies/{study}/critical-batch").status_code == 200
    assert_error(api.client("other").get(f"/v1/studies/{study}/critical-batch"), "not_found")
    assert_error(c.get("/v1/studies/no-such-study/critical-batch"), "not_found")
    assert_error(c.get("/v1/studies/%20bad/critical-batch"), "validation_error")
    assert_error(api.client(None).get(f"/v1/studies/{study}/critical-batch"), "unauthorized")


def test_a_run_of_ten_thousand_steps_stays_bounded(api):
    c = api.client()
    study = new_study(c)
    run = open_run(c, study)
    _send(c, run.id, range(10_000), 256, random.Random(1), tokens=False)
    out = CriticalBatchOut.model_validate(c.get(f"/v1/studies/{study}/critical-batch").json())
    assert len(out.points) <= MAX_BUCKETS and sum(p.reports for p in out.points) == 10_000
    assert out.fit is not None and all(p.tokens_seen is None for p in out.fit.points)
    assert len(c.get(f"/v1/studies/{study}/critical-batch").content) < 64_000


@pytest.mark.parametrize("bad, loc", [
    ({"grad_sq": 1.0}, ["body"]),
    ({"trace_sigma": 1.0}, ["body"]),
    ({"grad_sq": 0.0, "trace_sigma": 1.0}, ["body", "grad_sq"]),
    ({"grad_sq": 1.0, "trace_sigma": -1.0}, ["body", "trace_sigma"]),
    ({"grad_sq": 1.0, "trace_sigma": 5.0, "noise_scale": 3.0}, ["body"]),
    ({"grad_sq": 1e-20, "trace_sigma": 1.0}, ["body", "noise_scale"]),  # a ratio outside the noise scale's range
    ({"examples_seen": -1}, ["body", "examples_seen"]),
    ({"examples_seen": 1e19}, ["body", "examples_seen"]),
    ({"examples_seen": "64"}, ["body", "examples_seen"]),
    ({"examples_seen": 64, "tokens_seen": -5}, ["body", "tokens_seen"]),
    ({"tokens_seen": 8192}, ["body"]),
])
def test_bad_trajectory_fields_are_422_and_store_nothing(api, bad, loc):
    c = api.client()
    study = new_study(c)
    run = open_run(c, study)
    r = c.post(f"/v1/runs/{run.id}/reports", json={"step": 1, "loss": 1.0, **bad})
    body = assert_error(r, "validation_error")
    assert loc in [e["loc"][:len(loc)] for e in body.detail], r.text
    batch = c.post(f"/v1/runs/{run.id}/reports", json={"reports": [
        {"step": 0, "loss": 1.0, "noise_scale": 5.0, "examples_seen": 64}, {"step": 1, "loss": 1.0, **bad}]})
    assert_error(batch, "validation_error")
    assert c.get(f"/v1/runs/{run.id}/reports").json()["total"] == 0
    assert CriticalBatchOut.model_validate(c.get(f"/v1/studies/{study}/critical-batch").json()).points == []


def test_the_band_comes_from_a_bootstrap_over_runs_once_there_are_enough():
    rng = random.Random(2)
    runs = []
    for _ in range(BOOTSTRAP_RUNS + 3):
        scale = math.exp(rng.gauss(0, 0.2))  # runs differ (seeds, LR), which the points of one run cannot show
        runs.append([(x, scale * _truth(x) * math.exp(rng.gauss(0, 0.05))) for x in (2.0 ** k for k in range(6, 20))])
    boot = fit_power_law(runs)
    within = fit_power_law(runs[:1])
    assert boot.interval == "run_bootstrap" and within.interval == "t_points"
    assert boot.exponent_low < 0.5 < boot.exponent_high
    mid = boot.points[len(boot.points) // 2]
    assert mid.noise_scale_low < _truth(mid.examples_seen) < mid.noise_scale_high
    assert fit_power_law(runs) == boot  # seeded: the same data answer the same band
    assert fit_power_law([[(64.0, 10.0), (64.0, 12.0), (64.0, 11.0)]]).startswith("3 point(s)")
    assert fit_power_law([[(0.5, 10.0)]]) == "no point past the first example"
