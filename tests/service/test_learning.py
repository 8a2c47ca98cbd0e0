"""Issue #7 through HTTP: recommendations learn from a study's runs, and `explore` sweeps with
Optuna's sampler. Real app, real store (SQLite file and PostgreSQL)."""

from __future__ import annotations

import time

import pytest

from largebatch.scaling_rules.wire import RecommendationOut
from tests.scaling_rules.test_learning_simulation import B0, LR0, Landscape

from .conftest import bert_request, in_process_api
from .test_api import assert_error, locs, new_study


def test_explore_needs_a_study_and_write_scope(api):
    r = api.client().post("/v1/recommendations", json=bert_request(explore=2))
    assert_error(r, "validation_error")
    assert ["body", "study"] in locs(r)
    study = new_study(api.client())
    assert_error(api.client("read").post("/v1/recommendations", json=bert_request(study=study, explore=2)),
                 "forbidden")
    assert_error(api.client().post("/v1/recommendations", json=bert_request(study=study, explore=65)),
                 "validation_error")


def test_explore_opens_one_run_per_variant_idempotently(api):
    c = api.client()
    study = new_study(c)
    body = bert_request(16384, study=study, explore=3, start_run=True)
    r = c.post("/v1/recommendations", json=body, headers={"Idempotency-Key": "sweep-1"})
    assert r.status_code == 200, r.text
    out = RecommendationOut.model_validate(r.json())
    lr = out.stages[0].peak_lr
    variant_lrs = [v.stages[0].peak_lr for v in out.variants]
    assert len(variant_lrs) == len(set(variant_lrs)) == 3
    assert all(lr / 2 <= x <= lr * 2 for x in variant_lrs)
    assert all(v.stages[0].batch_size == 16384 for v in out.variants)  # the batch size is fixed
    assert [run.peak_lr for run in out.variant_runs] == variant_lrs
    assert all(any("explore variant" in line for line in v.rationale) for v in out.variants)
    assert out.run is not None and len({out.run.id, *(x.id for x in out.variant_runs)}) == 4
    again = RecommendationOut.model_validate(
        c.post("/v1/recommendations", json=body, headers={"Idempotency-Key": "sweep-1"}).json())
    assert [x.id for x in again.variant_runs] == [x.id for x in out.variant_runs]
    assert c.get(f"/v1/studies/{study}").json()["n_runs"] == 4


def test_explore_stays_at_or_below_the_users_lr_cap(api):
    c = api.client()
    study = new_study(c)
    # The user knows 0.0055 to be the largest stable LR at 32K; the recipe's LR is 0.005.
    out = RecommendationOut.model_validate(
        c.post("/v1/recommendations", json=bert_request(study=study, explore=6, lr_cap=0.0055)).json())
    assert out.stages[0].peak_lr == pytest.approx(0.005)
    lrs = [v.stages[0].peak_lr for v in out.variants]
    assert len(lrs) == 6 and all(0.005 / 2 <= x <= 0.0055 for x in lrs), lrs
    assert all("range [0.0025, 0.0055]" in v.rationale[-1] for v in out.variants), out.variants[0].rationale[-1]


def _request(batch: int, study: str, **extra) -> dict:
    return {"model": {"params": 10_000_000}, "study": study, "target": {"batch_size": batch},
            "reference": {"batch_size": B0, "lr": LR0, "warmup_ratio": 0.01, "steps": 100_000}, **extra}


