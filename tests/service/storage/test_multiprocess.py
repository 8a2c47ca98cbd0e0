"""Several processes on one database: schema creation races, 8 concurrent writers, SIGKILL.

Workers are separate processes (forked, see ``workers.py``), each with its own store, as uvicorn
workers and training jobs would be.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
from sqlalchemy import text

from largebatch.service.storage import StoreUnavailable, initialize_schema, open_store

from . import workers
from .helpers import assert_consistent

N_PROCS = 8
N_RUNS = 200
CTX = mp.get_context("fork")


def _run_all(target, args_for, timeout: float) -> list[dict]:
    """Start one forked process per argument tuple; return what each sent back."""
    pipes, procs = [], []
    for args in args_for:
        parent, child = CTX.Pipe(duplex=False)
        p = CTX.Process(target=target, args=(*args, child))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    results = []
    deadline = time.monotonic() + timeout
    for parent, p in zip(pipes, procs, strict=True):
        assert parent.poll(max(0.0, deadline - time.monotonic())), "worker timed out"
        results.append(parent.recv())
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_workers_refuse_an_uninitialised_database(file_url):
    with pytest.raises(StoreUnavailable, match="initialize_schema"):
        open_store(file_url, initialize=False)


@pytest.mark.slow
def test_schema_initialisation_races_safely(file_url):
    """8 processes initialise a fresh database at the same instant (Optuna's own
    ``create_study(load_if_exists=True)`` fails this way: optuna#1092, #4621)."""
    barrier = CTX.Barrier(N_PROCS)
    results = _run_all(workers.init, [(file_url, w, barrier) for w in range(N_PROCS)], timeout=120)
    assert [r["error"] for r in results] == [None] * N_PROCS
    assert len({json.dumps(r["versions"], sort_keys=True) for r in results}) == 1
    store = open_store(file_url, initialize=False)
    assert store.list_studies(limit=100).total == N_PROCS
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM version_info")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM lb_schema_version")).scalar() == 1
    store.close()


@pytest.mark.slow
def test_eight_processes_two_hundred_runs_each_with_retries(file_url):
    """8 x 200 runs, every call made twice: exactly 1600 runs, none lost, none duplicated, and no
    error (``database is locked`` included) reaches a caller."""
    initialize_schema(file_url)
    store = open_store(file_url, initialize=False)
    store.create_study("ns", "conc", model_family="transformer", model_params=10**8)
    results = _run_all(workers.hammer, [(file_url, w, N_RUNS) for w in range(N_PROCS)], timeout=500)
    errors = [e for r in results for e in r["errors"]]
    assert errors == []
    ids = [i for r in results for i in r["ids"]]
    assert len(ids) == N_PROCS * N_RUNS and len(set(ids)) == N_PROCS * N_RUNS
    assert store.get_study("ns", "conc").n_runs == N_PROCS * N_RUNS
    assert store.list_runs("ns", "conc", state="completed", limit=1).total == N_PROCS * N_RUNS
    keys = set()
    offset = 0
    while True:
        page = store.list_runs("ns", "conc", limit=1000, offset=offset)
        keys.update(r.client_key for r in page.items)
        offset += 1000
        if offset >= page.total:
            break
    assert keys == {f"w{w}-r{i}" for w in range(N_PROCS) for i in range(N_RUNS)}
    hist = store.history("ns", "conc")
    assert sum(h.n_completed for h in hist) == N_PROCS * N_RUNS
    assert assert_consistent(store, "ns", "conc") == N_PROCS * N_RUNS
    print(f"\nper-process seconds: {[round(r['seconds'], 1) for r in results]}")
    store.close()


@pytest.mark.slow
def test_sigkill_mid_write_loses_no_acknowledged_write(file_url):
    """A writer killed with SIGKILL at random moments: the store stays consistent and every write
    acknowledged before the kill is there afterwards."""
    initialize_schema(file_url)
    store = open_store(file_url, initialize=False)
    store.create_study("ns", "dur", model_family="transformer", model_params=10**8)
    rng = random.Random(1234)
    acked: dict[int, str] = {}
    start = 0
    for _round in range(4):
        parent, child = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=workers.writer, args=(file_url, start, child))
        proc.start()
        child.close()
        assert parent.recv() == "READY"
        target = rng.randint(20, 60)
        n = 0
        while n < target:
            run_id, what = parent.recv()
            if not (what == "reported" and acked.get(run_id) in ("completed", "diverged")):
                acked[run_id] = what
            n += 1
        time.sleep(rng.random() * 0.01)  # land somewhere inside the next transaction
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        while parent.poll():  # acknowledgements sent before the kill count too
            try:
                run_id, what = parent.recv()
            except EOFError:
                break
            if not (what == "reported" and acked.get(run_id) in ("completed", "diverged")):
                acked[run_id] = what
        parent.close()
        start += 1000  # fresh client keys for the next writer
        # After every kill: consistent, and every acknowledged write is there.
        total = assert_consistent(store, "ns", "dur")
        assert total >= len(acked)
        for run_id, what in acked.items():
            run = store.get_run(run_id)
            if what == "created":
                assert run.state in ("running", "completed", "diverged")
            elif what == "reported":
                assert run.last_step == 5 and store.reports(run_id)[0].loss == 3.0
            else:
                assert run.state == what, (run_id, what, run.state)
    if store.engine.dialect.name == "sqlite":
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    store.close()
