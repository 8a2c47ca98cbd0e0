"""Engine set-up and the one place where database errors become domain errors.

Every store operation is one function run inside one transaction by :meth:`Database.run`, which

* begins SQLite write transactions with ``BEGIN IMMEDIATE`` (a deferred transaction that later
  upgrades to a writer fails at once with "database is locked" instead of waiting on the busy
  timeout when another connection committed in between);
* retries the whole transaction with jittered exponential backoff on transient errors (SQLite
  busy/locked, PostgreSQL serialization failures and deadlocks, dropped connections), so none of
  them reaches a caller before ``busy_deadline_s`` has passed;
* turns what is left into :class:`StoreUnavailable` (database down or busy for too long) or
  :class:`StoreError`; ``IntegrityError`` is re-raised as is for the caller to interpret.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import StaticPool

from largebatch.service.storage.base import InvalidArgument, StoreError, StoreUnavailable

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's own locking (busy_timeout + retries) only
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

MEMORY_URLS = ("memory", "sqlite://", "sqlite:///:memory:", ":memory:")
_PG_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "08000", "08003", "08006", "08001"}


def default_url() -> str:
    """``sqlite:///$XDG_DATA_HOME/largebatch/largebatch.db`` (``~/.local/share`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'largebatch' / 'largebatch.db'}"


def normalize_url(url: str | None) -> tuple[str, str, str | None]:
    """Return ``(sqlalchemy_url, kind, sqlite_path)`` with kind in memory|sqlite|postgresql."""
    if url is None:
        url = default_url()
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument(f"url must be a non-empty string or None, got {url!r}")
    url = url.strip()
    if url in MEMORY_URLS:
        return "sqlite://", "memory", None
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):  # psycopg 3 is the driver we ship and test
            url = "postgresql+psycopg://" + url[len(prefix):]
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise InvalidArgument(f"url is not a database URL: {url!r}") from e
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            return "sqlite://", "memory", None
        path = os.path.abspath(os.path.expanduser(path))
        return f"sqlite:///{path}", "sqlite", path
    if backend == "postgresql":
        return url, "postgresql", None
    raise InvalidArgument(
        f"url: unsupported backend {backend!r}; use sqlite:///path, postgresql+psycopg://..., or 'memory'"
    )


