"""Recipes read the study's critical batch along the run by themselves: the runs' trajectories fitted
(service/critical_batch.py) and calibrated by measured critical batches become the engine's
``reference.noise_trajectory``; without a usable fit the median B_noise stands. Fitted once per version of
the study's evidence: a re-read with the same version reads no trajectory. On every backend."""

from __future__ import annotations

import contextlib
import re

import pytest
from sqlalchemy import event

from largebatch.scaling_rules.wire import MeasuredCriticalBatchIn, RecommendationIn
from largebatch.service.recipes import EvidenceCache, compute_recipe, gather_history
from largebatch.service.storage.records import NoisePoint

from .test_conformance import _run, _study

BATCH = 64
STEPS = 2000
SEQ = 128


def _truth(x: float) -> float:
    return 3.0 * x ** 0.5  # B_noise growing ~40x over the run, as on an LM run


def _request(target: int | str = 1024, **reference) -> RecommendationIn:
    return RecommendationIn.model_validate({
        "model": {"params": 110_000_000}, "budget": "same-loss", "target": {"batch_size": target},
        "reference": {"batch_size": BATCH, "lr": 1e-3, "steps": STEPS, "seq_len": SEQ, **reference}})


def _runs_with_trajectories(store, n: int = 3, *, tokens: bool = True) -> list:
    """n runs whose B_noise follows the known power law exactly (their last report is the median's value)."""
    runs = []
    for _ in range(n):
        run = _run(store, batch_size=BATCH)
        rows = [(s, 1.0, None, _truth((s + 1) * BATCH),
                 NoisePoint((s + 1) * BATCH, (s + 1) * BATCH * SEQ if tokens else None, None, None))
                for s in range(STEPS)]
        for i in range(0, STEPS, 1000):
            store.report_batch(run.id, rows[i:i + 1000])
        runs.append(run)
    return runs


def _recipe(store, request: RecommendationIn, cache: EvidenceCache | None = None):
    return compute_recipe(request, gather_history(store, "team", "bert", request, cache=cache or EvidenceCache()))


def _fed(recipe) -> str:
    return next(r for r in recipe.rationale if r.startswith("the study's critical batch along the run"))


def _explicit(store, request: RecommendationIn, factor: float = 1.0):
    """The recipe for the same request given the true curve, times ``factor``, at the fit's points by hand."""
    fit = gather_history(store, "team", "bert", request, cache=EvidenceCache()).critical.fit
    points = [{"examples_seen": p.examples_seen, "noise_scale": factor * _truth(p.examples_seen)} for p in fit.points]
    body = request.model_dump(exclude_none=True)
    body["reference"]["noise_trajectory"] = points
    return compute_recipe(RecommendationIn.model_validate(body))


def test_the_fitted_curve_is_the_engines_trajectory_not_the_median(store):
    _study(store)
    _runs_with_trajectories(store)
    request = _request()
    recipe = _recipe(store, request)
    fed = _fed(recipe)
    assert "B_noise = 3 x examples^0.5 fitted over 3 run(s)' trajectories" in fed, fed
    assert "calibration factor 1 (no measured critical batch)" in fed and "32 points over 8192.." in fed
    assert any("from reference.noise_trajectory (32 point(s)" in r for r in recipe.rationale), recipe.rationale
    # What the same request with the true curve typed in gives: the study's curve is that curve.
    assert recipe.total_steps == pytest.approx(_explicit(store, request).total_steps, abs=1)
    # The median of the runs' latest B_noise is the curve's end: one constant there underprices a bigger
    # batch (B_noise is small early), so the trajectory asks more steps for the same loss and a smaller
    # batch "auto".
    median = store.read_evidence("team", "bert").noise_scale
    assert median == pytest.approx(_truth(STEPS * BATCH))
    constant = compute_recipe(_request(noise_scale=median))
    assert recipe.total_steps > 1.2 * constant.total_steps
    auto = _recipe(store, _request("auto")).stages[0].batch_size
    assert auto < 0.8 * compute_recipe(_request("auto", noise_scale=median)).stages[0].batch_size
    # A request that measured its own B_noise keeps it: the study's curve is not fed.
    own = _recipe(store, _request(noise_scale=500.0))
    assert not any(r.startswith("the study's critical batch") for r in own.rationale)
    assert own.total_steps == compute_recipe(_request(noise_scale=500.0)).total_steps


