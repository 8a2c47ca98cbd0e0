"""One conformance suite, run against every backend (in-memory, SQLite file, PostgreSQL).

Every operation, every outcome transition and every error of :class:`StudyStore`.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from largebatch.scaling_rules.evidence import BatchSummary
from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.optimizers import units_of
from largebatch.service.storage import (
    AlreadyExists,
    ApiKeyRecord,
    Conflict,
    InvalidArgument,
    NotFound,
    Page,
    Report,
    RunRecord,
    StoreError,
    StudyRecord,
    StudyStore,
)

from .helpers import make_recipe

UTC = timezone.utc
LAMB, ADAMW = units_of("lamb"), units_of("adamw")  # the LR units of make_recipe's default optimizer, and AdamW's


def _study(store: StudyStore, name: str = "bert", ns: str = "team", **kw) -> StudyRecord:
    kw.setdefault("model_family", "transformer")
    kw.setdefault("model_params", 110_000_000)
    return store.create_study(ns, name, **kw)


def _run(store: StudyStore, name: str = "bert", ns: str = "team", **kw) -> RunRecord:
    recipe = kw.pop("recipe", None) or make_recipe(**{k: kw.pop(k) for k in list(kw) if k in
                                                      ("batch_size", "lr", "optimizer", "steps", "note")})
    run, created = store.create_run(ns, name, recipe, **kw)
    assert created
    return run


# ============================================================================ errors are builtins


def test_error_hierarchy():
    from largebatch.service.storage import StoreUnavailable

    assert issubclass(NotFound, KeyError) and issubclass(NotFound, StoreError)
    assert issubclass(AlreadyExists, ValueError)
    assert issubclass(Conflict, ValueError)
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(StoreUnavailable, ConnectionError)
    assert str(NotFound("run 3 not found")) == "run 3 not found"


# ============================================================================ studies


def test_create_and_get_study(store):
    before = datetime.now(UTC)
    s = _study(store, metric="eval_loss", direction="minimize", user_attrs={"dataset": "wiki"})
    assert (s.namespace, s.name, s.model_family, s.model_params) == ("team", "bert", "transformer", 110_000_000)
    assert s.metric == "eval_loss" and s.direction == "minimize" and s.n_runs == 0
    assert s.created_at.tzinfo is not None and before - timedelta(seconds=5) <= s.created_at <= datetime.now(UTC)
    got = store.get_study("team", "bert")
    assert got == s
    assert got.user_attrs == {"dataset": "wiki"}
    assert json.loads(got.model_dump_json())["name"] == "bert"


def test_duplicate_study_is_already_exists(store):
    _study(store)
    with pytest.raises(AlreadyExists, match="team/bert"):
        _study(store)
    _study(store, ns="other")  # the same name in another namespace is another study
    assert store.list_studies(limit=10).total == 2


@pytest.mark.parametrize("bad", ["", "-lead", "has space", "x" * 129, "a/b", None, 5, "ünï"])
def test_invalid_study_names(store, bad):
    with pytest.raises(InvalidArgument, match="name"):
        store.create_study("team", bad, model_family="transformer", model_params=1)
    with pytest.raises(InvalidArgument, match="namespace"):
        store.create_study(bad, "ok", model_family="transformer", model_params=1)
    with pytest.raises(InvalidArgument, match="namespace"):
        store.get_study(bad, "ok")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"model_params": 0}, "model_params"),
        ({"model_params": -5}, "model_params"),
        ({"model_params": 1.5}, "model_params"),
        ({"model_params": True}, "model_params"),
        ({"model_family": ""}, "model_family"),
        ({"model_family": 3}, "model_family"),
        ({"metric": ""}, "metric"),
        ({"direction": "up"}, "direction"),
        ({"user_attrs": {"x": float("nan")}}, "user_attrs"),
        ({"user_attrs": {"x": object()}}, "user_attrs"),
        ({"user_attrs": {"model_family": "cnn"}}, "user_attrs"),
        ({"user_attrs": ["not", "a", "dict"]}, "user_attrs"),
    ],
)
def test_invalid_study_arguments(store, kwargs, argument):
    base = {"model_family": "transformer", "model_params": 10}
    with pytest.raises(InvalidArgument, match=argument):
        store.create_study("team", "s", **{**base, **kwargs})
    assert store.list_studies().total == 0  # nothing half-created


def test_get_missing_study(store):
    with pytest.raises(NotFound, match="team/nope"):
        store.get_study("team", "nope")
    with pytest.raises(KeyError):
        store.get_study("team", "nope")


def test_list_studies_paging_and_namespace(store):
    for i in range(5):
        _study(store, name=f"s{i}")
    _study(store, name="x", ns="other")
    page = store.list_studies("team", limit=2, offset=0)
    assert isinstance(page, Page) and page.total == 5 and [s.name for s in page.items] == ["s0", "s1"]
    assert [s.name for s in store.list_studies("team", limit=2, offset=4).items] == ["s4"]
    assert store.list_studies("team", limit=2, offset=10).items == []
    assert store.list_studies(limit=100).total == 6
    assert store.list_studies("empty").total == 0


@pytest.mark.parametrize(("limit", "offset", "argument"), [(0, 0, "limit"), (1001, 0, "limit"), (10, -1, "offset"),
                                                           ("5", 0, "limit"), (5, 1.0, "offset")])
def test_list_studies_bad_paging(store, limit, offset, argument):
    with pytest.raises(InvalidArgument, match=argument):
        store.list_studies(limit=limit, offset=offset)


def test_n_runs_counts_runs(store):
    _study(store)
    for _ in range(3):
        _run(store)
    assert store.get_study("team", "bert").n_runs == 3
    assert store.list_studies().items[0].n_runs == 3


def test_delete_study(store):
    _study(store)
    _study(store, name="keep")
    r = _run(store)
    store.report(r.id, 1, 2.0, grad_norm=0.5)
    kept = _run(store, name="keep")
    store.delete_study("team", "bert")
    with pytest.raises(NotFound):
        store.get_study("team", "bert")
    with pytest.raises(NotFound):
        store.get_run(r.id)
    with pytest.raises(NotFound):
        store.history("team", "bert")
    assert store.get_run(kept.id).study == "keep"
    with pytest.raises(NotFound):
        store.delete_study("team", "bert")
    # The name can be used again, and starts empty.
    again = _study(store)
    assert again.n_runs == 0 and store.list_runs("team", "bert").total == 0
    # Nothing of the deleted study is left in Optuna's tables or ours.
    with store.engine.connect() as conn:
        names = [n for (n,) in conn.execute(text("SELECT study_name FROM studies ORDER BY study_name"))]
        assert names == ["team/bert", "team/keep"]
        orphans = conn.execute(text(
            "SELECT count(*) FROM trials t WHERE NOT EXISTS (SELECT 1 FROM studies s WHERE s.study_id = t.study_id)"
        )).scalar()
        assert orphans == 0
        for table in ("trial_params", "trial_user_attributes", "trial_intermediate_values"):
            left = conn.execute(text(
                f"SELECT count(*) FROM {table} x WHERE NOT EXISTS (SELECT 1 FROM trials t WHERE t.trial_id = x.trial_id)"
            )).scalar()
            assert left == 0, table
        assert conn.execute(text("SELECT count(*) FROM lb_grad_norms")).scalar() == 0


# ============================================================================ runs


def test_create_run_records_the_recipe(store):
    _study(store)
    recipe = make_recipe(batch_size=8192, lr=2e-3, optimizer="lans", steps=500, warmup=0.2, const=0.1)
    before = datetime.now(UTC)
    run, created = store.create_run("team", "bert", recipe, environment={"gpus": 8, "torch": "2.13"},
                                    lease_seconds=120)
    assert created
    assert run.state == "running"
    assert (run.batch_size, run.peak_lr, run.optimizer, run.steps) == (8192, 2e-3, "lans", 500)
    assert math.isclose(run.warmup_ratio, 0.2) and math.isclose(run.const_ratio, 0.1)
    assert run.study == "bert" and run.namespace == "team" and run.number == 0
    assert run.recipe_hash == recipe.fingerprint()
    assert Recipe.model_validate(run.recipe).fingerprint() == recipe.fingerprint()
    assert run.environment == {"gpus": 8, "torch": "2.13"}
    assert run.client_key is None and run.metric is None and run.last_step is None
    assert run.created_at.tzinfo is not None and run.created_at >= before - timedelta(seconds=5)
    lease = (run.lease_expires_at - run.created_at).total_seconds()
    assert 119 <= lease <= 121
    assert store.get_run(run.id) == run
    json.loads(run.model_dump_json())


def test_run_numbers_and_ids(store):
    _study(store)
    _study(store, name="other")
    a, b = _run(store), _run(store)
    c = _run(store, name="other")
    assert (a.number, b.number, c.number) == (0, 1, 0)
    assert len({a.id, b.id, c.id}) == 3  # ids are global


def test_create_run_is_idempotent_per_client_key(store):
    _study(store)
    _study(store, name="other")
    recipe = make_recipe()
    first, created = store.create_run("team", "bert", recipe, client_key="job-42/attempt-1")
    again, created_again = store.create_run("team", "bert", recipe, client_key="job-42/attempt-1")
    assert created and not created_again
    assert again.id == first.id and again.client_key == "job-42/attempt-1"
    assert store.list_runs("team", "bert").total == 1
    assert store.get_study("team", "bert").n_runs == 1
    assert store.history("team", "bert")[0].n_runs == 1
    # Same key in another study is another run; another key is another run.
    other, created_other = store.create_run("team", "other", recipe, client_key="job-42/attempt-1")
    assert created_other and other.id != first.id
    assert store.create_run("team", "bert", recipe, client_key="job-43")[1]
    # Idempotent even after the run finished.
    store.complete_run(first.id, "completed", metric=1.0)
    assert store.create_run("team", "bert", recipe, client_key="job-42/attempt-1")[0].state == "completed"


def test_client_key_reused_with_another_recipe_is_conflict(store):
    _study(store)
    store.create_run("team", "bert", make_recipe(lr=1e-3), client_key="k")
    with pytest.raises(Conflict, match="client_key"):
        store.create_run("team", "bert", make_recipe(lr=2e-3), client_key="k")
    # A recipe differing only in its explanations has the same fingerprint: same run.
    assert not store.create_run("team", "bert", make_recipe(lr=1e-3, note="why"), client_key="k")[1]


def test_client_key_with_a_request_hash_names_one_body(store):
    _study(store)
    first, _ = store.create_run("team", "bert", make_recipe(lr=1e-3), client_key="k", request_hash="body-a")
    # The same body again is a replay even if the recipe moved on (the study learned in between).
    again, created = store.create_run("team", "bert", make_recipe(lr=2e-3), client_key="k", request_hash="body-a")
    assert not created and again.id == first.id
    with pytest.raises(Conflict, match="different request body"):
        store.create_run("team", "bert", make_recipe(lr=1e-3), client_key="k", request_hash="body-b")
    with pytest.raises(InvalidArgument, match="request_hash"):
        store.create_run("team", "bert", make_recipe(), client_key="k2", request_hash="")


def test_create_run_errors(store):
    _study(store)
    with pytest.raises(NotFound, match="team/nope"):
        store.create_run("team", "nope", make_recipe())
    bad_cases = [
        ({"recipe": {"stages": []}}, "recipe"),
        ({"recipe": 42}, "recipe"),
        ({"client_key": ""}, "client_key"),
        ({"client_key": "x" * 201}, "client_key"),
        ({"client_key": "tab\there"}, "client_key"),
        ({"client_key": 7}, "client_key"),
        ({"environment": ["x"]}, "environment"),
        ({"environment": {"x": float("inf")}}, "environment"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"lease_seconds": float("nan")}, "lease_seconds"),
        ({"stage": 1}, "stage"),
        ({"recipe": make_recipe(lr=0.0)}, "peak_lr"),
        ({"recipe": make_recipe(lr=float("inf"))}, "peak_lr"),
    ]
    for kwargs, argument in bad_cases:
        recipe = kwargs.pop("recipe", make_recipe())
        with pytest.raises(InvalidArgument, match=argument):
            store.create_run("team", "bert", recipe, **kwargs)
    assert store.list_runs("team", "bert").total == 0
    assert store.get_study("team", "bert").n_runs == 0


def test_create_run_accepts_recipe_dict(store):
    _study(store)
    recipe = make_recipe()
    run, _ = store.create_run("team", "bert", recipe.model_dump(mode="json"))
    assert run.recipe_hash == recipe.fingerprint()


@pytest.mark.parametrize("bad", [-1, "1", 1.0, None, True])
def test_run_id_validation(store, bad):
    for call in (store.get_run, store.reports, store.heartbeat):
        with pytest.raises(InvalidArgument, match="run_id"):
            call(bad)
    with pytest.raises(InvalidArgument, match="run_id"):
        store.complete_run(bad, "failed")
    with pytest.raises(InvalidArgument, match="run_id"):
        store.report(bad, 1, 1.0)


def test_missing_run_is_not_found(store):
    for call in (store.get_run, store.reports, store.heartbeat):
        with pytest.raises(NotFound, match="run 999"):
            call(999)
    with pytest.raises(NotFound):
        store.report(999, 1, 1.0)
    with pytest.raises(NotFound):
        store.complete_run(999, "completed", metric=1.0)


def test_list_runs_filters_and_paging(store):
    _study(store)
    ids = [_run(store, batch_size=bs).id for bs in (1024, 2048, 1024, 4096, 1024)]
    store.complete_run(ids[0], "completed", metric=1.0)
    store.complete_run(ids[1], "diverged", step=10)
    page = store.list_runs("team", "bert", limit=2)
    assert page.total == 5 and [r.id for r in page.items] == ids[:2]
    assert [r.id for r in store.list_runs("team", "bert", limit=2, offset=4).items] == ids[4:]
    assert [r.id for r in store.list_runs("team", "bert", batch_size=1024).items] == [ids[0], ids[2], ids[4]]
    assert [r.id for r in store.list_runs("team", "bert", state="running").items] == [ids[2], ids[3], ids[4]]
    assert store.list_runs("team", "bert", state="running", batch_size=1024).total == 2
    assert store.list_runs("team", "bert", state="completed").items[0].metric == 1.0
    assert store.list_runs("team", "bert", state="pruned").total == 0
    with pytest.raises(InvalidArgument, match="state"):
        store.list_runs("team", "bert", state="done")
    with pytest.raises(InvalidArgument, match="batch_size"):
        store.list_runs("team", "bert", batch_size=0)
    with pytest.raises(InvalidArgument, match="limit"):
        store.list_runs("team", "bert", limit=0)
    with pytest.raises(NotFound):
        store.list_runs("team", "nope")


# ============================================================================ leases, reports


def test_heartbeat_renews_lease(store):
    _study(store)
    run = _run(store, lease_seconds=60)
    beat = store.heartbeat(run.id, lease_seconds=3600)
    assert beat.lease_expires_at > run.lease_expires_at + timedelta(seconds=3000)
    again = store.heartbeat(run.id)  # default: keep the run's lease length
    assert 3590 <= (again.lease_expires_at - again.updated_at).total_seconds() <= 3610
    with pytest.raises(InvalidArgument, match="lease_seconds"):
        store.heartbeat(run.id, lease_seconds=-1)
    store.complete_run(run.id, "failed", reason="oom")
    with pytest.raises(Conflict, match="failed"):
        store.heartbeat(run.id)


def test_reports_are_idempotent_per_step(store):
    _study(store)
    run = _run(store)
    store.report(run.id, 10, 5.0)
    store.report(run.id, 20, 4.0, grad_norm=1.5)
    r = store.report(run.id, 20, 4.0, grad_norm=1.5)  # a retry
    assert (r.last_step, r.last_loss) == (20, 4.0)
    r = store.report(run.id, 10, 4.9)  # a late retry of an older step overwrites that step only
    assert (r.last_step, r.last_loss) == (20, 4.0)
    assert store.reports(run.id) == [Report(step=10, loss=4.9), Report(step=20, loss=4.0, grad_norm=1.5)]
    r = store.report(run.id, 30, float("nan"), grad_norm=float("inf"))
    assert r.last_step == 30 and math.isnan(r.last_loss)
    last = store.reports(run.id)[-1]
    assert math.isnan(last.loss) and last.grad_norm == float("inf")
    assert store.report(run.id, 40, float("-inf")).last_loss == float("-inf")
    assert store.reports(_run(store).id) == []


def test_report_renews_lease(store):
    _study(store)
    run = _run(store, lease_seconds=100)
    later = store.report(run.id, 1, 1.0)
    assert later.lease_expires_at >= run.lease_expires_at


@pytest.mark.parametrize(
    ("args", "argument"),
    [((-1, 1.0), "step"), ((1.5, 1.0), "step"), ((1, "x"), "loss"), ((1, None), "loss"), ((1, 1.0, "g"), "grad_norm")],
)
def test_report_validation(store, args, argument):
    _study(store)
    run = _run(store)
    with pytest.raises(InvalidArgument, match=argument):
        store.report(run.id, *args)


def test_noise_scale_is_kept_per_run_and_its_median_per_study(store):
    """Issue 11: a run keeps the latest B_noise its job reported; the study gives the median over its runs."""
    _study(store)
    _study(store, "other")
    a, b, c = _run(store), _run(store), _run(store)
    assert store.noise_scale("team", "bert") is None and a.noise_scale is None
    assert store.report(a.id, 10, 3.0, noise_scale=100.0).noise_scale == 100.0
    assert store.report(a.id, 5, 3.1, noise_scale=1.0).noise_scale == 100.0  # an older step: not the latest
    assert store.report(a.id, 20, 2.9).noise_scale == 100.0  # a report without one keeps it
    assert store.report(a.id, 30, 2.8, noise_scale=400.0).noise_scale == 400.0
    store.report(b.id, 1, 3.0, noise_scale=1000.0)
    store.report(_run(store, "other").id, 1, 3.0, noise_scale=7.0)  # another study's run
    assert store.get_run(a.id).noise_scale == 400.0 and store.get_run(c.id).noise_scale is None
    assert store.noise_scale("team", "bert") == 700.0  # median of 400 and 1000; c reported none
    store.complete_run(b.id, "completed", metric=1.0)
    assert [r.noise_scale for r in store.list_runs("team", "bert").items] == [400.0, 1000.0, None]
    store.report(c.id, 1, 3.0, noise_scale=50.0)
    assert store.noise_scale("team", "bert") == 400.0
    for bad in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(InvalidArgument, match="noise_scale"):
            store.report(c.id, 2, 3.0, noise_scale=bad)
    with pytest.raises(NotFound):
        store.noise_scale("team", "nope")


def test_report_on_finished_run_is_conflict(store):
    _study(store)
    run = _run(store)
    store.complete_run(run.id, "completed", metric=1.0)
    with pytest.raises(Conflict, match="completed"):
        store.report(run.id, 5, 1.0)


# ============================================================================ outcomes


@pytest.mark.parametrize(
    ("outcome", "kwargs"),
    [
        ("completed", {"metric": 2.5}),
        ("diverged", {"step": 120, "reason": "loss became NaN"}),
        ("failed", {"reason": "CUDA OOM"}),
        ("pruned", {"step": 50, "metric": 3.0}),
        ("preempted", {"reason": "spot instance reclaimed"}),
    ],
)
def test_each_outcome_from_running(store, outcome, kwargs):
    _study(store)
    run = _run(store)
    done = store.complete_run(run.id, outcome, **kwargs)
    assert done.state == outcome
    assert done.lease_expires_at is None
    assert done.metric == kwargs.get("metric")
    assert done.reason == kwargs.get("reason")
    assert done.diverged_step == (120 if outcome == "diverged" else None)
    assert store.get_run(run.id) == done
    # The same outcome again is a no-op that returns the stored run.
    assert store.complete_run(run.id, outcome, **kwargs) == done
    # Any other outcome is a conflict, and changes nothing.
    for other in ("completed", "diverged", "failed", "pruned", "preempted"):
        if other != outcome:
            with pytest.raises(Conflict, match=f"already finished as {outcome}"):
                store.complete_run(run.id, other, metric=1.0 if other in ("completed", "pruned") else None)
    assert store.get_run(run.id) == done


def test_completed_with_another_metric_is_conflict(store):
    _study(store)
    run = _run(store)
    store.complete_run(run.id, "completed", metric=1.0)
    with pytest.raises(Conflict, match="metric"):
        store.complete_run(run.id, "completed", metric=1.5)
    assert store.get_run(run.id).metric == 1.0


def test_pruned_without_metric_keeps_last_loss(store):
    _study(store)
    run = _run(store)
    store.report(run.id, 10, 7.0)
    store.report(run.id, 20, 6.0)
    done = store.complete_run(run.id, "pruned", step=20)
    assert done.metric == 6.0 and done.last_step == 20
    assert store.complete_run(run.id, "pruned").state == "pruned"  # retry without metric: no-op


@pytest.mark.parametrize(
    ("outcome", "kwargs", "argument"),
    [
        ("done", {}, "outcome"),
        ("running", {}, "outcome"),
        ("completed", {}, "metric"),
        ("completed", {"metric": float("nan")}, "metric"),
        ("completed", {"metric": float("inf")}, "metric"),
        ("completed", {"metric": "1"}, "metric"),
        ("diverged", {"metric": 1.0}, "metric"),
        ("failed", {"reason": 5}, "reason"),
        ("failed", {"reason": "x" * 2001}, "reason"),
        ("diverged", {"step": -1}, "step"),
    ],
)
def test_complete_run_validation(store, outcome, kwargs, argument):
    _study(store)
    run = _run(store)
    with pytest.raises(InvalidArgument, match=argument):
        store.complete_run(run.id, outcome, **kwargs)
    assert store.get_run(run.id).state == "running"


def test_expire_leases_preempts_once(store):
    _study(store)
    # Leases long enough that a loaded machine cannot outrun the first check; the clock is moved instead.
    short = _run(store, lease_seconds=60)
    long = _run(store, lease_seconds=3600)
    finished = _run(store, lease_seconds=60)
    store.complete_run(finished.id, "completed", metric=1.0)
    assert store.expire_leases() == []  # nothing is past its lease yet
    later = datetime.now(UTC) + timedelta(seconds=120)
    assert store.expire_leases(now=later) == [short.id]
    assert store.expire_leases(now=later) == []
    pre = store.get_run(short.id)
    assert pre.state == "preempted" and pre.reason == "lease expired" and pre.lease_expires_at is None
    assert store.get_run(long.id).state == "running"
    assert store.get_run(finished.id).state == "completed"
    assert store.complete_run(short.id, "preempted").state == "preempted"  # agreeing: no-op
    # The job was alive after all (a network partition): its own word wins, and its final outcome too.
    assert store.complete_run(short.id, "completed", metric=0.5).state == "completed"
    with pytest.raises(Conflict):
        store.complete_run(short.id, "diverged")
    assert store.history("team", "bert")[0].n_completed == 2
    with pytest.raises(InvalidArgument, match="now"):
        store.expire_leases(now=datetime.now())  # naive
    much_later = datetime.now(UTC) + timedelta(hours=2)
    assert store.expire_leases(now=much_later) == [long.id]


@pytest.mark.parametrize("speak", ["heartbeat", "report"])
def test_preempted_run_whose_job_speaks_runs_again(store, speak):
    _study(store)
    run = _run(store, lease_seconds=1)
    assert store.expire_leases(now=datetime.now(UTC) + timedelta(seconds=5)) == [run.id]
    revived = store.heartbeat(run.id, lease_seconds=60) if speak == "heartbeat" else store.report(run.id, 3, 2.5)
    assert revived.state == "running" and revived.reason is None
    assert revived.lease_expires_at > datetime.now(UTC)
    assert store.get_run(run.id).state == "running"
    assert [s.state for s in store.list_runs("team", "bert", state="running").items] == ["running"]
    assert store.expire_leases() == []  # a fresh lease
    # preempted again later, then the job finishes: still one run, with the job's outcome
    assert store.expire_leases(now=datetime.now(UTC) + timedelta(hours=2)) == [run.id]
    assert store.complete_run(run.id, "completed", metric=0.7).state == "completed"
    assert store.history("team", "bert")[0].n_completed == 1
    # a run its own job declared preempted stays so
    told = _run(store)
    store.complete_run(told.id, "preempted", reason="spot reclaimed")
    with pytest.raises(Conflict, match="preempted"):
        store.heartbeat(told.id)
    with pytest.raises(Conflict, match="preempted"):
        store.report(told.id, 1, 1.0)


def test_expire_leases_in_batches(store):
    _study(store)
    ids = [_run(store, lease_seconds=1).id for _ in range(7)]
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert store.expire_leases(now=later, batch=3) == sorted(ids)


# ============================================================================ history


def _scenario(store: StudyStore, name: str = "bert", direction: str = "minimize") -> None:
    _study(store, name=name, direction=direction)
    plan = [
        (1024, 1e-3, "completed", 3.0),
        (1024, 2e-3, "completed", 2.5),
        (1024, 4e-3, "diverged", None),
        (1024, 8e-3, "diverged", None),
        (1024, 3e-3, "failed", None),
        (1024, 5e-3, "pruned", 9.0),
        (4096, 4e-3, "completed", 2.0),
        (4096, 2e-3, "completed", 2.0),  # tie on the metric: the smaller LR is reported
        (4096, 1e-2, "running", None),
        (16384, 1e-2, "diverged", None),
    ]
    for bs, lr, outcome, metric in plan:
        run = _run(store, name=name, batch_size=bs, lr=lr)
        if outcome == "running":
            continue
        store.complete_run(run.id, outcome, metric=metric)


def test_history_summarises_per_batch_size(store):
    _scenario(store)
    hist = store.history("team", "bert")
    assert all(isinstance(h, BatchSummary) for h in hist)
    assert hist == [
        BatchSummary(batch_size=1024, n_runs=6, n_completed=2, n_diverged=2, best_lr=2e-3, best_metric=2.5,
                     min_diverged_lr=4e-3, max_stable_lr=2e-3, units=LAMB),
        BatchSummary(batch_size=4096, n_runs=3, n_completed=2, n_diverged=0, best_lr=2e-3, best_metric=2.0,
                     min_diverged_lr=None, max_stable_lr=4e-3, units=LAMB),
        BatchSummary(batch_size=16384, n_runs=1, n_completed=0, n_diverged=1, best_lr=None, best_metric=None,
                     min_diverged_lr=1e-2, max_stable_lr=None, units=LAMB),
    ]


def test_history_maximize(store):
    _scenario(store, direction="maximize")
    by_bs = {h.batch_size: h for h in store.history("team", "bert")}
    assert (by_bs[1024].best_lr, by_bs[1024].best_metric) == (1e-3, 3.0)


def test_history_errors_and_empty(store):
    _study(store)
    assert store.history("team", "bert") == []
    with pytest.raises(NotFound):
        store.history("team", "nope")
    with pytest.raises(InvalidArgument, match="study"):
        store.history("team", "")


def test_evidence_lists_finished_runs_compactly(store):
    _scenario(store)
    ev = store.evidence("team", "bert")
    # completed and diverged runs only (running, failed and pruned runs teach nothing about the LR),
    # newest first
    assert [(e.batch_size, e.lr, e.outcome, e.metric) for e in ev] == [
        (16384, 1e-2, "diverged", None), (4096, 2e-3, "completed", 2.0), (4096, 4e-3, "completed", 2.0),
        (1024, 8e-3, "diverged", None), (1024, 4e-3, "diverged", None), (1024, 2e-3, "completed", 2.5),
        (1024, 1e-3, "completed", 3.0)]
    assert all(e.study == "bert" and e.model_params == 110_000_000 and e.run_id for e in ev)
    assert len(store.evidence("team", "bert", limit=2)) == 2
    with pytest.raises(NotFound):
        store.evidence("team", "nope")
    with pytest.raises(InvalidArgument, match="limit"):
        store.evidence("team", "bert", limit=0)


def test_evidence_adds_a_family_band(store):
    _scenario(store, name="bert")
    _scenario(store, name="bert-2")
    store.create_study("team", "resnet", model_family="cnn", model_params=110_000_000)
    own = store.evidence("team", "bert")
    both = store.evidence("team", "bert", family_band=("transformer", 50_000_000, 200_000_000))
    assert len(both) == 2 * len(own) and {e.study for e in both} == {"bert", "bert-2"}
    assert store.evidence("team", "bert", family_band=("transformer", 1, 10)) == own


def test_family_history_merges_a_size_band(store):
    _scenario(store, name="bert")
    store.create_study("team", "bert-large", model_family="transformer", model_params=340_000_000)
    r = _run(store, name="bert-large", batch_size=1024, lr=1e-4)
    store.complete_run(r.id, "completed", metric=1.0)
    r = _run(store, name="bert-large", batch_size=1024, lr=3e-3)
    store.complete_run(r.id, "diverged")
    store.create_study("other", "resnet", model_family="cnn", model_params=25_000_000)
    store.complete_run(_run(store, name="resnet", ns="other", batch_size=1024, lr=1.0).id, "completed", metric=0.1)

    band = store.family_history("transformer", 100_000_000, 400_000_000)
    b1024 = next(h for h in band if h.batch_size == 1024)
    assert (b1024.n_runs, b1024.n_completed, b1024.n_diverged) == (8, 3, 3)
    assert (b1024.best_lr, b1024.best_metric) == (1e-4, 1.0)
    assert b1024.min_diverged_lr == 3e-3 and b1024.max_stable_lr == 2e-3
    assert [h.batch_size for h in band] == [1024, 4096, 16384]
    only_base = store.family_history("transformer", 100_000_000, 200_000_000)
    assert [h.model_dump(exclude={"n_studies"}) for h in only_base] == [h.model_dump() for h in store.history("team", "bert")]
    assert {h.n_studies for h in band} == {1, 2}
    assert store.family_history("transformer", min_params=300_000_000)[0].n_runs == 2
    assert store.family_history("cnn")[0].best_lr == 1.0
    assert store.family_history("transformer", namespace="other") == []
    assert store.family_history("transformer", metric="accuracy") == []
    assert store.family_history("rnn") == []
    with pytest.raises(InvalidArgument, match="min_params"):
        store.family_history("transformer", 10, 5)
    with pytest.raises(InvalidArgument, match="family"):
        store.family_history("")


def test_rebuild_summaries_from_optuna_data(store):
    _scenario(store)
    _scenario(store, name="gpt", direction="maximize")
    expected = {n: store.history("team", n) for n in ("bert", "gpt")}
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM lb_batch_summary"))
    assert store.history("team", "bert") == []
    assert store.rebuild_summaries("team", "bert") == 3
    assert store.history("team", "bert") == expected["bert"]
    assert store.history("team", "gpt") == []
    assert store.rebuild_summaries() == 6
    assert {n: store.history("team", n) for n in ("bert", "gpt")} == expected
    with pytest.raises(NotFound):
        store.rebuild_summaries("team", "nope")
    with pytest.raises(InvalidArgument, match="namespace"):
        store.rebuild_summaries("team")


def _mixed_units_study(store: StudyStore, name: str, plan: list[tuple[int, float, str, str, float | None]]) -> None:
    _study(store, name=name)
    for bs, lr, optimizer, outcome, metric in plan:
        run = _run(store, name=name, batch_size=bs, lr=lr, optimizer=optimizer)
        if outcome != "running":
            store.complete_run(run.id, outcome, metric=metric)


def test_summaries_keep_each_lr_units_apart(store):
    """A LAMB study that also ran AdamW: the AdamW divergence at 1e-3 and the LAMB one at 5e-2 stay in rows
    of their own units (one smallest diverged LR of 1e-3 would bound LAMB's LRs, several times AdamW's);
    the rebuild from Optuna's data folds the same rows, and a family merges each units apart."""
    _mixed_units_study(store, "bert", [
        (1024, 1e-3, "adamw", "diverged", None),
        (1024, 2e-4, "adamw", "completed", 2.0),
        (1024, 5e-2, "lamb", "diverged", None),
        (1024, 1e-2, "lamb", "completed", 1.8),
        (1024, 2e-2, "lans", "completed", 1.9),  # LANS trains with LAMB's LRs: LAMB's row
        (4096, 4e-2, "lamb", "running", None),
    ])
    hist = store.history("team", "bert")
    assert hist == [
        BatchSummary(batch_size=1024, n_runs=2, n_completed=1, n_diverged=1, best_lr=2e-4, best_metric=2.0,
                     min_diverged_lr=1e-3, max_stable_lr=2e-4, units=ADAMW),
        BatchSummary(batch_size=1024, n_runs=3, n_completed=2, n_diverged=1, best_lr=1e-2, best_metric=1.8,
                     min_diverged_lr=5e-2, max_stable_lr=2e-2, units=LAMB),
        BatchSummary(batch_size=4096, n_runs=1, units=LAMB),
    ]
    assert store.read_evidence("team", "bert").history == hist
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM lb_batch_summary"))
    assert store.rebuild_summaries("team", "bert") == 3
    assert store.history("team", "bert") == hist

    _mixed_units_study(store, "bert-2", [
        (1024, 5e-4, "adamw", "diverged", None),
        (1024, 3e-2, "lamb", "diverged", None),
    ])
    family = [h.model_dump() for h in store.family_history("transformer", 100_000_000, 200_000_000)]
    assert family == [
        {**hist[0].model_dump(), "n_runs": 3, "n_diverged": 2, "min_diverged_lr": 5e-4, "n_studies": 2},
        {**hist[1].model_dump(), "n_runs": 4, "n_diverged": 2, "min_diverged_lr": 3e-2, "n_studies": 2},
        {**hist[2].model_dump(), "n_studies": 1},
    ]
    band = ("transformer", 100_000_000, 200_000_000)
    assert [h.model_dump() for h in store.read_evidence("team", "bert", family_band=band).family_history] == family


