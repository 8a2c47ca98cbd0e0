"""``"explore_warmup": true``: explore's variants vary the warmup as well as the LR (shorter only), their
runs record it, and the evidence model learns the warmup from them. Real app, real store (SQLite file
and PostgreSQL)."""

from __future__ import annotations

import math
import random

import pytest

from largebatch.scaling_rules import recommend
from largebatch.scaling_rules.learning import RunEvidence
from largebatch.scaling_rules.models import Recipe, Stage
from largebatch.scaling_rules.recipe import validated
from largebatch.scaling_rules.wire import RecommendationOut
from largebatch.service.convert import check_recipe
from largebatch.service.explore import SHORTEST_WARMUP, explore_variants

from .conftest import bert_request, in_process_api, store_url
from .test_api import assert_error, locs, new_study

# LAMB at 4096 from the 512 reference: 0.025 of 2,000 steps warm up (50 steps); short enough to step through.
SMALL = {"model": {"params": 340_000_000},
         "reference": {"batch_size": 512, "lr": 6.25e-4, "warmup_ratio": 0.003125, "steps": 16_000},
         "target": {"batch_size": 4096}}
_PHASES = ("warmup_steps", "const_steps", "decay_steps", "warmup_ratio", "const_ratio")


def _history(recipe: Recipe) -> list[RunEvidence]:
    """Finished runs at the recipe's batch: TPE's history (enough to leave its random start-up)."""
    lr, rng = recipe.stages[0].peak_lr, random.Random(3)
    points = [(0.6, 0.025), (0.8, 0.01), (1.0, 0.025), (1.3, 0.005), (1.7, 0.02), (1.9, None), (0.7, 0.0)]
    runs = [RunEvidence(batch_size=4096, lr=lr * f, outcome="completed", warmup_ratio=w, run_id=i,
                        metric=2 + 0.1 * math.log(f / 1.2) ** 2 + rng.gauss(0, 0.002)) for i, (f, w) in enumerate(points)]
    return [*runs, RunEvidence(batch_size=4096, lr=lr * 2.5, outcome="diverged", run_id=99)]


def _stepped_lrs(recipe: Recipe, steps: int) -> list[float]:
    """The LRs the client's torch optimizer runs its first ``steps`` steps with."""
    torch = pytest.importorskip("torch")
    from largebatch.client.optim import build

    optimizer, scheduler = build(torch.nn.Linear(4, 2), recipe)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_without_explore_warmup_the_variants_are_the_lr_sweep_they_always_were():
    recipe = recommend(bert_request(4096))
    history = _history(recipe)
    variants = explore_variants(recipe, history, 5, study="s")
    assert [x.model_dump() for x in variants] == \
        [x.model_dump() for x in explore_variants(recipe, history, 5, study="s", explore_warmup=False)]
    # The LR factors the sweep gave before explore_warmup existed (Optuna's univariate TPE, this seed).
    factors = [v.stages[0].peak_lr / recipe.stages[0].peak_lr for v in variants]
    assert factors == pytest.approx([1.040084, 0.955798, 0.5061, 1.49354, 1.088328], abs=1e-6)
    for v in variants:
        assert [[getattr(s, k) for k in _PHASES] for s in v.stages] == \
            [[getattr(s, k) for k in _PHASES] for s in recipe.stages]
        assert not any("warmup x" in line for line in v.rationale)


