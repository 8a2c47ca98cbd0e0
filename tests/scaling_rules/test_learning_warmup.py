"""Issue #11 item 3: the evidence model learns the warmup as well as the LR.

Synthetic truth: the best LR follows the sqrt rule, but the best warmup ratio grows as batch^0.3,
not linearly (the linear-epoch rule of LAMB Table 4 overshoots 10x at 32x the reference batch).
"""

import math
import random

import pytest

from largebatch.scaling_rules import priors, recommend
from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence

B0, LR0, R0 = 256, 2e-3, 0.01


def best_warmup(batch: int) -> float:
    return R0 * (batch / B0) ** 0.3


def metric(batch: int, lr: float, ratio: float, rng: random.Random) -> float:
    best_lr = LR0 * math.sqrt(batch / B0)
    return (2.0 + 0.02 * math.log2(batch / B0) + 0.1 * math.log(lr / best_lr) ** 2
            + 0.05 * math.log(ratio / best_warmup(batch)) ** 2 + rng.gauss(0, 0.002))


def sweep(batches, ratios_of_rule=(0.1, 0.3, 1.0), lr_factors=(0.6, 1.0, 1.6), seed=0) -> list[RunEvidence]:
    rng, runs = random.Random(seed), []
    for b in batches:
        rule = R0 * b / B0
        for f in lr_factors:
            for q in ratios_of_rule:
                lr = LR0 * math.sqrt(b / B0) * f
                runs.append(RunEvidence(batch_size=b, lr=lr, warmup_ratio=rule * q, outcome="completed",
                                        metric=metric(b, lr, rule * q, rng), run_id=len(runs) + 1))
    return runs


def request(batch: int) -> dict:
    return {"model": {"params": 10_000_000},
            "reference": {"batch_size": B0, "lr": LR0, "optimizer": "lamb", "warmup_ratio": R0, "steps": 100_000},
            "target": {"batch_size": batch}}


@pytest.mark.parametrize("seed", range(5))
def test_learns_the_warmup_at_a_batch_never_run(seed):
    runs = sweep((512, 2048), seed=seed)
    model = EvidenceModel.from_runs(runs)
    fit = model.warmup_fit
    assert fit is not None and abs(fit.exponent - 0.3) < max(3 * fit.exponent_sd, 0.1)
    learned = model.warmup_ratio_at(8192)
    assert learned == pytest.approx(best_warmup(8192), rel=0.25)
    recipe = recommend(request(8192), evidence=runs)
    stage = recipe.stages[0]
    rule = R0 * 8192 / B0
    assert abs(math.log(stage.warmup_ratio / best_warmup(8192))) < abs(math.log(rule / best_warmup(8192))) / 4
    assert stage.warmup_steps == math.floor(stage.warmup_ratio * stage.steps + 1e-9)
    text = " ".join(recipe.rationale)
    assert "warmup varied at batch sizes 512, 2048" in text and "the rule gave 0.32" in text
    # the LR is still learned (and the warmup variation did not bend it off the sqrt truth)
    assert model.fit is not None and abs(model.fit.exponent - 0.5) < 0.1


def test_no_warmup_variation_keeps_the_rule():
    runs = sweep((512, 2048), ratios_of_rule=(1.0,))
    model = EvidenceModel.from_runs(runs)
    assert model.warmup_fit is None and model.warmup_ratio_at(8192) is None
    assert recommend(request(8192), evidence=runs).stages[0].warmup_ratio == pytest.approx(R0 * 8192 / B0)


def test_one_batch_size_leaves_the_exponent_to_the_prior():
    runs = sweep((1024,))
    fit = EvidenceModel.from_runs(runs).warmup_fit
    assert fit is not None and fit.data_weight == 0.0
    assert fit.exponent == pytest.approx(priors.warmup_power(fit.rule), abs=1e-6) and fit.rule == "linear-epoch"
    # the level is the data's: at the batch that was swept, the measured optimum
    assert fit.ratio(1024) == pytest.approx(best_warmup(1024), rel=0.15)


