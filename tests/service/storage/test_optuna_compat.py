"""The store stays a genuine Optuna store: stock Optuna opens it and sees every run."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from largebatch.service.storage import open_store

from .helpers import make_recipe

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _populate(url: str) -> dict[str, int]:
    store = open_store(url)
    store.create_study("team", "bert", model_family="transformer", model_params=110_000_000, metric="eval_loss")
    ids = {}
    for outcome, kwargs in [
        ("completed", {"metric": 1.25}),
        ("diverged", {"step": 42, "reason": "loss is NaN"}),
        ("failed", {"reason": "OOM"}),
        ("pruned", {"step": 20}),
        ("running", {}),
    ]:
        run, _ = store.create_run("team", "bert", make_recipe(batch_size=8192, lr=2e-3, optimizer="lans"),
                                  environment={"gpus": 8}, client_key=f"key-{outcome}")
        store.report(run.id, 10, 3.0)
        store.report(run.id, 20, 2.5, grad_norm=0.7)
        if outcome != "running":
            store.complete_run(run.id, outcome, **kwargs)
        ids[outcome] = run.id
    preempted, _ = store.create_run("team", "bert", make_recipe(), lease_seconds=0.001)
    import time

    time.sleep(0.01)
    assert store.expire_leases() == [preempted.id]
    ids["preempted"] = preempted.id
    store.close()
    return ids


def test_optuna_load_study_sees_every_run(file_url):
    ids = _populate(file_url)
    assert "team/bert" in optuna.study.get_all_study_names(storage=file_url)
    study = optuna.load_study(study_name="team/bert", storage=file_url)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.metric_names == ["eval_loss"]
    assert study.user_attrs["model_family"] == "transformer" and study.user_attrs["model_params"] == 110_000_000
    trials = {t.user_attrs["outcome"] if "outcome" in t.user_attrs else "running": t for t in study.trials}
    assert [t.number for t in study.trials] == list(range(6))
    expected_state = {"completed": TrialState.COMPLETE, "diverged": TrialState.FAIL, "failed": TrialState.FAIL,
                      "pruned": TrialState.PRUNED, "running": TrialState.RUNNING, "preempted": TrialState.FAIL}
    for outcome, state in expected_state.items():
        assert trials[outcome].state == state, outcome
        assert trials[outcome]._trial_id == ids[outcome]
    done = trials["completed"]
    assert done.value == 1.25
    assert done.params == {"batch_size": 8192, "peak_lr": 2e-3, "warmup_ratio": 0.1, "const_ratio": 0.0,
                           "optimizer": "lans", "steps": 1000}
    assert isinstance(done.distributions["batch_size"], IntDistribution)
    assert isinstance(done.distributions["peak_lr"], FloatDistribution) and done.distributions["peak_lr"].log
    assert isinstance(done.distributions["optimizer"], CategoricalDistribution)
    assert done.intermediate_values == {10: 3.0, 20: 2.5}
    assert done.user_attrs["client_key"] == "key-completed" and done.user_attrs["environment"] == {"gpus": 8}
    assert done.user_attrs["recipe_hash"] == make_recipe(batch_size=8192, lr=2e-3, optimizer="lans").fingerprint()
    assert done.datetime_complete is not None and done.datetime_complete >= done.datetime_start
    assert trials["diverged"].user_attrs["reason"] == "loss is NaN"
    assert trials["diverged"].user_attrs["diverged_step"] == 42
    assert trials["pruned"].value == 2.5  # like Study.tell: the last reported value
    assert trials["preempted"].user_attrs["reason"] == "lease expired"
    assert study.best_trial.number == done.number
    summary = optuna.study.get_all_study_summaries(storage=file_url)[0]
    assert summary.study_name == "team/bert" and summary.n_trials == 6
    assert math.isclose(summary.best_trial.value, 1.25)


def test_runs_share_one_search_space(file_url):
    """The params' distributions are identical across runs, so samplers and importance
    analyses see one search space over the whole study."""
    _populate(file_url)
    study = optuna.load_study(study_name="team/bert", storage=file_url)
    space = optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))
    assert set(space) == {"batch_size", "peak_lr", "warmup_ratio", "const_ratio", "optimizer", "steps"}


def test_deleted_study_is_gone_for_optuna(file_url):
    _populate(file_url)
    store = open_store(file_url)
    store.delete_study("team", "bert")
    store.close()
    with pytest.raises(KeyError):
        optuna.load_study(study_name="team/bert", storage=file_url)


def test_rebuild_reads_trials_written_by_plain_optuna(file_url):
    """Summaries are rebuildable from Optuna data alone: a trial added with stock Optuna's
    ``add_trial`` (e.g. an import of past runs) shows up after a rebuild."""
    store = open_store(file_url)
    store.create_study("team", "bert", model_family="transformer", model_params=110_000_000)
    study = optuna.load_study(study_name="team/bert", storage=file_url)
    from largebatch.service.storage.optuna_store import DISTRIBUTIONS

    params = {"batch_size": 512, "peak_lr": 1e-4, "warmup_ratio": 0.1, "const_ratio": 0.0, "optimizer": "adamw",
              "steps": 100}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=DISTRIBUTIONS, value=0.5))
    study.add_trial(optuna.trial.create_trial(params={**params, "peak_lr": 1e-2}, distributions=DISTRIBUTIONS,
                                              state=TrialState.FAIL, user_attrs={"outcome": "diverged"}))
    assert store.history("team", "bert") == []
    store.rebuild_summaries()
    (h,) = store.history("team", "bert")
    assert (h.batch_size, h.n_runs, h.best_lr, h.best_metric, h.min_diverged_lr, h.max_stable_lr) == (
        512, 2, 1e-4, 0.5, 1e-2, 1e-4)
    store.close()


def test_optuna_sees_a_revived_run_running_again(file_url):
    ids = _populate(file_url)
    store = open_store(file_url)
    try:
        store.heartbeat(ids["preempted"], lease_seconds=60)
    finally:
        store.close()
    trial = next(t for t in optuna.load_study(study_name="team/bert", storage=file_url).trials
                 if t._trial_id == ids["preempted"])
    assert trial.state == TrialState.RUNNING and trial.datetime_complete is None
    assert "outcome" not in trial.user_attrs and "reason" not in trial.user_attrs