def test_explore_warmup_varies_the_warmup_shorter_only_in_trainable_recipes():
    recipe = recommend(SMALL)
    base = recipe.stages[0]
    assert (base.steps, base.warmup_steps, base.warmup_ratio) == (2000, 50, 0.025)
    variants = explore_variants(recipe, _history(recipe), 6, study="s", explore_warmup=True)
    ratios = [v.stages[0].warmup_ratio for v in variants]
    assert len(set(ratios)) == 6, ratios
    assert all(base.warmup_ratio * SHORTEST_WARMUP * (1 - 1e-9) <= r <= base.warmup_ratio for r in ratios), ratios
    lrs = [v.stages[0].peak_lr for v in variants]
    assert len(set(lrs)) == 6 and all(base.peak_lr / 2 <= x <= base.peak_lr * 2 for x in lrs)
    for i, v in enumerate(variants):
        s = v.stages[0]
        check_recipe(v, ["body", "explore"], computed=True)  # raises a 422 for an untrainable recipe
        assert s.warmup_steps == max(1, math.floor(s.warmup_ratio * s.steps + 1e-9))
        assert s.const_steps == base.const_steps and s.steps == base.steps and v.total_steps == recipe.total_steps
        assert s.warmup_steps + s.const_steps + s.decay_steps == s.steps
        factor = s.warmup_ratio / base.warmup_ratio
        assert f"explore variant {i + 1}/6: warmup x {factor:.3f} = {s.warmup_ratio:.4g}" in v.rationale[-1]
        lrs_run = _stepped_lrs(v, s.warmup_steps + 2)  # the client's schedule warms up over the variant's steps
        assert lrs_run[0] == pytest.approx(s.peak_lr / s.warmup_steps)
        assert lrs_run[s.warmup_steps - 1] == pytest.approx(s.peak_lr)
        assert lrs_run[s.warmup_steps] < s.peak_lr
    again = explore_variants(recipe, _history(recipe), 6, study="s", explore_warmup=True)
    assert [x.model_dump() for x in again] == [x.model_dump() for x in variants]  # deterministic


def test_a_warmup_of_a_few_steps_keeps_one_at_least():
    recipe = recommend({**SMALL, "reference": {**SMALL["reference"], "steps": 1_600}})
    assert (recipe.stages[0].steps, recipe.stages[0].warmup_steps) == (200, 5)
    variants = explore_variants(recipe, [], 8, study="few", explore_warmup=True)
    ratios = [v.stages[0].warmup_ratio for v in variants]
    assert any(r * 200 < 1 for r in ratios), ratios  # floor(ratio x steps) would be no warmup at all
    assert all(v.stages[0].warmup_steps == max(1, math.floor(v.stages[0].warmup_ratio * 200 + 1e-9))
               for v in variants)


def test_the_history_tells_tpe_each_runs_warmup():
    """TPE's history holds each run's warmup as a factor of the recipe's, clamped into [1/8, 1]; a run with
    no warmup recorded counts as the recipe's own warmup (see explore._warmup_factor)."""
    recipe = recommend(bert_request(4096))
    ratio = recipe.stages[0].warmup_ratio

    def sweep(warmups):
        runs = [r.model_copy(update={"warmup_ratio": w}) for r, w in zip(_history(recipe), warmups, strict=False)]
        return [x.model_dump() for x in explore_variants(recipe, runs, 4, study="s", explore_warmup=True)]

    told = [0.025, 0.01, 0.025, 0.005, 0.02, None, 0.0, None]
    assert sweep(told) != sweep([ratio] * 8)  # the warmups tried steer the sampler
    assert sweep(told) == sweep([0.025, 0.01, 0.025, 0.005, 0.02, ratio, ratio / 8, None])
    assert sweep([2 * ratio, 0.01, 0.025, 0.005, 0.02, None, 0.0, None]) == sweep(told)  # longer: clamped to 1


