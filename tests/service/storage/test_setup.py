"""URLs, the default location, engine settings, schema versions, busy handling."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import text

from largebatch.scaling_rules.optimizers import units_of
from largebatch.service.storage import (
    InvalidArgument,
    StoreError,
    StoreUnavailable,
    default_url,
    initialize_schema,
    open_store,
)
from largebatch.service.storage import _schema as sch

from .helpers import assert_consistent, make_recipe


def test_default_url_honours_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_url() == f"sqlite:///{tmp_path}/xdg/largebatch/largebatch.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path}/home/.local/share/largebatch/largebatch.db"


def test_open_store_none_creates_the_default_file(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    store = open_store(None)
    store.create_study("ns", "s", model_family="cnn", model_params=5)
    store.close()
    assert (tmp_path / "largebatch" / "largebatch.db").is_file()
    assert open_store(None).get_study("ns", "s").model_params == 5


def test_sqlite_is_configured_for_a_service(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}", busy_timeout_s=7)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7000
    store.close()


@pytest.mark.postgres
def test_postgres_pool_settings(pg_database):
    from .conftest import pg_schema_url

    with pg_schema_url(pg_database) as url:
        store = open_store(url)
        assert store.engine.pool._pre_ping is True
        assert store.engine.pool._recycle == 1800
        assert store.engine.url.drivername == "postgresql+psycopg"
        store.close()
    plain = pg_database.replace("postgresql+psycopg://", "postgresql://")
    with pg_schema_url(plain) as url:  # plain postgresql:// is mapped to psycopg 3
        store = open_store(url)
        assert store.engine.url.drivername == "postgresql+psycopg"
        store.close()


def test_memory_stores_are_private():
    a, b = open_store("memory"), open_store("sqlite://")
    a.create_study("ns", "s", model_family="cnn", model_params=5)
    assert b.list_studies().total == 0 and a.list_studies().total == 1


@pytest.mark.parametrize("bad", ["", "   ", 5, "mysql://u@h/db", "not a url", "oracle://x"])
def test_bad_urls(bad):
    with pytest.raises(InvalidArgument, match="url"):
        open_store(bad)


def test_unreachable_postgres_is_store_unavailable():
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_store("postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert time.monotonic() - start < 20


def test_schema_versions_are_kept_apart(tmp_path):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    versions = initialize_schema(url)
    assert versions["optuna"] == versions["optuna_head"] and versions["largebatch"] == str(sch.HEAD) == "4"
    assert initialize_schema(url) == versions  # idempotent
    store = open_store(url, initialize=False)
    with store.engine.connect() as conn:
        assert [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))] == [versions["optuna"]]
        assert conn.execute(text("SELECT component, version FROM lb_schema_version")).all() == [("largebatch", sch.HEAD)]
    assert store.schema_versions() == versions
    store.close()


def test_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    initialize_schema(url)
    store = open_store(url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE lb_schema_version SET version = 99"))
    store.close()
    with pytest.raises(StoreUnavailable, match="initialize_schema"):
        open_store(url, initialize=False)
    with pytest.raises(StoreError, match="newer"):
        open_store(url)


# The summary table as schema version 3 made it: one row per (study, batch size), every optimizer's runs in it.
_V3_SUMMARY = """CREATE TABLE lb_batch_summary (
    study_id INTEGER NOT NULL REFERENCES lb_studies (study_id) ON DELETE CASCADE, batch_size BIGINT NOT NULL,
    n_runs INTEGER NOT NULL, n_completed INTEGER NOT NULL, n_diverged INTEGER NOT NULL, best_lr DOUBLE PRECISION,
    best_metric DOUBLE PRECISION, min_diverged_lr DOUBLE PRECISION, max_stable_lr DOUBLE PRECISION,
    PRIMARY KEY (study_id, batch_size))"""


def test_a_store_of_schema_3_opens_with_summaries_per_lr_units(file_url):
    """Its rows mix AdamW's and LAMB's runs (AdamW's 1e-3 divergence bounding LAMB's LRs): opening it
    remakes the table per LR units from Optuna's data, and it goes on folding outcomes as a new store does."""
    store = open_store(file_url)
    store.create_study("team", "bert", model_family="transformer", model_params=110_000_000)
    for lr, optimizer, outcome in [(1e-3, "adamw", "diverged"), (5e-2, "lamb", "diverged"),
                                   (1e-2, "lamb", "completed")]:
        run, _ = store.create_run("team", "bert", make_recipe(batch_size=1024, lr=lr, optimizer=optimizer))
        store.complete_run(run.id, outcome, metric=1.5 if outcome == "completed" else None)
    per_units = store.history("team", "bert")
    assert [(h.units, h.min_diverged_lr) for h in per_units] == [(units_of("adamw"), 1e-3), (units_of("lamb"), 5e-2)]
    with store.engine.begin() as conn:
        sid = conn.execute(text("SELECT study_id FROM lb_studies")).scalar_one()
        conn.execute(text("DROP TABLE lb_batch_summary"))
        conn.execute(text(_V3_SUMMARY))
        conn.execute(text("INSERT INTO lb_batch_summary VALUES (:sid, 1024, 3, 1, 2, 1e-2, 1.5, 1e-3, 1e-2)"),
                     {"sid": sid})
        conn.execute(text("UPDATE lb_schema_version SET version = 3"))
    store.close()
    with pytest.raises(StoreUnavailable, match="initialize_schema"):
        open_store(file_url, initialize=False)
    store = open_store(file_url)
    try:
        assert store.schema_versions()["largebatch"] == str(sch.HEAD)
        assert store.history("team", "bert") == per_units
        run, _ = store.create_run("team", "bert", make_recipe(batch_size=1024, lr=3e-2, optimizer="lans"))
        store.complete_run(run.id, "diverged")
        assert [h.min_diverged_lr for h in store.history("team", "bert")] == [1e-3, 3e-2]
        assert assert_consistent(store, "team", "bert") == 4
    finally:
        store.close()


def _hold_write_lock(path: str, seconds: float, started: threading.Event) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    started.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def test_sqlite_busy_is_waited_out(tmp_path):
    path = str(tmp_path / "busy.db")
    store = open_store(f"sqlite:///{path}", busy_timeout_s=0.05)  # so our retry loop does the waiting
    started = threading.Event()
    t = threading.Thread(target=_hold_write_lock, args=(path, 1.0, started))
    t.start()
    started.wait()
    start = time.monotonic()
    store.create_study("ns", "s", model_family="cnn", model_params=5)  # no 'database is locked'
    assert time.monotonic() - start >= 0.5
    t.join()
    store.close()


def test_sqlite_busy_past_the_deadline_is_store_unavailable(tmp_path):
    path = str(tmp_path / "busy.db")
    store = open_store(f"sqlite:///{path}", busy_timeout_s=0.05, busy_deadline_s=0.3)
    started = threading.Event()
    t = threading.Thread(target=_hold_write_lock, args=(path, 1.5, started))
    t.start()
    started.wait()
    with pytest.raises(StoreUnavailable, match="busy"):
        store.create_study("ns", "s", model_family="cnn", model_params=5)
    t.join()
    store.create_study("ns", "s", model_family="cnn", model_params=5)
    store.close()
