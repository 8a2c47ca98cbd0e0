"""Each run's noise trajectory as the store keeps it: binned by examples seen and bounded, counted once
per step, checked, deleted with its study, and added to a database the previous schema created; on
every backend."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from largebatch.service.storage import InvalidArgument, NotFound, open_store
from largebatch.service.storage import _schema as sch
from largebatch.service.storage.records import NoisePoint
from largebatch.service.storage.trajectory import MAX_BUCKETS, bucket_of

from .test_conformance import _run, _study


def _rows(store, run_id: int) -> int:
    t = sch.lb_noise_trajectory
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(t).where(t.c.run_id == run_id)).scalar_one()


def _report(store, run_id: int, steps: range, batch: int = 64, noise=lambda x: 3 * x ** 0.5, **point):
    rows = [(s, 1.0, None, noise((s + 1) * batch), NoisePoint((s + 1) * batch, **point)) for s in steps]
    for i in range(0, len(rows), 1000):  # the service's largest report batch
        store.report_batch(run_id, rows[i:i + 1000])


def test_ten_thousand_steps_stay_bounded_and_keep_the_curve(store):
    _study(store)
    run = _run(store, batch_size=64)
    _report(store, run.id, range(10_000), tokens_seen=None)
    n, [traj] = store.noise_trajectories("team", "bert")
    assert n == 1 and traj.run_id == run.id and traj.batch_size == 64
    # 10,000 reports from 64 to 640,000 examples: one row per quarter of a doubling that a report fell in
    # (the first steps are a doubling apart), not one per step.
    bins = {bucket_of((s + 1) * 64) for s in range(10_000)}
    assert _rows(store, run.id) == len(traj.points) == len(bins) == 49 <= MAX_BUCKETS
    assert sum(p.reports for p in traj.points) == 10_000
    assert [p.examples_seen for p in traj.points] == sorted(p.examples_seen for p in traj.points)
    for p in traj.points:  # the geometric mean of 3 sqrt(x) over a bin is within the bin's spread of the curve
        assert p.noise_scale == pytest.approx(3 * math.sqrt(p.examples_seen), rel=0.01)
        assert p.grad_sq is None and p.tokens_seen is None
    assert traj.points[-1].last_step == 9_999


def test_a_step_is_counted_once_and_components_and_tokens_are_means(store):
    _study(store)
    run = _run(store, batch_size=64)
    _report(store, run.id, range(0, 300), tokens_seen=None)
    before = store.noise_trajectories("team", "bert")
    # A batch resent after a lost answer, and steps trained again after a resume, change nothing.
    _report(store, run.id, range(0, 300), noise=lambda x: 1e6)
    _report(store, run.id, range(250, 300), noise=lambda x: 1e6)
    assert store.noise_trajectories("team", "bert") == before
    # Reports without examples_seen or without noise_scale add no point.
    store.report_batch(run.id, [(300, 1.0, None, 5.0), (301, 1.0, None, None, NoisePoint(1e9))])
    assert store.noise_trajectories("team", "bert") == before
    # A resent batch with new steps after the counted ones: the bin that counted some of them stays as it
    # was; the bins after it take theirs.
    last_bin = bucket_of(300 * 64)
    _report(store, run.id, range(280, 400))
    [after] = store.noise_trajectories("team", "bert")[1]
    assert after.points[:len(before[1][0].points)] == before[1][0].points
    assert sum(p.reports for p in after.points) == 300 + sum(bucket_of((s + 1) * 64) > last_bin for s in range(300, 400))
    other = _run(store, batch_size=8)
    store.report_batch(other.id, [(s, 1.0, None, 2.0, NoisePoint(1000.0 + s, 512_000.0 + 512 * s, 0.5, 1.0))
                                  for s in range(3)])
    n, trajs = store.noise_trajectories("team", "bert")
    assert n == 2 and [t.run_id for t in trajs] == sorted([run.id, other.id])
    [p] = trajs[1].points
    assert (p.examples_seen, p.tokens_seen, p.noise_scale, p.grad_sq, p.trace_sigma, p.reports) == \
        pytest.approx((1001.0, 512_512.0, 2.0, 0.5, 1.0, 3))
    assert [t.run_id for t in store.noise_trajectories("team", "bert", max_runs=1)[1]] == [max(run.id, other.id)]


def test_bad_points_are_refused_naming_the_argument_and_nothing_is_stored(store):
    _study(store)
    run = _run(store)
    for point, name in [(NoisePoint(-1.0), "examples_seen"), (NoisePoint(float("nan")), "examples_seen"),
                        (NoisePoint(2e18), "examples_seen"), (NoisePoint(1.0, float("inf")), "tokens_seen"),
                        (NoisePoint(1.0, None, 0.0, 1.0), "grad_sq"), (NoisePoint(1.0, None, 1.0, -1.0), "trace_sigma"),
                        (NoisePoint(1.0, None, 1.0, None), "grad_sq"), ((1.0, 2.0), "NoisePoint")]:
        with pytest.raises(InvalidArgument, match=name):
            store.report_batch(run.id, [(0, 1.0, None, 10.0, NoisePoint(64.0)), (1, 1.0, None, 10.0, point)])
    assert store.reports(run.id) == [] and _rows(store, run.id) == 0
    with pytest.raises(NotFound):
        store.noise_trajectories("team", "nope")
    with pytest.raises(NotFound):
        store.noise_trajectories("elsewhere", "bert")
    with pytest.raises(InvalidArgument, match="max_runs"):
        store.noise_trajectories("team", "bert", max_runs=0)


def test_deleting_the_study_deletes_its_trajectories(store):
    _study(store)
    run = _run(store)
    _report(store, run.id, range(10))
    store.delete_study("team", "bert")
    assert _rows(store, run.id) == 0
    _study(store)
    assert store.noise_trajectories("team", "bert") == (0, [])


def test_a_database_of_the_previous_schema_gets_the_table_and_keeps_its_runs(file_url):
    with open_store(file_url) as old:
        _study(old)
        run = _run(old)
        old.report_batch(run.id, [(0, 2.0, None, 40.0)])
    # Back to what schema version 1 made: no trajectory table, version 1.
    engine = create_engine(file_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE lb_noise_trajectory"))
        conn.execute(text("UPDATE lb_schema_version SET version = 1"))
    with open_store(file_url) as store:
        assert store.schema_versions()["largebatch"] == str(sch.HEAD) == "4"
        assert store.get_run(run.id).noise_scale == 40.0
        _report(store, run.id, range(1, 20))
        assert store.noise_trajectories("team", "bert")[0] == 1
    with engine.connect() as conn:
        assert inspect(conn).has_table("lb_noise_trajectory")
    engine.dispose()