def test_a_reference_in_tokens_reads_the_curve_per_token(store):
    _study(store)
    _runs_with_trajectories(store)
    base = _recipe(store, _request())
    # The same run described in tokens, and a reference with sequences twice as long: the same tokens per
    # batch, so the same critical batch in tokens and the same examples cost.
    tokens = _recipe(store, _request(batch_size=None, batch_tokens=BATCH * SEQ))
    longer = _recipe(store, _request(512, batch_size=BATCH // 2, seq_len=2 * SEQ))
    assert tokens.total_steps == base.total_steps
    assert "(B_noise x 0.5: per token, in the reference's sequences)" in _fed(longer)
    assert longer.total_steps == pytest.approx(base.total_steps, abs=1)


def test_measured_critical_batches_at_twice_the_stream_double_the_curve(store):
    _study(store)
    runs = _runs_with_trajectories(store)
    request = _request()
    cache = EvidenceCache()
    plain = compute_recipe(request, gather_history(store, "team", "bert", request, cache=cache))
    for step in (100, 500, 1500):
        x = (step + 1) * BATCH
        store.add_critical_batch(runs[0].id, MeasuredCriticalBatchIn(
            step=step, examples_seen=x, critical_batch=2 * _truth(x), critical_batch_low=_truth(x),
            noise_scale=_truth(x), batch_size=BATCH,
            ks=[1, 2, 4, 8]))
    # The same cache: a measured critical batch is a new version of the study's evidence.
    calibrated = compute_recipe(request, gather_history(store, "team", "bert", request, cache=cache))
    assert "calibration factor 2 (from 3 measured critical batch(es))" in _fed(calibrated), _fed(calibrated)
    assert calibrated.total_steps == pytest.approx(_explicit(store, request, factor=2.0).total_steps, abs=1)
    assert calibrated.total_steps < plain.total_steps  # a larger critical batch: fewer extra examples


def test_without_a_usable_fit_the_median_stands(store):
    _study(store)
    lone = _run(store, batch_size=BATCH)
    store.report(lone.id, 1, 2.0, noise_scale=400.0)  # B_noise without examples seen: no trajectory
    request = _request()
    recipe = _recipe(store, request)
    why = next(r for r in recipe.rationale if r.startswith("critical batch from the study: the median"))
    assert "400 examples, a constant along the run" in why and "no run of this study has reported" in why
    assert not any(r.startswith("the study's critical batch") for r in recipe.rationale)
    assert recipe.total_steps == compute_recipe(_request(noise_scale=400.0)).total_steps
    # Two points at one examples seen cannot give a power law either: still the median, and why.
    store.report_batch(lone.id, [(s, 1.0, None, 300.0, NoisePoint(64.0, None, None, None)) for s in (2, 3, 4)])
    store.complete_run(lone.id, "completed", metric=1.0)  # a new version: fitted again
    why = next(r for r in _recipe(store, request).rationale if r.startswith("critical batch from the study"))
    assert "a power law needs 3 points at 2 or more distinct examples seen" in why, why


@contextlib.contextmanager
def _statements(store):
    seen: list[str] = []

    def note(conn, cursor, statement, *args):
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", note)


def test_the_fit_is_read_once_per_version_and_a_cache_hit_reads_no_trajectory(store):
    _study(store)
    runs = _runs_with_trajectories(store)
    request = _request()
    cache = EvidenceCache(fresh_s=0.0)  # the version is read on every call
    with _statements(store) as first:
        fed = _fed(_recipe(store, request, cache))
    assert any("lb_noise_trajectory" in s for s in first) and any("lb_critical_batches" in s for s in first)
    for _ in range(3):
        with _statements(store) as again:
            assert _fed(_recipe(store, request, cache)) == fed
        assert again and not any("lb_noise_trajectory" in s for s in again), again
        # The calibration's version: one indexed row, never the measurements.
        assert len([s for s in again if "lb_critical_batches" in s]) == 1
    fresh = EvidenceCache(fresh_s=60.0)
    _recipe(store, request, fresh)
    with _statements(store) as hit:
        assert _fed(_recipe(store, request, fresh)) == fed
    assert hit == []  # fresh: not even the version
    store.complete_run(runs[0].id, "completed", metric=1.0)  # a new version: fitted again, once
    with _statements(store) as refit:
        _recipe(store, request, cache)
    assert any("lb_noise_trajectory" in s for s in refit)
    with _statements(store) as after:
        _recipe(store, request, cache)
    assert not any("lb_noise_trajectory" in s for s in after)


def test_the_reason_names_the_runs_pooled_out_of_those_with_a_trajectory(store):
    _study(store)
    _runs_with_trajectories(store, n=2, tokens=False)
    fed = _fed(_recipe(store, _request()))
    assert "fitted over 2 run(s)' trajectories (of 2 with one)" in fed
    assert re.search(r"32 points over 64\.\.1\.\d+e\+05 examples", fed), fed
