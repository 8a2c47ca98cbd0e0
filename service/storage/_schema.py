"""Our own tables, kept beside Optuna's in the same database, with their own migration version.

Optuna's schema is versioned by Alembic in ``alembic_version``; ours is versioned in
``lb_schema_version`` (never in ``alembic_version``: two apps stamping one Alembic table break
each other, cf. mlflow#2923). Every table is prefixed ``lb_`` so it cannot collide with Optuna's.

Tables:

* ``lb_studies``: one row per study (``study_id`` = Optuna ``studies.study_id``); ``n_runs`` is
  also the counter that numbers trials, so creating a run locks only its study's row.
* ``lb_runs``: one row per run (``run_id`` = Optuna ``trials.trial_id``) with the columns that
  listing, idempotency and lease sweeps need. ``UNIQUE (study_id, client_key)`` makes run creation
  idempotent in the database.
* ``lb_batch_summary``: one row per (study, batch size, LR units), updated in the same transaction as
  each outcome; what :meth:`StudyStore.history` reads.
* ``lb_grad_norms``: optional gradient norm per reported step (the loss itself is an Optuna
  intermediate value).
* ``lb_noise_trajectory``: each run's gradient noise scale along the examples it has seen, merged into
  at most ``trajectory.MAX_BUCKETS`` buckets per run (fixed log-spaced bins of examples seen).
* ``lb_critical_batches``: critical batches measured by branching (``job.branch_probe``), at most
  ``wire.MAX_MEASURED_PER_RUN`` per run, one per (run, step); read newest first per study.
* ``lb_api_keys``: sha256 hashes of API keys.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Engine

from largebatch.service.storage.base import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

metadata = MetaData()

lb_schema_version = Table(
    "lb_schema_version",
    metadata,
    Column("component", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

lb_studies = Table(
    "lb_studies",
    metadata,
    Column("study_id", Integer, primary_key=True, autoincrement=False),
    Column("namespace", String(128), nullable=False),
    Column("name", String(128), nullable=False),
    Column("model_family", String(64), nullable=False),
    Column("model_params", BigInteger, nullable=False),
    Column("metric", String(128), nullable=False),
    Column("direction", String(8), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("n_runs", Integer, nullable=False),
    UniqueConstraint("namespace", "name", name="uq_lb_studies_namespace_name"),
    Index("ix_lb_studies_family_params", "model_family", "model_params"),
)

lb_runs = Table(
    "lb_runs",
    metadata,
    Column("run_id", Integer, primary_key=True, autoincrement=False),
    Column("study_id", Integer, ForeignKey("lb_studies.study_id", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("client_key", String(200), nullable=True),
    Column("state", String(16), nullable=False),
    Column("batch_size", BigInteger, nullable=False),
    Column("peak_lr", Double, nullable=False),
    Column("warmup_ratio", Double, nullable=False),
    Column("const_ratio", Double, nullable=False),
    Column("optimizer", String(16), nullable=False),
    Column("steps", BigInteger, nullable=False),
    Column("recipe_hash", String(64), nullable=False),
    Column("metric", Double, nullable=True),
    Column("reason", Text, nullable=True),
    Column("diverged_step", BigInteger, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("lease_seconds", Double, nullable=False),
    # NULL once the run is final, so the sweep index only holds running runs' leases.
    Column("lease_expires_at", DateTime, nullable=True),
    Column("last_step", BigInteger, nullable=True),
    Column("last_loss", Double, nullable=True),
    # SQLite stores NaN as NULL: keep non-finite losses as text ('nan', 'inf', '-inf').
    Column("last_loss_nonfinite", String(8), nullable=True),
    # True when expire_leases (not the job) preempted the run: the job's own outcome may follow.
    Column("swept", Boolean, nullable=False, default=False),
    UniqueConstraint("study_id", "client_key", name="uq_lb_runs_study_client_key"),
    Index("ix_lb_runs_study_number", "study_id", "number"),
    Index("ix_lb_runs_study_state", "study_id", "state"),
    Index("ix_lb_runs_study_batch", "study_id", "batch_size"),
    Index("ix_lb_runs_lease", "lease_expires_at"),
)

lb_batch_summary = Table(
    "lb_batch_summary",
    metadata,
    Column("study_id", Integer, ForeignKey("lb_studies.study_id", ondelete="CASCADE"), primary_key=True),
    Column("batch_size", BigInteger, primary_key=True, autoincrement=False),
    # optimizers.run_units of the runs' optimizer: one optimizer's divergences are no bound on another's LRs
    Column("units", String(32), primary_key=True),
    Column("n_runs", Integer, nullable=False),
    Column("n_completed", Integer, nullable=False),
    Column("n_diverged", Integer, nullable=False),
    Column("best_lr", Double, nullable=True),
    Column("best_metric", Double, nullable=True),
    Column("min_diverged_lr", Double, nullable=True),
    Column("max_stable_lr", Double, nullable=True),
)

lb_grad_norms = Table(
    "lb_grad_norms",
    metadata,
    Column("run_id", Integer, ForeignKey("lb_runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("step", BigInteger, primary_key=True, autoincrement=False),
    Column("grad_norm", Double, nullable=True),
    Column("grad_norm_nonfinite", String(8), nullable=True),
)

# Sums, so a report batch adds to its buckets in one upsert (no read-modify-write of the trajectory).
lb_noise_trajectory = Table(
    "lb_noise_trajectory",
    metadata,
    Column("run_id", Integer, ForeignKey("lb_runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("bucket", Integer, primary_key=True, autoincrement=False),
    Column("n", Integer, nullable=False),
    Column("first_step", BigInteger, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("sum_examples", Double, nullable=False),
    Column("sum_log_noise", Double, nullable=False),
    Column("n_tokens", Integer, nullable=False),
    Column("sum_tokens", Double, nullable=False),
    Column("n_components", Integer, nullable=False),
    Column("sum_grad_sq", Double, nullable=False),
    Column("sum_trace_sigma", Double, nullable=False),
)

lb_critical_batches = Table(
    "lb_critical_batches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("lb_runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("study_id", Integer, ForeignKey("lb_studies.study_id", ondelete="CASCADE"), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("examples_seen", Double, nullable=False),
    Column("tokens_seen", Double, nullable=True),
    Column("critical_batch", Double, nullable=False),
    Column("critical_batch_low", Double, nullable=False),
    Column("critical_batch_high", Double, nullable=True),
    Column("noise_scale", Double, nullable=True),
    Column("batch_size", BigInteger, nullable=False),
    Column("ks", String(200), nullable=False),  # the batch multiples, comma separated
    Column("window_examples", BigInteger, nullable=True),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("run_id", "step", name="uq_lb_critical_batches_run_step"),
    Index("ix_lb_critical_batches_study", "study_id", "id"),
)

lb_api_keys = Table(
    "lb_api_keys",
    metadata,
    Column("key_id", Integer, primary_key=True, autoincrement=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("namespace", String(128), nullable=False),
    Column("scope", String(8), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
    Index("ix_lb_api_keys_namespace", "namespace"),
)

COMPONENT = "largebatch"


def _migrate_to_1(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


def _migrate_to_2(conn: Connection) -> None:
    lb_noise_trajectory.create(conn, checkfirst=True)  # version 1's create_all made it on a new database


def _migrate_to_3(conn: Connection) -> None:
    lb_critical_batches.create(conn, checkfirst=True)


def _migrate_to_4(conn: Connection) -> None:
    """Summaries per (study, batch size, LR units): the old rows mix every optimizer's runs and cannot be
    split, so the table is made anew (and refilled, see :data:`REFILLS_SUMMARIES`)."""
    if "units" in {c["name"] for c in inspect(conn).get_columns(lb_batch_summary.name)}:
        return  # version 1's create_all made it so on a new database
    lb_batch_summary.drop(conn)
    lb_batch_summary.create(conn)


#: version -> migration that brings the schema from version-1 to version. Append, never edit.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_to_1, 2: _migrate_to_2, 3: _migrate_to_3,
                                                        4: _migrate_to_4}
HEAD = max(MIGRATIONS)
#: The versions whose migration empties ``lb_batch_summary``: :func:`migrate` refills it in the same
#: transaction, with the fold it is given (the fold reads Optuna's tables through modules that import this one).
REFILLS_SUMMARIES = frozenset({4})


def current_version(conn: Connection) -> int | None:
    """Our schema version, or None when our tables were never created."""
    if not inspect(conn).has_table(lb_schema_version.name):
        return None
    row = conn.execute(
        lb_schema_version.select().where(lb_schema_version.c.component == COMPONENT)
    ).first()
    return None if row is None else int(row.version)


def migrate(engine: Engine, refill_summaries: Callable[[Connection], None]) -> int:
    """Apply pending migrations, each in its own transaction. Caller holds the init lock.

    ``refill_summaries`` recomputes every study's summaries after a migration of :data:`REFILLS_SUMMARIES`.
    """
    with engine.connect() as conn:
        lb_schema_version.create(conn, checkfirst=True)
        conn.commit()
    while True:
        with engine.begin() as conn:
            row = conn.execute(
                lb_schema_version.select().where(lb_schema_version.c.component == COMPONENT)
            ).first()
            version = 0 if row is None else int(row.version)
            if version > HEAD:
                raise StoreError(
                    f"the database's largebatch schema is version {version}, newer than this code "
                    f"({HEAD}); upgrade largebatch"
                )
            if version == HEAD:
                return version
            MIGRATIONS[version + 1](conn)
            if version + 1 in REFILLS_SUMMARIES:
                refill_summaries(conn)
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            if row is None:
                conn.execute(lb_schema_version.insert().values(component=COMPONENT, version=1, updated_at=now))
            else:
                conn.execute(
                    lb_schema_version.update()
                    .where(lb_schema_version.c.component == COMPONENT)
                    .values(version=version + 1, updated_at=now)
                )


# A fixed 63-bit key for pg_advisory_lock: "largebatch schema".
_PG_LOCK_KEY = 0x6C62736368656D61


@contextlib.contextmanager
def init_lock(engine: Engine, sqlite_path: str | None) -> Iterator[None]:
    """Serialise schema creation across processes.

    PostgreSQL: a session-level advisory lock (released by the server if the process dies).
    SQLite file: an exclusive ``flock`` on a sidecar ``<db>.init-lock`` file (released by the
    kernel if the process dies). In-memory databases are private to the process: no lock needed.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
    elif sqlite_path is not None and fcntl is not None:
        fd = os.open(sqlite_path + ".init-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    else:
        yield