def test_monotone_concave_and_flat_warmup_evidence():
    """Shorter always better: the answer goes below what was tried (by at most 2x). No minimum at
    all (cap-shaped): the better end of what was tried. No effect beyond the noise: the shortest tried."""
    points = [(512, 0.01), (512, 0.02), (512, 0.04), (2048, 0.02), (2048, 0.08)]
    rng = random.Random(0)
    monotone = [RunEvidence(batch_size=b, lr=LR0, warmup_ratio=r, outcome="completed", run_id=i,
                            metric=2.0 + 0.05 * math.log(r) + rng.gauss(0, 1e-4)) for i, (b, r) in enumerate(points)]
    model = EvidenceModel.from_runs(monotone)
    assert model.warmup_ratio_at(512) < 0.01 and model.warmup_ratio_at(2048) < 0.02
    concave = [RunEvidence(batch_size=b, lr=LR0, warmup_ratio=r, outcome="completed", run_id=i,
                           metric=2.0 - 0.05 * math.log(r / 0.015) ** 2) for i, (b, r) in enumerate(points)]
    fit = EvidenceModel.from_runs(concave).warmup_fit
    assert fit is not None and fit.curvature < 0
    assert fit.log_c in fit.u_range  # an end of what was tried, not beyond
    flat = [RunEvidence(batch_size=b, lr=LR0, warmup_ratio=r, outcome="completed", run_id=i,
                        metric=2.0 + rng.gauss(0, 1e-3)) for i, (b, r) in enumerate(points * 2)]
    fit = EvidenceModel.from_runs(flat).warmup_fit
    assert fit is not None and fit.flat and fit.effect_p > 0.05
    # the shortest tried in the prior's coordinates (constant steps): 0.02 at 2048, so 0.08 at 8192
    assert fit.log_c == pytest.approx(min(math.log(r) - fit.exponent * math.log(b) for b, r in points))
    assert fit.ratio(8192) == pytest.approx(0.02 * (8192 / 2048) ** fit.exponent)


def flat_runs(ratios_of_rule, seed=0) -> list[RunEvidence]:
    """A sweep whose warmup changes nothing: only the LR's U and the noise."""
    rng = random.Random(seed)
    runs = sweep((512, 2048), ratios_of_rule=ratios_of_rule, seed=seed)
    for r in runs:
        best_lr = LR0 * math.sqrt(r.batch_size / B0)
        r.metric = 2.0 + 0.1 * math.log(r.lr / best_lr) ** 2 + rng.gauss(0, 0.002)
    return runs


def test_warmup_that_changes_nothing_gives_the_shortest_tried_in_steps():
    """Warmups of 0.05x to 1x the rule's, all as good: the recipe takes the shortest in steps (0.05x the
    rule's ratio), and says why; a study that only tried warmups longer than the rule's keeps the rule."""
    out = recommend(request(8192), evidence=flat_runs((0.05, 0.3, 1.0)))
    rule = R0 * 8192 / B0
    fit = EvidenceModel.from_runs(flat_runs((0.05, 0.3, 1.0))).warmup_fit
    assert fit is not None and fit.flat
    shortest_at_2048 = 0.05 * R0 * 2048 / B0
    assert out.stages[0].warmup_ratio == pytest.approx(shortest_at_2048 * 4 ** fit.exponent, rel=1e-6)
    assert abs(fit.exponent - 1) < 0.15 and out.stages[0].warmup_ratio < 0.2 * rule
    assert any("did not differ beyond the noise" in line and "shortest tried was enough" in line
               for line in out.rationale)
    longer = recommend(request(8192), evidence=flat_runs((1.5, 2.0, 3.0)))
    assert longer.stages[0].warmup_ratio == pytest.approx(rule)
    assert any("so it stands" in line for line in longer.rationale)


def test_optimum_stays_near_the_warmups_tried():
    """A U whose bottom lies far below every warmup tried: the answer is at most 2x outside them."""
    rng = random.Random(1)
    runs = [RunEvidence(batch_size=512, lr=LR0, warmup_ratio=r, outcome="completed", run_id=i,
                        metric=2.0 + 0.05 * math.log(r / 1e-4) ** 2 + rng.gauss(0, 1e-4))
            for i, r in enumerate([0.05, 0.1, 0.2])]
    model = EvidenceModel.from_runs(runs)
    assert model.warmup_ratio_at(512) == pytest.approx(0.05 / 2, rel=1e-6)


def test_a_given_warmup_scale_wins_over_evidence():
    runs = sweep((512, 2048))
    req = request(8192)
    del req["target"]
    req["stages"] = [{"batch_size": 8192, "warmup_scale": 2.0}]
    assert recommend(req, evidence=runs).stages[0].warmup_ratio == pytest.approx(2 * R0)
