"""A study's fitted LR-vs-batch exponent has the optimizer's own rule as its prior: linear (1) for SGD and
LARS, sqrt (1/2) for the Adam family. Before, every study was pulled toward sqrt: an SGD study that swept
its LR at the reference batch (which says nothing about the exponent) turned Goyal et al.'s linear 32x
into sqrt's 5.7x."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.scaling_rules import optimizers, recommend
from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence

GOYAL = {"model": {"params": 25_000_000, "family": "cnn"},
         "reference": {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "warmup_ratio": 0.05, "steps": 450_000},
         "target": {"batch_size": 8192}}


def runs(optimizer: str, batches: tuple[int, ...], best: dict[int, float], lrs=(0.5, 1.0, 2.0),
         curvature: float = 1.0) -> list[RunEvidence]:
    out = []
    for b in batches:
        for f in lrs:
            lr = best[b] * f * 1.1  # off the optimum: the fit has to find it
            out.append(RunEvidence(run_id=len(out) + 1, batch_size=b, lr=lr, outcome="completed", optimizer=optimizer,
                                   metric=1.0 + curvature * math.log(lr / best[b]) ** 2, warmup_ratio=0.05))
    return out


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("lars", 2.0)])
def test_a_sweep_at_the_reference_batch_keeps_the_linear_rule(optimizer: str, lr: float):
    req = {**GOYAL, "reference": {**GOYAL["reference"], "optimizer": optimizer, "lr": lr}}
    rule = recommend(req).stages[0].peak_lr
    assert rule == pytest.approx(lr * 32)  # no evidence: linear
    learned = recommend(req, evidence=runs(optimizer, (256,), {256: lr}))
    line = next(x for x in learned.rationale if x.startswith("evidence ("))
    assert "prior 1, the linear rule's; data weight 0.00" in line, line
    assert learned.stages[0].peak_lr == pytest.approx(rule, rel=1e-6)
    # a user who asks for the sqrt rule gets its prior too
    sqrt = recommend({**req, "rule": "sqrt"}, evidence=runs(optimizer, (256,), {256: lr}))
    assert sqrt.stages[0].peak_lr == pytest.approx(lr * math.sqrt(32), rel=1e-6)


def test_without_a_fit_the_re_anchoring_follows_the_rule():
    # two LRs show no U: the recipe re-anchors on the best run along the optimizer's own regime curve
    learned = recommend(GOYAL, evidence=runs("sgd", (256,), {256: 0.1}, lrs=(1 / 1.1, 0.5)))
    line = next(x for x in learned.rationale if x.startswith("evidence: re-anchored"))
    assert "along the linear regime curve" in line, line
    assert learned.stages[0].peak_lr == pytest.approx(3.2, rel=1e-9)


def test_sgd_runs_at_two_batches_extrapolate_nearer_the_linear_truth_than_under_the_sqrt_prior():
    """Shallow Us (the metric moves 1% over a 4x LR range) leave the prior in charge of much of the
    exponent; the optima grow linearly: the recipe 16x past the runs is within 10% of the truth, and closer
    than the same runs fitted under the Adam family's prior."""
    best = {256: 0.1, 512: 0.2}
    ev = runs("sgd", (256, 512), best, curvature=0.01)
    target = {**GOYAL, "target": {"batch_size": 8192}}
    truth = 0.1 * 8192 / 256
    linear = recommend(target, evidence=ev).stages[0].peak_lr
    assert abs(linear / truth - 1) < 0.10, linear
    model = EvidenceModel.from_runs(ev)
    assert model.rule == "linear" and model.fit is not None and model.fit.prior_exponent == 1.0
    as_adam = EvidenceModel.from_runs(ev, rule="sqrt").fit
    assert as_adam is not None
    assert abs(math.log(as_adam.optimum(8192) / truth)) > abs(math.log(linear / truth))


def test_the_rule_follows_the_units_and_adam_studies_are_unchanged():
    adam = runs("adamw", (256, 512), {256: 1e-4, 512: 1.41e-4})
    sgd = [r.model_copy(update={"run_id": r.run_id + 100}) for r in runs("sgd", (256, 512), {256: 0.1, 512: 0.2})]
    assert EvidenceModel.from_runs(adam).rule == "sqrt"
    mixed = EvidenceModel.from_runs(adam + sgd)
    assert mixed.rule == "sqrt"  # no rule shared: the papers' default
    assert mixed.in_units_of("sgd", "sgd").rule == "linear"
    assert mixed.in_units_of("adamw", "adamw").rule == "sqrt"
    only = EvidenceModel.from_runs(sgd)
    assert only.in_units_of("sgd", "sgd") is only  # its own units and rule: itself
    assert only.in_units_of("sgd", "sgd", "sqrt").rule == "sqrt"
    # the same Adam runs fit exactly as before the prior followed the rule
    assert EvidenceModel.from_runs(adam).fit == EvidenceModel.from_runs(adam, rule="sqrt").fit
    assert optimizers.rule_exponent("linear") == 1.0 and optimizers.rule_exponent("sqrt") == 0.5
    with pytest.raises(ValueError, match="unknown LR rule: 'cubic'"):
        EvidenceModel.from_runs(adam, rule="cubic")