@pytest.mark.slow
def test_service_learns_the_scaling_curve_from_its_own_runs(tmp_path):
    """The issue's loop through the real service: recommend with explore, run (simulated, with known
    truth), report outcomes, repeat; then the recipe at a batch never run is near the true optimum."""
    land = Landscape(seed=11)
    for api in in_process_api(f"sqlite:///{tmp_path / 'learn.db'}", "learn"):
        c = api.client()
        study = "learn-11"  # fixed: the sampler is seeded from the study name, so the test is repeatable
        assert c.post("/v1/studies", json={"name": study, "model_params": 10_000_000}).status_code == 201
        rule = RecommendationOut.model_validate(c.post("/v1/recommendations", json=_request(8192, study)).json())
        for rnd in range(4):
            batch = (512, 2048, 1024)[rnd % 3]
            out = RecommendationOut.model_validate(
                c.post("/v1/recommendations", json=_request(batch, study, start_run=True, explore=3)).json())
            for run in [out.run, *out.variant_runs]:
                result = land.run(batch, run.peak_lr, run.id)
                done = {"outcome": result.outcome, "metric": result.metric} if result.outcome == "completed" \
                    else {"outcome": "diverged", "reason": "loss exploded"}
                assert c.post(f"/v1/runs/{run.id}/complete", json=done).status_code == 200
        learned = RecommendationOut.model_validate(c.post("/v1/recommendations", json=_request(8192, study)).json())
        truth = land.optimum(8192)
        assert abs(rule.stages[0].peak_lr / truth - 1) > 0.5
        assert abs(learned.stages[0].peak_lr / truth - 1) < 0.10, learned.rationale
        assert any("evidence (runs" in line for line in learned.rationale)
        again = c.post("/v1/recommendations", json=_request(8192, study)).json()
        assert again == learned.model_dump(mode="json")  # deterministic


def test_explore_variants_nobody_starts_do_not_stay_running(tmp_path):
    """Variants get the claim lease (default 120 s, not the 600 s run lease): one nobody trains is
    preempted soon; the job that starts it later revives it with its first heartbeat."""
    from largebatch.service.settings import Settings

    assert Settings().explore_claim_s == 120 and Settings().lease_seconds == 600
    for api in in_process_api(f"sqlite:///{tmp_path / 'claim.db'}", "claim"):
        c = api.client()
        study = new_study(c)
        out = RecommendationOut.model_validate(c.post("/v1/recommendations", json=bert_request(
            16384, study=study, explore=2, start_run=True)).json())
        main_left = (out.run.lease_expires_at - out.run.created_at).total_seconds()
        variant_left = [(r.lease_expires_at - r.created_at).total_seconds() for r in out.variant_runs]
        assert 590 <= main_left <= 601 and all(110 <= s <= 121 for s in variant_left), (main_left, variant_left)
    for api in in_process_api(f"sqlite:///{tmp_path / 'claim-fast.db'}", "claim-fast", explore_claim_s=0.3,
                              sweep_interval_s=0.1):
        c = api.client()
        study = new_study(c)
        out = RecommendationOut.model_validate(c.post("/v1/recommendations", json=bert_request(
            16384, study=study, explore=1, start_run=True)).json())
        variant = out.variant_runs[0]
        deadline = time.monotonic() + 10
        while c.get(f"/v1/runs/{variant.id}").json()["state"] != "preempted" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get(f"/v1/runs/{variant.id}").json()["state"] == "preempted"
        assert c.get(f"/v1/runs/{out.run.id}").json()["state"] == "running"  # the main run keeps its lease
        assert c.post(f"/v1/runs/{variant.id}/heartbeat", json={}).status_code == 200  # a job starts it at last
        assert c.get(f"/v1/runs/{variant.id}").json()["state"] == "running"


def test_explore_history_holds_only_runs_in_the_recipes_lr_units():
    """A study that also ran LAMB: its runs (LRs in LAMB's units) are not TPE's history for an AdamW
    recipe, even where their LRs fall inside the explored range."""
    from largebatch.scaling_rules import recommend
    from largebatch.scaling_rules.learning import RunEvidence
    from largebatch.service.explore import explore_variants

    req = {"model": {"params": 110_000_000, "family": "transformer"},
           "reference": {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "steps": 10_000},
           "target": {"batch_size": 1024}}
    recipe = recommend(req)
    lr = recipe.stages[0].peak_lr
    adamw = [RunEvidence(batch_size=1024, lr=lr * f, outcome="completed", metric=1.0 + abs(f - 1), optimizer="adamw",
                         run_id=i) for i, f in enumerate((0.8, 1.2))]
    lamb = [RunEvidence(batch_size=1024, lr=lr * f, outcome="diverged", optimizer="lamb", run_id=10 + i)
            for i, f in enumerate((0.9, 1.1))]
    history = [v.rationale[-1] for v in explore_variants(recipe, adamw + lamb, 2, study="s")]
    assert all("2 past run(s) as its history" in line for line in history), history