def test_stages_without_a_warmup_keep_none():
    """A batch ramp: its first stage is warmup only, with no decay (the next stages carry the schedule on),
    and the later ones have no warmup. The first is shortened and holds the peak for the steps it frees;
    the others keep their phases. A recipe whose first stage has no warmup varies the LR only."""
    from tests.scaling_rules.test_ramp_schedule import _ramp

    ramp = _ramp()
    first = ramp.stages[0]
    assert first.decay_steps == 0 and first.warmup_ratio > 0 and all(s.warmup_ratio == 0 for s in ramp.stages[1:])
    for v in explore_variants(ramp, [], 3, study="ramp", explore_warmup=True):
        check_recipe(v, ["body", "explore"], computed=True)
        s = v.stages[0]
        assert s.warmup_steps < first.warmup_steps and s.decay_steps == 0
        assert s.const_steps == first.steps - s.warmup_steps
        assert s.const_ratio == pytest.approx(first.warmup_ratio - s.warmup_ratio)
        assert [[getattr(x, k) for k in _PHASES] for x in v.stages[1:]] == \
            [[getattr(x, k) for k in _PHASES] for x in ramp.stages[1:]]
    recipe = recommend(SMALL)
    s = recipe.stages[0]
    cold = recipe.model_copy(update={"stages": [validated(Stage, **{
        **s.model_dump(), "warmup_steps": 0, "warmup_ratio": 0.0, "decay_steps": s.decay_steps + s.warmup_steps})]})
    history = _history(recipe)
    assert [x.model_dump() for x in explore_variants(cold, history, 4, study="s", explore_warmup=True)] == \
        [x.model_dump() for x in explore_variants(cold, history, 4, study="s")]


def test_explore_warmup_needs_explore(api):
    c = api.client()
    study = new_study(c)
    for body in (bert_request(study=study, explore_warmup=True), bert_request(explore_warmup=True),
                 bert_request(study=study, explore=0, explore_warmup=True)):
        r = c.post("/v1/recommendations", json=body)
        assert_error(r, "validation_error")
        assert locs(r) == [["body", "explore_warmup"]], r.text
    r = c.post("/v1/recommendations/schedule.svg", json=bert_request(explore_warmup=True))
    assert_error(r, "validation_error")
    assert locs(r) == [["body", "explore_warmup"]]
    r = c.post("/v1/recommendations", json=bert_request(study=study, explore=2, explore_warmup="maybe"))
    assert_error(r, "validation_error")
    assert ["body", "explore_warmup"] in locs(r)
    assert c.get(f"/v1/studies/{study}").json()["n_runs"] == 0


def test_the_variant_runs_record_their_own_warmup(api):
    c = api.client()
    study = new_study(c)
    r = c.post("/v1/recommendations", json=bert_request(4096, study=study, explore=4, explore_warmup=True))
    assert r.status_code == 200, r.text
    out = RecommendationOut.model_validate(r.json())
    ratios = [v.stages[0].warmup_ratio for v in out.variants]
    assert len(set(ratios)) == 4 and all(x <= out.stages[0].warmup_ratio for x in ratios), ratios
    assert [run.warmup_ratio for run in out.variant_runs] == ratios
    assert [c.get(f"/v1/runs/{run.id}").json()["warmup_ratio"] for run in out.variant_runs] == ratios
    assert [run.recipe.stages[0].warmup_steps for run in out.variant_runs] == \
        [v.stages[0].warmup_steps for v in out.variants]
    plain = RecommendationOut.model_validate(
        c.post("/v1/recommendations", json=bert_request(4096, study=study, explore=4)).json())  # off by default
    assert {run.warmup_ratio for run in plain.variant_runs} == {plain.stages[0].warmup_ratio}


def test_variants_that_fail_the_recipe_checks_are_a_422_that_opens_no_run(api):
    """SGD at 9,800 (the rule's from a reference at 4,900): variants up to 2x, past the largest LR."""
    c = api.client()
    study = "out-of-range"  # fixed (the api's own namespace): the sampler is seeded from it, so the sweep is too
    assert c.post("/v1/studies", json={"name": study, "model_params": 1000}).status_code == 201
    body = {"model": {"params": 1000}, "study": study, "start_run": True, "explore": 8, "explore_warmup": True,
            "reference": {"batch_size": 256, "lr": 4900, "optimizer": "sgd", "steps": 1000},
            "target": {"batch_size": 512}}
    r = c.post("/v1/recommendations", json=body)
    assert_error(r, "validation_error")
    assert locs(r) == [["body", "explore"]] and "optimizer.lr is out of range" in r.text, r.text
    assert c.get(f"/v1/studies/{study}").json()["n_runs"] == 0