def _imported_trial(store: StudyStore, number: int, batch_size: int, lr: float, optimizer: tuple | None) -> None:
    """A diverged trial written as an import would (no run row); ``optimizer``: (choices, the one it names)."""
    from optuna.distributions import CategoricalDistribution, distribution_to_json
    from optuna.trial import TrialState

    from largebatch.service.storage.optuna_store import DISTRIBUTIONS, T_PARAMS, T_TRIAL_USER, T_TRIALS

    params = [("batch_size", DISTRIBUTIONS["batch_size"], batch_size), ("peak_lr", DISTRIBUTIONS["peak_lr"], lr)]
    if optimizer is not None:
        params.append(("optimizer", CategoricalDistribution(optimizer[0]), optimizer[1]))
    with store.engine.begin() as conn:
        sid = conn.execute(text("SELECT study_id FROM lb_studies WHERE name = 'bert'")).scalar_one()
        tid = conn.execute(T_TRIALS.insert().values(study_id=sid, number=number, state=TrialState.FAIL,
                                                    datetime_start=datetime.now())).inserted_primary_key[0]
        conn.execute(T_PARAMS.insert(), [{"trial_id": tid, "param_name": k, "param_value": d.to_internal_repr(v),
                                          "distribution_json": distribution_to_json(d)} for k, d, v in params])
        conn.execute(T_TRIAL_USER.insert().values(trial_id=tid, key="outcome", value_json='"diverged"'))