def _finished_run(c, study: str, optimizer: str, batch_size: int, lr: float, outcome: str) -> None:
    from .storage.helpers import make_recipe

    recipe = make_recipe(batch_size=batch_size, lr=lr, optimizer=optimizer).model_dump(mode="json")
    r = c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe})
    assert r.status_code == 201, r.text
    done = {"outcome": "completed", "metric": 2.0} if outcome == "completed" else \
        {"outcome": "diverged", "reason": "loss exploded"}
    assert c.post(f"/v1/runs/{r.json()['id']}/complete", json=done).status_code == 200


def _lamb_recipe(c, study: str) -> RecommendationOut:
    out = RecommendationOut.model_validate(c.post("/v1/recommendations", json=bert_request(4096, study=study)).json())
    assert out.optimizer.name in ("lamb", "lans")
    return out


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_lamb_recipe_is_capped_by_lambs_divergences_not_adamws(request, backend, monkeypatch):
    """A study that ran AdamW and LAMB: AdamW's divergence at 1e-3 is no bound on a LAMB recipe (LAMB's
    LRs are several times AdamW's), and a LAMB divergence older than every run the recipe reads still
    caps it: the study's summaries keep each optimizer's LR units apart."""
    from largebatch.scaling_rules import priors

    from .conftest import store_url

    monkeypatch.setattr("largebatch.service.recipes.EVIDENCE_LIMIT", 3)  # what 2,000 runs do, with 3
    for api in in_process_api(store_url(request, backend), f"units-{backend}"):
        c = api.client()
        study = new_study(c)
        alone = RecommendationOut.model_validate(
            c.post("/v1/recommendations", json=bert_request(4096)).json()).stages[0].peak_lr
        assert alone > 1e-3
        _finished_run(c, study, "adamw", 512, 2e-4, "completed")
        _finished_run(c, study, "adamw", 512, 1e-3, "diverged")
        out = _lamb_recipe(c, study)
        assert out.stages[0].peak_lr == pytest.approx(alone, rel=1e-12), out.rationale
        _finished_run(c, study, "lamb", 1024, 1.5e-3, "diverged")
        for lr in (1e-4, 2e-4, 4e-4):  # newer AdamW runs: the LAMB divergence is out of the runs read
            _finished_run(c, study, "adamw", 512, lr, "completed")
        out = _lamb_recipe(c, study)
        assert out.stages[0].peak_lr == pytest.approx(priors.DIVERGENCE_MARGIN * 1.5e-3, rel=1e-12), out.rationale
        assert any("study history in lamb's LR units (layerwise-adam): LR 0.0015 diverged at batch 1024" in line
                   for line in out.rationale), out.rationale


def test_a_measured_critical_batch_bends_the_studys_curve_through_the_service(tmp_path):
    """A study with runs at two batch sizes and a measured B_noise: the recipe far past its runs bends
    where the rule does (real app, real SQLite store), and the evidence view keeps the power law."""
    from tests.scaling_rules.test_learning_bend import TARGET, Bent, N

    land = Bent(seed=5)
    measured = {"noise_scale": N}
    for api in in_process_api(f"sqlite:///{tmp_path / 'bend.db'}", "bend"):
        c = api.client()
        study = "bend-5"
        assert c.post("/v1/studies", json={"name": study, "model_params": 10_000_000}).status_code == 201
        for batch in (512, 1024):
            body = _request(batch, study, start_run=True, explore=2)
            body["reference"].update(measured)
            out = RecommendationOut.model_validate(c.post("/v1/recommendations", json=body).json())
            for run in [out.run, *out.variant_runs]:
                result = land.run(batch, run.peak_lr, run.id)
                assert result.outcome == "completed"
                done = {"outcome": "completed", "metric": result.metric}
                assert c.post(f"/v1/runs/{run.id}/complete", json=done).status_code == 200
        body = _request(TARGET, study)
        body["reference"].update(measured)
        bent = RecommendationOut.model_validate(c.post("/v1/recommendations", json=body).json())
        line = next(x for x in bent.rationale if x.startswith("evidence ("))
        assert "bent flat at the critical batch: B_noise 2048 as measured" in line, line
        view = c.get(f"/v1/studies/{study}/evidence", params={"batch_size": TARGET}).json()
        assert view["fit"]["bend"] is None  # two batch sizes show no bend by themselves
        power_law = next(p["lr"] for p in view["optimum"] if p["batch_size"] == TARGET)
        # the same runs as one power law overshoot; bent, the recipe is the closer
        assert power_law > land.optimum(TARGET)
        assert abs(bent.stages[0].peak_lr / land.optimum(TARGET) - 1) < power_law / land.optimum(TARGET) - 1, line
        assert f"one power law through the same runs gives {power_law:.6g}" in line


