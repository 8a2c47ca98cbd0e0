"""Measured critical batches as the store keeps them: one per (run, step), a resend is the stored one, at
most MAX_MEASURED_PER_RUN per run, checked (nothing stored when refused), only on a running run, newest
first per study, deleted with the study, and added to a database the previous schema created; on every
backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from largebatch.scaling_rules.wire import MAX_MEASURED_PER_RUN, MeasuredCriticalBatchIn
from largebatch.service.storage import Conflict, InvalidArgument, NotFound, open_store
from largebatch.service.storage import _schema as sch

from .test_conformance import _run, _study


def _m(step: int = 10, **kw) -> MeasuredCriticalBatchIn:
    fields = {"step": step, "examples_seen": 64.0 * (step + 1), "critical_batch": 300.0,
              "critical_batch_low": 200.0, "critical_batch_high": 450.0, "noise_scale": 100.0,
              "batch_size": 64, "ks": [1, 2, 4, 8], "window_examples": 2048, **kw}
    return MeasuredCriticalBatchIn(**fields)


def _rows(store) -> int:
    t = sch.lb_critical_batches
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(t)).scalar_one()


def test_a_measurement_is_stored_once_per_step_and_read_newest_first(store):
    _study(store)
    run = _run(store)
    first, created, _ = store.add_critical_batch(run.id, _m(10, tokens_seen=1e6, critical_batch_high=None))
    assert created and first.run_id == run.id and first.ks == [1, 2, 4, 8] and first.critical_batch_high is None
    again, created, _ = store.add_critical_batch(run.id, _m(10, tokens_seen=1e6, critical_batch_high=None))
    assert not created and again == first  # a resend after a lost answer
    with pytest.raises(Conflict, match="step 10"):
        store.add_critical_batch(run.id, _m(10, critical_batch=310.0))
    second, _, _ = store.add_critical_batch(run.id, _m(20, noise_scale=None))
    total, items = store.measured_critical_batches("team", "bert")
    assert total == 2 and items == [second, first] and items[0].noise_scale is None
    assert store.measured_critical_batches("team", "bert", limit=1) == (2, [second])
    with pytest.raises(NotFound):
        store.measured_critical_batches("elsewhere", "bert")
    with pytest.raises(InvalidArgument, match="limit"):
        store.measured_critical_batches("team", "bert", limit=0)


def test_a_run_keeps_at_most_the_bound_and_only_while_it_runs(store):
    _study(store)
    run = _run(store)
    for s in range(MAX_MEASURED_PER_RUN):
        store.add_critical_batch(run.id, _m(s))
    with pytest.raises(Conflict, match=str(MAX_MEASURED_PER_RUN)):
        store.add_critical_batch(run.id, _m(MAX_MEASURED_PER_RUN))
    assert _rows(store) == MAX_MEASURED_PER_RUN
    other = _run(store)
    store.complete_run(other.id, "completed", metric=1.0)
    with pytest.raises(Conflict, match="completed"):
        store.add_critical_batch(other.id, _m())
    with pytest.raises(NotFound):
        store.add_critical_batch(10**9, _m())
    assert _rows(store) == MAX_MEASURED_PER_RUN


def test_bad_measurements_are_refused_naming_the_field_and_nothing_is_stored(store):
    _study(store)
    run = _run(store)
    bad = [({"critical_batch": float("nan")}, "critical_batch"), ({"critical_batch_low": 400.0}, "critical_batch_low"),
           ({"critical_batch_high": 250.0}, "critical_batch_high"), ({"examples_seen": 0.0}, "examples_seen"),
           ({"noise_scale": float("inf")}, "noise_scale"), ({"ks": [2, 2]}, "ks"), ({"step": -1}, "step")]
    for change, name in bad:
        with pytest.raises(InvalidArgument, match=name):
            store.add_critical_batch(run.id, MeasuredCriticalBatchIn.model_construct(**{**dict(_m()), **change}))
    with pytest.raises(InvalidArgument, match="MeasuredCriticalBatchIn"):
        store.add_critical_batch(run.id, dict(_m()))  # type: ignore[arg-type]
    assert _rows(store) == 0


def test_a_measurement_revives_a_swept_run_says_so_and_gives_it_a_lease_again(store):
    _study(store)
    run = _run(store, lease_seconds=60)
    later = datetime.now(UTC) + timedelta(hours=1)
    assert store.expire_leases(now=later) == [run.id]
    stored, created, revived = store.add_critical_batch(run.id, _m(10))
    assert created and revived
    back = store.get_run(run.id)
    assert back.state == "running" and back.lease_expires_at is not None
    assert store.add_critical_batch(run.id, _m(10)) == (stored, False, False)  # running: nothing revived
    assert store.add_critical_batch(run.id, _m(20))[1:] == (True, False)
    assert store.expire_leases(now=later + timedelta(hours=1)) == [run.id]  # the sweeper sees it again
    assert store.add_critical_batch(run.id, _m(10)) == (stored, False, True)  # a resend revives it too
    assert store.get_run(run.id).state == "running"


def test_deleting_the_study_deletes_its_measurements(store):
    _study(store)
    run = _run(store)
    store.add_critical_batch(run.id, _m())
    store.delete_study("team", "bert")
    assert _rows(store) == 0
    _study(store)
    assert store.measured_critical_batches("team", "bert") == (0, [])


def test_a_database_of_the_previous_schema_gets_the_table(file_url):
    with open_store(file_url) as old:
        _study(old)
        run = _run(old)
    engine = create_engine(file_url)
    with engine.begin() as conn:  # back to what schema version 2 made
        conn.execute(text("DROP TABLE lb_critical_batches"))
        conn.execute(text("UPDATE lb_schema_version SET version = 2"))
    with open_store(file_url) as store:
        assert store.schema_versions()["largebatch"] == str(sch.HEAD) == "4"
        store.add_critical_batch(run.id, _m())
        assert store.measured_critical_batches("team", "bert")[0] == 1
    with engine.connect() as conn:
        assert inspect(conn).has_table("lb_critical_batches")
    engine.dispose()