def test_imported_trials_of_no_optimizer_or_an_unknown_one_keep_to_buckets_of_their_own(store):
    """The rebuild reads each trial's optimizer by its own distribution: a trial naming none is in the
    unnamed bucket (read in a recipe's reference's units), one naming an optimizer the table does not know
    in "?" units, as ``EvidenceModel.in_units_of`` reads such runs; neither joins LAMB's row."""
    from largebatch.scaling_rules.optimizers import UNNAMED_UNITS

    _study(store)
    store.complete_run(_run(store, batch_size=512, lr=1e-2, optimizer="lamb").id, "diverged")
    _imported_trial(store, 100, 512, 1e-3, None)
    _imported_trial(store, 101, 512, 2e-3, (("adafactor", "lamb"), "adafactor"))
    _imported_trial(store, 102, 512, 3e-2, (("sgd", "lamb"), "lamb"))  # index 1 here, another in the store's
    store.rebuild_summaries("team", "bert")
    got = sorted(store.history("team", "bert"), key=lambda h: h.units)  # (collations order "?" apart)
    assert [(h.units, h.n_runs, h.n_diverged, h.min_diverged_lr) for h in got] == sorted(
        [("?", 1, 1, 2e-3), (LAMB, 2, 2, 1e-2), (UNNAMED_UNITS, 1, 1, 1e-3)])