def test_an_sgd_studys_runs_keep_the_linear_rule_through_the_service(api):
    """An SGD study that swept its LR at the reference batch: the recipe 16x past it keeps Goyal et al.'s
    linear scaling (the runs say nothing of the exponent), and the evidence view says which prior it used."""
    import math

    c = api.client()
    study = new_study(c)
    body = {"model": {"params": 25_000_000, "family": "cnn"}, "study": study,
            "reference": {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "warmup_ratio": 0.05, "steps": 450_000}}
    out = RecommendationOut.model_validate(c.post("/v1/recommendations", json={
        **body, "target": {"batch_size": 256}, "explore": 2, "start_run": True}).json())
    for run in [out.run, *out.variant_runs]:
        metric = 1.0 + math.log(run.peak_lr / 0.11) ** 2  # best at 0.11 at batch 256
        assert c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "completed", "metric": metric}).status_code == 200
    view = c.get(f"/v1/studies/{study}/evidence", params={"batch_size": 4096}).json()
    assert view["fit"]["prior_exponent"] == 1.0 and view["fit"]["data_weight"] == 0.0
    recipe = RecommendationOut.model_validate(
        c.post("/v1/recommendations", json={**body, "target": {"batch_size": 4096}}).json())
    assert recipe.optimizer.name == "sgd"
    optimum = next(p["lr"] for p in view["optimum"] if p["batch_size"] == 4096)
    assert recipe.stages[0].peak_lr == pytest.approx(optimum, rel=1e-9)
    assert recipe.stages[0].peak_lr == pytest.approx(0.11 * 16, rel=0.05)  # linear; sqrt would give 0.44


def test_runs_that_say_nothing_of_the_bend_leave_a_noise_aware_recipe_at_the_rules(api):
    """A LAMB study with a measured B_noise sweeps its LR at the reference batch and finds the reference's
    LR best: 64x past it, where the rule bends, the recipe is the rule's (the rule averages its bend over
    the spread the study's fit starts from), and the rationale says the runs moved it by nothing."""
    import math

    c = api.client()
    study = new_study(c)
    ref = {"batch_size": 512, "lr": 1e-3, "optimizer": "lamb", "warmup_ratio": 0.01, "steps": 100_000,
           "noise_scale": 2048}
    body = {"model": {"params": 110_000_000}, "study": study, "reference": ref}
    out = RecommendationOut.model_validate(c.post("/v1/recommendations", json={
        **body, "target": {"batch_size": 512}, "explore": 2, "start_run": True}).json())
    for run in [out.run, *out.variant_runs]:
        metric = 2.0 + 0.1 * math.log(run.peak_lr / ref["lr"]) ** 2
        assert c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "completed", "metric": metric}).status_code == 200
    target = {"batch_size": 32768}
    rule = RecommendationOut.model_validate(
        c.post("/v1/recommendations", json={**body, "study": None, "target": target}).json())
    learned = RecommendationOut.model_validate(c.post("/v1/recommendations", json={**body, "target": target}).json())
    line = next(x for x in learned.rationale if x.startswith("evidence ("))
    assert "bent flat at the critical batch: B_noise 2048 as measured" in line, line
    assert learned.stages[0].peak_lr == pytest.approx(rule.stages[0].peak_lr, rel=1e-6), line
    # the exact bend would have put it elsewhere: sqrt((1 + 2048/512) / (1 + 2048/32768)) x the reference's
    assert abs(rule.stages[0].peak_lr / (ref["lr"] * math.sqrt(5 / 1.0625)) - 1) > 0.02
