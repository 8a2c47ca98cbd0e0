"""Runs: open one (an Optuna trial plus its ``lb_runs`` row, in one transaction), read, list, renew
its lease, take its reports. How runs end is in :mod:`.outcomes`.

Run records are mapped from rows of the runs join (:data:`._queries.RUN_COLUMNS`); the recipe and
environment, which never change after creation, are read from Optuna's trial user attrs once and
then kept in a small per-process cache.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from pydantic import ValidationError
from sqlalchemy import and_, case, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from largebatch.scaling_rules.models import Recipe
from largebatch.service.lru import Lru
from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import (
    _aware,
    _client_key,
    _float,
    _from_nonfinite,
    _int,
    _json,
    _now,
    _page_args,
)
from largebatch.service.storage._queries import (
    _DIST_JSON,
    DISTRIBUTIONS,
    T_PARAMS,
    T_TRIAL_USER,
    T_TRIALS,
    find_study,
    locked_run,
    run_id_by_client_key,
    runs_join,
    write_trial_attrs,
)
from largebatch.service.storage.base import (
    DEFAULT_LEASE_SECONDS,
    OUTCOMES,
    Conflict,
    InvalidArgument,
    NotFound,
    Outcome,
    Page,
    RunRecord,
    StoreError,
    validate_name,
)
from largebatch.service.storage.reports import NOISE_KEY

__all__ = ["CACHE_BYTES", "LIST_ENVIRONMENT_BYTES", "TRUNCATED", "RunOps", "run_record"]

# Characters of recipe and environment JSON the run cache keeps, per process.
CACHE_BYTES = 32 << 20
# In a list of runs, a longer environment is replaced by {TRUNCATED: "..."} (GET /v1/runs/{id} has it).
LIST_ENVIRONMENT_BYTES = 2048
TRUNCATED = "_truncated"


@dataclass
class _Existing(Exception):
    """Raised inside a transaction to roll it back when the client key is already taken."""

    run_id: int


def run_record(m: Any, recipe_json: str, environment_json: str, noise_scale: float | None = None) -> RunRecord:
    return RunRecord(
        id=m["run_id"],
        study=m["study_name"],
        namespace=m["namespace"],
        number=m["number"],
        state=m["state"],
        batch_size=m["batch_size"],
        peak_lr=m["peak_lr"],
        warmup_ratio=m["warmup_ratio"],
        const_ratio=m["const_ratio"],
        optimizer=m["optimizer"],
        steps=m["steps"],
        recipe=json.loads(recipe_json),
        recipe_hash=m["recipe_hash"],
        environment=json.loads(environment_json),
        client_key=m["client_key"],
        metric=m["metric"],
        reason=m["reason"],
        diverged_step=m["diverged_step"],
        created_at=_aware(m["created_at"]),
        updated_at=_aware(m["updated_at"]),
        lease_expires_at=_aware(m["lease_expires_at"]),
        last_step=m["last_step"],
        last_loss=_from_nonfinite(m["last_loss"], m["last_loss_nonfinite"]),
        noise_scale=noise_scale,
    )


_REQUEST_KEY = "request_hash"  # digest of the body that opened the run (the Idempotency-Key rule)


def _recipe(recipe: object) -> Recipe:
    if isinstance(recipe, dict):
        try:
            recipe = Recipe.model_validate(recipe)
        except ValidationError as e:
            raise InvalidArgument(f"recipe is not a valid Recipe: {e}") from e
    if not isinstance(recipe, Recipe):
        raise InvalidArgument(f"recipe must be a Recipe, got {type(recipe).__name__}")
    if not recipe.stages:
        raise InvalidArgument("recipe.stages must not be empty")
    return recipe


def _run_params(recipe: Recipe, stage: int) -> dict[str, Any]:
    """The searchable parameters of ``recipe.stages[stage]``, checked against :data:`DISTRIBUTIONS`."""
    _int("stage", stage, minimum=0, maximum=len(recipe.stages) - 1)
    st = recipe.stages[stage]
    params: dict[str, Any] = {
        "batch_size": st.batch_size,
        "peak_lr": st.peak_lr,
        "warmup_ratio": st.warmup_ratio,
        "const_ratio": st.const_ratio,
        "optimizer": recipe.optimizer.name,
        "steps": st.steps,
    }
    for key, dist in DISTRIBUTIONS.items():
        v = params[key]
        if isinstance(dist, CategoricalDistribution):
            ok = v in dist.choices
        else:
            ok = isinstance(v, (int, float)) and math.isfinite(v) and dist.low <= v <= dist.high
        if not ok:
            raise InvalidArgument(f"recipe: {key}={v!r} is outside the recorded range {dist}")
    return params


def _marker(run_id: int, size: int) -> str:
    return json.dumps({TRUNCATED: f"an environment of {size} characters: GET /v1/runs/{run_id} has it"})


class RunOps:
    """The run operations of :class:`OptunaStudyStore` (a mixin: it uses the store's ``_read``,
    ``_write``, ``_insert``, ``_pg``, ``_bump_summary`` and ``_revive``)."""

    def _init_cache(self) -> None:
        # (run_id, created_at) -> (recipe JSON, environment JSON); JSON text, so that no caller can
        # mutate what the next caller gets. Bounded in bytes: environments may be large.
        self._attr_cache: Lru[tuple[int, datetime], tuple[str, str]] = Lru(
            max_cost=CACHE_BYTES, cost=lambda v: len(v[0]) + len(v[1]))

    def _run_records(self, conn: Connection, rows: Sequence[Any], *, listing: bool = False) -> list[RunRecord]:
        """Records from rows holding every ``lb_runs`` column plus ``namespace``/``study_name``.

        The recipe and environment never change after creation: they are read from Optuna's
        trial user attrs once and then kept in a per-process cache bounded in bytes, keyed by run id
        *and* creation time (SQLite may reuse the ids of a deleted study's trials). In a ``listing``
        an environment larger than ``LIST_ENVIRONMENT_BYTES`` is not read: a marker stands for it.
        """
        maps = [r._mapping if hasattr(r, "_mapping") else r for r in rows]
        attrs: dict[int, tuple[str, str]] = {}
        for m in maps:
            hit = self._cache_get(m["run_id"], m["created_at"])
            if hit is not None:
                attrs[m["run_id"]] = hit
        missing = [m["run_id"] for m in maps if m["run_id"] not in attrs]
        if missing:
            ua = T_TRIAL_USER.c
            big = and_(ua.key == "environment", func.length(ua.value_json) > LIST_ENVIRONMENT_BYTES)
            value = case((big, None), else_=ua.value_json) if listing else ua.value_json
            fetched: dict[int, dict[str, Any]] = {i: {} for i in missing}
            cut: set[int] = set()
            for tid, key, text, size in conn.execute(
                select(ua.trial_id, ua.key, value, func.length(ua.value_json))
                .where(ua.trial_id.in_(missing), ua.key.in_(("recipe", "environment")))
            ):
                if text is None:
                    cut.add(tid)
                    text = _marker(tid, size)
                fetched[tid][key] = text
            for m in maps:
                if m["run_id"] in fetched:
                    f = fetched[m["run_id"]]
                    got = attrs[m["run_id"]] = (f.get("recipe", "{}"), f.get("environment", "{}"))
                    if m["run_id"] not in cut:
                        self._cache_put(m["run_id"], m["created_at"], *got)
        noise = {tid: json.loads(v) for tid, v in conn.execute(
            select(T_TRIAL_USER.c.trial_id, T_TRIAL_USER.c.value_json).where(
                T_TRIAL_USER.c.trial_id.in_([m["run_id"] for m in maps]), T_TRIAL_USER.c.key == NOISE_KEY))}
        out = []
        for m in maps:
            recipe, environment = attrs.get(m["run_id"], ("{}", "{}"))
            if listing and len(environment) > LIST_ENVIRONMENT_BYTES:  # one from the cache
                environment = _marker(m["run_id"], len(environment))
            out.append(run_record(m, recipe, environment, noise.get(m["run_id"])))
        return out

    def _cache_get(self, run_id: int, created_at: datetime) -> tuple[str, str] | None:
        return self._attr_cache.get((run_id, created_at))

    def _cache_put(self, run_id: int, created_at: datetime, recipe: str, environment: str) -> None:
        size = len(recipe) + len(environment)
        if size > CACHE_BYTES // 16:  # one huge environment does not flush everything else
            return
        self._attr_cache.put((run_id, created_at), (recipe, environment))

    def _load_run(self, conn: Connection, run_id: int) -> RunRecord:
        row = conn.execute(runs_join().where(sch.lb_runs.c.run_id == run_id)).first()
        if row is None:
            raise NotFound(f"run {run_id} not found")
        return self._run_records(conn, [row])[0]

    def create_run(
        self,
        namespace: str,
        study: str,
        recipe: Recipe,
        *,
        client_key: str | None = None,
        environment: dict[str, Any] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        stage: int = 0,
        request_hash: str | None = None,
    ) -> tuple[RunRecord, bool]:
        validate_name("namespace", namespace)
        validate_name("study", study)
        recipe = _recipe(recipe)
        client_key = _client_key(client_key)
        if environment is not None and not isinstance(environment, dict):
            raise InvalidArgument(f"environment must be a dict, got {type(environment).__name__}")
        environment = environment or {}
        environment_blob = _json("environment", environment)
        lease_seconds = _float("lease_seconds", lease_seconds, positive=True)
        params = _run_params(recipe, stage)
        recipe_json = recipe.model_dump(mode="json")
        recipe_blob = _json("recipe", recipe_json)
        recipe_hash = recipe.fingerprint()
        if request_hash is not None and (not isinstance(request_hash, str) or not 0 < len(request_hash) <= 128):
            raise InvalidArgument("request_hash must be a string of 1..128 characters")
        trial_attrs = {"recipe": recipe_json, "recipe_hash": recipe_hash, "environment": environment,
                       "client_key": client_key, "stage": stage}
        if request_hash is not None:
            trial_attrs[_REQUEST_KEY] = request_hash

        def tx(conn: Connection) -> dict[str, Any]:
            if client_key is not None:  # fast path for a retry; the unique constraint decides races
                existing = run_id_by_client_key(conn, namespace, study, client_key)
                if existing is not None:
                    raise _Existing(existing)
            return self._insert_run(conn, namespace, study, params, lease_seconds, recipe_hash, client_key,
                                    trial_attrs)

        try:
            run_row = self._write(tx)
        except (_Existing, IntegrityError) as e:
            if client_key is None:
                raise StoreError(f"could not create run: {e}") from e
            return self._existing_run(e, namespace, study, client_key, recipe_hash, environment,
                                      request_hash), False
        self._cache_put(run_row["run_id"], run_row["created_at"], recipe_blob, environment_blob)
        run_row.update(
            namespace=namespace, study_name=study, metric=None, reason=None, diverged_step=None,
            last_step=None, last_loss=None, last_loss_nonfinite=None,
        )
        return run_record(run_row, recipe_blob, environment_blob), True

    def _insert_run(self, conn: Connection, namespace: str, study: str, params: dict[str, Any],
                    lease_seconds: float, recipe_hash: str, client_key: str | None,
                    trial_attrs: dict[str, Any]) -> dict[str, Any]:
        """The trial, its params and attrs, the ``lb_runs`` row and the summary's run count. The
        trial number comes from the ``lb_studies.n_runs`` counter, updated first: that row lock
        serialises run creation within one study."""
        s = sch.lb_studies
        row = conn.execute(
            update(s)
            .where(s.c.namespace == namespace, s.c.name == study)
            .values(n_runs=s.c.n_runs + 1)
            .returning(s.c.study_id, s.c.n_runs, s.c.direction)
        ).first()
        if row is None:
            raise NotFound(f"study {namespace}/{study} not found")
        study_id, number, direction = row.study_id, row.n_runs - 1, row.direction
        now = _now()
        trial_id = conn.execute(
            T_TRIALS.insert().values(study_id=study_id, number=number, state=TrialState.RUNNING, datetime_start=now)
        ).inserted_primary_key[0]
        run_row = {
            "run_id": trial_id,
            "study_id": study_id,
            "number": number,
            "client_key": client_key,
            "state": "running",
            "swept": False,
            "recipe_hash": recipe_hash,
            "created_at": now,
            "updated_at": now,
            "lease_seconds": lease_seconds,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            **params,
        }
        conn.execute(sch.lb_runs.insert().values(**run_row))
        conn.execute(
            T_PARAMS.insert(),
            [{"trial_id": trial_id, "param_name": k, "param_value": DISTRIBUTIONS[k].to_internal_repr(v),
              "distribution_json": _DIST_JSON[k]} for k, v in params.items()],
        )
        write_trial_attrs(conn, [trial_id], trial_attrs)
        self._bump_summary(conn, study_id, params["batch_size"], direction, optimizer=params["optimizer"],
                           outcome="running", lr=params["peak_lr"], new_run=True)
        return run_row

    def _existing_run(self, e: Exception, namespace: str, study: str, client_key: str,
                      recipe_hash: str, environment: dict[str, Any], request_hash: str | None) -> RunRecord:
        """The run the in-transaction check, or the constraint in a race, found the key taken by."""
        found = e.run_id if isinstance(e, _Existing) else self._read(
            lambda conn: run_id_by_client_key(conn, namespace, study, client_key))
        if found is None:
            raise StoreError(f"could not create run: {e}") from e
        run = self.get_run(found)
        stored = self._read(lambda conn: conn.execute(
            select(T_TRIAL_USER.c.value_json).where(T_TRIAL_USER.c.trial_id == found,
                                                    T_TRIAL_USER.c.key == _REQUEST_KEY)).scalar())
        if request_hash is not None and stored is not None:
            # One rule: a key names one request body. Same body: the first run (even if the study
            # learned meanwhile and would now answer another recipe); any other body: a conflict.
            if json.loads(stored) != request_hash:
                raise Conflict(f"client_key {client_key!r} was already used in study {namespace}/{study} for "
                               f"run {found} with a different request body") from None
            return run
        if run.recipe_hash != recipe_hash or run.environment != environment:
            what = "recipe" if run.recipe_hash != recipe_hash else "environment"
            raise Conflict(
                f"client_key {client_key!r} was already used in study {namespace}/{study} for run "
                f"{found} with a different {what}"
            ) from None
        return run

    def get_run(self, run_id: int) -> RunRecord:
        _int("run_id", run_id, minimum=0)
        return self._read(lambda conn: self._load_run(conn, run_id))

    def list_runs(
        self,
        namespace: str,
        study: str,
        *,
        state: Outcome | None = None,
        batch_size: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page:
        validate_name("namespace", namespace)
        validate_name("study", study)
        if state is not None and state not in OUTCOMES:
            raise InvalidArgument(f"state must be one of {list(OUTCOMES)}, got {state!r}")
        if batch_size is not None:
            _int("batch_size", batch_size, minimum=1)
        limit, offset = _page_args(limit, offset)
        r = sch.lb_runs

        def tx(conn: Connection) -> Page:
            sid = find_study(conn, namespace, study).study_id
            where = [r.c.study_id == sid]
            if state is not None:
                where.append(r.c.state == state)
            if batch_size is not None:
                where.append(r.c.batch_size == batch_size)
            total = conn.execute(select(func.count()).select_from(r).where(*where)).scalar_one()
            rows = conn.execute(
                runs_join()
                .where(*where)
                .order_by(r.c.number)
                .limit(limit)
                .offset(offset)
            ).all()
            return Page(items=self._run_records(conn, rows, listing=True), total=total, limit=limit, offset=offset)

        return self._read(tx)

    def _lock_running(self, conn: Connection, run_id: int, action: str) -> Any:
        """The run's row (locked on PostgreSQL), revived if the sweeper preempted it (then its ``revived``
        is True: the caller says so without reading the run again); NotFound, or Conflict if it finished."""
        row = locked_run(conn, run_id, lock=self._pg)
        if row["state"] == "preempted" and row["swept"]:
            return {**self._revive(conn, row), "revived": True}
        if row["state"] != "running":
            raise Conflict(f"run {run_id} is {row['state']}, not running: cannot {action}")
        return row

    def heartbeat(self, run_id: int, *, lease_seconds: float | None = None) -> RunRecord:
        """Renew the lease to now + ``lease_seconds`` (default: the run's current lease length)."""
        _int("run_id", run_id, minimum=0)
        if lease_seconds is not None:
            lease_seconds = _float("lease_seconds", lease_seconds, positive=True)
        r = sch.lb_runs

        def tx(conn: Connection) -> RunRecord:
            row = self._lock_running(conn, run_id, "heartbeat")
            secs = lease_seconds if lease_seconds is not None else row["lease_seconds"]
            now = _now()
            changes = {"updated_at": now, "lease_seconds": secs, "lease_expires_at": now + timedelta(seconds=secs)}
            conn.execute(update(r).where(r.c.run_id == run_id).values(**changes))
            row.update(changes)
            return self._run_records(conn, [row])[0]

        return self._write(tx)