# ============================================================================ API keys


def test_api_keys(store):
    key_id, plaintext = store.create_api_key("team", "write")
    rid, rplain = store.create_api_key("team", "read")
    other_id, _ = store.create_api_key("other")
    assert plaintext.startswith("lbk_") and len(plaintext) > 40 and plaintext != rplain
    rec = store.lookup_api_key(plaintext)
    assert isinstance(rec, ApiKeyRecord) and rec.id == key_id and rec.namespace == "team" and rec.scope == "write"
    assert rec.active and rec.created_at.tzinfo is not None and plaintext.startswith(rec.prefix)
    assert store.lookup_api_key(rplain).scope == "read"
    assert [k.id for k in store.list_api_keys("team")] == [key_id, rid]
    assert [k.id for k in store.list_api_keys()] == [key_id, rid, other_id]
    revoked = store.revoke_api_key(key_id)
    assert not revoked.active and revoked.revoked_at is not None
    assert store.revoke_api_key(key_id).revoked_at == revoked.revoked_at  # idempotent
    assert store.lookup_api_key(plaintext) is None
    assert [k.active for k in store.list_api_keys("team")] == [False, True]
    for unknown in ("lbk_nope", "", "x" * 10_000, None, 5):
        assert store.lookup_api_key(unknown) is None
    with pytest.raises(NotFound):
        store.revoke_api_key(12345)
    with pytest.raises(InvalidArgument, match="scope"):
        store.create_api_key("team", "admin")
    with pytest.raises(InvalidArgument, match="namespace"):
        store.create_api_key("bad name")
    with pytest.raises(InvalidArgument, match="key_id"):
        store.revoke_api_key("1")
    # Only the hash is stored.
    with store.engine.connect() as conn:
        dump = json.dumps([list(r) for r in conn.execute(text("SELECT * FROM lb_api_keys"))], default=str)
    assert plaintext not in dump and rplain not in dump