class Database:
    """An engine configured for a service, plus the transaction runner."""

    def __init__(
        self,
        url: str | None,
        *,
        engine_kwargs: dict[str, Any] | None = None,
        busy_timeout_s: float = 5.0,
        busy_deadline_s: float = 60.0,
        connect_attempts: int = 3,
    ) -> None:
        self.url, self.kind, self.sqlite_path = normalize_url(url)
        self.busy_deadline_s = busy_deadline_s
        self.connect_attempts = connect_attempts
        kwargs: dict[str, Any] = {}
        if self.kind == "memory":
            # One connection shared by every thread: the in-memory database lives in it.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        elif self.kind == "sqlite":
            Path(self.sqlite_path).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
            kwargs.update(connect_args={"check_same_thread": False, "timeout": busy_timeout_s})
        else:
            kwargs.update(
                pool_pre_ping=True,  # Optuna sets this for MySQL only (optuna#5600)
                pool_recycle=1800,
                pool_size=10,
                max_overflow=20,
                pool_timeout=30,
                connect_args={"connect_timeout": 5},
            )
        kwargs.update(engine_kwargs or {})
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            self._configure_sqlite(busy_timeout_s)
        self.write_engine: Engine = self.engine.execution_options(lb_write=True)
        # SQLite has one writer at a time anyway. Queue writers explicitly instead of in SQLite's
        # busy handler, which polls with sleeps of up to 100 ms (8 processes on 2 cores then spend
        # most of their time asleep): threads of this process on a lock, processes on an flock of
        # a sidecar file, which the kernel hands to the next waiter at once. SQLite's own locking
        # (busy_timeout + our retries) still protects against writers that do not take the flock
        # (optuna-dashboard, a stock Optuna script). The in-memory database serialises everything.
        self._lock: threading.RLock | None = threading.RLock() if self.kind != "postgresql" else None
        self._all_locked = self.kind == "memory"
        self._flock_path = self.sqlite_path + ".write-lock" if self.kind == "sqlite" else None
        self._flock_fd: int | None = None
        self._flock_pid = 0
        self._flock_held = False  # only touched under self._lock

    def _configure_sqlite(self, busy_timeout_s: float) -> None:
        file_backed = self.kind == "sqlite"

        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                if file_backed:
                    # WAL: readers never block the writer; NORMAL: fsync at checkpoints only,
                    # which in WAL mode still survives a killed process (not a power cut).
                    cur.execute("PRAGMA journal_mode = WAL")
                    cur.execute("PRAGMA synchronous = NORMAL")
            finally:
                cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn: Connection) -> None:
            if conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
                # Only possible on the single shared in-memory connection, when Optuna's schema
                # set-up nests a session inside an open connection: join the open transaction.
                return
            mode = "IMMEDIATE" if conn.get_execution_options().get("lb_write") else "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

    # ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _local(self, write: bool, deadline: float) -> Iterator[None]:
        """The write queue (this process's threads, then other processes), waited on until ``deadline``
        (monotonic) at most: the store's deadline covers the time spent queueing too."""
        if self._lock is None or not (write or self._all_locked):
            yield
            return
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise StoreUnavailable(f"the write queue did not move for {self.busy_deadline_s:g}s")
        try:
            if self._flock_path is None or self._flock_held or fcntl is None:  # re-entered, or no flock
                yield
                return
            fd = self._flock_fd
            if fd is None or self._flock_pid != os.getpid():  # a forked child needs its own
                fd = self._flock_fd = os.open(self._flock_path, os.O_RDWR | os.O_CREAT, 0o600)
                self._flock_pid = os.getpid()
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreUnavailable(
                            f"the write queue did not move for {self.busy_deadline_s:g}s") from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.02)
            self._flock_held = True
            try:
                yield
            finally:
                self._flock_held = False
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def run(self, fn: Callable[[Connection], T], *, write: bool) -> T:
        """Run ``fn(conn)`` in one transaction, retrying it whole on transient errors."""
        engine = self.write_engine if write else self.engine
        if write and self.kind == "sqlite" and not os.path.exists(self.sqlite_path):  # type: ignore[arg-type]
            # Pooled connections still write to the unlinked file: nothing acknowledged would survive.
            raise StoreUnavailable(f"the database file {self.sqlite_path} is gone")
        start = time.monotonic()
        attempt = 0
        disconnects = 0
        while True:
            attempt += 1
            try:
                with self._local(write, start + self.busy_deadline_s), engine.begin() as conn:
                    return fn(conn)
            except IntegrityError:
                raise
            except PoolTimeout as e:  # every pooled connection busy for pool_timeout: the database is too slow
                raise StoreUnavailable(f"no database connection free: {short_error(e)}") from e
            except (OperationalError, InterfaceError) as e:
                kind = self._classify(e)
                if kind == "timeout":  # statement_timeout: the database did not answer within the bound
                    raise StoreUnavailable(f"database did not answer in time: {short_error(e)}") from e
                if kind == "busy":
                    if time.monotonic() - start >= self.busy_deadline_s:
                        raise StoreUnavailable(
                            f"database stayed busy for {self.busy_deadline_s:g}s: {short_error(e)}"
                        ) from e
                else:
                    disconnects += 1
                    if disconnects >= self.connect_attempts:
                        raise StoreUnavailable(f"database unavailable: {short_error(e)}") from e
            except DataError as e:
                raise InvalidArgument(f"value rejected by the database: {short_error(e)}") from e
            except DBAPIError as e:
                if e.connection_invalidated:
                    disconnects += 1
                    if disconnects < self.connect_attempts:
                        time.sleep(0.05)
                        continue
                    raise StoreUnavailable(f"database unavailable: {short_error(e)}") from e
                raise StoreError(f"database error: {short_error(e)}") from e
            except SQLAlchemyError as e:
                raise StoreError(f"database error: {short_error(e)}") from e
            delay = min(0.5, 0.005 * (2 ** min(attempt, 7))) * (0.5 + random.random())
            time.sleep(delay)

    def _classify(self, e: DBAPIError) -> str:
        msg = str(getattr(e, "orig", e)).lower()
        if self.engine.dialect.name == "sqlite":
            if "locked" in msg or "busy" in msg:
                return "busy"
            return "down"
        sqlstate = getattr(getattr(e, "orig", None), "sqlstate", None)
        if sqlstate == "57014":
            return "timeout"
        if sqlstate in ("40001", "40P01", "55P03"):
            return "busy"
        return "down"

    def set_statement_timeout(self, seconds: float) -> None:
        """Every statement of the connections opened from now on is cancelled after ``seconds``
        (PostgreSQL ``statement_timeout``); the pool is emptied so no older connection escapes it.
        Called after schema set-up, whose init lock may rightly wait longer."""
        if self.engine.dialect.name != "postgresql":
            return
        ms = max(1, int(seconds * 1000))

        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET statement_timeout = {ms}")
            dbapi_conn.commit()

        self.engine.dispose()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._flock_fd is not None and self._flock_pid == os.getpid():
            os.close(self._flock_fd)
        self._flock_fd = None


def short_error(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