def warmup_sweep(optimizer: str, batch: int, lr: float, best_ratio: float) -> list[RunEvidence]:
    """LR x warmup at one batch size, the warmup's optimum at ``best_ratio``."""
    out = []
    for f in (0.5, 1.0, 2.0):
        for w in (best_ratio / 2, best_ratio, best_ratio * 2):
            out.append(RunEvidence(run_id=len(out) + 1, batch_size=batch, lr=lr * f, outcome="completed",
                                   optimizer=optimizer, warmup_ratio=w,
                                   metric=1.0 + math.log(f) ** 2 + 0.5 * math.log(w / best_ratio) ** 2))
    return out


@pytest.mark.parametrize("optimizer, lr, ref_ratio, target, growth", [
    ("adamw", 1e-4, 0.01, 1024, 1.0),  # constant samples
    ("sgd", 0.1, 5 / 90, 1024, 1.0),  # constant epochs (Goyal et al.)
    ("lamb", 1e-3, 1 / 320, 1024, 4.0),  # linear-epoch (LAMB Table 4)
    ("lars", 2.0, 5 / 90, 32768, (1 + 32768 / 13700) / (1 + 256 / 13700)),  # epochs as 1 + B/B_w
])
def test_a_warmup_sweep_at_the_reference_batch_keeps_the_optimizers_warmup_rule(optimizer, lr, ref_ratio, target,
                                                                                  growth):
    """The study's best warmup at the reference batch is the reference's: the recipe's warmup at a larger
    batch is the rule's. Before, every optimizer's warmup curve had LAMB's linear-epoch prior, so an AdamW
    study 4x past its sweep warmed up 4x longer than AdamW's own rule (0.04 against 0.01)."""
    req = {"model": {"params": 25_000_000, "family": "other"},
           "reference": {"batch_size": 256, "lr": lr, "optimizer": optimizer, "warmup_ratio": ref_ratio,
                         "steps": 100_000},
           "target": {"batch_size": target}, "optimizer": optimizer}
    stage = recommend(req).stages[0]
    rule = stage.warmup_ratio
    assert abs(rule - min(ref_ratio * growth, 0.45)) * stage.steps <= 1  # to the whole step
    learned = recommend(req, evidence=warmup_sweep(optimizer, 256, lr, ref_ratio))
    line = next(x for x in learned.rationale if x.startswith("evidence (runs") and "warmup" in x)
    assert f"{optimizers.info(optimizer).warmup_rule}; data weight 0.00" in line, line
    assert learned.stages[0].warmup_ratio == pytest.approx(rule, rel=0.02), line


@settings(max_examples=80, deadline=None)
@given(optimizer=st.sampled_from(optimizers.RECIPE_NAMES), k=st.integers(2, 64), m=st.sampled_from([1, 2, 4]),
       ref_batch=st.sampled_from([64, 256, 1024]), ratio=st.sampled_from([0.002, 0.01, 0.05]),
       noise=st.sampled_from([None, 0.25, 4.0, 32.0]))
def test_runs_that_confirm_the_rule_leave_the_recipe_as_the_rule_makes_it(optimizer, k, m, ref_batch, ratio, noise):
    """A study whose sweep at one batch finds the rule's own LR and warmup there best has told the engine
    nothing new: for every optimizer, at every larger batch, with or without a measured critical batch
    (``noise`` x the reference batch: the rule bends its curve there), the recipe is the rule's."""
    lr = {"sgd": 0.1, "lars": 1.0}.get(optimizer, 1e-3)
    ref = {"batch_size": ref_batch, "lr": lr, "optimizer": optimizer, "warmup_ratio": ratio, "steps": 200_000}
    if noise is not None:
        ref["noise_scale"] = noise * ref_batch
    req = {"model": {"params": 25_000_000, "family": "other"}, "optimizer": optimizer, "reference": ref,
           "target": {"batch_size": ref_batch * m * k}}
    rule = recommend(req)
    at_runs = recommend({**req, "target": {"batch_size": ref_batch * m}}).stages[0]
    learned = recommend(req, evidence=warmup_sweep(optimizer, ref_batch * m, at_runs.peak_lr, at_runs.warmup_ratio))
    a, b = rule.stages[0], learned.stages[0]
    assert b.peak_lr == pytest.approx(a.peak_lr, rel=1e-6), learned.rationale
    assert abs(b.warmup_steps - a.warmup_steps) <= 1, learned.rationale