# ============================================================================ operations


def test_ping_and_versions(store):
    assert store.ping() is True
    v = store.schema_versions()
    assert v["optuna"] == v["optuna_head"] and v["largebatch"] == v["largebatch_head"] == "4"


def test_records_are_immutable(store):
    s = _study(store)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        s.name = "x"  # type: ignore[misc]


def test_threads_share_one_store(store):
    _study(store)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(10):
                run, _ = store.create_run("team", "bert", make_recipe(), client_key=f"t{t}-{i}")
                store.create_run("team", "bert", make_recipe(), client_key=f"t{t}-{i}")
                store.report(run.id, 1, 1.0)
                store.complete_run(run.id, "completed", metric=float(i))
                store.history("team", "bert")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.list_runs("team", "bert", state="completed").total == 60
    numbers = sorted(r.number for r in store.list_runs("team", "bert", limit=100).items)
    assert numbers == list(range(60))
    assert store.history("team", "bert")[0].n_completed == 60


def test_concurrent_creates_with_one_client_key_make_one_run(store):
    """Racing retries of one create (on PostgreSQL each thread has its own connection, so the
    unique constraint, not a read-then-write check, decides)."""
    _study(store)
    barrier = threading.Barrier(8)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            barrier.wait()
            run, created = store.create_run("team", "bert", make_recipe(), client_key="same")
            results.append((run.id, created))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({rid for rid, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 7 + [True]
    assert store.list_runs("team", "bert").total == 1
    assert store.get_study("team", "bert").n_runs == 1
    assert store.history("team", "bert")[0].n_runs == 1
