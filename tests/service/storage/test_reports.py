"""Reports as the store keeps them: a batch in one transaction, pages by keyset on (run, step), the
count, and the downsampled curve; on every backend."""

from __future__ import annotations

import math

import pytest

from largebatch.service.storage.base import Conflict, InvalidArgument, NotFound, Report

from .test_conformance import _run, _study


def test_a_batch_is_all_or_nothing_and_the_later_report_of_a_step_wins(store):
    _study(store)
    run = _run(store)
    r = store.report_batch(run.id, [(3, 3.0, None, None), (1, 1.0, 0.5, 200.0), (2, 2.0, None, None),
                                    (3, 2.5, 1.0, 300.0)])
    assert (r.last_step, r.last_loss, r.noise_scale) == (3, 2.5, 300.0)
    assert store.reports(run.id) == [Report(step=1, loss=1.0, grad_norm=0.5), Report(step=2, loss=2.0),
                                     Report(step=3, loss=2.5, grad_norm=1.0)]
    with pytest.raises(InvalidArgument, match="noise_scale"):
        store.report_batch(run.id, [(4, 1.0, None, None), (5, 1.0, None, 1e-300)])
    with pytest.raises(InvalidArgument, match="step"):
        store.report_batch(run.id, [(6, 1.0, None, None), (-1, 1.0, None, None)])
    assert [p.step for p in store.reports(run.id)] == [1, 2, 3]
    # Older steps overwrite their own values only; a batch with NaN and inf keeps them.
    r = store.report_batch(run.id, [(1, 0.9, None, 50.0), (10, float("nan"), float("inf"), None)])
    assert r.last_step == 10 and math.isnan(r.last_loss) and r.noise_scale == 300.0
    assert store.reports(run.id, after_step=3)[0].grad_norm == float("inf")
    assert store.reports(run.id)[0] == Report(step=1, loss=0.9)
    store.complete_run(run.id, "failed")
    with pytest.raises(Conflict):
        store.report_batch(run.id, [(11, 1.0, None, None)])
    with pytest.raises(NotFound):
        store.report_batch(10**9, [(1, 1.0, None, None)])


def test_pages_by_keyset_and_offset_and_the_count(store):
    _study(store)
    run = _run(store)
    store.report_batch(run.id, [(s, 1.0 / (s + 1), None, None) for s in range(0, 3000, 3)])
    assert store.report_count(run.id) == 1000
    assert [p.step for p in store.reports(run.id, after_step=2990)] == [2991, 2994, 2997]
    assert [p.step for p in store.reports(run.id, after_step=-1, limit=2)] == [0, 3]
    assert [p.step for p in store.reports(run.id, after_step=100, limit=2)] == [102, 105]
    assert [p.step for p in store.reports(run.id, offset=998)] == [2994, 2997]
    store.report(run.id, 5000, 0.1)
    assert store.report_count(run.id) == 1001  # a new report: the count is not stale
    with pytest.raises(NotFound):
        store.report_count(10**9)


def test_the_curve_keeps_each_buckets_extremes_and_counts_non_finite_losses(store):
    _study(store)
    run = _run(store)
    assert store.report_curve(run.id, 10) == []
    losses = {s: 10.0 - s / 100 for s in range(1000)}
    losses[505] = 50.0  # a spike inside a bucket survives downsampling
    store.report_batch(run.id, [(s, v, None, None) for s, v in losses.items()])
    store.report(run.id, 1000, float("nan"))
    curve = store.report_curve(run.id, 10)
    assert len(curve) <= 10 and curve[0][0] == 0 and curve[-1][1] == 1000
    assert sum(1 for c in curve if c[3] == 50.0) == 1
    assert min(c[2] for c in curve if c[2] is not None) == min(losses.values())
    assert sum(c[4] for c in curve) == 1
    assert [c[0] for c in curve] == sorted(c[0] for c in curve)