B = 1024  # the study's batch; the recipe is then asked for at 4B


def _ask(c, batch: int, study: str | None = None, **extra) -> RecommendationOut:
    r = c.post("/v1/recommendations", json=bert_request(batch, **({"study": study} if study else {}), **extra))
    assert r.status_code == 200, r.text
    return RecommendationOut.model_validate(r.json())


def _learn_from_a_warmup_sweep(c, study: str, longer_is_better: float) -> tuple[RecommendationOut, RecommendationOut,
                                                                               list[tuple[float, int]]]:
    """A sweep of 4 variants at batch B with explore_warmup, asked twice (each variant trained with two
    seeds: the F-test needs more runs than its model has terms); outcomes whose metric depends on the
    LR only, plus noise, plus ``longer_is_better`` x ln(the rule's warmup / the run's). Returns the rule's
    recipe at 4B, the study's, and the (warmup ratio, warmup steps) tried."""
    rule_at_b = _ask(c, B).stages[0]
    best_lr, rng, tried = rule_at_b.peak_lr * 1.3, random.Random(0), []
    sweeps = [_ask(c, B, study, start_run=True, explore=4, explore_warmup=True) for _ in range(2)]
    for out in sweeps:
        for run, recipe in zip([out.run, *out.variant_runs], [out, *out.variants], strict=True):
            assert run is not None and run.warmup_ratio == recipe.stages[0].warmup_ratio <= rule_at_b.warmup_ratio
            tried.append((run.warmup_ratio, recipe.stages[0].warmup_steps))
            metric = (2.0 + 0.1 * math.log(run.peak_lr / best_lr) ** 2 + rng.gauss(0, 0.002)
                      + longer_is_better * math.log(rule_at_b.warmup_ratio / run.warmup_ratio))
            done = c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "completed", "metric": metric})
            assert done.status_code == 200, done.text
    return _ask(c, 4 * B), _ask(c, 4 * B, study), tried


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_warmups_that_do_not_matter_give_the_shortest_tried(request, backend):
    for api in in_process_api(store_url(request, backend), f"warmup-flat-{backend}"):
        c = api.client()
        study = "warmup-flat"  # fixed (in a new namespace): the sampler is seeded from it, so the sweep is too
        assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
        rule, learned, tried = _learn_from_a_warmup_sweep(c, study, longer_is_better=0.0)
        shortest_ratio, shortest_steps = min(tried)
        assert shortest_ratio < rule.stages[0].warmup_ratio / 4 / 2  # the sweep went well below the rule
        stage = learned.stages[0]
        # The shortest tried, kept in steps (LAMB's linear-epoch rule) as the batch grows 4x (no second batch size).
        assert stage.warmup_ratio == pytest.approx(4 * shortest_ratio, rel=1e-3), learned.rationale
        assert abs(stage.warmup_steps - shortest_steps) <= 1
        assert stage.warmup_ratio < rule.stages[0].warmup_ratio
        assert any("did not differ beyond the noise" in line for line in learned.rationale), learned.rationale


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_warmup_that_matters_is_not_shortened(request, backend):
    for api in in_process_api(store_url(request, backend), f"warmup-longer-{backend}"):
        c = api.client()
        study = "warmup-longer"
        assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
        rule, learned, tried = _learn_from_a_warmup_sweep(c, study, longer_is_better=0.05)
        assert min(tried)[0] < rule.stages[0].warmup_ratio / 4 / 2
        assert learned.stages[0].warmup_ratio >= rule.stages[0].warmup_ratio * (1 - 1e-9), learned.rationale
        assert any("warmup varied at batch sizes 1024" in line for line in learned.rationale), learned.rationale
        assert not any("did not differ beyond the noise" in line for line in learned.rationale)
